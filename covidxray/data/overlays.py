"""Lung-mask overlays: the predicted outline (and tint) over an X-ray, optionally beside the true outline.

Colours: the prediction is a yellow outline over a light yellow tint; a ground-truth mask, when given, is a
green outline (where both outlines fall on the same pixel it is drawn green over yellow). Outlines are
``max(1, side / 256)`` pixels thick, so that they stay visible on full-size films.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from covidxray.data.grids import grid_nrow
from covidxray.data.imaging import encode_png
from covidxray.utils import atomic_write_bytes


PRED_RGB = np.array([255, 220, 0], dtype=np.float32)
TRUE_RGB = np.array([0, 230, 90], dtype=np.float32)
TINT = 0.22


def outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boolean boundary of a boolean mask: its pixels with a 4-neighbour outside it, dilated to ``thickness``."""
    m = np.asarray(mask, dtype=bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    if thickness > 1:
        from scipy import ndimage  # local: scipy.ndimage (~0.2 s) only for thick outlines (films of 512 px and more)

        edge = ndimage.binary_dilation(edge, iterations=thickness - 1)
    return edge


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None, tint: bool = True) -> np.ndarray:
    """An RGB uint8 overlay (H x W x 3) of the gray uint8 ``image`` (H x W) with the boolean ``pred`` mask
    (yellow outline and tint) and optionally the boolean ``truth`` mask (green outline)."""
    gray = np.asarray(image, dtype=np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    pred = np.asarray(pred, dtype=bool)
    thick = max(1, min(gray.shape) // 256)
    if tint:  # only the lung pixels go through float arithmetic
        lung = gray[pred].astype(np.float32)[:, None]
        rgb[pred] = ((1 - TINT) * lung + TINT * PRED_RGB).round().clip(0, 255).astype(np.uint8)
    rgb[outline(pred, thick)] = PRED_RGB.astype(np.uint8)
    if truth is not None:
        rgb[outline(np.asarray(truth, dtype=bool), thick)] = TRUE_RGB.astype(np.uint8)
    return rgb


def save_rgb(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an H x W x 3 uint8 array as a PNG, atomically (the package's fast PNG writer, RGB)."""
    path = Path(path)
    atomic_write_bytes(path, encode_png(Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")))
    return path


def outline_grid(images: torch.Tensor, preds: torch.Tensor, truths: torch.Tensor | None, path: str | os.PathLike,
                 nrow: int | None = None, captions: list[str] | None = None) -> Path:
    """Save a grid PNG of :func:`overlay` tiles: uint8 ``images`` (N x 1 x H x W), boolean/0-1 ``preds`` and
    optional ``truths`` of the same shape; ``captions`` (one short line per tile) are drawn on each tile."""
    from torchvision.utils import make_grid  # local: torchvision adds ~1 s to start-up (infer.segment imports this)

    tiles = []
    for i in range(images.shape[0]):
        truth = None if truths is None else truths[i, 0].numpy() != 0
        rgb = overlay(images[i, 0].numpy(), preds[i, 0].numpy() != 0, truth)
        if captions:
            rgb = _caption(rgb, captions[i])
        tiles.append(torch.from_numpy(rgb).permute(2, 0, 1))
    grid = make_grid(torch.stack(tiles), nrow=nrow or grid_nrow(len(tiles)), padding=2, pad_value=0)
    return save_rgb(grid.permute(1, 2, 0).numpy(), path)


def _caption(rgb: np.ndarray, text: str) -> np.ndarray:
    img = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((2, 1), text)
    draw.rectangle((0, 0, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return np.array(img)
