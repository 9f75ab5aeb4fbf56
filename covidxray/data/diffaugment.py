"""DiffAugment for grayscale chest X-rays (Zhao, Liu, Lin, Zhu, Han, "Differentiable
Augmentation for Data-Efficient GAN Training", NeurIPS 2020).

The same random, differentiable transforms are applied to every image D sees -
reals and fakes, in the D step and in the G step - so D cannot memorise a small
training set while G still receives gradients through the augmentation.

Differences from the paper's reference code, all for 1-channel images in [-1, 1]:

* the fill of ``translation`` and ``cutout`` is ``-1`` (black, the X-ray
  background outside the body) instead of ``0``, which in [-1, 1] would be a
  mid-grey frame or square that appears in no real radiograph; pass ``fill=0.0``
  for the paper's behaviour;
* ``color``/``saturation`` are rejected: saturation has no meaning for one channel,
  use ``brightness,contrast``;
* ``flip`` (horizontal, p = 0.5) exists but is off by default: it swaps the
  patient's sides (heart on the right), which real PA/AP films never show; list it
  explicitly if you accept that.

Every random number is drawn with ``torch.rand``/``torch.randint`` on ``x.device``
from the optional ``generator``, in float32 whatever ``x.dtype`` is, so saving and
restoring the generator's state resumes the augmentation stream exactly. All
transforms are vectorised (masks and index gathers, no loop over the batch, no host
syncs) and preserve the input dtype.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.rand(4, 1, 32, 32) * 2 - 1
    >>> diff_augment(x, DEFAULT_POLICY, generator=g).shape
    torch.Size([4, 1, 32, 32])
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["POLICIES", "DEFAULT_POLICY", "FILL", "parse_policy", "diff_augment"]

FILL: float = -1.0  # black in [-1, 1]: the pad/cutout value (see the module docstring)
DEFAULT_POLICY: str = "translation,cutout,brightness,contrast"

# Names the paper uses that do not fit grayscale X-rays, with the reason shown to the user.
_REJECTED = {
    "color": "'color' includes saturation, which has no meaning for 1-channel images; use 'brightness,contrast'",
    "saturation": "saturation has no meaning for 1-channel (grayscale) images; drop it",
}

_Aug = Callable[[torch.Tensor, "torch.Generator | None", float], torch.Tensor]  # (x, generator, fill) -> x


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One U(0, 1) number per image, shaped (N, 1, 1, 1), in x's dtype."""
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device).to(x.dtype)


def _brightness(x: torch.Tensor, generator: torch.Generator | None, fill: float) -> torch.Tensor:
    # Add U(-0.5, 0.5) per image, as the reference code does on [-1, 1] images.
    return x + (_rand(x, generator) - 0.5)


def _contrast(x: torch.Tensor, generator: torch.Generator | None, fill: float) -> torch.Tensor:
    # Scale the deviation from each image's own mean by U(0.5, 1.5); the mean is kept.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean


def _flip(x: torch.Tensor, generator: torch.Generator | None, fill: float) -> torch.Tensor:
    return torch.where(_rand(x, generator) < 0.5, x.flip(3), x)


def _translation(x: torch.Tensor, generator: torch.Generator | None, fill: float, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by integers in [-round(ratio*H), round(ratio*H)] (and W), filling with ``fill``."""
    n, c, h, w = x.shape
    max_y, max_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    u = torch.rand(n, 2, generator=generator, device=x.device)
    # floor(u * (2m + 1)) - m is uniform over the 2m + 1 integer shifts {-m, ..., m}.
    dy = (u[:, 0] * (2 * max_y + 1)).long().clamp_max(2 * max_y) - max_y
    dx = (u[:, 1] * (2 * max_x + 1)).long().clamp_max(2 * max_x) - max_x
    src_y = torch.arange(h, device=x.device) - dy[:, None]         # (n, h): output row i reads row i - dy
    src_x = torch.arange(w, device=x.device) - dx[:, None]         # (n, w)
    valid = ((src_y >= 0) & (src_y < h))[:, :, None] & ((src_x >= 0) & (src_x < w))[:, None, :]  # (n, h, w)
    # A single gather over the flattened H*W plane; out-of-range sources are clamped and then masked.
    flat = src_y.clamp(0, h - 1)[:, :, None] * w + src_x.clamp(0, w - 1)[:, None, :]           # (n, h, w)
    index = flat.reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(x.reshape(n, c, h * w), 2, index).reshape(n, c, h, w)
    return out.masked_fill(~valid[:, None], fill)


def _cutout(x: torch.Tensor, generator: torch.Generator | None, fill: float, ratio: float = 0.5) -> torch.Tensor:
    """Set a square of side round(ratio*H) x round(ratio*W), centred anywhere in the image, to ``fill``.

    As in the paper the square may stick out of the image (then a smaller rectangle is cut).
    """
    n, _, h, w = x.shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    u = torch.rand(n, 2, generator=generator, device=x.device)
    cy = (u[:, 0] * h).long().clamp_max(h - 1)                      # centre row, uniform in [0, h)
    cx = (u[:, 1] * w).long().clamp_max(w - 1)
    y0, x0 = cy - size_y // 2, cx - size_x // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_y = (rows >= y0[:, None]) & (rows < (y0 + size_y)[:, None])
    in_x = (cols >= x0[:, None]) & (cols < (x0 + size_x)[:, None])
    cut = (in_y[:, :, None] & in_x[:, None, :])[:, None]           # (n, 1, h, w)
    return x.masked_fill(cut, fill)


_AUGMENTS: dict[str, _Aug] = {
    "translation": _translation,
    "cutout": _cutout,
    "brightness": _brightness,
    "contrast": _contrast,
    "flip": _flip,
}
POLICIES: tuple[str, ...] = tuple(_AUGMENTS)


def parse_policy(policy: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a DiffAugment policy and return its names in order.

    Args:
        policy: comma-separated names (``"translation,cutout"``, spaces allowed, ``""``
            for none) or a sequence of names.

    Returns:
        The tuple of names, in the order they will be applied.

    Raises:
        ValueError: an unknown name (the message lists the valid ones), ``color`` or
            ``saturation`` (meaningless for grayscale), or a repeated name.

    Example:
        >>> parse_policy("translation, cutout")
        ('translation', 'cutout')
    """
    parts = policy.split(",") if isinstance(policy, str) else list(policy)
    names = tuple(p.strip().lower() for p in parts if p.strip())
    for name in names:
        if name in _REJECTED:
            raise ValueError(f"DiffAugment policy {name!r} not supported: {_REJECTED[name]}")
        if name not in _AUGMENTS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; valid names: {', '.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"DiffAugment policy lists a name twice: {','.join(names)}")
    return names


def diff_augment(
    x: torch.Tensor,
    policy: str | Sequence[str],
    generator: torch.Generator | None = None,
    fill: float = FILL,
) -> torch.Tensor:
    """Apply DiffAugment (Zhao et al., NeurIPS 2020) to a batch, differentiably w.r.t. ``x``.

    Transforms are applied in the order listed, each image with its own random draw.
    In :data:`DEFAULT_POLICY` brightness/contrast come last, so they also shift the
    black fill, like an exposure change of the whole film (the paper's order puts
    colour first, which keeps the fill exactly at ``fill``):

    * ``translation`` - integer shift by up to 1/8 of each side, uncovered pixels = ``fill``;
    * ``cutout`` - a square of half the side, centred uniformly in the image, set to ``fill``;
    * ``brightness`` - ``x + U(-0.5, 0.5)``;
    * ``contrast`` - ``(x - mean) * U(0.5, 1.5) + mean`` (per-image mean, kept);
    * ``flip`` - horizontal flip with p = 0.5 (only when listed; swaps anatomical sides).

    No clamping: values may leave [-1, 1] after brightness/contrast, as in the paper.

    Args:
        x: float images ``(N, C, H, W)`` in [-1, 1], any device, dtype or memory format
            (integer images are rejected: convert ``uint8`` with the dataset's ``to_float``).
        policy: names or comma-separated string (see :func:`parse_policy`); empty -> ``x`` itself.
        generator: optional ``torch.Generator`` on ``x.device``; None uses the global RNG.
        fill: value of padded and cut-out pixels; ``-1`` (black) by default, ``0`` as in the paper.

    Returns:
        Augmented images, same shape and dtype as ``x``.

    Raises:
        ValueError: bad policy, non-4-D or non-float ``x``, or a generator on another device.

    Example:
        >>> x = torch.zeros(2, 1, 8, 8, requires_grad=True)
        >>> diff_augment(x, "brightness,contrast").sum().backward()
        >>> x.grad.shape
        torch.Size([2, 1, 8, 8])
    """
    names = parse_policy(policy)
    if not names:
        return x
    if x.ndim != 4:
        raise ValueError(f"diff_augment expects images (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"diff_augment expects float images in [-1, 1], got dtype {x.dtype} with shape {tuple(x.shape)}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"generator lives on {generator.device} but x {tuple(x.shape)} is on {x.device}; "
            f"create it with torch.Generator(device={str(x.device)!r})"
        )
    for name in names:
        x = _AUGMENTS[name](x, generator, fill)
    return x
