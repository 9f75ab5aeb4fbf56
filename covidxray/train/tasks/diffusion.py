"""The diffusion family's task (``edm``): EDM's training step in the one loop.

A step (Karras et al. 2022, section 5): noise levels ``σ`` drawn log-normal (``edm.p_mean``, ``edm.p_std``), the
images noised ``x + σ n``, each class dropped to "no class" with probability ``model.p_uncond`` (so that sampling
can use classifier-free guidance), and the loss ``λ(σ) |D(x + σ n; σ) - x|²`` averaged over pixels and images, with
``D`` the preconditioned denoiser (:func:`covidxray.models.diffusion.precondition`) in float32 around the network.

Validation is deterministic: the same loss at ``edm.eval_sigmas`` fixed, log-spaced noise levels between
σ_min (0.02) and σ_max (20), with noise fixed per image, on ``eval.split``; it picks ``best.pt``. It also
records ``copy_ratio`` (:meth:`DiffusionTask.copy_ratio`), so ``stats.jsonl`` shows when a model starts to copy. Snapshots are
grids drawn from fixed noise with the EMA weights (the GIF's frames). No flips: they would swap the anatomical sides.

Checkpoint entries it adds: ``models`` ``net`` (and ``net_ema``), ``rng`` ``noise``, ``fixed_noise``, ``fixed_y``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from covidxray.data.datasets import to_float, to_uint8
from covidxray.data.grids import save_grid
from covidxray.metrics.generative import nearest_distances, pixel_embedding
from covidxray.models import diffusion as edm
from covidxray.models.diffusion import mask_input
from covidxray.models.registry import get_model
from covidxray.train.ema import EMA, decay_for
from covidxray.train.optim import lr_stat
from covidxray.train.tasks.supervised import SupervisedTask


class DiffusionTask(SupervisedTask):
    """Trains a registered diffusion model (the ``diffusion`` family); see the module docstring."""

    family = "diffusion"
    resizes_data = True
    evaluates = True
    progress_keys = ("loss", "lr")
    bf16_on_native_cpu = True

    @classmethod
    def wants_masks(cls, cfg) -> bool:
        return "masks" in get_model(cfg.model.name).features  # edm_mask: X-rays drawn for lung masks

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, dev = self.cfg, self.device
        self.setup_net(trainer.spec.build(cfg, trainer.data_spec)["net"])
        self.n_classes = self.net.n_classes
        self.masked = self.net.cond_channels > 0
        if self.n_classes:  # e.g. a prepared set with lung masks for some classes only (the mask model's data)
            seen = torch.bincount(trainer.data.labels.cpu(), minlength=self.n_classes).tolist()
            empty = [c for c, k in zip(trainer.data.classes, seen) if k == 0]
            if empty:
                what = "masked " if self.masked else ""
                trainer.log(f"warning: no {what}training images of class {', '.join(empty)}: its class entry stays "
                            f"untrained, and draws of it are not X-rays of that class; train on the others with "
                            f"--classes {','.join(c for c, k in zip(trainer.data.classes, seen) if k)}")
        self.batch_fields = ("masks", "labels") if self.masked else ("labels",)
        self.ema = EMA(self.net) if cfg.train.ema_kimg > 0 else None
        self.noise_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 1)
        g = torch.Generator().manual_seed(cfg.train.seed + 2)
        size = trainer.data_spec.image_size
        n = cfg.train.grid_size
        self.fixed_noise = torch.randn(n, 1, size, size, generator=g)
        self.fixed_y = (torch.arange(n) % self.n_classes) if self.n_classes else None
        # a mask model draws its grid for the first training masks, the same every epoch
        self.fixed_masks = trainer.data.masks[torch.arange(n) % len(trainer.data)].cpu() if self.masked else None
        self._train_embedding = None  # the training images' pixel embedding, made at the first validation

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"noise": (self.noise_gen, 1)}

    def models_state(self) -> dict[str, Any]:
        states = super().models_state()
        if self.ema is not None:
            states["net_ema"] = self.ema.state_dict()
        return states

    def load_models_state(self, states: dict[str, Any]) -> None:
        super().load_models_state(states)
        if self.ema is not None:
            self.ema.load_state_dict(states["net_ema"])

    def extra_state(self) -> dict[str, Any]:
        return {"fixed_noise": self.fixed_noise, "fixed_y": self.fixed_y, "fixed_masks": self.fixed_masks}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.fixed_noise, self.fixed_y = ckpt["fixed_noise"], ckpt.get("fixed_y")
        self.fixed_masks = ckpt.get("fixed_masks")

    @property
    def sampling_net(self) -> torch.nn.Module:
        """The network snapshots and sampling use: the EMA weights when there are some."""
        return self.ema.ema_model if self.ema is not None else self.net

    # ------------------------------------------------------------ step
    def losses(self, net, x: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
               labels: torch.Tensor | None, masks: torch.Tensor | None = None) -> torch.Tensor:
        """EDM's weighted loss per image (N,): ``λ(σ) mean |D(x + σ n; σ) - x|²`` (given the masks of a mask model)."""
        e = self.cfg.edm
        cond = {"labels": labels} if self.n_classes else {}
        if self.masked:
            cond["cond"] = mask_input(masks)
        with self.autocast():
            denoised = edm.precondition(net, x + sigma.view(-1, 1, 1, 1) * noise, sigma, e.sigma_data, **cond)
        return edm.loss_weight(sigma, e.sigma_data).to(x.device) * (denoised - x).pow(2).flatten(1).mean(1)

    def device_step(self, images_u8: torch.Tensor, *targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph); ``targets``:
        the labels, or the masks and the labels of a mask model."""
        masks, labels = targets if self.masked else (None, targets[0])
        e, g = self.cfg.edm, self.noise_gen
        x = to_float(images_u8).contiguous(memory_format=self.trainer.memory_format)
        n = x.shape[0]
        sigma = edm.training_sigmas(n, e.p_mean, e.p_std, g, x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device)
        y = None
        if self.n_classes:
            drop = torch.rand(n, generator=g, device=x.device) < self.cfg.model.p_uncond
            y = torch.where(drop, torch.full_like(labels, self.n_classes), labels)
        loss = self.losses(self.net_train, x, sigma, noise, y, masks).mean()
        self.optimizer_step(loss)
        return {"loss": loss.detach(), "lr": lr_stat(self.opt)}

    def after_step(self, n_images: int) -> None:
        if self.ema is not None:
            cfg = self.cfg
            beta = decay_for(n_images, cfg.train.ema_kimg, cfg.train.ema_rampup or None,
                             self.trainer.state.images_seen)
            self.ema.update(self.net, beta)

    # ------------------------------------------------------------ evaluation and snapshots
    def eval_sigmas(self) -> torch.Tensor:
        """The validation's fixed noise levels: log-spaced from 0.02 to 20."""
        k = self.cfg.edm.eval_sigmas
        return torch.logspace(math.log10(0.02), math.log10(20.0), k) if k > 1 else torch.tensor([1.0])

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        net, bs = self.sampling_net, self.cfg.eval.batch_size
        was = net.training
        net.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(data.images), bs):
                x = to_float(data.images[i:i + bs].to(self.device))
                labels = data.labels[i:i + bs].to(self.device) if self.n_classes else None
                masks = data.masks[i:i + bs].to(self.device) if self.masked else None
                for j, s in enumerate(self.eval_sigmas().tolist()):
                    g = torch.Generator().manual_seed(10_000 * j + i)  # the same noise for an image at every eval
                    noise = torch.randn(x.shape, generator=g).to(self.device)
                    sigma = torch.full((x.shape[0],), s, device=self.device)
                    total += float(self.losses(net, x, sigma, noise, labels, masks).sum())
                    count += x.shape[0]
        finally:
            net.train(was)
        out = {"loss": total / max(count, 1)}
        if self.cfg.edm.eval_samples > 0 and len(data.images) > 0:
            out["copy_ratio"] = self.copy_ratio(data)
        return out

    @torch.no_grad()
    def copy_ratio(self, held_out) -> float:
        """Memorisation as it develops: the median distance from ``edm.eval_samples`` samples (fixed noise,
        ``edm.eval_steps`` steps) to their nearest training image, over the median distance from the held-out
        images to theirs, in the pixel space of ``evaluate``'s copy check (32 x 32, per-image standardised).
        About 1 for a generator that does not copy; below 1 when the samples sit closer to training images than
        real held-out X-rays do (Dar et al., arXiv 2402.01054, saw diffusion models reproduce training X-rays)."""
        e, size = self.cfg.edm, self.trainer.data_spec.image_size
        if self._train_embedding is None:
            self._train_embedding = pixel_embedding(self.trainer.data.images.cpu())
            self._copy_noise = torch.randn(e.eval_samples, 1, size, size, generator=torch.Generator().manual_seed(7))
            self._copy_y = (torch.arange(e.eval_samples) % self.n_classes) if self.n_classes else None
        # a mask model draws for held-out masks: training masks would make its samples look like copies
        masks = held_out.masks[torch.arange(e.eval_samples) % len(held_out)].cpu() if self.masked else None
        samples = self.draw(self._copy_noise, self._copy_y, steps=e.eval_steps, masks=masks)
        d_gen, _ = nearest_distances(pixel_embedding(samples), self._train_embedding)
        d_ref, _ = nearest_distances(pixel_embedding(held_out.images.cpu()), self._train_embedding)
        ref = float(np.median(d_ref))
        return float(np.median(d_gen)) / ref if ref > 0 else float("nan")

    @torch.no_grad()
    def draw(self, noise: torch.Tensor, labels: torch.Tensor | None, steps: int | None = None,
             masks: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images from standard-normal ``noise`` (for ``masks``: a mask model) with the sampling weights."""
        e, net = self.cfg.edm, self.sampling_net
        was = net.training
        net.eval()
        try:
            y = labels.to(self.device) if labels is not None else None
            cond = mask_input(masks.to(self.device)) if self.masked else None
            denoise = edm.sampler_denoiser(net, e.sigma_data, y, e.guidance if y is not None else 1.0, self.n_classes,
                                           cond)
            x = edm.sample(denoise, noise.to(self.device), edm.karras_sigmas(steps or e.steps, e.sigma_min,
                                                                              e.sigma_max, e.rho),
                           method=e.sampler)
        finally:
            net.train(was)
        return to_uint8(x.clamp(-1, 1)).cpu()

    def snapshot(self) -> None:
        t = self.trainer
        save_grid(self.draw(self.fixed_noise, self.fixed_y, masks=self.fixed_masks),
                  t.run_dir / "samples" / f"epoch_{t.epoch:04d}.png")

