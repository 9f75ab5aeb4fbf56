"""Post-processing and measurements of lung masks (covidxray.data.masks), on hand-made masks."""

import numpy as np
import pytest
import torch

from covidxray.data.masks import LARGE_FRACTION, bounding_box, lung_stats, postprocess


def _two_lungs(h=64, w=64):
    m = np.zeros((h, w), bool)
    m[10:50, 6:26] = True     # image left: 40 x 20 = 800 px
    m[12:52, 38:60] = True    # image right: 40 x 22 = 880 px
    return m


def test_postprocess_keeps_the_two_largest_components_and_fills_holes():
    m = _two_lungs()
    m[30:33, 14:17] = False   # a 3x3 hole inside the left lung
    m[2:4, 2:4] = True        # a 4-px speck
    m[58:61, 30:33] = True    # a 9-px blob
    out = postprocess(m)
    want = _two_lungs()
    assert np.array_equal(out, want)
    assert np.array_equal(postprocess(m, keep=0, fill_holes=False), m)  # both steps switch off
    kept3 = postprocess(m, keep=3, fill_holes=False)
    assert kept3[59, 31] and not kept3[2, 2]


def test_the_gap_between_two_lungs_is_not_a_hole():
    m = np.zeros((20, 20), bool)
    m[2:18, 2:6] = m[2:18, 14:18] = True
    m[2:4, 2:18] = m[16:18, 2:18] = True  # joined at top and bottom: one ring-shaped component
    assert postprocess(m).sum() == 16 * 16  # a ring's inside is a hole of that component
    a = np.zeros((20, 20), bool)
    a[2:18, 2:6] = a[2:18, 14:18] = True  # two separate lungs: the space between stays empty
    assert np.array_equal(postprocess(a), a)


def test_lung_stats_measures_each_side_and_the_intensity():
    m = _two_lungs()
    img = np.full((64, 64), 200, np.uint8)
    img[m] = 50
    s = lung_stats(torch.from_numpy(m.astype(np.uint8)), torch.from_numpy(img))
    assert s["area_px"] == 1680 and s["area_fraction"] == pytest.approx(1680 / 4096)
    assert s["image_left_px"] == 800 and s["image_right_px"] == 880
    assert s["components"] == 2 and s["large_components"] == 2 and s["status"] == "ok"
    assert s["mean_intensity"] == 50.0
    assert s["bbox"] == (6 - 3, 10 - 3, 60 + 3, 52 + 3)


@pytest.mark.parametrize("case, status", [("empty", "suspicious: no lung found"), ("one", "suspicious: one lung"),
                                          ("three", "suspicious: 3 large components"), ("speck", "suspicious: no lung found")])
def test_suspicious_masks_say_why(case, status):
    m = np.zeros((64, 64), bool)
    if case == "one":
        m[10:50, 6:26] = True
    elif case == "three":
        m = _two_lungs()
        m[55:62, 28:36] = True  # 56 px >= 1 % of 4096
        assert 56 >= LARGE_FRACTION * 4096
    elif case == "speck":
        m[5, 5] = True
    s = lung_stats(m)
    assert s["status"] == status
    assert s["mean_intensity"] is None
    if case == "empty":
        assert s["bbox"] is None and s["area_px"] == 0 and s["image_left_px"] == s["image_right_px"] == 0


def test_bounding_box_is_clipped_to_the_image():
    m = np.zeros((10, 10), bool)
    m[0:3, 8:10] = True
    assert bounding_box(m, margin=0.2) == (6, 0, 10, 5)
    with pytest.raises(ValueError):
        lung_stats(np.zeros((2, 3, 4)))
