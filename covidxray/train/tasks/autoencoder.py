"""The autoencoder task (``autoencoder``, ``vae``, ``cvae``): reconstruction loss (+ beta x KL for the VAEs);
validation MSE / PSNR / SSIM every epoch.

One step: the uint8 batch (on the device) becomes float in [-1, 1]; a VAE draws its reparameterisation noise
from a generator of its own (``rng`` ``noise``, saved with the run, so a resumed run is bit-exact); the
network reconstructs under the run's precision; the loss (``covidxray/config/autoencoder.py``) is computed in
fp32: per image the summed squared (or absolute) error, optionally ``ssim_weight * (1 - SSIM) * pixels``, and
for VAEs ``beta_t * KL`` with ``beta_t`` = ``loss.beta`` times the linear KL warm-up, set on the host before
each step into a device tensor (so a CUDA graph reads it, as it reads the learning rate). No augmentation: an
autoencoder should reconstruct the X-rays as they are.

Validation (:meth:`AutoencoderTask.evaluate`) reconstructs every image of ``eval.split`` from its code (a
VAE's mean: deterministic) and reports the mean over images of MSE, PSNR (dB) and SSIM on images in [0, 1],
and the loss; ``best.pt`` is kept by ``eval.metric`` (default MSE). Snapshots (``samples/epoch_XXXX.png``,
every ``train.snapshot_every`` epochs, for ``covidxray gif``): for a VAE, ``train.grid_size`` decodes of fixed
prior draws (a cVAE cycles the classes row by row); for a plain autoencoder, validation images and their
reconstructions in alternating rows.

Checkpoint entries it adds: ``models`` ``net``; ``optimizers``/``scalers`` ``net``; ``rng`` ``noise``;
``fixed_z`` / ``fixed_y`` (the snapshot draws); ``fit`` (``prepare``'s ``--fit``, for ``sample --reconstruct``).
"""

from __future__ import annotations

from typing import Any

import torch

from covidxray.data.datasets import read_prepared_info, to_float, to_uint8
from covidxray.data.grids import save_grid
from covidxray.infer.generate import generate_images
from covidxray.metrics import image as IM
from covidxray.train.optim import lr_stat
from covidxray.train.tasks.supervised import SupervisedTask


class AutoencoderTask(SupervisedTask):
    """Trains a registered autoencoder (the ``autoencoder`` family); see the module docstring."""

    family = "autoencoder"
    resizes_data = True
    evaluates = True
    progress_keys = ("loss", "mse", "kl", "lr")
    bf16_on_native_cpu = True

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, spec, dev = self.cfg, trainer.spec, self.device
        self.setup_net(spec.build(cfg, trainer.data_spec)["net"])
        self.variational = bool(self.net.variational)
        self.conditional = self.net.n_classes > 0
        # How `prepare` fitted the X-rays into squares: `sample --reconstruct` fits other X-rays the same way.
        self.fit = str(read_prepared_info(cfg.data.path).get("fit", "stretch"))
        self.noise_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 1)
        self.beta_t = torch.zeros((), device=dev)
        n = cfg.train.grid_size
        g = torch.Generator().manual_seed(cfg.train.seed + 2)
        self.fixed_z = torch.randn(n, self.net.latent_dim, generator=g)
        k = max(self.net.n_classes, 1)
        rows = max(1, int(n ** 0.5))
        self.fixed_y = (torch.arange(n) // rows % k) if self.conditional else None

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"noise": (self.noise_gen, 1)}

    def extra_state(self) -> dict[str, Any]:
        return {"fixed_z": self.fixed_z, "fixed_y": self.fixed_y, "fit": self.fit}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("fixed_z") is not None:
            self.fixed_z = ckpt["fixed_z"]
            self.fixed_y = ckpt.get("fixed_y")

    def divergence_hint(self) -> str:
        amp = "--set train.amp=off (full precision), " if self.trainer.amp_dtype is not None else ""
        return (f"Try {amp}a lower learning rate (optim.lr), a longer KL warm-up (loss.kl_warmup_epochs), or "
                f"resume from the last checkpoint")

    # ------------------------------------------------------------ step
    def current_beta(self) -> float:
        lo, t = self.cfg.loss, self.trainer
        if not self.variational:
            return 0.0
        epoch_float = t.state.step / max(t.batches_per_epoch, 1)
        ramp = 1.0 if lo.kl_warmup_epochs <= 0 else min(1.0, epoch_float / lo.kl_warmup_epochs)
        return lo.beta * ramp

    def step_variant(self) -> tuple:
        self.beta_t.fill_(self.current_beta())  # not a graph key: a captured step reads the tensor
        return super().step_variant()

    def losses(self, recon: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor | None,
               beta: torch.Tensor | float) -> dict[str, torch.Tensor]:
        """Per-image terms (N,) of the loss in fp32: ``recon``, ``ssim`` (when weighted), ``kl`` and ``loss``."""
        lo = self.cfg.loss
        recon, x = recon.float(), x.float()
        diff = recon - x
        err = diff.pow(2) if lo.recon == "mse" else diff.abs()
        out = {"recon": err.flatten(1).sum(1)}
        loss = out["recon"]
        if lo.ssim_weight:
            pixels = x[0].numel()
            s = IM.ssim((recon + 1) / 2, (x + 1) / 2)
            loss = loss + lo.ssim_weight * (1 - s) * pixels
        kl = IM.kl_normal(mu, logvar) if logvar is not None else torch.zeros_like(loss)
        out["kl"] = kl
        out["loss"] = loss + beta * kl
        return out

    def device_step(self, images_u8: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        x = to_float(images_u8).contiguous(memory_format=self.trainer.memory_format)
        y = labels if self.conditional else None
        eps = (torch.randn(x.shape[0], self.net.latent_dim, generator=self.noise_gen, device=x.device)
               if self.variational else None)
        with self.autocast():
            recon, mu, logvar = self.net_train(x, y, eps)
        terms = self.losses(recon, x, mu, logvar, self.beta_t)
        loss = terms["loss"].mean()
        self.optimizer_step(loss)
        mse01 = (recon.detach().float() - x).pow(2).mean() / 4  # images in [0, 1]
        return {"loss": loss.detach(), "mse": mse01, "kl": terms["kl"].detach().mean(), "lr": lr_stat(self.opt)}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def reconstruct(self, images_u8: torch.Tensor, labels: torch.Tensor | None, batch_size: int | None = None):
        """Reconstructions (uint8, on the CPU) of uint8 images from their codes (a VAE's mean), batched."""
        out = []
        for _, recon in self._recon_batches(images_u8, labels, batch_size):
            out.append(to_uint8(recon).cpu())
        return torch.cat(out)

    def _recon_batches(self, images_u8, labels, batch_size=None):
        t, net = self.trainer, self.net
        bs = batch_size or self.cfg.eval.batch_size
        was = net.training
        net.eval()
        try:
            for i in range(0, images_u8.shape[0], bs):
                x = to_float(images_u8[i:i + bs].to(self.device)).contiguous(memory_format=t.memory_format)
                y = labels[i:i + bs].to(self.device) if self.conditional else None
                with self.autocast():
                    recon, mu, logvar = net(x, y)
                yield (x, mu, logvar), recon.float()
        finally:
            net.train(was)

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "loss": 0.0}
        beta = self.current_beta()
        for (x, mu, logvar), recon in self._recon_batches(data.images, data.labels):
            a, b = (recon + 1) / 2, (x + 1) / 2
            sums["mse"] += float(IM.mse(a, b).sum())
            sums["psnr"] += float(IM.psnr(a, b).sum())
            sums["ssim"] += float(IM.ssim(a, b).sum())
            sums["loss"] += float(self.losses(recon, x, mu, logvar, beta)["loss"].sum())
        n = data.images.shape[0]
        return {k: v / n for k, v in sums.items()}

    @torch.no_grad()
    def snapshot(self) -> None:
        t = self.trainer
        path = t.run_dir / "samples" / f"epoch_{t.epoch:04d}.png"
        if self.variational:
            images = generate_images(self.net.decoder, self.fixed_z, self.fixed_y, self.device,
                                     self.cfg.eval.batch_size)
        else:
            data = t.eval_data if t.eval_data is not None else t.data
            n = min(self.cfg.train.grid_size // 2, len(data)) or 1
            real = data.images[:n]
            recon = self.reconstruct(real, data.labels[:n])
            rows = max(1, int((2 * n) ** 0.5))
            pairs = []
            for i in range(0, n, rows):  # a row of originals, then the row of their reconstructions
                pairs += [real[i:i + rows].cpu(), recon[i:i + rows]]
            images = torch.cat(pairs)
            save_grid(images, path, nrow=rows)
            return
        save_grid(images, path)
