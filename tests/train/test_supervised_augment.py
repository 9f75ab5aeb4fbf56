"""On-device augmentation of the supervised tasks (covidxray.data.transforms) and the learning-rate schedule."""

import math

import pytest
import torch

from covidxray.data.transforms import affine_matrices, augment_batch, jitter, warp
from covidxray.train.optim import schedule_factor


def test_identity_matrices_keep_the_image():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    theta = affine_matrices(3)  # all ranges 0
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))
    assert torch.allclose(warp(x, theta), x, atol=1e-5)


def test_a_quarter_turn_and_a_shift_bring_in_black():
    x = torch.full((1, 1, 8, 8), -1.0)
    x[0, 0, 0, :] = 1.0  # a white top row
    quarter = torch.tensor([[[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]]])  # output (x, y) reads input (-y, x)
    y = warp(x, quarter, mode="nearest")
    expected = torch.full((8, 8), -1.0)
    expected[:, 0] = 1.0  # the top row became the left column
    assert torch.equal(y[0, 0], expected)
    shift = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]])  # content moves left by a quarter of the width
    z = warp(torch.ones(1, 1, 8, 8), shift, mode="nearest")
    assert torch.equal(z[0, 0, :, -2:], torch.full((8, 2), -1.0))  # black comes in, not mid-grey
    assert torch.equal(z[0, 0, :, :6], torch.ones(8, 6))


def test_image_and_mask_share_one_draw():
    g = torch.Generator().manual_seed(0)
    theta = affine_matrices(4, g, rotate=15, scale=0.1, translate=0.1)
    mask = (torch.rand(4, 1, 32, 32) > 0.5).float()
    image = mask * 2 - 1  # the image is its mask in [-1, 1]
    warped_image = warp(image, theta, mode="nearest")
    warped_mask = warp(mask, theta, mode="nearest", fill=0.0)
    assert torch.equal(warped_image, warped_mask * 2 - 1)


def test_draws_are_per_image_in_range_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = affine_matrices(500, g1, rotate=10, scale=0.1, translate=0.1)
    b = affine_matrices(500, g2, rotate=10, scale=0.1, translate=0.1)
    assert torch.equal(a, b)
    # |det| = 1 / zoom^2 with zoom in [0.9, 1.1]; translations within 2 x 0.1 of the normalised side
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    assert det.min() >= 1 / 1.1**2 - 1e-6 and det.max() <= 1 / 0.9**2 + 1e-6
    assert a[:, :, 2].abs().max() <= 0.2 + 1e-6 and a[:, :, 2].std() > 0.05
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    assert angle.abs().max() <= math.radians(10) + 1e-6 and angle.std() > math.radians(3)
    flips = affine_matrices(400, torch.Generator().manual_seed(0), hflip=True)[:, 0, 0]
    assert 150 < int((flips < 0).sum()) < 250  # about half mirrored


def test_jitter_known_answer_and_clamp():
    x = torch.tensor([[[[-0.5, 0.5]]]])
    assert torch.equal(jitter(x), x)  # no ranges: unchanged
    g = torch.Generator().manual_seed(0)
    y = jitter(x.expand(64, 1, 1, 2).clone(), g, brightness=0.2, contrast=0.5)
    spread = y[:, 0, 0, 1] - y[:, 0, 0, 0]  # contrast factor in [0.5, 1.5] times the spread 1.0
    assert spread.min() >= 0.5 - 1e-6 and spread.max() <= 1.5 + 1e-6
    mid = y.mean((1, 2, 3))  # the mean moves by the brightness shift only
    assert mid.abs().max() <= 0.2 + 1e-6
    assert augment_batch(torch.full((2, 1, 4, 4), 0.95), g, brightness=0.9).max() <= 1.0


def test_schedule_factors():
    assert schedule_factor("cosine", 0.0, 10) == pytest.approx(1.0)
    assert schedule_factor("cosine", 5.0, 10) == pytest.approx(0.5)
    assert schedule_factor("cosine", 10.0, 10) == pytest.approx(0.0, abs=1e-12)
    # warm-up: linear from 0 over 2 epochs, then the cosine over the remaining 8
    assert schedule_factor("cosine", 1.0, 10, warmup_epochs=2) == pytest.approx(0.5)
    assert schedule_factor("cosine", 6.0, 10, warmup_epochs=2) == pytest.approx(0.5)
    assert schedule_factor("step", 25.0, 30, step_epochs=10, step_gamma=0.1) == pytest.approx(0.01)
    assert schedule_factor("none", 7.0, 10) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_factor("linear", 1.0, 10)
