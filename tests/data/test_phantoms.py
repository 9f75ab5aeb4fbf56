"""Tests for the synthetic chest-radiograph phantoms (covidxray.data.phantoms)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from covidxray.data.phantoms import PHANTOM_CLASSES, render_phantom

SIZES = (16, 32, 64, 128, 256)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (row, col) pixels (plain BFS)."""
    todo = mask.copy()
    h, w = mask.shape
    found = []
    for i, j in zip(*np.nonzero(todo)):
        if not todo[i, j]:
            continue
        todo[i, j] = False
        queue, pixels = deque([(i, j)]), []
        while queue:
            a, b = queue.popleft()
            pixels.append((a, b))
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < h and 0 <= d < w and todo[c, d]:
                    todo[c, d] = False
                    queue.append((c, d))
        found.append(np.array(pixels))
    return found


def _render(label: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return render_phantom(label, size, np.random.default_rng(seed))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("label", PHANTOM_CLASSES)
def test_shapes_dtypes_and_mask_values(label: str, size: int) -> None:
    img, mask = _render(label, size, seed=size)
    assert img.shape == (size, size) and mask.shape == (size, size)
    assert img.dtype == np.uint8 and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 255}
    assert img.std() > 10  # a picture, not a flat field


@pytest.mark.parametrize("size", SIZES)
def test_mask_is_two_lungs_of_sensible_size(size: int) -> None:
    for seed in range(4 if size <= 64 else 2):
        _, mask = _render(PHANTOM_CLASSES[seed % 3], size, seed)
        lung = mask > 0
        comps = _components(lung)
        assert len(comps) == 2, f"size {size} seed {seed}: {len(comps)} lung components"
        centres = sorted(c[:, 1].mean() for c in comps)
        assert centres[0] < size / 2 < centres[1], "one lung on each side of the midline"
        assert 0.10 <= lung.mean() <= 0.45
        for comp in comps:
            assert 0.05 <= len(comp) / size**2 <= 0.25
            rows = comp[:, 0]
            assert (rows.max() - rows.min() + 1) / size >= 0.4, "lungs are tall"


def test_radiograph_convention_lungs_dark_body_bright() -> None:
    for seed in range(5):
        img, mask = _render("normal", 64, seed)
        lungs = img[mask > 0].mean()
        air = img[:4, :4].mean()  # above the shoulders
        mediastinum = img[16:40, 30:34].mean()
        abdomen = img[-6:, 24:40].mean()
        assert air < lungs < mediastinum
        assert lungs < abdomen


def test_mask_scales_with_size() -> None:
    # The anatomy is drawn in normalised coordinates: the same rng state gives the same lungs at any size.
    _, small = _render("normal", 64, 7)
    _, large = _render("normal", 128, 7)
    pooled = large.reshape(64, 2, 64, 2).mean(axis=(1, 3)) >= 127.5
    a, b = small > 0, pooled
    assert (a & b).sum() / (a | b).sum() > 0.9


def test_deterministic_and_seed_dependent() -> None:
    for label in PHANTOM_CLASSES:
        img1, mask1 = _render(label, 64, 123)
        img2, mask2 = _render(label, 64, 123)
        np.testing.assert_array_equal(img1, img2)
        np.testing.assert_array_equal(mask1, mask2)
        img3, mask3 = _render(label, 64, 124)
        assert not np.array_equal(img1, img3)
        assert not np.array_equal(mask1, mask3)


def test_one_generator_gives_a_new_phantom_each_call() -> None:
    rng = np.random.default_rng(0)
    first = render_phantom("normal", 32, rng)[0]
    second = render_phantom("normal", 32, rng)[0]
    assert not np.array_equal(first, second)


def test_same_rng_state_shares_anatomy_across_classes() -> None:
    masks = [_render(label, 64, 5)[1] for label in PHANTOM_CLASSES]
    for other in masks[1:]:
        np.testing.assert_array_equal(masks[0], other)
    images = {label: _render(label, 64, 5)[0] for label in PHANTOM_CLASSES}
    assert not np.array_equal(images["normal"], images["covid"])
    assert not np.array_equal(images["normal"], images["viral_pneumonia"])


def _lung_regions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lower-lateral, upper-medial) parts of both lungs, split at each lung's bounding-box centre."""
    lung = mask > 0
    h, w = lung.shape
    rows, cols = np.mgrid[0:h, 0:w]
    lower_lateral = np.zeros_like(lung)
    upper_medial = np.zeros_like(lung)
    for side in (slice(0, w // 2), slice(w // 2, w)):
        one = np.zeros_like(lung)
        one[:, side] = lung[:, side]
        r, c = np.nonzero(one)
        r_mid, c_mid = (r.min() + r.max()) / 2, (c.min() + c.max()) / 2
        lateral = cols < c_mid if side.start == 0 else cols > c_mid
        medial = cols > c_mid if side.start == 0 else cols < c_mid
        lower_lateral |= one & (rows > r_mid) & lateral
        upper_medial |= one & (rows < r_mid) & medial
    return lower_lateral, upper_medial


def _class_stats(label: str, seeds: range) -> dict[str, float]:
    whole, ll, um = [], [], []
    for seed in seeds:
        img, mask = _render(label, 64, seed)
        lower_lateral, upper_medial = _lung_regions(mask)
        whole.append(img[mask > 0].mean())
        ll.append(img[lower_lateral].mean())
        um.append(img[upper_medial].mean())
    return {"lung": float(np.mean(whole)), "ll": float(np.mean(ll)), "um": float(np.mean(um))}


def test_classes_are_separable_paired() -> None:
    # Same seeds for every class: anatomy and noise are shared, only the pathology differs.
    stats = {label: _class_stats(label, range(20)) for label in PHANTOM_CLASSES}
    normal, covid, viral = stats["normal"], stats["covid"], stats["viral_pneumonia"]
    assert covid["lung"] > normal["lung"] + 4
    assert viral["lung"] > normal["lung"] + 8
    covid_ll, covid_um = covid["ll"] - normal["ll"], covid["um"] - normal["um"]
    viral_ll, viral_um = viral["ll"] - normal["ll"], viral["um"] - normal["um"]
    # COVID: peripheral, lower zone. Viral: diffuse (if anything heavier centrally).
    assert covid_ll > covid_um + 10
    assert covid_ll - covid_um > viral_ll - viral_um + 10


def test_classes_are_separable_unpaired() -> None:
    # Independent patients per class: the pathology must still show through the anatomical variation.
    stats = {
        label: _class_stats(label, range(100 * k, 100 * k + 20)) for k, label in enumerate(PHANTOM_CLASSES)
    }
    assert stats["covid"]["lung"] > stats["normal"]["lung"] + 3
    assert stats["viral_pneumonia"]["lung"] > stats["normal"]["lung"] + 6


def test_unknown_label_names_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        render_phantom("lung_opacity", 32, np.random.default_rng(0))
    for label in PHANTOM_CLASSES:
        assert label in str(info.value)


@pytest.mark.parametrize("size", [0, 4, 12.5])
def test_bad_size_is_rejected(size: float) -> None:
    with pytest.raises(ValueError):
        render_phantom("normal", size, np.random.default_rng(0))  # type: ignore[arg-type]
