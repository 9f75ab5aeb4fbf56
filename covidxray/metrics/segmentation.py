"""Segmentation metrics as pure functions of binary masks (lung / lesion masks of chest X-rays).

Every function takes a predicted and a target mask as torch tensors (bool, uint8, ...) or NumPy
arrays, of shape ``(N, H, W)``, ``(N, 1, H, W)`` or a single ``(H, W)`` image; any nonzero value is
foreground (threshold probabilities first: 0.3 counts as foreground). The two masks must have the
same shape once the channel axis of ``(N, 1, H, W)`` is dropped. Scores are per image, float64
arrays of shape ``(N,)``; :func:`summarize` and :func:`segmentation_report` aggregate them.

Definitions (those of MONAI 1.x, so numbers are comparable with papers that report MONAI's
``DiceMetric``, ``HausdorffDistanceMetric(percentile=95)`` and
``SurfaceDistanceMetric(symmetric=True)``; the tests cross-check them against MONAI):

* **Dice** ``2|P & T| / (|P| + |T|)`` and **IoU** ``|P & T| / |P | T|``.
* **Boundary** (surface) of a mask: its foreground pixels that have at least one *4-neighbour*
  (up, down, left, right) in the background, pixels outside the image counting as background, i.e.
  ``mask XOR binary_erosion(mask)``. This is MONAI's ``get_mask_edges``, which calls
  ``scipy.ndimage.binary_erosion`` with its default structuring element, the cross of
  ``generate_binary_structure(2, 1)`` (not the full 3x3 square), and ``border_value=0``. A
  one-pixel-wide line or a single pixel is all boundary.
* **Surface distances**: for every boundary pixel of one mask, the exact Euclidean distance to the
  nearest boundary pixel of the other, times ``spacing``. Computed with
  ``scipy.ndimage.distance_transform_edt`` on the complement of the other mask's boundary (one
  distance map per image and direction, on the bounding box of both boundaries - cropping does not
  change any distance, since all boundary pixels lie inside it).
* **HD95**: in each direction (pred -> target, target -> pred) the 95th percentile of the distances
  (linear interpolation, as ``torch.quantile`` / ``np.percentile``); the result is the larger of
  the two.
* **ASD** (average symmetric surface distance): the mean of the distances of *both* directions
  pooled together, ``(sum(d_pt) + sum(d_tp)) / (n_p + n_t)``, which is what MONAI's
  ``SurfaceDistanceMetric(symmetric=True)`` computes (it concatenates the two distance arrays). It
  differs from the mean of the two directional means when the boundaries have different lengths.

Empty masks (exactly so, and never ``inf`` or ``NaN``):

* both masks empty -> Dice 1, IoU 1, HD95 0, ASD 0 (a correct "nothing here");
* exactly one empty -> Dice 0, IoU 0, HD95 = ASD = the image diagonal ``sqrt(H^2 + W^2)`` (times
  ``spacing``), the largest distance two pixels of the image can be apart.

Why: MONAI returns ``inf``/``NaN`` there and its mean reductions drop ``NaN`` - so a model that
misses more lungs entirely is averaged over fewer, easier images and can score *better*. Here each
image always contributes a finite, worst-case value, and :func:`segmentation_report` counts the
empty cases so they stay visible.

Input problems the user can fix (mismatched shapes, wrong number of axes, no images, bad spacing)
raise :class:`~covidxray.errors.CovidXrayError`.

Example:
    >>> import numpy as np
    >>> a = np.zeros((8, 8), bool); a[2:6, 2:6] = True
    >>> b = np.roll(a, 1, axis=1)                      # the square shifted one pixel right
    >>> float(dice(a, b)[0]), float(iou(a, b)[0]), float(hd95(a, b)[0])
    (0.75, 0.6, 1.0)
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from covidxray.errors import CovidXrayError

__all__ = ["dice", "iou", "hd95", "asd", "summarize", "segmentation_report"]

#: 4-connectivity cross, lifted to 3-D with no connectivity along the image (batch) axis, so one
#: ``binary_erosion`` call erodes every image of an ``(N, H, W)`` stack on its own.
_CROSS = ndimage.generate_binary_structure(2, 1)[None]


# --------------------------------------------------------------------------------------- helpers

def _as_bool(x: Any, name: str) -> np.ndarray:
    """One mask input as a bool array of shape (N, H, W)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    shape = tuple(arr.shape)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim != 3:
        raise CovidXrayError(f"{name} mask has shape {shape}; expected (N, H, W), (N, 1, H, W) or (H, W)",
                             "Pass binary masks, one channel per image (e.g. argmax or threshold the model output)")
    return arr != 0


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as bool (N, H, W) arrays of one shape, or a CovidXrayError naming both shapes."""
    p, t = _as_bool(pred, "pred"), _as_bool(target, "target")
    if p.shape != t.shape:
        raise CovidXrayError(f"pred and target masks differ in shape: pred {tuple(np.shape(pred))} vs target "
                             f"{tuple(np.shape(target))}",
                             "Resize the predictions to the target resolution and score the same images in the same order")
    if p.shape[0] == 0 or p.shape[1] == 0 or p.shape[2] == 0:
        raise CovidXrayError(f"no masks to score: pred and target have shape {tuple(np.shape(pred))}")
    return p, t


def _spacing(spacing: float | Sequence[float]) -> tuple[float, float]:
    """Pixel size as (row, column) spacing; a single number is isotropic."""
    try:
        s = (float(spacing),) * 2 if np.ndim(spacing) == 0 else tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        s = ()
    if len(s) != 2 or not all(math.isfinite(v) and v > 0 for v in s):
        raise CovidXrayError(f"spacing must be a positive number or a (row, column) pair of them, got {spacing!r}")
    return s  # type: ignore[return-value]


def _boundaries(masks: np.ndarray) -> np.ndarray:
    """Boundary pixels of every mask of a bool (N, H, W) stack: the mask minus its 4-connected erosion."""
    return masks ^ ndimage.binary_erosion(masks, structure=_CROSS, border_value=0)


def _directed(src: np.ndarray, dst: np.ndarray, sampling: tuple[float, float]) -> np.ndarray:
    """Distances from each ``src`` boundary pixel to the nearest ``dst`` boundary pixel (exact EDT)."""
    return ndimage.distance_transform_edt(~dst, sampling=sampling)[src]


def _surface_metrics(pred: Any, target: Any, spacing: float | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (HD95, ASD) under the module's definitions and empty-mask conventions."""
    p, t = _pair(pred, target)
    sy, sx = _spacing(spacing)
    n, h, w = p.shape
    diagonal = math.hypot(h * sy, w * sx)
    bp, bt = _boundaries(p), _boundaries(t)
    has_p, has_t = bp.any(axis=(1, 2)), bt.any(axis=(1, 2))
    out_hd, out_asd = np.zeros(n), np.zeros(n)
    for i in range(n):
        if not has_p[i] and not has_t[i]:
            continue                                   # both empty: 0, 0
        if has_p[i] != has_t[i]:
            out_hd[i] = out_asd[i] = diagonal          # exactly one empty: worst case, finite
            continue
        union = bp[i] | bt[i]
        rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        ep, et = bp[i][box], bt[i][box]
        d_pt, d_tp = _directed(ep, et, (sy, sx)), _directed(et, ep, (sy, sx))
        out_hd[i] = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
        out_asd[i] = (d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size)
    return out_hd, out_asd


# --------------------------------------------------------------------------------------- metrics

def dice(pred: Any, target: Any) -> np.ndarray:
    """Dice coefficient ``2|P & T| / (|P| + |T|)`` of every image.

    Args:
        pred: predicted masks, (N, H, W), (N, 1, H, W) or (H, W); nonzero = foreground.
        target: reference masks of the same shape.

    Returns:
        float64 array (N,); 1 where both masks are empty, 0 where exactly one is.
    """
    p, t = _pair(pred, target)
    inter = (p & t).sum(axis=(1, 2)).astype(np.float64)
    total = p.sum(axis=(1, 2)) + t.sum(axis=(1, 2))
    return np.divide(2.0 * inter, total, out=np.ones(p.shape[0]), where=total > 0)


def iou(pred: Any, target: Any) -> np.ndarray:
    """Intersection over union (Jaccard index) ``|P & T| / |P | T|`` of every image; arguments and the
    empty-mask values as for :func:`dice` (float64 (N,): 1 where both are empty, 0 where one is)."""
    p, t = _pair(pred, target)
    inter = (p & t).sum(axis=(1, 2)).astype(np.float64)
    union = (p | t).sum(axis=(1, 2))
    return np.divide(inter, union, out=np.ones(p.shape[0]), where=union > 0)


def hd95(pred: Any, target: Any, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance between the mask boundaries of every image.

    Args:
        pred: predicted masks, (N, H, W), (N, 1, H, W) or (H, W); nonzero = foreground.
        target: reference masks of the same shape.
        spacing: pixel size, one number or a (row, column) pair; 1.0 gives pixels.

    Returns:
        float64 array (N,): the larger of the two directional 95th percentiles; 0 where both masks
        are empty, the image diagonal (times ``spacing``) where exactly one is.
    """
    return _surface_metrics(pred, target, spacing)[0]


def asd(pred: Any, target: Any, spacing: float | Sequence[float] = 1.0) -> np.ndarray:
    """Average symmetric surface distance between the mask boundaries of every image; arguments as for
    :func:`hd95`. Returns float64 (N,): the pred->target and target->pred boundary distances pooled into one
    mean (MONAI's definition); 0 where both masks are empty, the image diagonal (times ``spacing``) where
    exactly one is."""
    return _surface_metrics(pred, target, spacing)[1]


def summarize(values: Any) -> dict[str, float | int]:
    """Mean, standard deviation, median, min, max and count of per-image scores.

    Args:
        values: 1-D scores (e.g. the output of :func:`dice`).

    Returns:
        dict with ``mean``, ``std`` (ddof=1 when n > 1, else 0), ``median``, ``min``, ``max`` as
        Python floats and ``n`` as a Python int.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise CovidXrayError("no values to summarize (empty array)")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def segmentation_report(pred: Any, target: Any, spacing: float | Sequence[float] = 1.0) -> dict[str, Any]:
    """Every segmentation metric of a set of masks, per image and summarized, plus empty-mask counts.

    Args:
        pred: predicted masks, (N, H, W), (N, 1, H, W) or (H, W); nonzero = foreground.
        target: reference masks of the same shape.
        spacing: pixel size for the distances, one number or a (row, column) pair.

    Returns:
        dict with ``per_image`` (``dice``, ``iou``, ``hd95``, ``asd`` as lists of floats),
        ``summary`` (the same keys, each a :func:`summarize` dict), and the counts ``n``,
        ``n_empty_target``, ``n_empty_pred`` and ``n_one_empty`` (exactly one of the two empty).
    """
    p, t = _pair(pred, target)
    hd, sd = _surface_metrics(p, t, spacing)
    per_image = {"dice": dice(p, t), "iou": iou(p, t), "hd95": hd, "asd": sd}
    empty_p, empty_t = ~p.any(axis=(1, 2)), ~t.any(axis=(1, 2))
    return {"per_image": {k: [float(x) for x in v] for k, v in per_image.items()},
            "summary": {k: summarize(v) for k, v in per_image.items()},
            "n": int(p.shape[0]), "n_empty_target": int(empty_t.sum()), "n_empty_pred": int(empty_p.sum()),
            "n_one_empty": int((empty_p ^ empty_t).sum())}
