"""U-Net discriminator GANs: ``unetgan`` (unconditional) and ``unetcgan`` (class-conditional).

Paper: E. Schönfeld, B. Schiele, A. Khoreva, "A U-Net Based Discriminator for Generative
Adversarial Networks", CVPR 2020 (arXiv:2002.12655). The discriminator is a U-Net: its encoder
judges the whole image (one logit per image), its decoder judges every pixel (one logit per
pixel), so G gets both global and local feedback. The paper's CutMix consistency regularisation
is a training-loop matter (``loss.cutmix*`` keys), not part of these networks.

Architecture (grayscale, square images of 64, 128 or 256 px), :class:`UNetDiscriminator`:

* Encoder: the DCGAN discriminator's trunk (:func:`~covidxray.models.dcgan.dcgan_trunk`,
  stride-2 4x4 convolutions + LeakyReLU(0.2), spectral norm by default) from S down to 4x4, the
  same trunk as ``cgan``'s D, so comparisons with ``rawgan``/``cgan`` isolate the U-Net decoder.
  Its 4x4 features are summed over space into ``h`` (N, C) -> ``logits = linear(h)`` (N,).
* Decoder: per level from 4x4 up to S/2, nearest 2x upsampling, concatenation with the encoder's
  features of that resolution (skip connection), an SN 3x3 convolution and LeakyReLU(0.2), at
  *half* the encoder's width at that level (to save compute). The S/2 level's skip also carries the
  input image itself, pixel-unshuffled (each 2x2 block -> 4 channels), so no detail is lost. An
  SN 1x1 convolution gives 4 logits per S/2 position, one per pixel of its 2x2 block, rearranged
  by pixel shuffle into ``pixel_logits`` (N, 1, S, S): a logit per pixel without running any
  layer at full resolution (thin full-resolution convolutions were 40 % of D's time on CPU).
* Conditional version (``n_classes > 0``), as in the paper: projection on both outputs,
  ``logits += <embed(y), h>`` and ``pixel_logits += <embed_pix(y), f>`` per pixel, with ``f`` the
  decoder's last feature map (at S/2; the projection is shared by the 4 pixels of a 2x2 block).
* Init: encoder as ``cgan`` (PyTorch's default for SN convolutions, the DCGAN init without SN);
  decoder convolutions, heads and embeddings Xavier-uniform with zero bias, set before SN.
* Monte-Carlo dropout (``dropout = p``) on ``h`` only, as in :mod:`covidxray.models.conditional`:
  ``mc_samples = K > 1`` gives ``logits`` (K, N); ``pixel_logits`` are always one deterministic pass.

Example:
    >>> import torch
    >>> D = UNetDiscriminator(64, channels=16)
    >>> out = D(torch.zeros(2, 1, 64, 64))
    >>> tuple(out.logits.shape), tuple(out.pixel_logits.shape)
    ((2,), (2, 1, 64, 64))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from covidxray.models.common import DOutput, maybe_sn
from covidxray.models.conditional import (
    conditional_generator,
    apply_spectral_norm,
    check_image,
    check_int_labels,
    init_head,
    mc_dropout,
)
from covidxray.models.dcgan import DCGANGenerator, dcgan_init, dcgan_trunk
from covidxray.models.registry import DataSpec, register_model


def _split_after(trunk: nn.Sequential, kind: type[nn.Module]) -> nn.ModuleList:
    """Cut a Sequential into stages, each ending with a ``kind`` layer (one stage per resolution)."""
    stages, current = [], []
    for layer in trunk:
        current.append(layer)
        if isinstance(layer, kind):
            stages.append(nn.Sequential(*current))
            current = []
    if current:
        stages.append(nn.Sequential(*current))
    return nn.ModuleList(stages)


class _UpBlock(nn.Module):
    """Nearest 2x upsampling of ``d``, concatenation with ``skip``, (SN) 3x3 conv, LeakyReLU(0.2)."""

    def __init__(self, c_low: int, c_skip: int, c_out: int, spectral_norm: bool):
        super().__init__()
        self.conv = maybe_sn(init_head(nn.Conv2d(c_low + c_skip, c_out, 3, 1, 1)), spectral_norm)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, d: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        d = F.interpolate(d, scale_factor=2.0, mode="nearest")
        return self.act(self.conv(torch.cat([d, skip.to(d.dtype)], dim=1)))


class UNetDiscriminator(nn.Module):
    """U-Net discriminator (Schönfeld et al. 2020): ``D(x, y=None, mc_samples=1) -> DOutput``.

    Returns ``logits`` (N,) (or (K, N) for ``mc_samples = K > 1``) from the encoder and
    ``pixel_logits`` (N, 1, S, S) from the decoder.

    Args:
        image_size: input side, 64, 128 or 256.
        n_classes: 0 for the unconditional D (``y`` ignored); > 0 adds projection heads on both
            outputs and requires ``y`` (N,) integer labels.
        channels: width of the encoder's first layer; later layers double it up to ``max_channels``.
        max_channels: cap on any layer's width.
        in_channels: image channels (1 for grayscale X-rays).
        spectral_norm: SN on every conv, linear and embedding (the encoder then has no BatchNorm).
        dropout: Monte-Carlo dropout probability on the encoder's pooled features (0 = none).
    """

    def __init__(self, image_size: int = 128, n_classes: int = 0, channels: int = 64, max_channels: int = 512,
                 in_channels: int = 1, spectral_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        if n_classes < 0:
            raise ValueError(f"n_classes must be >= 0, got {n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size, self.n_classes, self.dropout = image_size, n_classes, float(dropout)
        trunk, width = dcgan_trunk(image_size, channels, max_channels, in_channels, spectral_norm)
        if not spectral_norm:
            dcgan_init(trunk)
        self.encoder = _split_after(trunk, nn.LeakyReLU)
        enc = [stage[0].out_channels for stage in self.encoder]  # widths at S/2, S/4, ..., 4
        dec = [max(w // 2, 4) for w in enc[:-1]]  # decoder widths at S/2, S/4, ..., 8
        # the S/2 level's skip also carries the image itself, pixel-unshuffled to 4 channels per input channel
        skips = [enc[0] + 4 * in_channels] + enc[1:-1]
        self.decoder = nn.ModuleList()
        c_low = enc[-1]
        for i in reversed(range(len(dec))):  # 8x8 up to S/2
            self.decoder.append(_UpBlock(c_low, skips[i], dec[i], spectral_norm))
            c_low = dec[i]
        self.linear = maybe_sn(init_head(nn.Linear(width, 1)), spectral_norm)
        # 4 logits per S/2 position = one per pixel of its 2x2 block (pixel shuffle), see forward
        self.pixel = maybe_sn(init_head(nn.Conv2d(c_low, 4, 1)), spectral_norm)
        if n_classes:
            self.embed = maybe_sn(init_head(nn.Embedding(n_classes, width)), spectral_norm)
            self.pixel_embed = maybe_sn(init_head(nn.Embedding(n_classes, c_low)), spectral_norm)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, mc_samples: int = 1) -> DOutput:
        check_image(x, self.image_size)
        if self.n_classes:
            y = check_int_labels(y, x.shape[0], self.n_classes)
        skips = []
        h = x
        for stage in self.encoder:
            h = stage(h)
            skips.append(h)
        pooled = mc_dropout(h.sum(dim=(2, 3)), self.dropout, mc_samples, self.training)  # (N, C) | (K, N, C)
        logits = self.linear(pooled).squeeze(-1)
        skips[0] = torch.cat([skips[0], F.pixel_unshuffle(x, 2).to(skips[0].dtype)], dim=1)
        d = skips[-1]
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            d = block(d, skip)  # ends at S/2
        pixel_logits = self.pixel(d)  # (N, 4, S/2, S/2)
        if self.n_classes:
            e = self.embed(y).to(pooled.dtype)
            logits = logits + (e * pooled).sum(dim=-1)
            e_pix = self.pixel_embed(y).to(d.dtype)
            pixel_logits = pixel_logits + (d * e_pix[:, :, None, None]).sum(dim=1, keepdim=True)
        pixel_logits = F.pixel_shuffle(pixel_logits, 2)  # (N, 1, S, S)
        return DOutput(logits, pixel_logits=pixel_logits)


def _unet_discriminator(cfg, image_size: int, n_classes: int) -> UNetDiscriminator:
    arch = cfg.arch
    return UNetDiscriminator(image_size, n_classes, arch.d_channels, arch.max_channels,
                             spectral_norm=arch.d_spectral_norm, dropout=arch.d_dropout)


@register_model(
    "unetgan",
    family="gan",
    features=("cutmix", "uncertainty"),
    paper="Schönfeld, Schiele & Khoreva, U-Net GAN, CVPR 2020 (arXiv:2002.12655)",
    summary="DCGAN G + SN U-Net discriminator (per-image and per-pixel real/fake logits)",
)
def build_unetgan(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"G", "D"}`` of the unetgan model (Schönfeld et al., CVPR 2020, arXiv:2002.12655).

    G: :class:`~covidxray.models.dcgan.DCGANGenerator` (SN optional); D: :class:`UNetDiscriminator`
    (unconditional). Reads the image side from ``data`` and ``arch.latent_dim``, ``arch.g_channels``,
    ``arch.d_channels``, ``arch.max_channels``, ``arch.g_spectral_norm``, ``arch.d_spectral_norm``
    (configs/unetgan.yaml turns it on), ``arch.d_dropout`` (defaults: ``covidxray/config/gan.py``).
    """
    size, arch = data.image_size, cfg.arch
    G = DCGANGenerator(size, arch.latent_dim, arch.g_channels, arch.max_channels)
    if arch.g_spectral_norm:
        apply_spectral_norm(G)
    return {"G": G, "D": _unet_discriminator(cfg, size, 0)}


@register_model(
    "unetcgan",
    family="gan",
    features=("cutmix", "uncertainty"),
    paper="Schönfeld, Schiele & Khoreva, U-Net GAN (class-conditional), CVPR 2020 (arXiv:2002.12655)",
    summary="class-conditional U-Net GAN: class-conditional BatchNorm in G, U-Net D with projection on both outputs",
    conditional=True,
)
def build_unetcgan(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """Build ``{"G", "D"}`` of the unetcgan model (Schönfeld et al., CVPR 2020, conditional version).

    G: :class:`~covidxray.models.conditional.ConditionalGenerator`; D: :class:`UNetDiscriminator`
    with ``n_classes`` projection heads on the image and pixel outputs. Keys read and defaults: as
    :func:`build_unetgan`, plus the number of classes of ``data``.
    """
    return {"G": conditional_generator(cfg, data), "D": _unet_discriminator(cfg, data.image_size, data.n_classes)}
