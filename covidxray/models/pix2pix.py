"""pix2pix (Isola, Zhu, Zhou & Efros, CVPR 2017): a U-Net generator and a PatchGAN discriminator.

Generator: the paper's U-Net "encoder-decoder with skips". The encoder halves the side with 4x4 stride-2
convolutions (``arch.g_channels`` doubling per level up to 8x, BatchNorm after the first, LeakyReLU 0.2) down
to 1 x 1; the decoder mirrors it with 4x4 stride-2 transposed convolutions (BatchNorm, ReLU), concatenating
the encoder's features of the same level, and ends in tanh. Dropout (``arch.dropout``, the paper's 0.5) on the
first three decoder levels is the paper's noise source: it stays on at sampling time too (``G.sample_mode``),
as in the paper.

Discriminator: the 70 x 70 PatchGAN (C64-C128-C256-C512 at 256 px, ``arch.d_layers`` = 3 stride-2 levels,
then a stride-1 level and a 1-channel convolution): one real/fake logit per overlapping patch of the
condition and the image, concatenated. At 128 px and below, ``arch.d_layers`` = 2 keeps the patch (34 x 34)
in proportion to the image.

The condition is an image of ``in_channels`` channels in [-1, 1] (``mask2xray``: the lung mask, 1 channel, to a
1-channel X-ray; ``colorize``: the X-ray, 1 channel, to a 3-channel pseudo-colour rendering). A class-conditional
``mask2xray`` run (``model.class_maps``, data of two or more classes) adds one constant map per class, +1 on the
image's class and -1 elsewhere (:func:`condition`), so G draws an X-ray of a chosen class for a mask, and D judges
the pair given the class - the spatial form of the conditioning of Mirza & Osindero's cGAN that pix2pix's
concatenated input takes naturally.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from covidxray.data.datasets import to_uint8
from covidxray.models.registry import register_model

PAPER_PIX2PIX = "Isola, Zhu, Zhou & Efros, Image-to-Image Translation with Conditional Adversarial Networks, CVPR 2017"


def uses_class_maps(cfg, n_classes: int) -> bool:
    """Whether a pix2pix run of ``cfg`` on ``n_classes`` classes conditions on class maps (mask2xray only)."""
    return cfg.model.task == "mask2xray" and bool(cfg.model.class_maps) and n_classes >= 2


def condition(masks: torch.Tensor, labels: torch.Tensor | None = None, n_classes: int = 0) -> torch.Tensor:
    """The mask2xray condition (N x (1 + n_classes) x S x S in [-1, 1]): the 0/1 mask, then with ``n_classes`` > 0
    one map per class, +1 everywhere on the class of each ``labels`` entry and -1 on the others.

    Example:
        >>> c = condition(torch.ones(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), 3)
        >>> c.shape, c[1, 1:, 0, 0].tolist()
        (torch.Size([2, 4, 4, 4]), [-1.0, -1.0, 1.0])
    """
    m = masks.float() * 2 - 1
    if not n_classes:
        return m
    if labels is None:
        raise ValueError(f"a class-conditional pix2pix (class maps of {n_classes} classes) needs the masks' labels")
    hot = torch.nn.functional.one_hot(labels.long(), n_classes).to(m.dtype) * 2 - 1
    return torch.cat([m, hot[:, :, None, None].expand(-1, -1, *m.shape[-2:])], 1)


@torch.no_grad()
def draw_xrays(G: nn.Module, masks: torch.Tensor, labels: torch.Tensor | None, n_classes: int,
               device: torch.device | str, batch_size: int) -> torch.Tensor:
    """G's X-rays (uint8 N x 1 x S x S, on the CPU) of 0/1 ``masks`` (and of the classes ``labels`` when G is
    conditioned on ``n_classes`` class maps), in batches on ``device``; G's mode (dropout) is the caller's."""
    out = []
    for i in range(0, masks.shape[0], batch_size):
        y = None if labels is None else labels[i:i + batch_size].to(device)
        out.append(to_uint8(G(condition(masks[i:i + batch_size].to(device), y, n_classes))).cpu())
    return torch.cat(out) if out else torch.zeros((0, 1, *masks.shape[-2:]), dtype=torch.uint8)


class UNetGenerator(nn.Module):
    """The pix2pix U-Net: condition (N x in_channels x S x S) -> image (N x out_channels x S x S) in [-1, 1].

    Example:
        >>> G = UNetGenerator(64, channels=8)
        >>> G(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, image_size: int, in_channels: int = 1, out_channels: int = 1, channels: int = 64,
                 dropout: float = 0.5):
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ValueError(f"the image side must be a power of two >= 16, got {image_size}")
        levels = int(math.log2(image_size))
        widths = [min(channels * 2 ** i, channels * 8) for i in range(levels)]
        self.image_size, self.in_channels = image_size, in_channels
        self.down = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(widths):
            layers: list[nn.Module] = [nn.LeakyReLU(0.2, inplace=False)] if i > 0 else []
            layers.append(nn.Conv2d(c_in, c, 4, 2, 1, bias=i == 0 or i == levels - 1))
            if 0 < i < levels - 1:  # no norm on the first level and at the 1 x 1 bottleneck (batch statistics of one pixel)
                layers.append(nn.BatchNorm2d(c))
            self.down.append(nn.Sequential(*layers))
            c_in = c
        self.up = nn.ModuleList()
        rev = widths[::-1]
        for j in range(levels - 1):
            c_in = rev[j] if j == 0 else 2 * rev[j]
            layers = [nn.ReLU(inplace=False), nn.ConvTranspose2d(c_in, rev[j + 1], 4, 2, 1, bias=False),
                      nn.BatchNorm2d(rev[j + 1])]
            if j < 3 and dropout > 0:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        self.out = nn.Sequential(nn.ReLU(inplace=False), nn.ConvTranspose2d(2 * widths[0], out_channels, 4, 2, 1),
                                 nn.Tanh())

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        skips = []
        x = cond
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = torch.cat([block(x), skips.pop()], 1)
        return self.out(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN: (condition, image) -> logits N x 1 x P x P, one per patch."""

    def __init__(self, in_channels: int = 2, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = channels
        for i in range(1, layers):
            c_out = min(channels * 2 ** i, channels * 8)
            mods += [nn.Conv2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True)]
            c = c_out
        c_out = min(c * 2, channels * 8)
        mods += [nn.Conv2d(c, c_out, 4, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2, inplace=True),
                 nn.Conv2d(c_out, 1, 4, 1, 1)]
        self.net = nn.Sequential(*mods)

    def forward(self, cond: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cond, image], 1))


def init_weights(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) convolutions, N(1, 0.02) BatchNorm scales, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@register_model("pix2pix", family="image2image", paper=PAPER_PIX2PIX, min_image_size=32,
                summary="pix2pix: U-Net G + PatchGAN D, L1 + adversarial; mask2xray: lung mask -> X-ray")
def build_pix2pix(cfg, data):
    """pix2pix (Isola et al. 2017): U-Net generator with dropout, 70x70 PatchGAN (``arch.d_layers``), L1 weight 100
    + adversarial loss, Adam 2e-4 (0.5, 0.999) (``configs/pix2pix.yaml``, ``docs/image2image.md``)."""
    a = cfg.arch
    out = 3 if cfg.model.task == "colorize" else 1  # colorize: a 3-channel rendering of a 1-channel X-ray
    c_in = 1 + (data.n_classes if uses_class_maps(cfg, data.n_classes) else 0)  # the mask (+ class maps)
    G = UNetGenerator(data.image_size, c_in, out, a.g_channels, a.dropout)
    D = PatchDiscriminator(c_in + out, a.d_channels, a.d_layers)
    init_weights(G)
    init_weights(D)
    return {"G": G, "D": D}


def sampling_mode(G: nn.Module) -> None:
    """G as pix2pix samples: BatchNorm on its running statistics, dropout on (the paper's noise)."""
    G.eval()
    for m in G.modules():
        if isinstance(m, nn.Dropout):
            m.train()
