"""The GAN training loop: one readable loop, progress counted in images and epochs.

A run folder ``<out>/<id>-<model>/`` holds:

* ``config.yaml`` - the resolved configuration;
* ``log.txt`` - human-readable progress lines;
* ``stats.jsonl`` - one JSON object per log interval and per epoch end (step, epoch,
  kimg, losses, D(x), D(G(z)), images/s);
* ``reals.png`` - a grid of training images; ``samples/epoch_XXXX.png`` - the
  fixed-latent grid every ``train.snapshot_every`` epochs (``epoch_0000`` = the
  untrained G), the source of ``covidxray gif``;
* ``checkpoints/last.pt`` (+ ``epoch_XXXX.pt`` every ``train.keep_every`` epochs).

``--resume`` restores models, optimizers, counters, the data order (also in the
middle of an epoch) and every RNG, so a resumed run continues exactly as an
uninterrupted one would. Ctrl-C (SIGINT/SIGTERM) stops after the current step
and writes a checkpoint first.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import math
import warnings

import torch
from torch import nn

from covidxray.config import Config, config_from_dict
from covidxray.data.datasets import TensorData, load_tensor_data, to_float
from covidxray.errors import CovidXrayError
from covidxray.generate import generate_images
from covidxray.models.registry import get_model, list_models
from covidxray.train import losses
from covidxray.train.augment import diff_augment, parse_policy
from covidxray.train.checkpoint import load_checkpoint, save_checkpoint
from covidxray.train.ema import EMA, decay_for
from covidxray.train.graphs import StepGraphs
from covidxray.train.images import save_grid
from covidxray.utils import atomic_write_text, seed_everything


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a missing CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CovidXrayError(f"device '{name}' was asked but no CUDA GPU is available", "Use --device cpu or auto")
    return torch.device(name)


def new_run_dir(out: str | Path, model: str) -> Path:
    """Create ``<out>/<NNNNN>-<model>/`` with the next free number."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d+)-", p.name))]
    run_id = max(ids, default=-1) + 1
    while True:
        path = out / f"{run_id:05d}-{model}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took it
            run_id += 1


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict(state)``, keeping how ``opt`` was built to run here.

    A saved optimizer carries its implementation flags (``fused``, ``capturable``,
    ``foreach``), and ``load_state_dict`` would adopt them: a run saved on a GPU and resumed
    on a CPU would ask for a CUDA-only Adam, an eager run resumed with CUDA graphs could not
    be captured. The flags of ``opt`` are kept and Adam's step counters moved to where those
    flags want them (the parameters' device for fused/capturable, the CPU otherwise).
    """
    keys = ("fused", "capturable", "foreach")
    flags = [{k: g[k] for k in keys if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, f in zip(opt.param_groups, flags):
        group.update(f)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = opt.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)


@dataclass
class RunState:
    """Counters of a run; all of it goes into the checkpoint."""

    epoch: int = 0               # completed epochs
    batch_in_epoch: int = 0      # batches done in the current (unfinished) epoch
    perm: torch.Tensor | None = None  # data order of the current epoch (kept for a mid-epoch resume)
    step: int = 0                # optimisation steps (one D + one G update)
    images_seen: int = 0         # real images shown to D
    best_metric: float | None = None


@dataclass
class Meter:
    """Running means of per-step scalars, kept on the device to avoid a sync per step.

    Each key has its own count, since some values (lazy R1, CutMix) exist only on some steps.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def state(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "counts": dict(self.counts)}

    def load(self, state: dict[str, Any], device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, device=device) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])

    def pop(self) -> dict[str, float]:
        out = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


class GANTrainer:
    """Trains a registered GAN (``family == "gan"``) on a prepared folder.

    One step = one D update and one G update on a batch of real images. Every
    model shares the same loop; what differs is declared by its outputs and config:
    ``DOutput.class_logits`` (ACGAN auxiliary loss), ``DOutput.pixel_logits``
    (U-Net D, CutMix), ``loss.uncertainty`` (MC-dropout regulariser). See
    ``docs/training.md`` for the formulas.

    Args:
        cfg: resolved configuration.
        run_dir: the run folder (created by :func:`new_run_dir`, or an existing one on resume).
        checkpoint: a loaded checkpoint to resume from, or None for a fresh run.
        console: rich console for progress (None: no progress display).
        on_step: optional callback ``on_step(trainer)`` after every step (tests use it to interrupt).
    """

    def __init__(self, cfg: Config, run_dir: Path, checkpoint: dict[str, Any] | None = None,
                 console=None, on_step: Callable[["GANTrainer"], None] | None = None):
        self.cfg, self.run_dir, self.console, self.on_step = cfg, Path(run_dir), console, on_step
        self.spec = get_model(cfg.model)
        if self.spec.family != "gan":
            raise CovidXrayError(f"model '{cfg.model}' is a {self.spec.family} model, not a GAN")
        if cfg.loss.uncertainty != "off" and "uncertainty" not in self.spec.features:
            with_it = [m.name for m in list_models() if "uncertainty" in m.features]
            raise CovidXrayError(f"loss.uncertainty is not available for model '{cfg.model}'",
                                 f"Use one of: {', '.join(with_it)}, or --set loss.uncertainty=off")
        self.device = resolve_device(cfg.train.device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self._stop = False

        if not cfg.data.path:
            raise CovidXrayError("no training data given", "Pass --data PREPARED_FOLDER (from `covidxray prepare`)")
        self.data: TensorData = load_tensor_data(
            cfg.data.path, cfg.data.split, cfg.data.classes or None, cfg.data.image_size, cfg.data.cache, self.log
        )
        if self.device.type == "cuda" and cfg.data.on_device in ("auto", "yes"):
            self.data = self.data.to(self.device)  # uint8 on the GPU: an epoch needs no host work
        self.conditional = self.spec.conditional
        cfg.data.n_classes = len(self.data.classes) if self.conditional else 0
        self.batch_size = min(cfg.train.batch_size, len(self.data))
        # Drop the last incomplete batch: every step then sees the same batch size
        # (a shuffled order means every image still gets seen).
        self.batches_per_epoch = len(self.data) // self.batch_size

        # Mixed precision: bf16 needs no loss scaling; fp16 gets one scaler per optimizer.
        # `auto` is bf16 on CUDA and full precision on the CPU; bf16 may be asked for on a CPU too.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}.get(
            cfg.train.amp, torch.bfloat16 if self.device.type == "cuda" else None)
        if self.amp_dtype == torch.float16 and self.device.type != "cuda":
            raise CovidXrayError("train.amp=fp16 needs a CUDA device", "Use --set train.amp=bf16 or off on the CPU")
        # channels_last speeds convolutions up on GPUs and on CPUs alike (oneDNN prefers NHWC too).
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if self.device.type == "cuda" and not cfg.train.deterministic:
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels

        # Whole-step CUDA graphs (covidxray/train/graphs.py): on by default on CUDA. fp16's loss
        # scaler syncs with the host every step, and torch.compile brings its own graphs.
        self.graphs: StepGraphs | None = None
        fp16 = self.amp_dtype == torch.float16
        if cfg.train.cuda_graphs == "yes":
            why = ("it needs a CUDA device" if self.device.type != "cuda" else
                   "fp16's loss scaler syncs with the host every step" if fp16 else
                   "torch.compile brings its own CUDA graphs" if cfg.train.compile else "")
            if why:
                raise CovidXrayError(f"train.cuda_graphs=yes cannot be used here: {why}",
                                     "Use --set train.cuda_graphs=auto (graphs where they work) or no")
        use_graphs = (cfg.train.cuda_graphs != "no" and self.device.type == "cuda" and not fp16
                      and not cfg.train.compile)

        nets = self.spec.build(cfg)
        self.G = nets["G"].to(self.device, memory_format=self.memory_format)
        self.D = nets["D"].to(self.device, memory_format=self.memory_format)
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        adam_kw = {"fused": True} if self.device.type == "cuda" else {}
        if use_graphs:
            adam_kw["capturable"] = True  # the step counter lives on the GPU, so the update can be captured
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.optim.lr_g, betas=betas, **adam_kw)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.optim.lr_d, betas=betas, **adam_kw)
        self.scaler_g = torch.amp.GradScaler("cuda", enabled=fp16)
        self.scaler_d = torch.amp.GradScaler("cuda", enabled=fp16)
        self.ema = EMA(self.G) if cfg.train.ema_kimg > 0 else None
        self.policy = parse_policy(cfg.aug.diffaugment) if cfg.aug.diffaugment else ()
        # A D without BatchNorm judges each image on its own: reals and fakes can then share one
        # forward/backward pass (same losses, half the kernel launches; the step is launch-bound on GPUs).
        self.d_joint = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.D.modules())
        self.G_train, self.D_train = self.G, self.D
        self._compiled_ok = False
        if cfg.train.compile:
            self._compile()

        # Separate generators for the data order, the noise and the augmentations, so
        # that their states can be saved and restored exactly (nothing else consumes them).
        self.shuffle_gen = torch.Generator().manual_seed(cfg.train.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 1)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(cfg.train.seed + 3)
        # The CutMix coin is decided on the host: a draw on the GPU would need a sync every step.
        self.coin_gen = torch.Generator().manual_seed(cfg.train.seed + 4)
        grid_gen = torch.Generator().manual_seed(cfg.train.seed + 2)
        self.fixed_z = torch.randn(cfg.train.grid_size, cfg.arch.latent_dim, generator=grid_gen)
        # Conditional models: the grid shows the classes in contiguous blocks.
        self.fixed_y = (torch.arange(cfg.train.grid_size) * max(cfg.data.n_classes, 1) // cfg.train.grid_size
                        if self.conditional else None)
        if use_graphs:
            self.graphs = StepGraphs(self._step, [self.noise_gen, self.aug_gen], self._graphs_failed)
        self.state = RunState()
        # Running averages of the current log interval and epoch (kept across a mid-epoch resume).
        self.interval_meter, self.epoch_meter = Meter(), Meter()
        if checkpoint is not None:
            self._restore(checkpoint)

    def _compile(self) -> None:
        try:
            mode = self.cfg.train.compile_mode
            self.G_train, self.D_train = torch.compile(self.G, mode=mode), torch.compile(self.D, mode=mode)
        except Exception as exc:  # e.g. no compiler toolchain: train eagerly
            self._compile_failed(exc)

    def _warn_eager(self, what: str, exc: BaseException, hint: str = "") -> None:
        """Warn (and log) that ``what`` failed with ``exc`` and training goes on eagerly."""
        msg = f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); training eagerly{hint}"
        warnings.warn(msg, stacklevel=3)
        self.log(f"warning: {msg}")

    def _graphs_failed(self, exc: BaseException) -> None:
        self._warn_eager("CUDA graph capture", exc, " (--set train.cuda_graphs=no silences this)")

    def _compile_failed(self, exc: BaseException) -> None:
        self._warn_eager("torch.compile", exc)
        self.G_train, self.D_train = self.G, self.D

    # ----------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.run_dir.exists():
            with (self.run_dir / "log.txt").open("a", encoding="utf-8") as fh:
                fh.write(f"[{stamp}] {message}\n")
        if self.console is not None:
            self.console.print(message, highlight=False)

    def _write_stats(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "stats.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------- state I/O
    def state_dict(self) -> dict[str, Any]:
        rng = {"shuffle": self.shuffle_gen.get_state(), "noise": self.noise_gen.get_state(),
               "aug": self.aug_gen.get_state(), "coin": self.coin_gen.get_state(),
               "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        s = self.state
        models = {"G": self.G.state_dict(), "D": self.D.state_dict()}
        if self.ema is not None:
            models["G_ema"] = self.ema.state_dict()
        return {
            "model": self.cfg.model, "config": self.cfg.to_dict(),
            "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "perm": s.perm,
            "step": s.step, "images_seen": s.images_seen, "best_metric": s.best_metric,
            "n_images": len(self.data), "classes": list(self.data.classes),
            "models": models,
            "optimizers": {"G": self.opt_g.state_dict(), "D": self.opt_d.state_dict()},
            "scalers": {"G": self.scaler_g.state_dict(), "D": self.scaler_d.state_dict()},
            "augment": {"policy": list(self.policy), "cutmix_prob": self.cutmix_prob()},
            "rng": rng, "fixed_z": self.fixed_z, "fixed_y": self.fixed_y,
            "epoch_meter": self.epoch_meter.state(), "interval_meter": self.interval_meter.state(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["n_images"] != len(self.data) or list(ckpt["classes"]) != list(self.data.classes):
            raise CovidXrayError(
                f"the training data changed since {ckpt['path']} was written "
                f"({ckpt['n_images']} images of {ckpt['classes']} then, {len(self.data)} of {self.data.classes} now)",
                "Resume with the same prepared data (--data), or start a new run",
            )
        self.G.load_state_dict(ckpt["models"]["G"])
        self.D.load_state_dict(ckpt["models"]["D"])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["models"]["G_ema"])
        load_optimizer(self.opt_g, ckpt["optimizers"]["G"])
        load_optimizer(self.opt_d, ckpt["optimizers"]["D"])
        self.scaler_g.load_state_dict(ckpt["scalers"]["G"])
        self.scaler_d.load_state_dict(ckpt["scalers"]["D"])
        rng = ckpt["rng"]
        self.shuffle_gen.set_state(rng["shuffle"])
        if "coin" in rng:  # older checkpoints drew the CutMix coin from aug_gen
            self.coin_gen.set_state(rng["coin"])
        else:
            self.coin_gen.manual_seed(self.cfg.train.seed + 4 + ckpt["step"])
        try:
            self.noise_gen.set_state(rng["noise"])
            self.aug_gen.set_state(rng["aug"])
        except RuntimeError:  # CPU and CUDA generator states differ in format
            self.log(f"note: the noise/augmentation RNGs of a run on another device type cannot be restored; "
                     f"they continue from seeds derived from step {ckpt['step']} (not bit-exact)")
            self.noise_gen.manual_seed(self.cfg.train.seed + 1 + ckpt["step"])
            self.aug_gen.manual_seed(self.cfg.train.seed + 3 + ckpt["step"])
        torch.set_rng_state(rng["torch_cpu"])
        if self.device.type == "cuda" and "torch_cuda" in rng:
            torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.fixed_z, self.fixed_y = ckpt["fixed_z"], ckpt["fixed_y"]
        self.epoch_meter.load(ckpt["epoch_meter"], self.device)
        self.interval_meter.load(ckpt["interval_meter"], self.device)
        self.state = RunState(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["perm"], ckpt["step"],
                              ckpt["images_seen"], ckpt.get("best_metric"))
        # Lines logged after the checkpoint belong to work that is about to be redone.
        stats = self.run_dir / "stats.jsonl"
        if stats.exists():
            keep = [ln for ln in stats.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.state.step]
            atomic_write_text(stats, "".join(ln + "\n" for ln in keep))

    def save(self, name: str = "last.pt") -> Path:
        return save_checkpoint(self.run_dir / "checkpoints" / name, self.state_dict())

    # ---------------------------------------------------------------- samples
    @property
    def G_eval(self) -> torch.nn.Module:
        """The generator used for snapshots and sampling: G_ema when there is one."""
        return self.ema.ema_model if self.ema is not None else self.G

    def generate(self, z: torch.Tensor, y: torch.Tensor | None = None, batch: int = 256) -> torch.Tensor:
        """uint8 images from latents (and labels) with :attr:`G_eval` in eval mode."""
        return generate_images(self.G_eval, z, y, self.device, batch)

    def snapshot(self) -> Path:
        path = self.run_dir / "samples" / f"epoch_{self.state.epoch:04d}.png"
        return save_grid(self.generate(self.fixed_z, self.fixed_y), path)

    # ------------------------------------------------------------------- step
    def cutmix_prob(self) -> float:
        """U-Net GAN CutMix probability: linear warm-up over ``loss.cutmix_warmup_kimg``."""
        loss = self.cfg.loss
        if not loss.cutmix:
            return 0.0
        if loss.cutmix_warmup_kimg <= 0:
            return loss.cutmix_prob
        return loss.cutmix_prob * min(1.0, self.state.images_seen / (loss.cutmix_warmup_kimg * 1000))

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return diff_augment(x, self.policy, generator=self.aug_gen) if self.policy else x

    def _autocast(self):
        # No cast cache with CUDA graphs: a cached cast would outlive the capture.
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None, cache_enabled=self.graphs is None)

    def train_step(self, real_u8: torch.Tensor, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One D update and one G update; returns detached scalars for the logs.

        With CUDA graphs the scalars are the graph's output buffers: read them (as the
        loop's meters do) before the next step overwrites them.
        """
        cfg = self.cfg
        # What varies from step to step is decided here, on the host, before the device work:
        # each combination is one captured graph.
        r1_now = cfg.loss.r1_gamma > 0 and self.state.step % cfg.loss.r1_every == 0
        mix = False
        if "cutmix" in self.spec.features:  # U-Net D: CutMix with probability p (warmed up)
            p = self.cutmix_prob()
            # The coin comes from a host generator saved in checkpoints: no device sync, and a
            # resumed run makes the same draws.
            mix = p > 0 and float(torch.rand((), generator=self.coin_gen)) < p
        if self.graphs is not None:
            stats = self.graphs.step(real_u8, labels, r1_now, mix)
        else:
            stats = self._step(real_u8, labels, r1_now, mix)
        if self.ema is not None:
            n = real_u8.shape[0]
            beta = decay_for(n, cfg.train.ema_kimg, cfg.train.ema_rampup or None, self.state.images_seen + n)
            self.ema.update(self.G, beta)
        return stats

    def _step(self, real_u8: torch.Tensor, labels: torch.Tensor | None, r1_now: bool,
              mix: bool) -> dict[str, torch.Tensor]:
        """The device work of one step (no host syncs, so that it can be captured as a CUDA graph)."""
        cfg, kind = self.cfg, self.cfg.loss.kind
        real = to_float(real_u8).contiguous(memory_format=self.memory_format)
        n = real.shape[0]
        y = labels if self.conditional else None  # fakes reuse the batch's labels: same class mix for D
        z = torch.randn(n, cfg.arch.latent_dim, device=self.device, generator=self.noise_gen)
        stats: dict[str, torch.Tensor] = {}

        # ---------------------------------------------------------------- D
        # G runs once per step: D's update sees it detached, G's update reuses its graph
        # (as in the PyTorch DCGAN example; saves one G forward pass per step).
        self.D.requires_grad_(True)
        with self._autocast():
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
            if mix:  # U-Net D: this step mixes (the coin was tossed in train_step)
                mask = losses.cutmix_masks(n, real.shape[-2], real.shape[-1], generator=self.aug_gen,
                                           device=self.device)
                mixed = losses.cutmix(real_aug.detach(), fake_aug, mask)
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
                    loss_mix = (losses.mixed_pixel_d_loss(kind, out_m.logits, torch.zeros_like(out_m.logits))
                                + losses.mixed_pixel_d_loss(kind, out_m.pixel_logits, mask))
                    cons = losses.cutmix_consistency(out_m.pixel_logits, out_r.pixel_logits,
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
        with self._autocast():
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

    # ------------------------------------------------------------------- loop
    def request_stop(self) -> None:
        """Stop after the current step and write a checkpoint (what Ctrl-C does)."""
        self._stop = True

    @contextmanager
    def _signals(self):
        handlers = {}

        def handler(signum, frame):
            if self._stop:  # second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self.log("stop requested: finishing the current step and writing a checkpoint (Ctrl-C again to abort)")
            self._stop = True

        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no signal handling
            pass
        try:
            yield
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def fit(self) -> bool:
        """Train up to ``cfg.train.epochs``. Returns True when finished, False when stopped early."""
        cfg, s = self.cfg, self.state
        total = cfg.train.epochs
        if s.epoch >= total:
            raise CovidXrayError(
                f"the run is already trained to epoch {s.epoch} (asked: {total})",
                f"Pass --epochs larger than {s.epoch} to continue it",
            )
        fresh = s.step == 0 and s.batch_in_epoch == 0
        if fresh:
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            save_grid(self.data.images[: cfg.train.grid_size].cpu(), self.run_dir / "reals.png")
            self.snapshot()  # epoch_0000: the untrained G, first frame of the GIF
            self.log(f"run {self.run_dir}: {self.spec.name} on {len(self.data)} images "
                     f"({', '.join(self.data.classes)}) at {cfg.data.image_size} px, device {self.device}, seed {cfg.train.seed}")
        else:
            self.log(f"resuming {self.run_dir} at epoch {s.epoch}, step {s.step} (batch {s.batch_in_epoch}), to epoch {total}")

        meter, epoch_meter = self.interval_meter, self.epoch_meter
        t_log = time.perf_counter()
        imgs_since_log = 0
        progress = _progress(self.console)
        with self._signals(), progress:
            task = progress.add_task("train", total=total * self.batches_per_epoch,
                                     completed=s.epoch * self.batches_per_epoch + s.batch_in_epoch, info="")
            while s.epoch < total:
                progress.update(task, description=f"epoch {s.epoch + 1}/{total}")
                if s.perm is None:
                    s.perm = torch.randperm(len(self.data), generator=self.shuffle_gen)
                perm = s.perm.to(self.data.images.device)
                for b in range(s.batch_in_epoch, self.batches_per_epoch):
                    idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
                    real = self.data.images[idx].to(self.device, non_blocking=True)
                    labels = self.data.labels[idx].to(self.device, non_blocking=True)
                    out = self._step_with_fallback(real, labels)
                    meter.add(**out)
                    epoch_meter.add(**out)
                    s.step += 1
                    s.batch_in_epoch = b + 1
                    s.images_seen += real.shape[0]
                    imgs_since_log += real.shape[0]
                    progress.advance(task)
                    if s.step % cfg.train.log_every == 0:
                        now = time.perf_counter()
                        rec = self._stats_record(self._check_finite(meter.pop()), imgs_since_log / max(now - t_log, 1e-9))
                        t_log, imgs_since_log = now, 0
                        self._write_stats(rec)
                        progress.update(task, info=_fmt_info(rec))
                    if self.on_step is not None:
                        self.on_step(self)
                    if self._stop:
                        path = self.save()
                        self.log(f"stopped at epoch {s.epoch} batch {s.batch_in_epoch} (step {s.step}); "
                                 f"checkpoint {path}; continue with `covidxray train --resume {self.run_dir}`")
                        return False
                # epoch finished
                s.epoch += 1
                s.batch_in_epoch, s.perm = 0, None
                rec = self._stats_record(self._check_finite(epoch_meter.pop()), None, kind="epoch")
                self._write_stats(rec)
                last = s.epoch == total
                if s.epoch % cfg.train.snapshot_every == 0 or last:
                    self.snapshot()
                if s.epoch % cfg.train.checkpoint_every == 0 or last:
                    self.save()
                if cfg.train.keep_every and s.epoch % cfg.train.keep_every == 0:
                    self.save(f"epoch_{s.epoch:04d}.pt")
                self._log_epoch(rec)
        self.log(f"done: {s.epoch} epochs, {s.step} steps, {s.images_seen / 1000:.1f} kimg; "
                 f"checkpoint {self.run_dir / 'checkpoints' / 'last.pt'}")
        return True

    def _step_with_fallback(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.G_train is self.G or self._compiled_ok:
            return self.train_step(real, labels)
        try:  # the first compiled step is where torch.compile really compiles (and may fail)
            out = self.train_step(real, labels)
            self._compiled_ok = True
            return out
        except Exception as exc:
            if self.G_train is self.G:
                raise
            self._compile_failed(exc)
            return self.train_step(real, labels)

    def _check_finite(self, values: dict[str, float]) -> dict[str, float]:
        """Stop with a clear message when a loss became NaN/inf (the last checkpoint stays good)."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            hint = ("Try --set train.amp=off (full precision), a lower learning rate, or resume from the last "
                    "checkpoint" if self.amp_dtype is not None else
                    "Try a lower learning rate (optim.lr_g / optim.lr_d), loss.r1_gamma > 0, or resume from the last checkpoint")
            raise CovidXrayError(f"training diverged at step {self.state.step}: {', '.join(bad)} became NaN/inf", hint)
        return values

    def _stats_record(self, values: dict[str, float], images_per_s: float | None, kind: str = "interval") -> dict:
        s = self.state
        rec = {"kind": kind, "step": s.step, "epoch": s.epoch, "kimg": round(s.images_seen / 1000, 3),
               **{k: round(v, 5) for k, v in values.items()}}
        if images_per_s is not None:
            rec["images_per_s"] = round(images_per_s, 1)
        return rec

    def _log_epoch(self, rec: dict) -> None:
        line = f"epoch {rec['epoch']}/{self.cfg.train.epochs} step {rec['step']} kimg {rec['kimg']}: {_fmt_info(rec)}"
        if self.console is None or self.cfg.train.epochs <= 50 or rec["epoch"] % max(1, self.cfg.train.epochs // 20) == 0:
            self.log(line)
        else:  # keep the terminal readable on long runs; log.txt gets every epoch
            with (self.run_dir / "log.txt").open("a", encoding="utf-8") as fh:
                fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


def _fmt_info(rec: dict) -> str:
    parts = [f"{k} {rec[k]:.3f}" for k in ("loss_d", "loss_g", "d_real", "d_fake") if k in rec]
    if "images_per_s" in rec:
        parts.append(f"{rec['images_per_s']:.0f} img/s")
    return "  ".join(parts)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(console):
    if console is None:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)


def start_run(cfg: Config, console=None, on_step=None) -> tuple[GANTrainer, bool]:
    """Create a run folder for ``cfg`` and train it."""
    run_dir = new_run_dir(cfg.out, cfg.model)
    try:
        trainer = GANTrainer(cfg, run_dir, console=console, on_step=on_step)
    except BaseException:
        # Nothing was trained: do not leave a run folder behind (at most the data-loading lines of
        # log.txt were written; the error itself is shown to the user).
        if {p.name for p in run_dir.iterdir()} <= {"log.txt"}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return trainer, trainer.fit()


def resume_run(run_dir: str | Path, epochs: int | None = None, data: str | None = None,
               device: str | None = None, console=None, on_step=None) -> tuple[GANTrainer, bool]:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt``; ``epochs`` is the new total."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CovidXrayError(f"run folder {run_dir} does not exist", "Pass the folder printed by `covidxray train`")
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt" if (run_dir / "checkpoints").is_dir() else run_dir)
    cfg = config_from_dict(ckpt["config"])
    if epochs is not None:
        cfg.train.epochs = epochs
    if data is not None:
        cfg.data.path = str(Path(data).resolve())
    if device is not None:
        cfg.train.device = device
    trainer = GANTrainer(cfg, run_dir, checkpoint=ckpt, console=console, on_step=on_step)
    if epochs is not None:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    return trainer, trainer.fit()
