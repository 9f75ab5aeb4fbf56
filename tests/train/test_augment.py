"""Tests of DiffAugment for grayscale X-rays (covidxray.data.diffaugment)."""

import pytest
import torch

from covidxray.data.diffaugment import DEFAULT_POLICY, FILL, POLICIES, diff_augment, parse_policy


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _images(n=8, size=32, seed=0):
    # Values in (-0.9, 0.9): never equal to the -1 fill, so filled pixels are recognisable.
    return torch.rand(n, 1, size, size, generator=_gen(seed)) * 1.8 - 0.9


def test_parse_policy():
    assert parse_policy("translation,cutout") == ("translation", "cutout")
    assert parse_policy(" Translation , cutout, ") == ("translation", "cutout")
    assert parse_policy("") == ()
    assert parse_policy(["brightness", "flip"]) == ("brightness", "flip")
    assert parse_policy(DEFAULT_POLICY) == ("translation", "cutout", "brightness", "contrast")
    assert "flip" in POLICIES and "flip" not in DEFAULT_POLICY


@pytest.mark.parametrize("bad, match", [
    ("translation,zoom", "valid names: translation, cutout"),
    ("color", "brightness,contrast"),
    ("saturation", "grayscale"),
    ("cutout,cutout", "twice"),
])
def test_parse_policy_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_policy(bad)
    with pytest.raises(ValueError):
        diff_augment(_images(), bad)


def test_empty_policy_returns_input():
    x = _images()
    assert diff_augment(x, "") is x
    assert diff_augment(x, []) is x


@pytest.mark.parametrize("policy", [DEFAULT_POLICY, *POLICIES])
def test_shape_dtype_and_gradient(policy):
    x = _images(n=4, size=16).requires_grad_(True)
    y = diff_augment(x, policy, generator=_gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deterministic_with_generator():
    x = _images()
    a = diff_augment(x, DEFAULT_POLICY + ",flip", generator=_gen(5))
    b = diff_augment(x, DEFAULT_POLICY + ",flip", generator=_gen(5))
    c = diff_augment(x, DEFAULT_POLICY + ",flip", generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_state_resume_is_exact():
    x = _images()
    g = _gen(2)
    diff_augment(x, DEFAULT_POLICY, generator=g)
    state = g.get_state()
    second = diff_augment(x, DEFAULT_POLICY, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(diff_augment(x, DEFAULT_POLICY, generator=g2), second)


def test_translation_integer_shift_with_black_fill():
    n, size = 64, 16
    x = torch.full((n, 1, size, size), -1.0)
    x[:, 0, 8, 7] = 1.0  # one bright pixel
    y = diff_augment(x, "translation", generator=_gen(3))
    max_shift = 2  # round(16 / 8)
    shifts = set()
    for img in y[:, 0]:
        ones = torch.nonzero(img == 1.0)
        assert len(ones) == 1 and ((img == 1.0) | (img == -1.0)).all()
        dy, dx = int(ones[0, 0]) - 8, int(ones[0, 1]) - 7
        assert abs(dy) <= max_shift and abs(dx) <= max_shift
        shifts.add((dy, dx))
    assert len(shifts) > 10  # 25 possible shifts; 64 draws see most of them


def test_translation_moves_content_and_pads():
    x = _images(n=32, size=16)
    y = diff_augment(x, "translation", generator=_gen(4))
    for xi, yi in zip(x[:, 0], y[:, 0]):
        kept = yi != FILL
        # Every kept pixel is the input shifted by one integer offset; the rest is -1.
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.roll(xi, (dy, dx), (0, 1))
                if torch.equal(yi[kept], shifted[kept]) and kept.sum() == (16 - abs(dy)) * (16 - abs(dx)):
                    found = True
        assert found


def test_fill_value_is_configurable():
    x = _images(n=16, size=16)
    y = diff_augment(x, "cutout", generator=_gen(0), fill=0.0)
    assert (y == 0.0).any() and not (y == -1.0).any()


def test_brightness_shifts_mean_and_contrast_keeps_it():
    x = _images(n=64)
    mean = x.mean(dim=(1, 2, 3))
    yb = diff_augment(x, "brightness", generator=_gen(0))
    delta = yb.mean(dim=(1, 2, 3)) - mean
    assert (delta.abs() <= 0.5 + 1e-6).all() and delta.std() > 0.1
    # brightness adds one constant per image
    assert torch.allclose(yb - x, delta[:, None, None, None].expand_as(x), atol=1e-6)
    yc = diff_augment(x, "contrast", generator=_gen(0))
    assert torch.allclose(yc.mean(dim=(1, 2, 3)), mean, atol=1e-5)
    ratio = yc.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert (ratio >= 0.5 - 1e-5).all() and (ratio <= 1.5 + 1e-5).all() and ratio.std() > 0.1


def test_cutout_sets_a_half_side_square_to_fill():
    size, side = 32, 16
    x = _images(n=64, size=size)
    y = diff_augment(x, "cutout", generator=_gen(7))
    full_squares = 0
    for yi in y[:, 0]:
        cut = yi == FILL
        rows, cols = torch.nonzero(cut, as_tuple=True)
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert h * w == len(rows) and h <= side and w <= side  # one filled rectangle, at most the square
        full_squares += h == side and w == side
    assert torch.equal(y[y != FILL], x[y != FILL])
    assert full_squares > 10  # squares centred away from the border are complete


def test_flip_only_when_listed():
    x = _images(n=64)
    y = diff_augment(x, "flip", generator=_gen(0))
    flipped = torch.tensor([torch.equal(yi, xi.flip(2)) for xi, yi in zip(x, y)])
    same = torch.tensor([torch.equal(yi, xi) for xi, yi in zip(x, y)])
    assert (flipped | same).all() and 10 < int(flipped.sum()) < 54

    # A left-to-right ramp: mirroring would make its correlation with the input negative.
    ramp = torch.linspace(-0.9, 0.9, 32).expand(64, 1, 32, 32).contiguous()

    def corr(a, b):
        a, b = a - a.mean((2, 3), keepdim=True), b - b.mean((2, 3), keepdim=True)
        return (a * b).mean((1, 2, 3))

    assert (corr(diff_augment(ramp, "translation,brightness,contrast", generator=_gen(1)), ramp) > 0).all()
    assert (corr(diff_augment(ramp, "flip", generator=_gen(1)), ramp) < 0).any()


def test_input_validation():
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        diff_augment(torch.zeros(8, 8), "translation")
    with pytest.raises(ValueError, match="uint8"):
        diff_augment(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "translation")


def test_bf16_and_channels_last():
    x = _images(n=4, size=16, seed=1).to(torch.bfloat16)
    y = diff_augment(x, DEFAULT_POLICY, generator=_gen(0))
    assert y.dtype == torch.bfloat16
    x3 = torch.rand(4, 3, 16, 16).to(memory_format=torch.channels_last)
    a = diff_augment(x3, DEFAULT_POLICY, generator=_gen(0))
    b = diff_augment(x3.contiguous(), DEFAULT_POLICY, generator=_gen(0))
    assert torch.allclose(a, b, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = diff_augment(_images(n=2, size=8), DEFAULT_POLICY, generator=_gen(0))
    assert z.shape == (2, 1, 8, 8)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bf16_autocast_channels_last_without_host_syncs():
    dev = torch.device("cuda")
    x = (_images(n=16, size=32).to(dev).to(memory_format=torch.channels_last)).requires_grad_(True)
    conv = torch.nn.Conv2d(1, 2, 3).to(dev, memory_format=torch.channels_last)
    policy = DEFAULT_POLICY + ",flip"
    torch.cuda.set_sync_debug_mode("error")  # any .item()/host sync inside raises
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = diff_augment(conv(x), policy, generator=torch.Generator(device=dev).manual_seed(0))
        y.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.dtype == torch.bfloat16 and x.grad is not None and bool(x.grad.abs().sum() > 0)
    a = diff_augment(x.detach(), policy, generator=torch.Generator(device=dev).manual_seed(1))
    b = diff_augment(x.detach(), policy, generator=torch.Generator(device=dev).manual_seed(1))
    assert torch.equal(a, b)


@cuda
def test_cuda_translation_known_answer_and_generator_check():
    dev = torch.device("cuda")
    x = torch.full((64, 1, 16, 16), -1.0, device=dev)
    x[:, 0, 8, 7] = 1.0
    y = diff_augment(x, "translation", generator=torch.Generator(device=dev).manual_seed(3))
    assert bool(((y == 1.0).sum(dim=(1, 2, 3)) == 1).all()) and bool(((y == 1.0) | (y == -1.0)).all())
    with pytest.raises(ValueError, match="Generator"):
        diff_augment(x, "translation", generator=torch.Generator())
