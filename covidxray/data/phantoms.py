"""Synthetic chest-radiograph phantoms with exact lung masks (NOT medical data).

STUB: placeholder shapes; to be replaced by the realistic generator.
"""

from __future__ import annotations

import numpy as np

PHANTOM_CLASSES = ("covid", "normal", "viral_pneumonia")


def render_phantom(label: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Render one phantom. Returns (image uint8 HxW, mask uint8 HxW with values 0/255)."""
    if label not in PHANTOM_CLASSES:
        raise ValueError(f"unknown phantom class {label!r}; expected one of {PHANTOM_CLASSES}")
    yy, xx = np.mgrid[0:size, 0:size] / size
    mask = np.zeros((size, size), np.uint8)
    for cx in (0.33, 0.67):
        inside = ((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        mask[inside] = 255
    img = 200 - 120 * (mask > 0) + rng.normal(0, 8, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), mask
