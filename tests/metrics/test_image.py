"""PSNR, SSIM, the VAE's KL and reparameterisation against hand-computed values."""

import math

import pytest
import torch

from covidxray.metrics import image as IM


def test_psnr_of_a_constant_error_and_of_identical_images():
    x = torch.rand(3, 1, 16, 16)
    y = (x + 0.05).clamp(max=2)  # no clamping happens: x < 1
    assert IM.psnr(y, x).tolist() == pytest.approx([10 * math.log10(1 / 0.0025)] * 3, rel=1e-5)
    assert IM.psnr(x * 255, x * 255 + 5, data_range=255).tolist() == pytest.approx([10 * math.log10(255 ** 2 / 25)] * 3,
                                                                                   rel=1e-5)
    assert IM.psnr(x, x).tolist() == [IM.PSNR_CAP] * 3  # capped, never inf in a mean


def test_ssim_of_identical_and_of_constant_images():
    x = torch.rand(2, 1, 32, 32)
    assert IM.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    a, b = torch.full((1, 1, 32, 32), 0.5), torch.full((1, 1, 32, 32), 0.6)
    c1 = 0.01 ** 2  # no variance: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    # float32: sigma^2 = E[x^2] - mu^2 cancels to ~1e-7 against C2 = 9e-4, so the contrast term is 1 within ~2e-4
    # (1.0002 on an AMD EPYC, 1.0000 on an Intel Xeon)
    assert float(IM.ssim(a, b)) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), rel=5e-4)
    assert float(IM.ssim(x[:1], torch.rand(1, 1, 32, 32))) < 0.2  # unrelated noise


def test_kl_of_known_gaussians():
    mu, logvar = torch.zeros(2, 4), torch.zeros(2, 4)
    assert IM.kl_normal(mu, logvar).tolist() == [0.0, 0.0]
    assert IM.kl_normal(mu + 1, logvar).tolist() == pytest.approx([2.0, 2.0])  # 4 dims x 1/2
    kl = IM.kl_normal(mu, logvar + math.log(2.0))  # sigma^2 = 2: 1/2 (2 - 1 - ln 2) per dim
    assert kl.tolist() == pytest.approx([4 * 0.5 * (1 - math.log(2))] * 2, rel=1e-6)


def test_reparameterisation_draws_the_asked_gaussian():
    mu, logvar = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, math.log(4.0)]])
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    z = IM.reparameterize(mu, logvar, eps)
    assert z.mean(0).tolist() == pytest.approx([1.0, -2.0], abs=0.02)
    assert z.std(0).tolist() == pytest.approx([1.0, 2.0], abs=0.02)
    assert torch.equal(IM.reparameterize(mu, logvar, torch.zeros(1, 2)), mu)
