"""Diffusion in the EDM formulation: Karras, Aittala, Aila & Laine, "Elucidating the design space of
diffusion-based generative models", NeurIPS 2022 (arXiv 2206.00364), Table 1 and Algorithms 1-2.

Each part of the formulation is a small pure function that can be checked against the paper's equations:

* **Preconditioning** (:func:`edm_coefficients`, :func:`precondition`): the denoiser is
  ``D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))`` with

  ``c_skip = σ_d² / (σ² + σ_d²)``, ``c_out = σ σ_d / sqrt(σ² + σ_d²)``, ``c_in = 1 / sqrt(σ² + σ_d²)``,
  ``c_noise = ln(σ) / 4``,

  so that the network F sees inputs and targets of unit variance at every noise level.
* **Training noise** (:func:`training_sigmas`): ``ln σ ~ N(P_mean, P_std²)`` (the paper: -1.2, 1.2).
* **Loss weight** (:func:`loss_weight`): ``λ(σ) = (σ² + σ_d²) / (σ σ_d)²``, which makes the effective
  weight of F's error 1 at every σ.
* **Sampling schedule** (:func:`karras_sigmas`): ``σ_i = (σ_max^(1/ρ) + i/(N-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ``
  for ``i < N``, and ``σ_N = 0`` (the paper: σ_min 0.002, σ_max 80, ρ = 7).
* **Sampler** (:func:`sample`): the deterministic Heun (2nd order) solver of the probability-flow ODE,
  Algorithm 1 (2N - 1 network evaluations for N steps). Euler is an option (N evaluations), and so is
  Algorithm 2's stochastic churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``); so is the multistep
  DPM-Solver++(2M) of Lu et al. 2022 (:func:`sample_dpm2m`, N evaluations, second order).
* **Classifier-free guidance** (:func:`guided`, Ho & Salimans 2022): ``D_w = D_uncond + w (D_cond - D_uncond)``,
  so w = 1 is the conditional denoiser and w = 0 the unconditional one.

Written from the paper; no code of NVlabs/edm (non-commercial licence) was used.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from covidxray.models.registry import DataSpec, register_model

#: A denoiser as the sampler calls it: ``D(x, sigma)`` with ``sigma`` a tensor of shape (N,).
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (N,) or a scalar, shaped to broadcast against ``x`` (N x ...)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.dim() - 1))) if sigma.dim() else sigma


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of EDM's preconditioning at noise level ``sigma`` (Table 1).

    Example:
        >>> [round(float(c), 5) for c in edm_coefficients(torch.tensor(0.5), 0.5)]
        [0.5, 0.35355, 1.41421, -0.17329]
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + d2)
    c_in = 1 / torch.sqrt(s2 + d2)
    c_noise = torch.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def precondition(net: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5,
                 **condition) -> torch.Tensor:
    """``D(x; σ) = c_skip x + c_out F(c_in x; c_noise, **condition)``: the denoiser of the network F (``net``),
    evaluated in float32 around F (F itself may run under autocast)."""
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma.float(), sigma_data)
    x = x.float()
    f = net(_col(c_in, x).to(x.device) * x, c_noise.to(x.device).reshape(-1), **condition).float()
    return _col(c_skip, x).to(x.device) * x + _col(c_out, x).to(x.device) * f


def training_sigmas(n: int, p_mean: float = -1.2, p_std: float = 1.2, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` training noise levels, ``ln σ ~ N(P_mean, P_std²)`` (the paper's log-normal)."""
    z = torch.randn(n, generator=generator, device=device)
    return torch.exp(p_mean + p_std * z)


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """``λ(σ) = (σ² + σ_d²) / (σ σ_d)²``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def karras_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """The ``steps`` noise levels of the sampler, from ``sigma_max`` down to ``sigma_min``, then 0 (float64).

    Example:
        >>> [round(s, 4) for s in karras_sigmas(3, 0.002, 80.0, 7.0).tolist()]
        [80.0, 2.5152, 0.002, 0.0]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = (a + i / (steps - 1) * (b - a)) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance of two denoised estimates: ``uncond + w (cond - uncond)``."""
    if w == 1:
        return cond
    if w == 0:
        return uncond
    return uncond + w * (cond - uncond)


#: The samplers of :func:`sample` (``edm.sampler``).
SAMPLERS = ("heun", "euler", "dpm2m")


@torch.no_grad()
def sample(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor, method: str = "heun", s_churn: float = 0.0,
           s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x_0 = sigmas[0] * noise`` along ``sigmas`` (ending in 0).

    ``method``: ``heun`` (Algorithm 1) takes two network evaluations per step except the last (2N - 1 in all);
    ``euler`` one per step; ``dpm2m`` (:func:`sample_dpm2m`) one per step, second order from the previous step's
    estimate. ``s_churn > 0`` (Heun and Euler) adds Algorithm 2's noise: at each ``σ_i`` in [s_tmin, s_tmax] the
    level is raised to ``σ̂ = σ_i (1 + γ)``, ``γ = min(s_churn / N, √2 - 1)``, with fresh noise of scale
    ``s_noise`` from ``generator``.

    Args:
        denoise: ``D(x, sigma)`` -> the denoised estimate (sigma a tensor of shape (N,)).
        noise: standard normal draws, N x C x H x W (float32).
        sigmas: the schedule, e.g. :func:`karras_sigmas` (float64 on any device; cast here).
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; one of {', '.join(SAMPLERS)}")
    if method == "dpm2m":
        if s_churn > 0:
            raise ValueError("the dpm2m sampler is deterministic; stochastic churn needs heun or euler")
        return sample_dpm2m(denoise, noise, sigmas)
    steps = len(sigmas) - 1
    x = noise.float() * float(sigmas[0])
    n = x.shape[0]
    gamma_max = min(s_churn / steps, math.sqrt(2) - 1) if steps else 0.0
    for i in range(steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = gamma_max if s_churn > 0 and s_tmin <= s_cur <= s_tmax else 0.0
        s_hat = s_cur * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device if generator is None else generator.device)
            x = x + math.sqrt(s_hat ** 2 - s_cur ** 2) * s_noise * eps.to(x.device)
        d = (x - denoise(x, torch.full((n,), s_hat, device=x.device))) / s_hat
        x_next = x + (s_next - s_hat) * d
        if method == "heun" and s_next > 0:
            d2 = (x_next - denoise(x_next, torch.full((n,), s_next, device=x.device))) / s_next
            x_next = x + (s_next - s_hat) * (d + d2) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_dpm2m(denoise: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu, Zhou, Bao, Chen, Li & Zhu, arXiv 2211.01095, Algorithm 2) in EDM's terms
    (signal scale 1, noise σ, half-log-SNR λ = -ln σ): one network evaluation per step, second order by
    reusing the previous step's denoised estimate.

    With ``h_i = ln(σ_i / σ_{i+1})`` and ``r_i = h_{i-1} / h_i``:
    ``x_{i+1} = (σ_{i+1} / σ_i) x_i + (1 - σ_{i+1} / σ_i) D̂_i``, where ``D̂_0 = D_0`` and
    ``D̂_i = (1 + 1 / (2 r_i)) D_i - D_{i-1} / (2 r_i)``; the last step, to σ = 0, returns ``D̂`` of first
    order (``D_i`` itself), so N steps cost N evaluations.
    """
    steps = len(sigmas) - 1
    x = noise.float() * float(sigmas[0])
    n = x.shape[0]
    previous, h_previous = None, 0.0
    for i in range(steps):
        s_cur, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, torch.full((n,), s_cur, device=x.device)).float()
        if s_next == 0:
            return d
        h = math.log(s_cur / s_next)
        d_hat = d
        if previous is not None:
            c = 1 / (2 * (h_previous / h))  # 1 / (2 r_i), r_i = h_{i-1} / h_i
            d_hat = (1 + c) * d - c * previous
        x = (s_next / s_cur) * x + (1 - s_next / s_cur) * d_hat
        previous, h_previous = d, h
    return x


def mask_input(masks: torch.Tensor) -> torch.Tensor:
    """0/1 uint8 lung masks (N x 1 x H x W) as the mask model's extra input channel, in [-1, 1]."""
    return masks.float() * 2 - 1


def network_evaluations(steps: int, method: str = "heun") -> int:
    """Denoiser calls of :func:`sample` for ``steps`` steps (Heun: 2N - 1; Euler and DPM-Solver++(2M): N),
    per image and without guidance (guidance w != 0, 1 doubles them)."""
    return 2 * steps - 1 if method == "heun" else steps


def sampler_denoiser(net, sigma_data: float, labels: torch.Tensor | None, guidance: float, n_classes: int,
                     cond: torch.Tensor | None = None):
    """``D(x, σ)`` for the sampler: the preconditioned ``net`` conditioned on ``labels``, with classifier-free
    guidance ``w`` against the "no class" entry (w = 1: the conditional model only, w = 0: the unconditional one
    only, one evaluation per call each; otherwise two)."""
    extra = {} if cond is None else {"cond": cond}
    if labels is None or not n_classes:
        return lambda x, sigma: precondition(net, x, sigma, sigma_data, **extra)
    if guidance == 1:
        return lambda x, sigma: precondition(net, x, sigma, sigma_data, labels=labels, **extra)
    null = torch.full_like(labels, n_classes)
    if guidance == 0:  # the unconditional model alone: one evaluation per call
        return lambda x, sigma: precondition(net, x, sigma, sigma_data, labels=null, **extra)

    def denoise(x, sigma):
        conditional = precondition(net, x, sigma, sigma_data, labels=labels, **extra)
        unconditional = precondition(net, x, sigma, sigma_data, labels=null, **extra)
        return guided(conditional, unconditional, guidance)

    return denoise


# ------------------------------------------------------------------------------------------ the denoiser network
class _ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the embedding (noise level, class) as a per-channel shift, twice; a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class EDMUNet(nn.Module):
    """The network F of EDM's denoiser: a U-Net (residual blocks with GroupNorm, average-pool down, nearest up,
    skip connections) whose blocks take an embedding of the noise level ``c_noise`` (sinusoidal, then an MLP)
    plus, for a conditional model, a learned embedding of the class. Class index ``n_classes`` is "no class"
    (the unconditional model of classifier-free guidance).

    Example:
        >>> net = EDMUNet(32, channels=8, depth=2, emb_dim=16, n_classes=3)
        >>> net(torch.zeros(2, 1, 32, 32), torch.zeros(2), labels=torch.tensor([0, 3])).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, image_size: int, channels: int = 32, depth: int = 3, emb_dim: int = 128, n_classes: int = 0,
                 dropout: float = 0.0, in_channels: int = 1, cond_channels: int = 0):
        super().__init__()
        self.image_size, self.n_classes, self.emb_dim = image_size, n_classes, emb_dim
        self.cond_channels = cond_channels  # extra input maps beside the noisy image (edm_mask: the lung mask)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(n_classes + 1, emb_dim) if n_classes > 0 else None
        widths = [channels * min(2 ** i, 4) for i in range(depth + 1)]
        self.inp = nn.Conv2d(in_channels + cond_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(_ResBlock(widths[i], widths[i + 1], emb_dim, dropout) for i in range(depth))
        self.mid = _ResBlock(widths[-1], widths[-1], emb_dim, dropout)
        self.up = nn.ModuleList(_ResBlock(widths[i + 1] * 2, widths[i], emb_dim, dropout)
                                for i in reversed(range(depth)))
        self.out = nn.Sequential(nn.GroupNorm(min(8, widths[0]), widths[0]), nn.SiLU(),
                                 nn.Conv2d(widths[0], in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # F starts at 0: D starts as c_skip x, the best guess without training
        nn.init.zeros_(self.out[-1].bias)

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        half = self.emb_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=c_noise.device) / half)
        angle = c_noise.float()[:, None] * 1000 * freqs[None]  # c_noise = ln(σ)/4 spans a few units: scaled up
        emb = self.noise_mlp(torch.cat([angle.cos(), angle.sin()], dim=1))
        if self.class_emb is not None:
            if labels is None:
                labels = torch.full((c_noise.shape[0],), self.n_classes, dtype=torch.long, device=c_noise.device)
            emb = emb + self.class_emb(labels)
        return emb

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embed(c_noise, labels).to(x.dtype)
        h = self.inp(x if cond is None else torch.cat([x, cond.to(x.dtype)], dim=1))
        skips = []
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
            h = F.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for block in self.up:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


@register_model("edm", family="diffusion", conditional=True, min_image_size=32, features=("draws",),
                paper="Karras et al., Elucidating the design space of diffusion-based generative models, NeurIPS 2022",
                summary="EDM pixel-space diffusion: class-conditional with classifier-free guidance, Heun sampler")
def build_edm(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """The denoiser network F of ``edm`` (``arch.*``), conditioned on the data's classes when there are several."""
    a = cfg.arch
    n_classes = data.n_classes if data.n_classes > 1 and cfg.model.p_uncond < 1 else 0
    return {"net": EDMUNet(data.image_size, a.channels, a.depth, a.emb_dim, n_classes, a.dropout, data.channels)}


@register_model("edm_mask", family="diffusion", conditional=True, min_image_size=32, features=("masks",),
                paper="Karras et al., NeurIPS 2022; mask-conditioned as pix2pix (Isola et al., CVPR 2017) is",
                summary="EDM conditioned on a lung mask (and the class): mask -> X-ray, for synthetic (X-ray, mask) pairs")
def build_edm_mask(cfg, data: DataSpec) -> dict[str, nn.Module]:
    """``edm``'s denoiser with the lung mask (in [-1, 1]) as an extra input channel: it draws X-rays for given
    masks, as ``pix2pix`` does."""
    a = cfg.arch
    n_classes = data.n_classes if data.n_classes > 1 and cfg.model.p_uncond < 1 else 0
    return {"net": EDMUNet(data.image_size, a.channels, a.depth, a.emb_dim, n_classes, a.dropout, data.channels,
                           cond_channels=1)}
