"""On-device augmentation of training batches for the supervised tasks (classifiers, and the
segmenters of later issues): random affine warps and brightness/contrast jitter.

Every image of a batch gets its own draw, all on the batch's device from one ``generator`` (its
state is saved with the run, so a resumed run draws the same numbers), with no host syncs, so the
step can be a CUDA graph. Images are float N x C x H x W in [-1, 1]; what a warp brings in from
outside the image is black (-1), the background of a radiograph. The warp is split into
:func:`affine_matrices` and :func:`warp` so that an image and its mask can share one draw (bilinear
for the image, bilinear then thresholded for the mask: :func:`augment_pair`).

No horizontal flip by default: it swaps the patient's sides (heart on the right), which a real
PA/AP radiograph never shows.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 1, 32, 32) * 2 - 1
    >>> augment_batch(x, g, rotate=10, scale=0.1, translate=0.1, brightness=0.1, contrast=0.1).shape
    torch.Size([4, 1, 32, 32])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from covidxray.data.masks import postprocess

__all__ = ["affine_matrices", "elastic_displacement", "warp", "jitter", "augment_pair", "augment_batch"]


def _uniform(n: int, half_width: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """``n`` draws uniform in [-half_width, half_width] (float32)."""
    return (torch.rand(n, generator=generator, device=device) * 2 - 1) * half_width


def affine_matrices(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    rotate: float = 0.0, scale: float = 0.0, translate: float = 0.0,
                    hflip: bool = False) -> torch.Tensor:
    """Random affine matrices (n, 2, 3) in ``F.affine_grid``'s normalised coordinates.

    Args:
        rotate: rotation uniform in +-``rotate`` degrees.
        scale: zoom factor uniform in 1 +- ``scale`` (> 1 enlarges the content).
        translate: shift uniform in +- ``translate`` of the image side, per axis.
        hflip: mirror half of the images (left-right).
    """
    angle = _uniform(n, math.radians(rotate), generator, device)
    zoom = 1 + _uniform(n, scale, generator, device)
    shift = _uniform(2 * n, 2 * translate, generator, device).view(n, 2)  # normalised coords span 2
    flip = torch.ones(n, device=device)
    if hflip:
        flip = torch.where(torch.rand(n, generator=generator, device=device) < 0.5, -flip, flip)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    return theta


def elastic_displacement(n: int, height: int, width: int, strength: float, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu", control: int = 4) -> torch.Tensor:
    """Smooth random displacements (n, H, W, 2) for :func:`warp`'s ``displacement``, in normalised coordinates.

    Normal noise with a standard deviation of ``strength`` times the side on a ``control`` x ``control``
    grid, up-sampled bicubically (an elastic deformation in the manner of Simard et al. 2003 and the
    U-Net paper, which draw displacements on a coarse grid).
    """
    d = torch.randn(n, 2, control, control, generator=generator, device=device) * (2 * strength)
    return F.interpolate(d, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", fill: float = -1.0,
         displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Apply affine matrices ``theta`` (N, 2, 3), then optional ``displacement`` (N, H, W, 2, normalised
    coordinates, :func:`elastic_displacement`), to ``x`` (N, C, H, W); outside pixels become ``fill``."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement.to(grid.dtype)
    # grid_sample pads with zeros: shift so that zero padding is `fill`.
    return F.grid_sample(x - fill, grid, mode=mode, padding_mode="zeros", align_corners=False) + fill


def jitter(x: torch.Tensor, generator: torch.Generator | None = None, brightness: float = 0.0,
           contrast: float = 0.0) -> torch.Tensor:
    """Per image: contrast factor uniform in 1 +- ``contrast`` about the image mean, plus a brightness
    shift uniform in +- ``brightness``; clamped to [-1, 1]."""
    n = x.shape[0]
    c = (1 + _uniform(n, contrast, generator, x.device)).view(n, 1, 1, 1).to(x.dtype)
    b = _uniform(n, brightness, generator, x.device).view(n, 1, 1, 1).to(x.dtype)
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * c + mean + b).clamp(-1, 1)


def augment_pair(x: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None, rotate: float = 0.0,
                 scale: float = 0.0, translate: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                 elastic: float = 0.0, hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``x`` (float, [-1, 1]) and their ``masks`` (0/1, any dtype) warped by one shared random draw
    (affine, then elastic when ``elastic`` > 0); the image bilinearly (outside: -1), the mask bilinearly
    then > 0.5 (outside: 0), so that they stay aligned. Brightness/contrast jitter touches the image only.
    Returns the image and the mask as float 0/1."""
    m = masks.to(x.dtype)
    if rotate or scale or translate or hflip or elastic:
        n, _, h, w = x.shape
        theta = affine_matrices(n, generator, x.device, rotate, scale, translate, hflip)
        disp = elastic_displacement(n, h, w, elastic, generator, x.device) if elastic else None
        x = warp(x, theta, "bilinear", -1.0, disp)
        m = (warp(m, theta, "bilinear", 0.0, disp) > 0.5).to(x.dtype)
    if brightness or contrast:
        x = jitter(x, generator, brightness, contrast)
    return x, m


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, rotate: float = 0.0,
                  scale: float = 0.0, translate: float = 0.0, brightness: float = 0.0, contrast: float = 0.0,
                  hflip: bool = False) -> torch.Tensor:
    """:func:`warp` with random :func:`affine_matrices`, then :func:`jitter`; parts set to 0 are skipped."""
    if rotate or scale or translate or hflip:
        theta = affine_matrices(x.shape[0], generator, x.device, rotate, scale, translate, hflip)
        x = warp(x, theta)
    if brightness or contrast:
        x = jitter(x, generator, brightness, contrast)
    return x


#: The deformation of ``sample --deform`` (pix2pix pairs): a small rotation, zoom, shift and elastic warp of a mask.
DEFORM = {"rotate": 8.0, "scale": 0.08, "translate": 0.05, "elastic": 0.02}


def deform_masks(masks: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random smooth deformations of 0/1 masks (N x 1 x S x S) -> 0/1 uint8 masks, two components, no holes."""
    x = torch.zeros(masks.shape, dtype=torch.float32)
    _, m = augment_pair(x, masks, generator, **DEFORM)
    out = torch.stack([torch.from_numpy(postprocess(mi[0].numpy() > 0.5))[None] for mi in m])
    return out.to(torch.uint8)
