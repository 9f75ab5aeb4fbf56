"""The GAN task: one D update and one G update per step, for every registered GAN.

Every GAN shares this task; what differs is declared by its outputs and config:
``DOutput.class_logits`` (ACGAN auxiliary loss), ``DOutput.pixel_logits`` (U-Net D, CutMix),
``loss.uncertainty`` (MC-dropout regulariser). The formulas are in ``docs/training.md``; the
GAN-only arithmetic lives in :mod:`covidxray.train.gan_losses`, :mod:`covidxray.data.diffaugment`
and :mod:`covidxray.train.unetgan_cutmix`.

Checkpoint entries it adds (format of version 0.1.0, kept): ``models`` ``G``, ``D``, ``G_ema``;
``optimizers``/``scalers`` ``G``, ``D``; ``rng`` ``noise``, ``aug``, ``coin``; ``augment``,
``fixed_z``, ``fixed_y``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from covidxray.data.datasets import to_float
from covidxray.data.diffaugment import diff_augment, parse_policy
from covidxray.data.grids import save_grid
from covidxray.errors import CovidXrayError
from covidxray.infer.generate import generate_images
from covidxray.models.registry import list_models
from covidxray.train import gan_losses as losses
from covidxray.train import unetgan_cutmix
from covidxray.train.ema import EMA, decay_for
from covidxray.train.tasks.base import Task


class GANTask(Task):
    """Trains a registered GAN (the ``gan`` family); see the module docstring."""

    family = "gan"
    train_forwards = (("G_train", "G"), ("D_train", "D"))
    shared_generators = ("coin",)  # the CutMix coin of step_variant
    progress_keys = ("loss_d", "loss_g", "d_real", "d_fake")
    # Measured (configs/studies/precision.yaml, docs/benchmarks.md "Precision on the CPU"): cgan at 64 px trains
    # 1.65x faster in bf16 on a 2-core CPU with native bf16, to the same FID at equal kimg (352.5 against 359.1
    # in fp32 at 15.4 kimg, floor 68.5).
    bf16_on_native_cpu = True
    cpu_precision_before_record = "off"  # fp32 on every CPU before that measurement

    @classmethod
    def check_config(cls, cfg, spec) -> None:
        if cfg.loss.uncertainty != "off" and "uncertainty" not in spec.features:
            with_it = [m.name for m in list_models("gan") if "uncertainty" in m.features]
            raise CovidXrayError(f"loss.uncertainty is not available for model '{spec.name}'",
                                 f"Use one of: {', '.join(with_it)}, or --set loss.uncertainty=off")

    def __init__(self, trainer):
        super().__init__(trainer)
        cfg, spec, dev = self.cfg, trainer.spec, self.device
        self.spec = spec
        self.conditional = spec.conditional
        self.n_classes = trainer.data_spec.n_classes if self.conditional else 0

        self.setup_pair(spec.build(cfg, trainer.data_spec))
        self.ema = EMA(self.G) if cfg.train.ema_kimg > 0 else None
        self.policy = parse_policy(cfg.aug.diffaugment) if cfg.aug.diffaugment else ()
        # A D without BatchNorm judges each image on its own: reals and fakes can then share one
        # forward/backward pass (same losses, half the kernel launches; the step is launch-bound on GPUs).
        self.d_joint = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.D.modules())
        self.G_train, self.D_train = self.G, self.D

        # Separate generators for the noise and the augmentations (and the loop's for the data
        # order), so that their states can be saved and restored exactly (nothing else consumes them).
        self.noise_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 1)
        self.aug_gen = torch.Generator(device=dev).manual_seed(cfg.train.seed + 3)
        # The CutMix coin is decided on the host: a draw on the GPU would need a sync every step.
        self.coin_gen = torch.Generator().manual_seed(cfg.train.seed + 4)
        grid_gen = torch.Generator().manual_seed(cfg.train.seed + 2)
        self.fixed_z = torch.randn(cfg.train.grid_size, cfg.arch.latent_dim, generator=grid_gen)
        # Conditional models: the grid shows the classes in contiguous blocks.
        self.fixed_y = (torch.arange(cfg.train.grid_size) * max(self.n_classes, 1) // cfg.train.grid_size
                        if self.conditional else None)

    # ------------------------------------------------------------ compile
    def compile(self, mode: str) -> None:
        self.G_train = torch.compile(self.train_module("G"), mode=mode)
        self.D_train = torch.compile(self.train_module("D"), mode=mode)
        self.compiled = True

    def uncompile(self) -> None:
        self.G_train, self.D_train = self.train_module("G"), self.train_module("D")
        self.compiled = False

    # ------------------------------------------------------------ state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        return {"noise": (self.noise_gen, 1), "aug": (self.aug_gen, 3), "coin": (self.coin_gen, 4)}

    def models_state(self) -> dict[str, Any]:
        states = super().models_state()
        if self.ema is not None:
            states["G_ema"] = self.ema.state_dict()
        return states

    def load_models_state(self, states: dict[str, Any]) -> None:
        super().load_models_state(states)
        if self.ema is not None:
            self.ema.load_state_dict(states["G_ema"])

    def extra_state(self) -> dict[str, Any]:
        return {"augment": {"policy": list(self.policy), "cutmix_prob": self.cutmix_prob()},
                "fixed_z": self.fixed_z, "fixed_y": self.fixed_y}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.fixed_z, self.fixed_y = ckpt["fixed_z"], ckpt["fixed_y"]

    def divergence_hint(self) -> str:
        if self.trainer.amp_dtype is not None:
            return super().divergence_hint()
        return ("Try a lower learning rate (optim.lr_g / optim.lr_d), loss.r1_gamma > 0, or resume from the last "
                "checkpoint")

    # ------------------------------------------------------------ samples
    @property
    def G_eval(self) -> torch.nn.Module:
        """The generator used for snapshots and sampling: G_ema when there is one."""
        return self.ema.ema_model if self.ema is not None else self.G

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        """uint8 images from latents (and labels) with :attr:`G_eval` in eval mode."""
        return generate_images(self.G_eval, z, y, self.device, batch)

    def on_start(self) -> None:
        t = self.trainer
        save_grid(t.data.images[: self.cfg.train.grid_size].cpu(), t.run_dir / "reals.png")
        self.snapshot()  # epoch_0000: the untrained G, first frame of the GIF

    def snapshot(self) -> Path:
        path = self.trainer.run_dir / "samples" / f"epoch_{self.trainer.state.epoch:04d}.png"
        return save_grid(self.generate(self.fixed_z, self.fixed_y), path)

    # ------------------------------------------------------------ step
    def cutmix_prob(self) -> float:
        """U-Net GAN CutMix probability: linear warm-up over ``loss.cutmix_warmup_kimg``."""
        loss = self.cfg.loss
        if not loss.cutmix:
            return 0.0
        if loss.cutmix_warmup_kimg <= 0:
            return loss.cutmix_prob
        return loss.cutmix_prob * min(1.0, self.trainer.state.images_seen / (loss.cutmix_warmup_kimg * 1000))

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy, generator=self.aug_gen) if self.policy else x

    def step_variant(self) -> tuple[bool, bool]:
        """``(r1_now, mix)``: whether the lazy R1 penalty runs, whether this is a CutMix D step."""
        cfg = self.cfg
        r1_now = cfg.loss.r1_gamma > 0 and self.trainer.state.step % cfg.loss.r1_every == 0
        mix = False
        if "cutmix" in self.spec.features:  # U-Net D: CutMix with probability p (warmed up)
            p = self.cutmix_prob()
            # The coin comes from a host generator saved in checkpoints: no device sync, and a
            # resumed run makes the same draws.
            mix = p > 0 and float(torch.rand((), generator=self.coin_gen)) < p
        return r1_now, mix

    def after_step(self, n_images: int) -> None:
        if self.ema is not None:
            cfg = self.cfg
            beta = decay_for(n_images, cfg.train.ema_kimg, cfg.train.ema_rampup or None,
                             self.trainer.state.images_seen + n_images)
            self.ema.update(self.G, beta)

    def device_step(self, real_u8: torch.Tensor, labels: torch.Tensor | None, r1_now: bool,
                    mix: bool) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        cfg, kind = self.cfg, self.cfg.loss.kind
        real = to_float(real_u8).contiguous(memory_format=self.trainer.memory_format)
        n = real.shape[0]
        y = labels if self.conditional else None  # fakes reuse the batch's labels: same class mix for D
        z = torch.randn(n, cfg.arch.latent_dim, device=self.device, generator=self.noise_gen)
        stats: dict[str, torch.Tensor] = {}

        # ---------------------------------------------------------------- D
        # G runs once per step: D's update sees it detached, G's update reuses its graph
        # (as in the PyTorch DCGAN example; saves one G forward pass per step).
        self.D.requires_grad_(True)
        with self.autocast():
            fake = self.G_train(z, y)
            mc = cfg.loss.mc_samples if cfg.loss.uncertainty != "off" else 1
            logits_k = None
            # One augmentation call for reals and fakes (per-image draws): fewer launches.
            both = self._augment(torch.cat([real, fake.detach().to(real.dtype)]))
            real_aug, fake_aug = both[:n], both[n:]
            if r1_now:  # R1 needs the reals as their own leaf
                real_aug = real_aug.detach().requires_grad_(True)
                if self.d_joint:
                    both = torch.cat([real_aug, fake_aug])
            mixed = None
            if mix:  # U-Net D: this step mixes (the coin was tossed in step_variant)
                mask = unetgan_cutmix.cutmix_masks(n, real.shape[-2], real.shape[-1], generator=self.aug_gen,
                                                   device=self.device)
                mixed = unetgan_cutmix.cutmix(real_aug.detach(), fake_aug, mask)
            if self.d_joint:  # and one D pass over all of them: a third of the launches of D's update
                x_d = both if mixed is None else torch.cat([both, mixed])
                out = self.D_train(x_d, None if y is None else y.repeat(x_d.shape[0] // n), mc_samples=mc)
                if mc > 1:  # uncertainty: K dropout passes over one trunk pass; the first is the main one
                    logits_k, out = out.mc_split()
                    logits_k = logits_k[:, :2 * n]
                out_r, out_f = out.split(n)
                if mixed is not None:
                    out_f, out_m = out_f.split(n)
            else:  # BatchNorm in D: reals, fakes (and mixes) in separate batches
                out_r, out_f = self.D_train(real_aug, y), self.D_train(fake_aug, y)
                out_m = self.D_train(mixed, y) if mixed is not None else None
            loss_d = losses.d_loss(kind, out_r.logits, out_f.logits)
            if out_r.pixel_logits is not None:  # U-Net D: per-pixel real/fake decision too
                loss_d = loss_d + losses.d_loss(kind, out_r.pixel_logits, out_f.pixel_logits)
                if mixed is not None:
                    # Encoder: a mixed image is fake. Decoder: each pixel is real where it came from a real image.
                    loss_mix = (unetgan_cutmix.mixed_pixel_d_loss(kind, out_m.logits, torch.zeros_like(out_m.logits))
                                + unetgan_cutmix.mixed_pixel_d_loss(kind, out_m.pixel_logits, mask))
                    cons = unetgan_cutmix.cutmix_consistency(out_m.pixel_logits, out_r.pixel_logits,
                                                             out_f.pixel_logits, mask)
                    loss_d = loss_d + loss_mix + cfg.loss.consistency_weight * cons
                    stats["cutmix_cons"] = cons
            if out_r.class_logits is not None:  # ACGAN: D also classifies (see docs/training.md)
                loss_d = loss_d + cfg.loss.aux_weight * losses.aux_d_loss(
                    cfg.loss.aux_mode, out_r.class_logits, labels, out_f.class_logits, out_f.twin_logits)
                if out_f.twin_logits is not None:
                    stats["acc_twin"] = (out_f.twin_logits.argmax(1) == labels).float().mean()
                stats["acc_real"] = (out_r.class_logits.argmax(1) == labels).float().mean()
                stats["acc_fake"] = (out_f.class_logits.argmax(1) == labels).float().mean()
            if cfg.loss.uncertainty != "off":
                fake_k = (logits_k[:, n:] if logits_k is not None  # joint pass: its fake half
                          else self.D_train(fake_aug, y, mc_samples=mc).logits)
                u_d = losses.mc_dropout_uncertainty(fake_k)
                term_d, _ = losses.uncertainty_terms(cfg.loss.uncertainty, u_d)
                loss_d = loss_d + cfg.loss.uncertainty_weight * term_d
                stats["uncertainty_fake"] = u_d
            if r1_now:
                r1 = losses.r1_penalty(out_r.logits, real_aug)
                loss_d = loss_d + (cfg.loss.r1_gamma / 2) * r1 * cfg.loss.r1_every
                stats["r1"] = r1
        self.opt_d.zero_grad(set_to_none=True)
        self.scaler_d.scale(loss_d).backward()
        self.scaler_d.step(self.opt_d)
        self.scaler_d.update()

        # ---------------------------------------------------------------- G
        self.D.requires_grad_(False)  # no D gradients are needed for G's update
        with self.autocast():
            fake_aug = self._augment(fake)
            out_g = self.D_train(fake_aug, y, mc_samples=mc)
            if mc > 1:  # as in D's update: one trunk pass, the first dropout pass is the main one
                logits_gk, out_g = out_g.mc_split()
            loss_g = losses.g_loss(kind, out_g.logits)
            if out_g.pixel_logits is not None:
                loss_g = loss_g + losses.g_loss(kind, out_g.pixel_logits)
            if out_g.class_logits is not None:
                loss_g = loss_g + cfg.loss.aux_weight * losses.aux_g_loss(out_g.class_logits, labels,
                                                                           out_g.twin_logits)
            if cfg.loss.uncertainty != "off":
                u_g = losses.mc_dropout_uncertainty(logits_gk)
                _, term_g = losses.uncertainty_terms(cfg.loss.uncertainty, u_g)
                loss_g = loss_g + cfg.loss.uncertainty_weight * term_g
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.D.requires_grad_(True)

        logits_r, logits_f = out_r.logits.detach().float(), out_f.logits.detach().float()
        stats.update(loss_d=loss_d, loss_g=loss_g,
                     d_real=torch.sigmoid(logits_r).mean(), d_fake=torch.sigmoid(logits_f).mean())
        # Detached: a returned value holding the autograd graph would keep this step's graph alive.
        return {k: v.detach() for k, v in stats.items()}
