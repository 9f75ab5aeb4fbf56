"""The diffusion family after training: a loaded ``edm`` is a :class:`~covidxray.infer.protocol.Generator` that
draws images from noise with EDM's sampler (docs/diffusion.md), per class, with classifier-free guidance."""

from __future__ import annotations

import numbers

import torch

from covidxray.data.datasets import to_uint8
from covidxray.errors import CovidXrayError
from covidxray.infer.load import build_from_checkpoint
from covidxray.infer.predict import inference_settings
from covidxray.infer.protocol import Generator, MaskTranslator, register_loader
from covidxray.models import diffusion as edm

#: The denoiser samples in channels-last: measured 1.5x faster than contiguous on the 2-core AMX CPU in bf16
#: (1.28 against 1.96 s for a batch of 32 at 64 px, one thread); as the training step, which is channels-last.
CHANNELS_LAST = torch.channels_last
#: Images per denoiser call on a CPU: smaller batches stay in cache, measured 1.4x faster per image at 32 than at
#: 256 (19 against 27 ms per image and evaluation, 64 px, bf16, one thread); a GPU takes the caller's batch.
CPU_BATCH = 32


class _Sampling:
    """The sampler settings of a loaded diffusion model: the run's ``edm`` section, which :meth:`configure` (the
    CLI's ``--steps --guidance --sampler``) overrides for every later draw."""

    options = ("steps", "guidance", "sampler")
    cfg: "object"
    net: torch.nn.Module

    @classmethod
    def check_options(cls, steps: int | None = None, guidance: float | None = None, sampler: str | None = None
                      ) -> dict:
        """The options given, checked (a study checks its spec's with this before anything trains)."""
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
                                  or not 1 <= steps <= 1000):
            raise CovidXrayError(f"--steps must be a whole number in [1, 1000], got {steps!r}")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, numbers.Real)
                                     or not 0 <= guidance <= 20):
            raise CovidXrayError(f"--guidance must be a number in [0, 20], got {guidance!r}")
        if sampler is not None and sampler not in edm.SAMPLERS:
            raise CovidXrayError(f"--sampler must be one of {', '.join(edm.SAMPLERS)}, got {sampler!r}")
        given = {"steps": steps, "guidance": guidance, "sampler": sampler}
        return {k: v for k, v in given.items() if v is not None}

    def configure(self, steps: int | None = None, guidance: float | None = None, sampler: str | None = None
                  ) -> dict:
        e = self.cfg.edm
        given = self.check_options(steps=steps, guidance=guidance, sampler=sampler)
        if "steps" in given:
            e.steps = int(steps)
        if "guidance" in given:
            e.guidance = float(guidance)
        if "sampler" in given:
            e.sampler = sampler
        guided = self.net.n_classes > 0 and e.guidance not in (0, 1)
        return {"sampler": e.sampler, "steps": e.steps, "guidance": e.guidance,
                "network_evaluations": edm.network_evaluations(e.steps, e.sampler) * (2 if guided else 1)}


class LoadedDiffusion(_Sampling, Generator):
    """An EDM denoiser ready to sample (its EMA weights when the run kept them). Image i of a draw depends on
    the seed and i only (the noise of all n images is drawn, then the ones asked are denoised), so ``sample``
    resumes exactly."""

    def __init__(self, net: torch.nn.Module, cfg, weights: str, checkpoint: dict):
        self.net, self.cfg, self.weights, self.checkpoint = net, cfg, weights, checkpoint

    @property
    def conditional(self) -> bool:
        return self.net.n_classes > 0

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0, batch_size: int = 256, device="cpu", label: int | None = None,
               temperature: float = 1.0, only=None) -> torch.Tensor:
        """``n`` uint8 images with the sampler settings in force (:meth:`configure`): ``edm.steps`` steps of
        ``edm.sampler``, guidance w ``edm.guidance`` (a conditional model only); ``temperature`` scales the noise."""
        e = self.cfg.edm
        steps, guidance = e.steps, e.guidance
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
        net = self.net.to(dev, memory_format=CHANNELS_LAST)
        batch_size = min(batch_size, CPU_BATCH) if dev.type == "cpu" else batch_size
        out = []
        for i in range(0, len(noise), batch_size):
            chunk = noise[i:i + batch_size].to(dev).contiguous(memory_format=CHANNELS_LAST)
            y = torch.full((len(chunk),), label, dtype=torch.long, device=dev) if self.conditional else None
            denoise = edm.sampler_denoiser(net, e.sigma_data, y, guidance, self.net.n_classes)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = edm.sample(denoise, chunk, sigmas, method=e.sampler)
            out.append(to_uint8(x.float().clamp(-1, 1)).cpu())
        return torch.cat(out) if out else torch.empty(0, 1, size, size, dtype=torch.uint8)


class LoadedMaskDiffusion(_Sampling, MaskTranslator):
    """An ``edm_mask`` denoiser: X-rays drawn for given lung masks (and classes), with the run's sampler settings.
    Its noise comes from torch's global generator, which the callers seed (``sample --from-data --seed``, each
    ``evaluate`` draw)."""

    def __init__(self, net: torch.nn.Module, cfg, weights: str, checkpoint: dict):
        self.net, self.cfg, self.weights, self.checkpoint = net, cfg, weights, checkpoint

    @property
    def conditioning(self) -> list[str]:
        return self.classes if self.net.n_classes > 0 else []

    def lacks(self, capability: type) -> str:
        return "it draws X-rays for lung masks (pass --from-data PREPARED or --masks FOLDER)"

    @torch.no_grad()
    def translate_masks(self, masks, labels, device, batch_size):
        e = self.cfg.edm
        dev, amp = inference_settings(device)
        net, size = self.net.to(dev, memory_format=CHANNELS_LAST), int(masks.shape[-1])
        batch_size = min(batch_size, CPU_BATCH) if dev.type == "cpu" else batch_size
        sigmas = edm.karras_sigmas(e.steps, e.sigma_min, e.sigma_max, e.rho)
        out = []
        for i in range(0, masks.shape[0], batch_size):
            m = masks[i:i + batch_size].to(dev)
            m = m.contiguous(memory_format=CHANNELS_LAST)
            noise = torch.randn(len(m), 1, size, size).to(dev).contiguous(memory_format=CHANNELS_LAST)
            y = labels[i:i + batch_size].to(dev) if labels is not None and self.conditioning else None
            denoise = edm.sampler_denoiser(net, e.sigma_data, y, e.guidance if y is not None else 1.0,
                                           self.net.n_classes, edm.mask_input(m))
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                x = edm.sample(denoise, noise, sigmas, method=e.sampler)
            out.append(to_uint8(x.float().clamp(-1, 1)).cpu())
        return torch.cat(out) if out else torch.zeros((0, 1, size, size), dtype=torch.uint8)


@register_loader("diffusion", (Generator, "draws"), (MaskTranslator, "masks"), sampling=_Sampling)
def load_diffusion(ckpt: dict) -> LoadedDiffusion | LoadedMaskDiffusion:
    """The denoiser of a diffusion checkpoint (EMA weights when present), eval mode: ``edm`` draws from noise,
    ``edm_mask`` draws X-rays for lung masks."""
    nets, cfg = build_from_checkpoint(ckpt, "diffusion")
    net = nets["net"]
    weights = "net_ema" if "net_ema" in ckpt["models"] else "net"
    net.load_state_dict(ckpt["models"][weights])
    kind = LoadedMaskDiffusion if net.cond_channels > 0 else LoadedDiffusion
    return kind(net.eval(), cfg, weights, ckpt)
