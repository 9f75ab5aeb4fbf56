"""Class-conditional GANs: ``cgan`` (projection discriminator) and ``acgan`` (auxiliary classifier).

Papers:

* M. Mirza, S. Osindero, "Conditional Generative Adversarial Nets", 2014 (arXiv:1411.1784):
  G and D both receive the class label.
* T. Miyato, M. Koyama, "cGANs with Projection Discriminator", ICLR 2018 (arXiv:1802.05637):
  how ``cgan``'s D receives the label.
* A. Odena, C. Olah, J. Shlens, "Conditional Image Synthesis with Auxiliary Classifier GANs",
  ICML 2017 (arXiv:1610.09585): ``acgan``'s D predicts the label instead of receiving it.

Architecture (grayscale, square images of 64, 128 or 256 px):

* G (:class:`ConditionalGenerator`, both models): the DCGAN generator's layers with every
  BatchNorm made class-conditional (per-class scale and shift), as the projection paper's G.
* D trunk: :func:`~covidxray.models.dcgan.dcgan_trunk` (spectral norm by default), then the
  features at 4x4 are summed over space into ``h`` (N, C) (as in SNGAN/projection D).
* ``cgan`` head (:class:`ProjectionDiscriminator`): ``logit = w.h + b + <embed_D(y), h>``.
  The label enters D only through this inner product (a "projection"), not as an extra input map.
* ``acgan`` head (:class:`ACGANDiscriminator`): ``logit = w.h + b`` and ``class_logits = W_c h``;
  D ignores ``y``.

Monte-Carlo dropout (``arch.d_dropout = p``): dropout with probability ``p`` on ``h`` before the
head(s). ``D(x, y, mc_samples=1)`` drops only in training mode (plain dropout);
``D(x, y, mc_samples=K)`` with K > 1 runs the trunk once and the head K times with dropout
*always on* (also in eval mode), returning ``logits`` of shape (K, N) - the samples the
uncertainty regulariser needs. With ``p = 0`` the K rows are identical.

Example:
    >>> import torch
    >>> G = ConditionalGenerator(64, latent_dim=100, n_classes=3)
    >>> D = ProjectionDiscriminator(64, n_classes=3, dropout=0.3)
    >>> y = torch.tensor([0, 2])
    >>> x = G(torch.randn(2, 100), y)
    >>> tuple(x.shape), tuple(D(x, y).logits.shape), tuple(D(x, y, mc_samples=8).logits.shape)
    ((2, 1, 64, 64), (2,), (8, 2))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covidxray.models.common import DOutput, check_labels, maybe_sn
from covidxray.models.dcgan import DCGANGenerator, dcgan_init, dcgan_trunk
from covidxray.models.registry import DataSpec, register_model

def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Wrap every convolution and linear layer of ``module`` in spectral norm, in place; returns it.

    Used to add SN to an already initialised network (e.g. a DCGAN generator), so its
    initialisation is kept as the un-normalised weight.
    """
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.utils.parametrizations.spectral_norm(m)
    return module


def init_head(layer: nn.Module) -> nn.Module:
    """Xavier-uniform weight, zero bias, for a linear/embedding/conv head *before* it is wrapped in SN.

    (Initialising after :func:`maybe_sn` would be silently lost: under a parametrization
    ``layer.weight`` is recomputed on each access.)
    """
    nn.init.xavier_uniform_(layer.weight)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def check_int_labels(y: torch.Tensor | None, n: int, n_classes: int) -> torch.Tensor:
    """:func:`~covidxray.models.common.check_labels` plus an integer-dtype check (no host sync).

    Values must lie in ``[0, n_classes)``; that is not checked here (it would need a device sync).
    """
    y = check_labels(y, n, n_classes)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels y must be integer class indices in [0, {n_classes}), got dtype {y.dtype}")
    return y


def mc_dropout(h: torch.Tensor, p: float, mc_samples: int, training: bool) -> torch.Tensor:
    """Dropout on pooled features ``h`` (N, C) for a single pass or K Monte-Carlo passes.

    Returns (N, C) when ``mc_samples == 1`` (dropout only if ``training``), else (K, N, C) with K
    independent dropout masks, always stochastic (the trunk's work is not repeated).
    """
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
    if mc_samples == 1:
        return F.dropout(h, p, training=training) if p > 0 else h
    hk = h.unsqueeze(0).expand(mc_samples, *h.shape)
    return F.dropout(hk, p, training=True) if p > 0 else hk


def check_image(x: torch.Tensor, image_size: int) -> None:
    if x.ndim != 4 or x.shape[-1] != image_size or x.shape[-2] != image_size:
        raise ValueError(f"x must have shape (N, C, {image_size}, {image_size}), got {tuple(x.shape)}")


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm whose scale and shift depend on the class (de Vries et al. 2017; Miyato & Koyama 2018's G).

    ``out = BN(x) * gamma[y] + beta[y]`` with BN without its own affine parameters; ``gamma``
    starts at N(1, 0.02) and ``beta`` at 0, the DCGAN initialisation of BatchNorm.
    """

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Embedding(n_classes, channels)
        self.beta = nn.Embedding(n_classes, channels)
        nn.init.normal_(self.gamma.weight, 1.0, 0.02)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        gamma, beta = self.gamma(y)[:, :, None, None].to(h.dtype), self.beta(y)[:, :, None, None].to(h.dtype)
        return torch.addcmul(beta, h, gamma)  # beta + h * gamma in one kernel


class ConditionalGenerator(nn.Module):
    """DCGAN generator conditioned on a class label: ``G(z, y)``, ``z`` (N, latent_dim), ``y`` (N,) ints.

    The layers of a :class:`~covidxray.models.dcgan.DCGANGenerator` with every BatchNorm replaced by
    a :class:`ConditionalBatchNorm2d`: the label sets each layer's per-channel scale and shift, as in
    the generator of the projection-discriminator paper (Miyato & Koyama 2018).

    Why not concatenate a label embedding to ``z`` (the textbook cGAN)? A learned per-class input
    is a free constant path into the first layer: on our X-rays G learned to draw the 4x4 layout
    from it and to ignore ``z``, and every class collapsed to one image (measured: per-class pixel
    std across ``z`` fell to 6-11 grey levels vs 46 in the real data, also with an unconditional D).
    With conditional BatchNorm the spatial structure can only come from ``z``.

    Args:
        image_size: output side, 64, 128 or 256.
        latent_dim: length of z (what the trainer samples).
        n_classes: number of classes (labels in ``[0, n_classes)``).
        channels: width of the last hidden layer (see DCGANGenerator).
        max_channels: cap on any layer's width.
        spectral_norm: spectral norm on every (transposed) convolution, added after the DCGAN init.
    """

    def __init__(self, image_size: int = 128, latent_dim: int = 100, n_classes: int = 3,
                 channels: int = 64, max_channels: int = 512, spectral_norm: bool = False):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 for a conditional generator, got {n_classes}")
        self.image_size, self.latent_dim, self.n_classes = image_size, latent_dim, n_classes
        base = DCGANGenerator(image_size, latent_dim, channels, max_channels)  # DCGAN-initialised layers
        self.layers = nn.ModuleList(
            ConditionalBatchNorm2d(m.num_features, n_classes) if isinstance(m, nn.BatchNorm2d) else m
            for m in base.net
        )
        if spectral_norm:
            apply_spectral_norm(self.layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        y = check_int_labels(y, z.shape[0], self.n_classes)
        x = z[:, :, None, None]
        for layer in self.layers:
            x = layer(x, y) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


class _PooledDiscriminator(nn.Module):
    """DCGAN trunk -> LeakyReLU features at 4x4 -> sum over space ``h`` (N, C); heads in subclasses."""

    def __init__(self, image_size: int, n_classes: int, channels: int, max_channels: int, in_channels: int,
                 spectral_norm: bool, dropout: float):
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1 for a conditional discriminator, got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size, self.n_classes, self.dropout = image_size, n_classes, float(dropout)
        self.trunk, self.width = dcgan_trunk(image_size, channels, max_channels, in_channels, spectral_norm)
        if not spectral_norm:
            dcgan_init(self.trunk)  # with SN the trunk keeps PyTorch's default init (documented in docs/models.md)

    def features(self, x: torch.Tensor, mc_samples: int) -> torch.Tensor:
        """Pooled trunk features after dropout: (N, C), or (K, N, C) for ``mc_samples = K > 1``."""
        h = self.trunk(x).sum(dim=(2, 3))
        return mc_dropout(h, self.dropout, mc_samples, self.training)


class ProjectionDiscriminator(_PooledDiscriminator):
    """Projection discriminator (Miyato & Koyama 2018) on the DCGAN trunk: ``D(x, y, mc_samples=1)``.

    ``logits = linear(h) + <embed(y), h>`` with ``h`` the spatially summed trunk features; the label
    is required. Returns :class:`DOutput` with ``logits`` (N,), or (K, N) for ``mc_samples = K > 1``.

    Args:
        image_size: input side, 64, 128 or 256.
        n_classes: number of classes.
        channels: width of the first layer; later layers double it up to ``max_channels``.
        max_channels: cap on any layer's width.
        in_channels: image channels (1 for grayscale X-rays).
        spectral_norm: SN on every layer, the embedding included (replaces BatchNorm).
        dropout: Monte-Carlo dropout probability on ``h`` (0 = none).
    """

    def __init__(self, image_size: int = 128, n_classes: int = 3, channels: int = 64, max_channels: int = 512,
                 in_channels: int = 1, spectral_norm: bool = True, dropout: float = 0.0):
        super().__init__(image_size, n_classes, channels, max_channels, in_channels, spectral_norm, dropout)
        self.linear = maybe_sn(init_head(nn.Linear(self.width, 1)), spectral_norm)
        self.embed = maybe_sn(init_head(nn.Embedding(n_classes, self.width)), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mc_samples: int = 1) -> DOutput:
        check_image(x, self.image_size)
        y = check_int_labels(y, x.shape[0], self.n_classes)
        h = self.features(x, mc_samples)  # (N, C) or (K, N, C)
        e = self.embed(y).to(h.dtype)  # (N, C), broadcasts over K
        return DOutput(self.linear(h).squeeze(-1) + (e * h).sum(dim=-1))


class ACGANDiscriminator(_PooledDiscriminator):
    """Auxiliary-classifier discriminator (Odena et al. 2017) on the DCGAN trunk: ``D(x, y=None, mc_samples=1)``.

    Two linear heads on the pooled features ``h``: real/fake ``logits`` (N,) and ``class_logits``
    (N, n_classes). ``y`` is accepted and ignored (the class is predicted, not given). With
    ``mc_samples = K > 1``: ``logits`` (K, N) and ``class_logits`` from the first of the K dropout
    passes (N, n_classes), so the auxiliary loss can share the pass.

    With ``twin=True`` a third head, the twin classifier of TAC-GAN (Gong et al., NeurIPS 2019,
    arXiv:1907.02690), gives ``twin_logits`` (N, n_classes) on the same features: it is trained to
    classify generated images only, and G is pushed away from what it finds easy to classify.

    Args: as :class:`ProjectionDiscriminator`, plus ``twin``.
    """

    def __init__(self, image_size: int = 128, n_classes: int = 3, channels: int = 64, max_channels: int = 512,
                 in_channels: int = 1, spectral_norm: bool = True, dropout: float = 0.0, twin: bool = False):
        super().__init__(image_size, n_classes, channels, max_channels, in_channels, spectral_norm, dropout)
        self.linear = maybe_sn(init_head(nn.Linear(self.width, 1)), spectral_norm)
        self.classifier = maybe_sn(init_head(nn.Linear(self.width, n_classes)), spectral_norm)
        self.twin = maybe_sn(init_head(nn.Linear(self.width, n_classes)), spectral_norm) if twin else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mc_samples: int = 1) -> DOutput:
        check_image(x, self.image_size)
        h = self.features(x, mc_samples)
        first = h if h.ndim == 2 else h[0]
        return DOutput(self.linear(h).squeeze(-1), class_logits=self.classifier(first),
                       twin_logits=self.twin(first) if self.twin is not None else None)


def conditional_generator(cfg, data: DataSpec) -> ConditionalGenerator:
    """The :class:`ConditionalGenerator` of a resolved config (shared by cgan, acgan and unetcgan)."""
    arch = cfg.arch
    return ConditionalGenerator(data.image_size, arch.latent_dim, data.n_classes,
                                arch.g_channels, arch.max_channels, arch.g_spectral_norm)


@register_model(
    "cgan",
    family="gan",
    features=("uncertainty",),
    paper="Mirza & Osindero, Conditional GAN, 2014 (arXiv:1411.1784); projection D: Miyato & Koyama, ICLR 2018",
    summary="class-conditional DCGAN: class-conditional BatchNorm in G, SN projection discriminator, optional MC dropout",
    conditional=True,
)
def build_cgan(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"G", "D"}`` of the cgan model (Mirza & Osindero 2014, arXiv:1411.1784).

    G: :class:`ConditionalGenerator` (DCGAN G with class-conditional BatchNorm); D: :class:`ProjectionDiscriminator`
    (DCGAN trunk + projection head, Miyato & Koyama 2018). Reads the image side and number of
    classes from ``data``, and ``arch.latent_dim``, ``arch.g_channels``, ``arch.d_channels``,
    ``arch.max_channels``, ``arch.g_spectral_norm``, ``arch.d_spectral_norm`` (configs/cgan.yaml turns
    it on), ``arch.d_dropout`` (defaults: ``covidxray/config/gan.py``).
    """
    size, arch, k = data.image_size, cfg.arch, data.n_classes
    return {
        "G": conditional_generator(cfg, data),
        "D": ProjectionDiscriminator(size, k, arch.d_channels, arch.max_channels,
                                     spectral_norm=arch.d_spectral_norm, dropout=arch.d_dropout),
    }


@register_model(
    "acgan",
    family="gan",
    features=("uncertainty",),
    paper="Odena, Olah & Shlens, AC-GAN, ICML 2017 (arXiv:1610.09585)",
    summary="auxiliary-classifier GAN: class-conditional BatchNorm in G, SN D predicts real/fake and the class",
    conditional=True,
)
def build_acgan(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"G", "D"}`` of the acgan model (Odena et al., ICML 2017, arXiv:1610.09585).

    G: :class:`ConditionalGenerator`; D: :class:`ACGANDiscriminator` (DCGAN trunk, real/fake and
    class heads; D does not take ``y``). Keys read and defaults: as :func:`build_cgan`, plus
    ``loss.aux_mode`` ("acgan"; "tac" adds the twin classifier head).
    """
    size, arch, k = data.image_size, cfg.arch, data.n_classes
    return {
        "G": conditional_generator(cfg, data),
        "D": ACGANDiscriminator(size, k, arch.d_channels, arch.max_channels,
                                spectral_norm=arch.d_spectral_norm, dropout=arch.d_dropout,
                                twin=cfg.loss.aux_mode == "tac"),
    }
