"""Lung segmenters: U-Net (Ronneberger et al. 2015) and Attention U-Net (Oktay et al. 2018).

Both map a 1-channel X-ray (N x 1 x H x W in [-1, 1]) to one logit map of the lungs (N x 1 x H x W;
sigmoid > ``threshold`` = lung). H and W must be multiples of ``2 ** arch.depth``.

The encoder has ``arch.depth`` down-sampling levels; level i has ``arch.width * 2**i`` channels (the
defaults 32 and 4: 32 -> 512 at the bottleneck, 7.2 M parameters). Each level is two 3x3 convolutions
with a normalisation (``batch`` or ``group``: GroupNorm, 8 groups, for small batches) and ReLU; 2x2
max-pooling goes down; ``bilinear`` up-sampling (then a 1x1 convolution halving the channels) or a
2x2 ``transpose`` convolution goes up, and the decoder concatenates the encoder's features of the same
level (the skip connection).

The Attention U-Net adds an additive attention gate on each skip connection (Oktay et al.'s Fig. 2):
the decoder's up-sampled features g and the skip features x give ``a = sigmoid(psi(relu(W_g g + W_x x)))``,
one weight in [0, 1] per pixel, and the decoder concatenates ``a * x`` instead of x; it costs about 1 %
more parameters.

Why written here and not taken from MONAI (``monai.networks.nets.BasicUNet`` / ``AttentionUnet``):
BasicUNet fixes the depth at four levels and MONAI's AttentionUnet has BatchNorm and transposed
convolutions only, while the issue asks for configurable depth, width, normalisation and
up-sampling; the blocks are plain ``torch.nn`` layers, so channels-last, bf16 autocast and CUDA graph
capture work unchanged. ``bench/segmentation.py`` times them against MONAI's BasicUNet.
"""

from __future__ import annotations

import torch
from torch import nn

from covidxray.models.registry import register_model

PAPER_UNET = "Ronneberger, Fischer & Brox, U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015"
PAPER_ATTENTION = "Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018"


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.BatchNorm2d(channels)


class DoubleConv(nn.Sequential):
    """(3x3 convolution -> norm -> ReLU) x 2."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch"):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), _norm(norm, c_out), nn.ReLU(inplace=True))


class Up(nn.Module):
    """Up-sample by 2 and halve the channels: bilinear + 1x1 convolution, or a 2x2 transposed convolution."""

    def __init__(self, c_in: int, c_out: int, mode: str = "bilinear"):
        super().__init__()
        if mode == "transpose":
            self.up = nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    nn.Conv2d(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): weights the skip features ``x`` by the decoder's ``g``."""

    def __init__(self, c_g: int, c_x: int, c_int: int, norm: str = "batch"):
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(c_g, c_int, 1, bias=False), _norm(norm, c_int))
        self.w_x = nn.Sequential(nn.Conv2d(c_x, c_int, 1, bias=False), _norm(norm, c_int))
        self.psi = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(c_int, 1, 1), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.w_g(g) + self.w_x(x))


class UNet(nn.Module):
    """U-Net with ``depth`` levels of ``width * 2**i`` channels (module docstring); ``attention=True`` gives
    the Attention U-Net.

    Args:
        in_channels: image channels (1: X-rays).
        out_channels: logit maps (1: lungs).
        width: channels of the first level.
        depth: down-sampling levels (the input side must be a multiple of ``2 ** depth``).
        norm: ``batch`` | ``group``.
        upsample: ``bilinear`` | ``transpose``.
        attention: gate the skip connections (Attention U-Net).

    Example:
        >>> net = UNet(width=8, depth=3)
        >>> net(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 32, depth: int = 4,
                 norm: str = "batch", upsample: str = "bilinear", attention: bool = False):
        super().__init__()
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.depth, self.out_channels = depth, out_channels
        self.down = nn.ModuleList([DoubleConv(in_channels, chans[0], norm)] +
                                  [DoubleConv(chans[i], chans[i + 1], norm) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList([Up(chans[i + 1], chans[i], upsample) for i in reversed(range(depth))])
        self.gates = nn.ModuleList([AttentionGate(chans[i], chans[i], max(chans[i] // 2, 1), norm)
                                    for i in reversed(range(depth))]) if attention else None
        self.dec = nn.ModuleList([DoubleConv(2 * chans[i], chans[i], norm) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = 2 ** self.depth
        if x.shape[-1] % side or x.shape[-2] % side:
            raise ValueError(f"input sides must be multiples of {side} (2 ** depth); got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for j, (up, dec) in enumerate(zip(self.ups, self.dec)):
            g = up(x)
            skip = skips.pop()
            if self.gates is not None:
                skip = self.gates[j](g, skip)
            x = dec(torch.cat([g, skip], 1))
        return self.head(x)


def _build(cfg, data, attention: bool) -> dict[str, nn.Module]:
    a = cfg.arch
    return {"net": UNet(data.channels, 1, a.width, a.depth, a.norm, a.upsample, attention)}


@register_model("unet", family="segmentation", paper=PAPER_UNET,
                summary="U-Net lung segmenter (configurable depth, width, norm, up-sampling)", min_image_size=64)
def build_unet(cfg, data):
    """U-Net (Ronneberger et al. 2015) for lung masks: defaults width 32, depth 4 (32 -> 512 channels),
    BatchNorm, bilinear up-sampling; Dice + BCE loss (``configs/unet.yaml``, ``docs/segmentation.md``)."""
    return _build(cfg, data, attention=False)


@register_model("attention_unet", family="segmentation", paper=PAPER_ATTENTION,
                summary="Attention U-Net: additive attention gates on the skip connections", min_image_size=64)
def build_attention_unet(cfg, data):
    """Attention U-Net (Oktay et al. 2018): the U-Net above with an additive attention gate on each skip
    connection; same defaults (``configs/attention_unet.yaml``, ``docs/segmentation.md``)."""
    return _build(cfg, data, attention=True)
