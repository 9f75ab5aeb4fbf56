"""Image grids: tiling uint8 images for sample grids, ``reals.png`` and GIF frames."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from covidxray.data.imaging import save_png


def grid_nrow(n: int) -> int:
    """Columns of a near-square grid of ``n`` images."""
    return max(1, math.ceil(math.sqrt(n)))


def make_grid_u8(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile uint8 images (N x 1 x H x W) into one uint8 image (H' x W'), black padding."""
    from torchvision.utils import make_grid  # local: torchvision (~1 s) would slow every training start

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 N x C x H x W, got {images.dtype} {tuple(images.shape)}")
    grid = make_grid(images.cpu(), nrow=nrow or grid_nrow(images.shape[0]), padding=padding, pad_value=0)
    return grid[0]


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Save uint8 images (N x 1 x H x W) as one grid PNG (atomically)."""
    return save_png(make_grid_u8(images, nrow), path)
