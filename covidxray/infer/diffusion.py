"""The diffusion family after training: a loaded ``edm`` is a :class:`~covidxray.infer.protocol.Generator` that
draws images from noise with EDM's sampler (docs/diffusion.md), per class, with classifier-free guidance."""

from __future__ import annotations

import torch

from covidxray.data.datasets import to_uint8
from covidxray.errors import CovidXrayError
from covidxray.infer.load import build_from_checkpoint
from covidxray.infer.predict import inference_settings
from covidxray.infer.protocol import Generator, register_loader
from covidxray.models import diffusion as edm


class LoadedDiffusion(Generator):
    """An EDM denoiser ready to sample (its EMA weights when the run kept them). Image i of a draw depends on
    the seed and i only (the noise of all n images is drawn, then the ones asked are denoised), so ``sample``
    resumes exactly."""

    #: The extra options of its sampling (``sample --steps --guidance``).
    options = ("steps", "guidance")

    def __init__(self, net: torch.nn.Module, cfg, weights: str, checkpoint: dict):
        self.net, self.cfg, self.weights, self.checkpoint = net, cfg, weights, checkpoint

    @property
    def conditional(self) -> bool:
        return self.net.n_classes > 0

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256, device="cpu", label: int | None = None,
               temperature: float = 1.0, only=None, steps: int | None = None,
               guidance: float | None = None) -> torch.Tensor:
        """``n`` uint8 images; ``steps`` (default ``edm.steps``) Heun or Euler steps (``edm.sampler``),
        ``guidance`` w (default ``edm.guidance``; a conditional model only), ``temperature`` scales the noise."""
        e = self.cfg.edm
        steps = e.steps if steps is None else steps
        guidance = e.guidance if guidance is None else guidance
        if steps < 1:
            raise CovidXrayError(f"--steps must be at least 1, got {steps}")
        if not 0 <= guidance <= 20:
            raise CovidXrayError(f"--guidance must be in [0, 20], got {guidance:g}")
        if self.conditional and label is None:
            raise CovidXrayError(f"model '{self.model}' is class-conditional: choose a class "
                                 f"({', '.join(self.classes)} or all)")
        size = self.image_size
        noise = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * temperature
        if only is not None:
            noise = noise[torch.as_tensor(list(only), dtype=torch.long)]
        sigmas = edm.karras_sigmas(steps, e.sigma_min, e.sigma_max, e.rho)
        # The network in bf16 where it is native (a CUDA GPU, an AMX / AVX512-BF16 CPU), as in training; the
        # preconditioning and the solver stay in float32 (docs/diffusion.md).
        dev, amp = inference_settings(device)
        net = self.net.to(dev)
        out = []
        for i in range(0, len(noise), batch_size):
            chunk = noise[i:i + batch_size].to(dev)
            y = torch.full((len(chunk),), label, dtype=torch.long, device=dev) if self.conditional else None
            denoise = edm.sampler_denoiser(net, e.sigma_data, y, guidance, self.net.n_classes)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = edm.sample(denoise, chunk, sigmas, heun=e.sampler == "heun")
            out.append(to_uint8(x.float().clamp(-1, 1)).cpu())
        return torch.cat(out) if out else torch.empty(0, 1, size, size, dtype=torch.uint8)


@register_loader("diffusion", Generator)
def load_diffusion(ckpt: dict) -> LoadedDiffusion:
    """The denoiser of a diffusion checkpoint (EMA weights when present), eval mode."""
    nets, cfg = build_from_checkpoint(ckpt, "diffusion")
    net = nets["net"]
    weights = "net_ema" if "net_ema" in ckpt["models"] else "net"
    net.load_state_dict(ckpt["models"][weights])
    return LoadedDiffusion(net.eval(), cfg, weights, ckpt)
