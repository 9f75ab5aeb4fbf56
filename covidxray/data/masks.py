"""Post-processing and measurements of predicted lung masks (for ``covidxray segment``).

Pure functions on one binary mask (H x W, any nonzero = lung) and, for intensities, its X-ray:

* :func:`postprocess` - keep the ``keep`` largest 8-connected components (two lungs) and fill the holes
  inside each (``scipy.ndimage.label`` / ``binary_fill_holes``); both steps can be switched off.
* :func:`lung_stats` - what a row of ``segment.csv`` holds: lung area in pixels and as a fraction of the
  image, the areas of the largest component on each side of the image's vertical midline (by the
  component's centroid), the number of components, the mean X-ray intensity inside the lungs, the lung
  bounding box, and a ``status``: ``ok``, or ``suspicious: ...`` when no lung is found, only one large
  component, or more than two large components (large = at least :data:`LARGE_FRACTION` of the image).

Sides are **image** sides. In a standard PA chest X-ray the patient's right lung appears on the image's
left; the columns say "image_left"/"image_right" so that an AP or flipped film is never mislabelled.
SciPy is used because it labels and fills in C, which is what these operations need; nothing here is
hand-written that it does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: A component counts as a lung-sized one when it covers at least this fraction of the image.
LARGE_FRACTION = 0.01


def _binary(mask: Any) -> np.ndarray:
    m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
    m = np.squeeze(m)
    if m.ndim != 2:
        raise ValueError(f"expected one H x W mask, got shape {m.shape}")
    return m != 0


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage  # local: scipy.ndimage (~0.2 s) kept out of data.transforms' importers (training)

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


def postprocess(mask: Any, keep: int = 2, fill_holes: bool = True) -> np.ndarray:
    """The ``keep`` largest 8-connected components of ``mask`` (0 = all), holes filled; bool H x W."""
    from scipy import ndimage  # local: scipy.ndimage (~0.2 s) kept out of data.transforms' importers (training)

    m = _binary(mask)
    if keep > 0:
        lab, n = _label(m)
        if n > keep:
            sizes = np.bincount(lab.ravel())[1:]
            order = np.argsort(-sizes, kind="stable")[:keep] + 1
            m = np.isin(lab, order)
    if fill_holes:
        lab, n = _label(m)  # fill each component on its own: a gap between the lungs is not a hole
        filled = np.zeros_like(m)
        for i in range(1, n + 1):
            filled |= ndimage.binary_fill_holes(lab == i)
        m = filled
    return m


def bounding_box(mask: Any, margin: float = 0.05) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` (x1/y1 exclusive) of the lungs, widened by ``margin`` x the side, clipped; None if empty."""
    m = _binary(mask)
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        return None
    h, w = m.shape
    dx, dy = int(round(margin * w)), int(round(margin * h))
    return (max(0, int(xs.min()) - dx), max(0, int(ys.min()) - dy),
            min(w, int(xs.max()) + 1 + dx), min(h, int(ys.max()) + 1 + dy))


def lung_stats(mask: Any, image: Any | None = None) -> dict[str, Any]:
    """Measurements of one (post-processed) lung mask; see the module docstring.

    Args:
        mask: H x W binary mask.
        image: the X-ray (H x W, any numeric type) for the mean intensity inside the lungs, or None.

    Returns:
        ``area_px``, ``area_fraction``, ``image_left_px``, ``image_right_px``, ``components``,
        ``large_components``, ``mean_intensity`` (None without an image or lungs), ``bbox`` and ``status``.
    """
    m = _binary(mask)
    h, w = m.shape
    lab, n = _label(m)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    large = [i + 1 for i, s in enumerate(sizes) if s >= LARGE_FRACTION * h * w]
    left = right = 0
    for i in (np.argsort(-sizes, kind="stable")[:2] + 1 if n else []):
        xs = np.nonzero(lab == i)[1]
        if xs.mean() < (w - 1) / 2:
            left = max(left, int(sizes[i - 1]))
        else:
            right = max(right, int(sizes[i - 1]))
    area = int(m.sum())
    mean_intensity = None
    if image is not None and area:
        img = np.squeeze(np.asarray(image.cpu() if hasattr(image, "cpu") else image))
        if img.shape != m.shape:
            raise ValueError(f"image {img.shape} and mask {m.shape} differ in shape")
        mean_intensity = float(img[m].mean())
    if area == 0 or not large:
        status = "suspicious: no lung found"
    elif len(large) == 1:
        status = "suspicious: one lung"
    elif len(large) > 2:
        status = f"suspicious: {len(large)} large components"
    else:
        status = "ok"
    return {"area_px": area, "area_fraction": area / (h * w), "image_left_px": left, "image_right_px": right,
            "components": int(n), "large_components": len(large), "mean_intensity": mean_intensity,
            "bbox": bounding_box(m), "status": status}
