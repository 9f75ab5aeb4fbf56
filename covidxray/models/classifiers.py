"""Chest X-ray classifiers (family ``classifier``): torchvision architectures with a native 1-channel
stem, and the small CNN the GAN benchmarks use.

Papers:

* ``resnet18`` - K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016 (arXiv:1512.03385).
* ``densenet121`` - G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, "Densely Connected
  Convolutional Networks", CVPR 2017 (arXiv:1608.06993); the backbone of CheXNet (Rajpurkar et al.
  2017, arXiv:1711.05225).
* ``inception_v3`` - C. Szegedy, V. Vanhoucke, S. Ioffe, J. Shlens, Z. Wojna, "Rethinking the
  Inception Architecture for Computer Vision", CVPR 2016 (arXiv:1512.00567); the seed project's
  classifier (with Monte-Carlo dropout, ``--set model.mc_dropout=0.5``).
* ``smallcnn`` - four stride-2 convolution blocks (16-32-64-128 channels), a fast 64 px classifier
  for benchmarks (GAN-train/GAN-test, Shmelkov et al., ECCV 2018).

Every model is a :class:`Classifier`: a backbone that pools each image to a feature vector, a
dropout layer and one linear head. Grayscale stays 1 channel: the first convolution of each
torchvision backbone takes 1 channel (initialised as torchvision initialises that layer). With
``model.mc_dropout = p`` the dropout layer can stay on at evaluation: ``net(x, mc_samples=K)`` runs
the backbone once and the head K times with independent dropout masks (Gal & Ghahramani, ICML 2016),
returning logits of shape (K, N, C).

Pretrained weights are never downloaded: :func:`load_pretrained` reads a torchvision ``state_dict``
file the user saved once (``docs/classifiers.md``), sums its 3-channel first-layer weights to 1
channel (the response to a gray image replicated to RGB) and leaves the ImageNet head out.

Example:
    >>> import torch
    >>> from covidxray.config import resolve_config
    >>> from covidxray.models import DataSpec, get_model
    >>> cfg = resolve_config("resnet18")
    >>> net = get_model("resnet18").build(cfg, DataSpec.example(64, n_classes=3))["net"]
    >>> tuple(net(torch.zeros(2, 1, 64, 64)).shape)
    (2, 3)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from covidxray.errors import CovidXrayError
from covidxray.models.registry import DataSpec, register_model


class Classifier(nn.Module):
    """A backbone pooling each image to ``n_features`` values, dropout, and a linear head.

    Args:
        backbone: maps N x 1 x S x S images in [-1, 1] to N x ``n_features``.
        n_features: length of the pooled feature vector.
        n_classes: number of classes (logits per image).
        dropout: dropout probability before the head (training only unless ``mc_dropout``).
        mc_dropout: keep that dropout available at evaluation (``forward(x, mc_samples=K)``).
        arch: name of the torchvision architecture (for :func:`load_pretrained`), or ``""``.
        stem: attribute path of the backbone's first convolution, e.g. ``"conv1"``.
        head_keys: prefixes of a torchvision state_dict's head, left out when loading it.
    """

    def __init__(self, backbone: nn.Module, n_features: int, n_classes: int, dropout: float = 0.0,
                 mc_dropout: bool = False, arch: str = "", stem: str = "", head_keys: tuple[str, ...] = ()):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        self.backbone, self.n_features, self.n_classes = backbone, n_features, n_classes
        self.p, self.mc_dropout = float(dropout), bool(mc_dropout)
        self.fc = nn.Linear(n_features, n_classes)
        self.arch, self.stem, self.head_keys = arch, stem, head_keys

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, n_features) of images (N, 1, S, S)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grayscale images N x 1 x H x W, got shape {tuple(x.shape)}")
        return self.backbone(x)

    def head(self, h: torch.Tensor, mc_samples: int = 1) -> torch.Tensor:
        """Logits from pooled features: (N, C), or (K, N, C) for ``mc_samples = K > 1``."""
        if mc_samples == 1:
            return self.fc(F.dropout(h, self.p, training=self.training) if self.p > 0 else h)
        if not self.mc_dropout:
            raise ValueError("mc_samples > 1 needs a model built with Monte-Carlo dropout (model.mc_dropout > 0)")
        hk = h.unsqueeze(0).expand(mc_samples, *h.shape)
        return self.fc(F.dropout(hk, self.p, training=True))

    def forward(self, x: torch.Tensor, mc_samples: int = 1) -> torch.Tensor:
        return self.head(self.features(x), mc_samples)


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------


def _kaiming_conv(c_out: int, kernel: int, stride: int, padding: int) -> nn.Conv2d:
    conv = nn.Conv2d(1, c_out, kernel, stride, padding, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # torchvision's rule for these stems
    return conv


def _resnet18_backbone() -> tuple[nn.Module, int]:
    from torchvision.models import resnet18  # local: torchvision (~1 s); every model lookup imports this module

    net = resnet18(weights=None)
    net.conv1 = _kaiming_conv(64, 7, 2, 3)
    n = net.fc.in_features
    net.fc = nn.Identity()
    return net, n


def _densenet121_backbone() -> tuple[nn.Module, int]:
    from torchvision.models import densenet121  # local: torchvision (~1 s); every model lookup imports this module

    net = densenet121(weights=None)
    net.features.conv0 = _kaiming_conv(64, 7, 2, 3)
    n = net.classifier.in_features
    net.classifier = nn.Identity()
    return net, n


def _inception_v3_backbone() -> tuple[nn.Module, int]:
    from torchvision.models import inception_v3  # local: torchvision (~1 s); every model lookup imports this module

    # No auxiliary head, no input transform (that one expects ImageNet-normalised RGB), no built-in
    # dropout: the Classifier's own dropout (model.dropout / model.mc_dropout) takes its place.
    net = inception_v3(weights=None, aux_logits=False, transform_input=False, init_weights=True, dropout=0.0)
    conv = nn.Conv2d(1, 32, 3, 2, bias=False)
    nn.init.trunc_normal_(conv.weight, mean=0.0, std=0.1, a=-2, b=2)  # torchvision's Inception init
    net.Conv2d_1a_3x3.conv = conv
    n = net.fc.in_features
    net.fc = nn.Identity()
    return net, n


class SmallCNNBackbone(nn.Module):
    """Four blocks of (3x3 conv, BN, ReLU, 3x3 stride-2 conv, BN, ReLU), widths ``w``..``8w``, then a
    global average pool."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, c_in = [], 1
        for i in range(4):
            c = width * 2**i
            layers += [nn.Conv2d(c_in, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Conv2d(c, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.n_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))


def _classifier(cfg, data: DataSpec, backbone: Callable[[], tuple[nn.Module, int]], arch: str, stem: str,
                head_keys: tuple[str, ...]) -> dict[str, nn.Module]:
    net, n = backbone()
    p = cfg.model.mc_dropout if cfg.model.mc_dropout > 0 else cfg.model.dropout
    return {"net": Classifier(net, n, data.n_classes, p, cfg.model.mc_dropout > 0, arch, stem, head_keys)}


@register_model(
    "resnet18",
    family="classifier",
    paper="He et al., ResNet, CVPR 2016 (arXiv:1512.03385)",
    summary="ResNet-18 classifier, 1-channel stem, 64-299 px; optional MC dropout and pretrained weights file",
    min_image_size=32,
)
def build_resnet18(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"net"}``: torchvision's ResNet-18 (He et al., CVPR 2016) with a 1-channel 7x7 stem.

    Reads ``model.dropout``, ``model.mc_dropout`` (defaults: ``covidxray/config/classifier.py``); the
    number of classes comes from ``data``. 11.2 M parameters; any side >= 32 px.
    """
    return _classifier(cfg, data, _resnet18_backbone, "resnet18", "conv1", ("fc.",))


@register_model(
    "densenet121",
    family="classifier",
    paper="Huang et al., DenseNet, CVPR 2017 (arXiv:1608.06993); CheXNet's backbone (Rajpurkar et al. 2017)",
    summary="DenseNet-121 classifier (the CheXNet backbone), 1-channel stem, 64-299 px",
    min_image_size=32,
)
def build_densenet121(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"net"}``: torchvision's DenseNet-121 (Huang et al., CVPR 2017) with a 1-channel stem.

    Reads ``model.dropout``, ``model.mc_dropout``; 7.0 M parameters; any side >= 32 px.
    """
    return _classifier(cfg, data, _densenet121_backbone, "densenet121", "features.conv0", ("classifier.",))


@register_model(
    "inception_v3",
    family="classifier",
    paper="Szegedy et al., Inception-v3, CVPR 2016 (arXiv:1512.00567); the seed's (MC-dropout) classifier",
    summary="Inception-v3 classifier, 1-channel stem, no auxiliary head, 75-299 px",
    min_image_size=75,
)
def build_inception_v3(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"net"}``: torchvision's Inception-v3 (Szegedy et al., CVPR 2016), 1-channel stem, no
    auxiliary head; its dropout before the head is ``model.dropout`` (configs/inception_v3.yaml: 0.5,
    torchvision's value) or ``model.mc_dropout``. 21.8 M parameters; sides 75-299 px (299 is its design).
    """
    return _classifier(cfg, data, _inception_v3_backbone, "inception_v3", "Conv2d_1a_3x3.conv",
                       ("fc.", "AuxLogits."))


@register_model(
    "smallcnn",
    family="classifier",
    paper="a small CNN for GAN-train/GAN-test scores (Shmelkov, Schmid & Alahari, ECCV 2018)",
    summary="4-block CNN (16-128 channels, 0.4 M parameters), fast at 64 px; the demo and evaluate --downstream use it",
)
def build_smallcnn(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"net"}``: :class:`SmallCNNBackbone` (width 16) + dropout (configs/smallcnn.yaml: 0.3) + linear.

    No torchvision counterpart, so ``model.pretrained`` does not apply. Any side >= 16 px.
    """
    def backbone() -> tuple[nn.Module, int]:
        net = SmallCNNBackbone(16)
        return net, net.n_features

    return _classifier(cfg, data, backbone, "", "", ())


# --------------------------------------------------------------------------------------------
# Pretrained weights from a file
# --------------------------------------------------------------------------------------------

# torchvision's own DenseNet files (the URLs of its weights enum) spell "norm.1" where the modules say
# "norm1"; torchvision renames them when it loads such a file, and so does this.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CovidXrayError(f"pretrained weights file {path} does not exist",
                             "Save torchvision's weights to a file once (docs/classifiers.md) and pass its path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, pickled code...
        raise CovidXrayError(f"{path} is not a readable torch state_dict file ({type(exc).__name__})") from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        blob = blob["state_dict"]
    if not isinstance(blob, dict) or not blob or not all(torch.is_tensor(v) for v in blob.values()):
        raise CovidXrayError(f"{path} holds no state_dict (a mapping of names to tensors)",
                             "Save it with torch.save(model.state_dict(), PATH)")
    return {k.removeprefix("module."): v for k, v in blob.items()}


def load_pretrained(net: Classifier, path: str | os.PathLike) -> dict[str, int]:
    """Load a torchvision ``state_dict`` file into ``net``'s backbone (the head stays as initialised).

    The first convolution's 3-channel weights are summed over the channels (a 1-channel file is taken
    as it is); keys of the ImageNet head are left out; any other missing, unexpected or mis-shaped
    key is refused with one line naming it.

    Returns:
        counts: ``{"loaded": tensors loaded, "skipped_head": head tensors left out}``.
    """
    path = Path(path)
    if not net.arch:
        raise CovidXrayError("model.pretrained applies to the torchvision classifiers (resnet18, densenet121, "
                             "inception_v3) only", "Drop --set model.pretrained")
    state = _read_state_dict(path)
    if net.arch == "densenet121":
        state = {(_DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}
    head = [k for k in state if k.startswith(net.head_keys)]
    state = {k: v for k, v in state.items() if k not in head}
    stem_key = f"{net.stem}.weight"
    own = net.backbone.state_dict()
    if stem_key in state:
        w = state[stem_key]
        if w.ndim == 4 and w.shape[1] == 3:
            state[stem_key] = w.sum(1, keepdim=True)
        elif w.ndim != 4 or w.shape[1] != 1:
            raise CovidXrayError(f"{path}: first-layer weights '{stem_key}' have shape {tuple(w.shape)}; "
                                 f"expected 3 (RGB) or 1 input channels")
    for key in own:  # files saved before PyTorch 0.4.1 have no BatchNorm step counters: start them at 0
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(own[key])
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CovidXrayError(f"{path} does not fit {net.arch}: keys {'; '.join(parts)}",
                             f"Pass a state_dict of torchvision's {net.arch}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CovidXrayError(f"{path} does not fit {net.arch}: '{key}' has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(own[key].shape)}")
    net.backbone.load_state_dict(state, strict=True)
    return {"loaded": len(state), "skipped_head": len(head)}
