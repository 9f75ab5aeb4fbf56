"""DCGAN generator and discriminator, and the ``rawgan`` model.

Paper: A. Radford, L. Metz, S. Chintala, "Unsupervised Representation Learning
with Deep Convolutional Generative Adversarial Networks", ICLR 2016
(arXiv:1511.06434).

Architecture (grayscale, square images of 64, 128 or 256 px):

* G: z (latent_dim) -> 4x4 by a transposed convolution, then ``log2(size/4)``
  stride-2 transposed convolutions (kernel 4) each halving the width, BatchNorm
  and ReLU between them, ``tanh`` output in [-1, 1].
* D: the mirror: stride-2 convolutions (kernel 4) with LeakyReLU(0.2) and
  BatchNorm (none on the first layer) down to 4x4, then a 4x4 convolution to one
  logit per image.
* Weights from N(0, 0.02), BatchNorm scale from N(1, 0.02), as in the paper.

Defaults of ``rawgan`` (``configs/rawgan.yaml``): 128 px, latent 100, widths
64 (capped at 512), Adam(lr 2e-4, betas (0.5, 0.999)), non-saturating BCE loss,
all classes merged into one (``--classes covid`` trains the seed's "covidGAN").

Example:
    >>> import torch
    >>> G, D = DCGANGenerator(64, latent_dim=100), DCGANDiscriminator(64)
    >>> x = G(torch.randn(2, 100))
    >>> tuple(x.shape), tuple(D(x).logits.shape)
    ((2, 1, 64, 64), (2,))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from covidxray.models.common import DOutput, maybe_sn
from covidxray.models.registry import DataSpec, register_model

SIZES = (64, 128, 256)


def _n_stages(image_size: int) -> int:
    if image_size not in SIZES:
        raise ValueError(f"image_size must be one of {SIZES}, got {image_size}")
    return int(math.log2(image_size // 4))


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialisation: conv weights N(0, 0.02), BatchNorm N(1, 0.02) and bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            # Under spectral norm `m.weight` is recomputed on each read: initialise the stored original.
            weight = m.parametrizations.weight.original if nn.utils.parametrize.is_parametrized(m, "weight") else m.weight
            nn.init.normal_(weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``z`` (N x latent_dim) -> images (N x 1 x S x S) in [-1, 1].

    Args:
        image_size: output side, 64, 128 or 256.
        latent_dim: length of z.
        channels: width of the last hidden layer; earlier layers double it up to ``max_channels``.
        max_channels: cap on any layer's width.
        out_channels: image channels (1 for grayscale X-rays).
    """

    def __init__(self, image_size: int = 128, latent_dim: int = 100, channels: int = 64,
                 max_channels: int = 512, out_channels: int = 1):
        super().__init__()
        n = _n_stages(image_size)
        widths = [min(channels * 2 ** (n - 1 - i), max_channels) for i in range(n)]
        self.image_size, self.latent_dim, self.n_classes = image_size, latent_dim, 0
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``y`` is ignored (unconditional model); it is accepted so every G has one signature."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (N, {self.latent_dim}), got {tuple(z.shape)}")
        return self.net(z[:, :, None, None])


def dcgan_trunk(image_size: int, channels: int, max_channels: int, in_channels: int = 1,
                spectral_norm: bool = False) -> tuple[nn.Sequential, int]:
    """The DCGAN discriminator's convolutions down to 4x4; returns (trunk, width at 4x4).

    With spectral norm, BatchNorm is left out (SN takes its place, as in Miyato et al. 2018).
    """
    n = _n_stages(image_size)
    widths = [min(channels * 2**i, max_channels) for i in range(n)]
    layers: list[nn.Module] = [maybe_sn(nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=spectral_norm), spectral_norm),
                               nn.LeakyReLU(0.2, True)]
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers.append(maybe_sn(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=spectral_norm), spectral_norm))
        if not spectral_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.2, True))
    return nn.Sequential(*layers), widths[-1]


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: images (N x 1 x S x S) in [-1, 1] -> :class:`DOutput` with one logit per image.

    Args:
        image_size: input side, 64, 128 or 256.
        channels: width of the first layer; later layers double it up to ``max_channels``.
        max_channels: cap on any layer's width.
        in_channels: image channels (1 for grayscale X-rays).
        spectral_norm: spectral normalisation on every layer (replaces BatchNorm).
    """

    def __init__(self, image_size: int = 128, channels: int = 64, max_channels: int = 512, in_channels: int = 1,
                 spectral_norm: bool = False):
        super().__init__()
        self.image_size, self.n_classes = image_size, 0
        self.trunk, width = dcgan_trunk(image_size, channels, max_channels, in_channels, spectral_norm)
        self.head = maybe_sn(nn.Conv2d(width, 1, 4, 1, 0, bias=False), spectral_norm)
        dcgan_init(self)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"x must have shape (N, C, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mc_samples: int = 1) -> DOutput:
        self.check_input(x)
        return DOutput(self.head(self.trunk(x)).flatten())


@register_model(
    "rawgan",
    family="gan",
    paper="Radford et al., DCGAN, ICLR 2016 (arXiv:1511.06434)",
    summary="DCGAN on all classes merged (or one class with --classes), grayscale, 64/128/256 px",
)
def build_rawgan(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"G", "D"}`` of the rawgan model (Radford et al., ICLR 2016, arXiv:1511.06434).

    G: :class:`DCGANGenerator`; D: :class:`DCGANDiscriminator` (BatchNorm). Reads ``data.image_size``
    and ``arch.latent_dim``, ``arch.g_channels``, ``arch.d_channels``, ``arch.max_channels``
    (defaults: ``covidxray/config/gan.py``); the classes of ``data`` are merged (unconditional).
    """
    size, arch = data.image_size, cfg.arch
    return {
        "G": DCGANGenerator(size, arch.latent_dim, arch.g_channels, arch.max_channels),
        "D": DCGANDiscriminator(size, arch.d_channels, arch.max_channels),
    }
