"""Image-reconstruction metrics and the VAE's closed forms, as pure functions on tensors.

* :func:`psnr` - peak signal-to-noise ratio per image, ``10 log10(range^2 / MSE)`` in dB (identical images:
  ``inf``; :func:`psnr` caps it at :data:`PSNR_CAP` dB so that a mean stays finite, and says so);
* :func:`ssim` - structural similarity per image (Wang et al. 2004: 11-tap Gaussian window, sigma 1.5,
  K1 0.01, K2 0.03), computed by ``pytorch_msssim`` (the kernels the MS-SSIM diversity score uses too);
* :func:`kl_normal` - KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed over the latent dimensions;
* :func:`reparameterize` - ``mu + exp(logvar / 2) * eps`` (Kingma & Welling 2014).

Images are float tensors N x C x H x W in ``[0, data_range]``.
"""

from __future__ import annotations

import torch
from pytorch_msssim import ssim as _ssim

#: PSNR of (near-)identical images is reported as this many dB instead of infinity.
PSNR_CAP = 100.0


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (N,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per image (N,) in dB, capped at :data:`PSNR_CAP`.

    Example:
        >>> x = torch.zeros(1, 1, 4, 4); y = x + 0.1
        >>> round(float(psnr(y, x)), 4)  # 10 log10(1 / 0.01)
        20.0
    """
    err = mse(pred, target)
    out = 10 * torch.log10(data_range ** 2 / err.clamp_min(1e-30))
    return out.clamp(max=PSNR_CAP)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per image (N,) with the standard 11-tap Gaussian window (needs sides of at least 11 px)."""
    return _ssim(pred.float(), target.float(), data_range=data_range, size_average=False)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL divergence of N(mu, diag(exp(logvar))) from N(0, I) per sample (N,), in nats:
    ``-1/2 sum(1 + logvar - mu^2 - exp(logvar))``."""
    mu, logvar = mu.float(), logvar.float()
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).flatten(1).sum(1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A draw ``mu + sigma * eps`` of N(mu, sigma^2), sigma = exp(logvar / 2), given standard normal ``eps``."""
    return mu + torch.exp(0.5 * logvar) * eps
