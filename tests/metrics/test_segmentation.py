"""Tests of covidxray.metrics.segmentation: hand-computed toy masks, empty-mask conventions, input
handling, and a cross-check against MONAI's metrics on random blobs (skipped without MONAI).

Every expected value is derived here by hand (counting pixels and boundary distances), never copied
from a previous run of the code under test.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from covidxray.errors import CovidXrayError
from covidxray.metrics import segmentation as S


def _square(h, w, top, left, side):
    m = np.zeros((h, w), dtype=bool)
    m[top:top + side, left:left + side] = True
    return m


def _pixel(h, w, r, c):
    m = np.zeros((h, w), dtype=bool)
    m[r, c] = True
    return m


# ------------------------------------------------------------------------------------- toy cases

def test_identical_squares_are_perfect():
    a = _square(16, 16, 3, 4, 6)
    assert S.dice(a, a).tolist() == [1.0]
    assert S.iou(a, a).tolist() == [1.0]
    assert S.hd95(a, a).tolist() == [0.0]
    assert S.asd(a, a).tolist() == [0.0]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_square_shifted_by_k_pixels(k):
    side = 8
    a = _square(24, 24, 4, 4, side)
    b = _square(24, 24, 4, 4 + k, side)
    # overlap is side x (side - k); each mask has side^2 pixels
    overlap, area = side * (side - k), side * side
    np.testing.assert_allclose(S.dice(a, b), [2 * overlap / (2 * area)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.iou(a, b), [overlap / (2 * area - overlap)], rtol=0, atol=1e-12)
    # The left column of A's boundary ring (side points of 4*side-4) is exactly k from B's ring and
    # nothing is farther, so more than 5% of the distances equal the maximum k: HD95 = k.
    np.testing.assert_allclose(S.hd95(a, b), [k], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.hd95(b, a), [k], rtol=0, atol=1e-12)


def test_one_pixel_shift_asd_by_hand():
    # 4x4 squares shifted one column: each 12-pixel ring has 6 pixels on the other ring (distance 0)
    # and 6 at distance 1 (A's left column: 4, A's right column inside B: 2), both directions alike.
    a = _square(8, 8, 2, 2, 4)
    b = _square(8, 8, 2, 3, 4)
    np.testing.assert_allclose(S.asd(a, b), [0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.dice(a, b), [0.75], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.iou(a, b), [0.6], rtol=0, atol=1e-12)


def test_single_pixels_are_their_euclidean_distance_apart():
    a, b = _pixel(10, 10, 1, 1), _pixel(10, 10, 4, 5)   # (3, 4) apart -> 5
    np.testing.assert_allclose(S.hd95(a, b), [5.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.asd(a, b), [5.0], rtol=0, atol=1e-12)
    assert S.dice(a, b).tolist() == [0.0] and S.iou(a, b).tolist() == [0.0]
    c = _pixel(10, 10, 2, 2)                            # diagonal neighbour of a
    np.testing.assert_allclose(S.hd95(a, c), [math.sqrt(2)], rtol=0, atol=1e-12)


def test_spacing_scales_distances():
    a, b = _pixel(10, 10, 1, 1), _pixel(10, 10, 4, 5)
    np.testing.assert_allclose(S.hd95(a, b, spacing=0.5), [2.5], rtol=0, atol=1e-12)
    # anisotropic (row, col) spacing: rows 3 apart * 2, cols 4 apart * 1.5 -> sqrt(36 + 36)
    np.testing.assert_allclose(S.hd95(a, b, spacing=(2.0, 1.5)), [math.sqrt(72)], rtol=0, atol=1e-12)
    with pytest.raises(CovidXrayError, match="spacing"):
        S.hd95(a, b, spacing=0)


def test_distances_are_between_boundaries_not_whole_masks():
    # 3x3 square inside a concentric 5x5 one. Inner ring (8 px) -> outer ring: all 1.
    # Outer ring (16 px) -> inner ring: 12 edge pixels at 1, 4 corners at sqrt(2).
    # Sorted outer distances: twelve 1s, four sqrt(2)s; the 95th percentile (index 14.25) is sqrt(2).
    outer, inner = _square(9, 9, 2, 2, 5), _square(9, 9, 3, 3, 3)
    np.testing.assert_allclose(S.hd95(inner, outer), [math.sqrt(2)], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.hd95(outer, inner), [math.sqrt(2)], rtol=0, atol=1e-12)  # symmetric
    np.testing.assert_allclose(S.asd(inner, outer), [(8 + 12 + 4 * math.sqrt(2)) / 24], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.dice(inner, outer), [2 * 9 / (9 + 25)], rtol=0, atol=1e-12)


def test_boundary_uses_4_neighbours_like_monai():
    # A 3x3 square missing its top-left corner: the centre's four edge-neighbours are all foreground
    # (only a diagonal one is background), so with MONAI's cross erosion the centre is interior and
    # the boundary is the 7 outer pixels; with an 8-neighbour rule it would be boundary too.
    pred = _square(7, 7, 2, 2, 3)
    pred[2, 2] = False
    target = _pixel(7, 7, 3, 3)                          # the centre
    # pred ring -> centre: four at 1, three at sqrt(2); centre -> nearest ring pixel: 1.
    expected = (4 + 3 * math.sqrt(2) + 1) / 8
    np.testing.assert_allclose(S.asd(pred, target), [expected], rtol=0, atol=1e-12)
    # an 8-neighbour boundary would give (4 + 3 sqrt 2 + 0) / 9 instead
    assert abs(expected - (4 + 3 * math.sqrt(2)) / 9) > 0.05


def test_mask_touching_the_image_border_has_a_boundary_there():
    # The whole 5x5 image is foreground: pixels outside count as background, so its boundary is the
    # 16-pixel outer ring. Centre (2, 2) -> ring: 2. Ring -> centre: 4 edge midpoints at 2, 8 pixels
    # at sqrt(5), 4 corners at 2 sqrt(2); the 95th percentile (index 14.25 of 16) is 2 sqrt(2).
    full = np.ones((5, 5), dtype=bool)
    centre = _pixel(5, 5, 2, 2)
    np.testing.assert_allclose(S.hd95(centre, full), [2 * math.sqrt(2)], rtol=0, atol=1e-12)
    expected = (2 + 4 * 2 + 8 * math.sqrt(5) + 4 * 2 * math.sqrt(2)) / 17
    np.testing.assert_allclose(S.asd(centre, full), [expected], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.asd(full, full), [0.0], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------- empty masks

def test_both_empty_is_perfect():
    z = np.zeros((6, 8), dtype=bool)
    assert S.dice(z, z).tolist() == [1.0]
    assert S.iou(z, z).tolist() == [1.0]
    assert S.hd95(z, z).tolist() == [0.0]
    assert S.asd(z, z).tolist() == [0.0]


def test_one_empty_scores_zero_overlap_and_the_diagonal():
    z, a = np.zeros((6, 8), dtype=bool), _square(6, 8, 1, 1, 3)
    for p, t in ((z, a), (a, z)):
        assert S.dice(p, t).tolist() == [0.0]
        assert S.iou(p, t).tolist() == [0.0]
        np.testing.assert_allclose(S.hd95(p, t), [10.0], rtol=0, atol=1e-12)   # sqrt(6^2 + 8^2)
        np.testing.assert_allclose(S.asd(p, t), [10.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.hd95(z, a, spacing=0.5), [5.0], rtol=0, atol=1e-12)


def test_batch_mixing_cases_and_report():
    h = w = 12
    same = _square(h, w, 2, 2, 5)
    shifted = _square(h, w, 2, 4, 5)
    z = np.zeros((h, w), dtype=bool)
    pred = np.stack([same, same, z, z, same])
    target = np.stack([same, shifted, z, same, z])
    diag = math.hypot(h, w)
    np.testing.assert_allclose(S.dice(pred, target), [1, 2 * 15 / 50, 1, 0, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.iou(pred, target), [1, 15 / 35, 1, 0, 0], rtol=0, atol=1e-12)
    hd = S.hd95(pred, target)
    np.testing.assert_allclose(hd, [0, 2, 0, diag, diag], rtol=0, atol=1e-12)
    assert np.isfinite(S.asd(pred, target)).all()

    rep = S.segmentation_report(torch.from_numpy(pred).to(torch.uint8), torch.from_numpy(target))
    assert rep["n"] == 5
    assert rep["n_empty_pred"] == 2 and rep["n_empty_target"] == 2 and rep["n_one_empty"] == 2
    assert set(rep["per_image"]) == set(rep["summary"]) == {"dice", "iou", "hd95", "asd"}
    assert all(isinstance(x, float) for v in rep["per_image"].values() for x in v)
    np.testing.assert_allclose(rep["per_image"]["hd95"], hd, rtol=0, atol=1e-12)
    assert rep["summary"]["hd95"]["mean"] == pytest.approx((2 + 2 * diag) / 5, abs=1e-12)
    assert rep["summary"]["dice"]["n"] == 5 and rep["summary"]["dice"]["max"] == 1.0


# ------------------------------------------------------------------------------- input handling

def test_mismatched_shapes_are_refused_naming_both():
    with pytest.raises(CovidXrayError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        S.dice(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(CovidXrayError, match=r"\(3, 8, 8\).*\(2, 8, 8\)"):
        S.hd95(np.zeros((3, 8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(CovidXrayError, match="expected"):
        S.iou(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))      # multi-channel is not a binary mask


def test_channel_axis_single_image_and_dtypes_are_accepted():
    a, b = _square(8, 8, 2, 2, 4), _square(8, 8, 2, 3, 4)
    ref = S.hd95(a[None], b[None])
    nchw = torch.from_numpy(np.stack([a, a])[:, None]).to(torch.uint8) * 255   # nonzero = foreground
    nchw_b = torch.from_numpy(np.stack([b, a])[:, None])
    np.testing.assert_allclose(S.hd95(nchw, nchw_b), [ref[0], 0.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(S.dice(nchw, nchw_b), [0.75, 1.0], rtol=0, atol=1e-12)
    out = S.dice(a, b)                                                   # single (H, W)
    assert out.shape == (1,) and out.dtype == np.float64
    np.testing.assert_allclose(S.asd(a.astype(np.float32), b.astype(np.int64)), [0.5], rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ summarize

def test_summarize_known_numbers():
    s = S.summarize(np.array([1.0, 2.0, 3.0, 4.0]))
    assert s == {"mean": 2.5, "std": pytest.approx(math.sqrt(5 / 3), abs=1e-12), "median": 2.5,
                 "min": 1.0, "max": 4.0, "n": 4}
    assert type(s["n"]) is int and all(type(s[k]) is float for k in ("mean", "std", "median", "min", "max"))
    one = S.summarize([0.7])
    assert one["std"] == 0.0 and one["mean"] == 0.7 and one["n"] == 1
    with pytest.raises(CovidXrayError):
        S.summarize([])


# --------------------------------------------------------------------------- MONAI cross-check

def _blobs(n, h, w, seed):
    """Random smooth blobs (some touching the image border), every mask non-empty."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        field = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=rng.uniform(2, 6))
        m = field > np.quantile(field, rng.uniform(0.5, 0.9))
        if m.any():
            out.append(m)
    return np.stack(out)


def test_agrees_with_monai_on_random_blobs():
    monai_metrics = pytest.importorskip("monai.metrics")
    pred, target = _blobs(12, 48, 64, seed=1), _blobs(12, 48, 64, seed=2)
    pred[0] = target[0]                                   # one exact match
    pred[1] = np.roll(target[1], 3, axis=0)               # one near match
    yp, yt = torch.from_numpy(pred[:, None]).float(), torch.from_numpy(target[:, None]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_hd = monai_metrics.compute_hausdorff_distance(yp, yt, include_background=True, percentile=95)
        m_asd = monai_metrics.compute_average_surface_distance(yp, yt, include_background=True, symmetric=True)
        m_dice = monai_metrics.compute_dice(yp, yt, include_background=True)
    np.testing.assert_allclose(S.hd95(pred, target), m_hd[:, 0].double().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(S.asd(pred, target), m_asd[:, 0].double().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(S.dice(pred, target), m_dice[:, 0].double().numpy(), rtol=1e-6, atol=1e-6)
    assert S.hd95(pred, target)[0] == 0.0 and (S.hd95(pred, target)[2:] > 0).all()
