"""The one training loop of every model family: run state, devices, precision, checkpoints, progress.

:class:`Trainer` owns everything that does not depend on what is trained; a small per-family
:class:`~covidxray.train.tasks.base.Task` (``covidxray/train/tasks/<family>.py``) owns the networks,
optimizers and the arithmetic of one step (the Lightning / stylegan2-ada split). A new family is a
new task and registered models, never a copied loop.

A run folder ``<out>/<id>-<model>/`` holds:

* ``config.yaml`` - the resolved configuration (``data.image_size = 0`` resolved to the prepared size);
* ``log.txt`` - human-readable progress lines;
* ``stats.jsonl`` - one JSON object per log interval (``kind: interval``), epoch end (``epoch``) and
  evaluation (``eval``): step, epoch, kimg, the task's scalars, images/s; with ``train.tensorboard`` the same
  numbers also as TensorBoard scalars in ``tensorboard/`` (:mod:`covidxray.train.tensorboard`);
* what the task writes at the start and every ``train.snapshot_every`` epochs (GANs: ``reals.png``,
  ``samples/epoch_XXXX.png``);
* ``checkpoints/last.pt`` (+ ``epoch_XXXX.pt`` every ``train.keep_every`` epochs, ``best.pt`` at the
  evaluation with the best ``eval.metric``).

The loop also owns: ``--resume`` (models, optimizers, scalers, the task's extra state such as EMA,
counters, the data order also in the middle of an epoch, every RNG), so a resumed run continues
exactly as an uninterrupted one; Ctrl-C (SIGINT/SIGTERM), which stops after the current step and
writes a checkpoint first; mixed precision (bf16/fp16), channels-last, whole-step CUDA graphs and
``torch.compile`` with their eager fallbacks; the NaN/inf guard (the advice comes from the task); an
evaluation every ``eval.every`` epochs that keeps ``best.pt`` by ``eval.metric`` and stops early
after ``eval.patience`` evaluations without improvement.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
import shutil
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from covidxray.checkpoint import load_checkpoint, save_checkpoint
from covidxray.config import Config, config_from_dict, eval_metric
from covidxray.data.datasets import TensorData, load_tensor_data, resize_masks, resize_u8
from covidxray.errors import CovidXrayError
from covidxray.models.registry import DataSpec, get_model
from covidxray.train import distributed, tensorboard
from covidxray.train.graphs import StepGraphs
from covidxray.train.optim import load_optimizer
from covidxray.train.tasks import get_task
from covidxray.utils import (ProgressBar, atomic_write_text, cpu_has_native_bf16, resolve_device, seed_everything,
                             sweep_stale_temps)


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


@dataclass
class RunState:
    """Counters of a run; all of it goes into the checkpoint."""

    epoch: int = 0               # completed epochs
    batch_in_epoch: int = 0      # batches done in the current (unfinished) epoch
    perm: torch.Tensor | None = None  # data order of the current epoch (kept for a mid-epoch resume)
    step: int = 0                # optimisation steps
    images_seen: int = 0         # training images shown
    best_metric: float | None = None  # best value of eval.metric so far
    best_epoch: int = 0          # the epoch it was reached at (0: no evaluation yet)
    evals_since_best: int = 0    # evaluations without improvement (early stopping)
    stopped_early: bool = False  # early stopping ended the run


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


class Trainer:
    """Trains any registered model on a prepared folder; the model's family picks the task.

    Args:
        cfg: resolved configuration (of the model's family).
        run_dir: the run folder (created by :func:`new_run_dir`, or an existing one on resume).
        checkpoint: a loaded checkpoint to resume from, or None for a fresh run.
        console: rich console for progress (None: no progress display).
        on_step: optional callback ``on_step(trainer)`` after every step (tests use it to interrupt).

    Attributes:
        task: the family's :class:`~covidxray.train.tasks.base.Task` (its networks: ``task.models``).
        data: the training split as a :class:`~covidxray.data.datasets.TensorData` (uint8, on the GPU
            when there is one); ``eval_data`` the evaluated split, or None.
    """

    def __init__(self, cfg: Config, run_dir: Path, checkpoint: dict[str, Any] | None = None,
                 console=None, on_step: Callable[["Trainer"], None] | None = None):
        self.cfg, self.run_dir, self.console, self.on_step = cfg, Path(run_dir), console, on_step
        self.spec = get_model(cfg.model.name)
        if self.spec.family != cfg.family:
            raise CovidXrayError(f"model '{cfg.model.name}' is a {self.spec.family} model but the configuration is "
                                 f"of the {cfg.family} family")
        task_cls = get_task(self.spec.family)
        task_cls.check_config(cfg, self.spec)
        tensorboard.check(cfg)  # train.tensorboard without the package: refused before the data are read
        self._tb: tensorboard.ScalarWriter | None = None  # open during fit() (rank 0, train.tensorboard)
        # torchrun: this process's rank (covidxray/train/distributed.py); rank 0 of 1 otherwise.
        self.dist = dist = distributed.current()
        self.device = distributed.device_for(dist, resolve_device(cfg.train.device))
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        self._stop = False

        if dist.enabled and not dist.is_main:
            dist.barrier()  # rank 0 decodes (and caches) the data first; the others then read its cache
        self.data, self.eval_data = self._load_data(task_cls)
        if dist.enabled and dist.is_main:
            dist.barrier()
        self.batch_size = min(cfg.train.batch_size, len(self.data))  # the global batch (all ranks together)
        if self.batch_size % dist.world_size:
            raise CovidXrayError(f"train.batch_size={self.batch_size} does not split over {dist.world_size} ranks",
                                 f"Pass a batch size divisible by {dist.world_size} (it is the global batch)")
        #: This rank's share of each global batch.
        self.rank_batch_size = self.batch_size // dist.world_size
        # Drop the last incomplete batch: every step then sees the same batch size
        # (a shuffled order means every image still gets seen).
        self.batches_per_epoch = len(self.data) // self.batch_size

        # Mixed precision: bf16 needs no loss scaling; fp16 gets one scaler per optimizer.
        # `auto` is bf16 on CUDA; on the CPU it is bf16 for tasks that ask for it (every family, each measured:
        # docs/benchmarks.md) where the CPU has native bf16 (AMX / AVX512-BF16), else full precision.
        auto_bf16 = self.device.type == "cuda" or (task_cls.bf16_on_native_cpu and cpu_has_native_bf16())
        if checkpoint is not None and cfg.train.amp == "auto" and self.device.type == "cpu":
            # A resumed run keeps the precision it trained in (the checkpoint's record), so that a default that
            # changed between versions never switches precision mid-run; a checkpoint from before the record
            # goes on in its family's old CPU default (Task.cpu_precision_before_record).
            recorded = checkpoint.get("precision", task_cls.cpu_precision_before_record)
            if recorded is not None:
                auto_bf16 = recorded == "bf16"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}.get(
            cfg.train.amp, torch.bfloat16 if auto_bf16 else None)
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
        self.use_graphs = (cfg.train.cuda_graphs != "no" and self.device.type == "cuda" and not fp16
                           and not cfg.train.compile)
        unsupported = task_cls.graphs_unsupported(cfg) if self.use_graphs else ""
        if self.use_graphs and dist.enabled and not unsupported:
            unsupported = ("DistributedDataParallel's gradient all-reduce is not captured in this project's step "
                           "graphs, so torchrun runs train eagerly")
        if unsupported:
            if cfg.train.cuda_graphs == "yes":
                raise CovidXrayError(f"train.cuda_graphs=yes: {unsupported}", "Use --set train.cuda_graphs=auto or no")
            self.log(f"note: CUDA graphs off: {unsupported}")
            self.use_graphs = False

        classes = tuple(self.data.classes)
        self.data_spec = DataSpec(len(classes), int(self.data.images.shape[-1]), 1, classes)
        self.resuming = checkpoint is not None
        self.task = task_cls(self)
        if dist.enabled:
            self._distribute()
        self._compiled_ok = False
        if cfg.train.compile:
            try:
                self.task.compile(cfg.train.compile_mode)
            except Exception as exc:  # e.g. no compiler toolchain: train eagerly
                self._compile_failed(exc)

        # The data order has its own generator, so that its state can be saved and restored exactly; under
        # torchrun every rank draws the same order and takes its slice of each batch.
        self.shuffle_gen = torch.Generator().manual_seed(cfg.train.seed)
        if dist.rank > 0:  # rank r's own noise, augmentation and dropout (rank 0 keeps the single-process ones)
            self._reseed_rank_streams(cfg.train.seed + distributed.RANK_SEED_STRIDE * dist.rank)
        if self.use_graphs:
            self.graphs = StepGraphs(self.task.device_step, self.task.graph_generators(), self._graphs_failed)
        self.state = RunState()
        # Running averages of the current log interval and epoch (kept across a mid-epoch resume).
        self.interval_meter, self.epoch_meter = Meter(), Meter()
        self.metric_name, self.metric_mode = eval_metric(cfg) if self.eval_data is not None else ("", "min")
        if checkpoint is not None:
            self._restore(checkpoint)

    # ------------------------------------------------------------ distributed
    def _distribute(self) -> None:
        """Wrap the task's trained networks in DDP (SyncBatchNorm first where train.sync_batchnorm says so)."""
        cfg, dist = self.cfg, self.dist
        with_bn = [k for k, m in self.task.models.items() if distributed.has_batchnorm(m)]
        mode = cfg.train.sync_batchnorm
        if mode == "yes" and self.device.type != "cuda":
            raise CovidXrayError("train.sync_batchnorm=yes needs CUDA devices (PyTorch's SyncBatchNorm runs on GPUs "
                                 "only)", "Use --set train.sync_batchnorm=auto or no on the CPU")
        sync = mode == "yes" or (mode == "auto" and self.device.type == "cuda" and bool(with_bn))
        wrappers = {k: distributed.wrap(m, dist, self.device, sync and k in with_bn)
                    for k, m in self.task.models.items()}
        self.task.distribute(wrappers)
        bn = ("no BatchNorm" if not with_bn else
              f"SyncBatchNorm in {', '.join(with_bn)}" if sync else
              f"BatchNorm per rank in {', '.join(with_bn)} (" + (
                  "SyncBatchNorm runs on CUDA only" if self.device.type != "cuda" else "train.sync_batchnorm=no")
              + "; rank 0's running statistics are broadcast)")
        self.log(f"distributed: {dist.world_size} ranks ({dist.backend}), DDP around {', '.join(wrappers)}; "
                 f"global batch {self.batch_size} = {dist.world_size} x {self.rank_batch_size} per rank; {bn}")

    def _reseed_rank_streams(self, seed: int) -> None:
        torch.manual_seed(seed)
        for name, (gen, offset) in self.task.generators().items():
            if name not in self.task.shared_generators:
                gen.manual_seed(seed + offset)

    # ------------------------------------------------------------------- data
    def _load_data(self, task_cls) -> tuple[TensorData, TensorData | None]:
        cfg = self.cfg
        if not cfg.data.path:
            raise CovidXrayError("no training data given", "Pass --data PREPARED_FOLDER (from `covidxray prepare`)")
        resizes = task_cls.resizes_data
        load_size = None if resizes else (cfg.data.image_size or None)
        masks = task_cls.wants_masks(cfg)
        data = load_tensor_data(cfg.data.path, cfg.data.split, cfg.data.classes or None, load_size,
                                cfg.data.cache, self.log, masks=masks)
        eval_data = None
        if cfg.eval.every > 0 and task_cls.evaluates:
            if cfg.eval.split == cfg.data.split:
                raise CovidXrayError(f"eval.split and data.split are both '{cfg.data.split}': the model would be "
                                     f"selected on its own training images", "Evaluate on another split (eval.split=val)")
            try:
                eval_data = load_tensor_data(cfg.data.path, cfg.eval.split, cfg.data.classes or None, load_size,
                                             cfg.data.cache, self.log, masks=masks)
            except CovidXrayError as exc:
                raise CovidXrayError(f"{exc.message}; it is needed to evaluate during training (eval.every="
                                     f"{cfg.eval.every})", "Prepare with --val > 0, or --set eval.every=0") from None
        prepared = int(data.images.shape[-1])
        size = cfg.data.image_size or prepared
        on_gpu = self.device.type == "cuda" and cfg.data.on_device in ("auto", "yes")
        if size != prepared:
            self.log(f"data prepared at {prepared} px are resized to {size} px on the "
                     f"{'GPU' if on_gpu else 'CPU'} (bilinear, antialiased), once")

        def place(d: TensorData) -> TensorData:
            d = d.to(self.device) if on_gpu else d  # uint8 on the GPU: an epoch needs no host work
            if size == prepared:
                return d
            return TensorData(resize_u8(d.images, size), d.labels, d.classes, d.ids,
                              None if d.masks is None else resize_masks(d.masks, size))

        cfg.data.image_size = size  # "0 = the prepared size", resolved for config.yaml and the checkpoint
        return place(data), (place(eval_data) if eval_data is not None else None)

    # ------------------------------------------------------------ public state
    @property
    def step(self) -> int:
        """Optimisation steps done."""
        return self.state.step

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.state.epoch

    @property
    def images_seen(self) -> int:
        """Training images shown so far."""
        return self.state.images_seen

    @property
    def batch_in_epoch(self) -> int:
        """Batches done in the current (unfinished) epoch."""
        return self.state.batch_in_epoch

    @property
    def cuda_graphs(self) -> str:
        """How steps run: ``off`` (eager), ``failed`` (capture failed; eager), ``warming-up``, or
        ``replayed (N graphs)``."""
        if self.graphs is None:
            return "off"
        if self.graphs.failed:
            return "failed"
        return f"replayed ({len(self.graphs.graphs)} graphs)" if self.graphs.graphs else "warming-up"

    # ---------------------------------------------------------------- logging
    def log(self, message: str) -> None:
        if not self.dist.is_main:  # rank 0 writes the run folder and talks to the user
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.run_dir.exists():
            with (self.run_dir / "log.txt").open("a", encoding="utf-8") as fh:
                fh.write(f"[{stamp}] {message}\n")
        if self.console is not None:
            self.console.print(message, highlight=False)

    def _write_stats(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with (self.run_dir / "stats.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.write(record)

    def _warn_eager(self, what: str, exc: BaseException, hint: str = "") -> None:
        """Warn (and log) that ``what`` failed with ``exc`` and training goes on eagerly."""
        msg = f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); training eagerly{hint}"
        warnings.warn(msg, stacklevel=3)
        self.log(f"warning: {msg}")

    def _graphs_failed(self, exc: BaseException) -> None:
        self._warn_eager("CUDA graph capture", exc, " (--set train.cuda_graphs=no silences this)")

    def _compile_failed(self, exc: BaseException) -> None:
        self._warn_eager("torch.compile", exc)
        self.task.uncompile()

    # -------------------------------------------------------------- state I/O
    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"shuffle": self.shuffle_gen.get_state(),
               **{name: gen.get_state() for name, (gen, _) in self.task.generators().items()},
               "torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _rank_state(self) -> dict[str, Any]:
        """What only this rank has: its random-generator states and its partial means."""
        return {"rng": self._rng_state(), "epoch_meter": self.epoch_meter.state(),
                "interval_meter": self.interval_meter.state()}

    def state_dict(self) -> dict[str, Any] | None:
        """The whole run state: what ``checkpoints/*.pt`` hold (format: :mod:`covidxray.checkpoint`).

        Under torchrun every rank must call it at the same point: it gathers each rank's :meth:`_rank_state`
        (``rank_state``); the rest is the same on every rank. Only rank 0's return value is complete (None elsewhere).
        """
        task = self.task
        own = self._rank_state()
        ranks = self.dist.gather(own) if self.dist.enabled else None
        if not self.dist.is_main:
            return None
        s = self.state
        return {
            "model": self.cfg.model.name, "family": self.spec.family, "config": self.cfg.to_dict(),
            "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch, "perm": s.perm,
            "step": s.step, "images_seen": s.images_seen, "best_metric": s.best_metric,
            "best_epoch": s.best_epoch, "evals_since_best": s.evals_since_best, "stopped_early": s.stopped_early,
            "eval_metric": self.metric_name,
            "n_images": len(self.data), "classes": list(self.data.classes), "image_size": self.data_spec.image_size,
            "models": task.models_state(),
            "optimizers": {k: opt.state_dict() for k, opt in task.optimizers.items()},
            "scalers": {k: sc.state_dict() for k, sc in task.scalers.items()},
            "rng": own["rng"], "epoch_meter": own["epoch_meter"], "interval_meter": own["interval_meter"],
            "world_size": self.dist.world_size, "rank_batch_size": self.rank_batch_size,
            "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "off"),
            **({"rank_state": ranks} if ranks is not None else {}),
            **task.extra_state(),
        }

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if ckpt["n_images"] != len(self.data) or list(ckpt["classes"]) != list(self.data.classes):
            raise CovidXrayError(
                f"the training data changed since {ckpt['path']} was written "
                f"({ckpt['n_images']} images of {ckpt['classes']} then, {len(self.data)} of {self.data.classes} now)",
                "Resume with the same prepared data (--data), or start a new run",
            )
        task = self.task
        saved_world = int(ckpt.get("world_size", 1))
        rng, meters = ckpt["rng"], (ckpt["epoch_meter"], ckpt["interval_meter"])
        if self.dist.rank > 0:  # this rank's own part of the checkpoint, when the saving run had this rank
            ranks = ckpt.get("rank_state") or []
            own = ranks[self.dist.rank] if saved_world == self.dist.world_size and len(ranks) > self.dist.rank else None
            rng = own["rng"] if own else None
            if own:  # (else rank 0's partial means stand in: the logged means of this interval are approximate)
                meters = (own["epoch_meter"], own["interval_meter"])
        if saved_world != self.dist.world_size:
            self.log(f"note: {ckpt['path']} was written by a run of {saved_world} rank(s), this one has "
                     f"{self.dist.world_size}: the epoch order and the global batch of {self.batch_size} are the same, "
                     f"but the ranks' random streams (noise, augmentation, dropout) and the per-rank batches differ "
                     f"from here on, so the run does not continue bit-exactly")
        try:
            task.load_models_state(ckpt["models"])
            for k, opt in task.optimizers.items():
                load_optimizer(opt, ckpt["optimizers"][k])
            for k, sc in task.scalers.items():
                sc.load_state_dict(ckpt["scalers"][k])
            task.load_extra_state(ckpt)
            self.shuffle_gen.set_state(ckpt["rng"]["shuffle"])  # the same epoch order on every rank
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CovidXrayError(
                f"{ckpt['path']} was written by covidxray {ckpt.get('covidxray_version', '?')} (checkpoint format "
                f"{ckpt.get('format_version', '?')}) and does not fit this version's {self.spec.name} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})",
                "Resume it with the version that wrote it, or start a new run",
            ) from None
        # Each generator of the task: restored, or (a run saved on another device type, or by a version
        # that did not have it) re-seeded from the step, which is then not bit-exact.
        reseeded = []
        if rng is None:  # a rank the saving run did not have: streams of its own, from the step
            self._reseed_rank_streams(self.cfg.train.seed + distributed.RANK_SEED_STRIDE * self.dist.rank
                                      + ckpt["step"])
            for name in task.shared_generators:  # the host decisions stay rank 0's
                task.generators()[name][0].set_state(ckpt["rng"][name])
        else:
            for name, (gen, offset) in task.generators().items():
                try:
                    gen.set_state(rng[name])
                except (KeyError, RuntimeError):  # CPU and CUDA generator states differ in format
                    gen.manual_seed(self.cfg.train.seed + offset + ckpt["step"])
                    reseeded.append(name)
        if reseeded:
            self.log(f"note: the {', '.join(reseeded)} RNG(s) could not be restored (saved on another device type, "
                     f"or by an older version); they continue from seeds derived from step {ckpt['step']} "
                     f"(not bit-exact)")
        if rng is not None:
            torch.set_rng_state(rng["torch_cpu"])
            if self.device.type == "cuda" and "torch_cuda" in rng:
                torch.cuda.set_rng_state(rng["torch_cuda"], self.device)
        self.epoch_meter.load(meters[0], self.device)
        self.interval_meter.load(meters[1], self.device)
        self.state = RunState(ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["perm"], ckpt["step"],
                              ckpt["images_seen"], ckpt.get("best_metric"), ckpt.get("best_epoch", 0),
                              ckpt.get("evals_since_best", 0), ckpt.get("stopped_early", False))
        # Lines logged after the checkpoint belong to work that is about to be redone.
        stats = self.run_dir / "stats.jsonl"
        if stats.exists():
            keep = [ln for ln in stats.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.state.step]
            atomic_write_text(stats, "".join(ln + "\n" for ln in keep))

    def save(self, name: str = "last.pt") -> Path:
        """Write a checkpoint (under torchrun: every rank calls it, rank 0 writes it)."""
        path = self.run_dir / "checkpoints" / name
        state = self.state_dict()  # ranks > 0 only hand rank 0 their part
        if state is not None:
            save_checkpoint(path, state)
        return path

    # ------------------------------------------------------------------- step
    def train_step(self, images_u8: torch.Tensor, *targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step of the task on a batch; returns detached scalars for the logs.

        ``targets`` are the batch's rows of the task's ``batch_fields`` (class labels, masks). What varies from
        step to step is decided by the task on the host first (its graph key); with CUDA graphs the scalars are
        the graph's output buffers: read them (as the loop's meters do) before the next step overwrites them.
        """
        variant = self.task.step_variant()
        if self.graphs is not None:
            stats = self.graphs.step((images_u8, *targets), variant)
        else:
            stats = self.task.device_step(images_u8, *targets, *variant)
        self.task.after_step(images_u8.shape[0] * self.dist.world_size)  # all ranks' images (EMA half-life)
        return stats

    def _step_with_fallback(self, images: torch.Tensor, *targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.task.compiled or self._compiled_ok:
            return self.train_step(images, *targets)
        try:  # the first compiled step is where torch.compile really compiles (and may fail)
            out = self.train_step(images, *targets)
            self._compiled_ok = True
            return out
        except Exception as exc:
            self._compile_failed(exc)
            return self.train_step(images, *targets)

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

    def fit(self, epochs: int | None = None) -> bool:
        """Train up to ``epochs`` in total (default ``cfg.train.epochs``, which ``epochs`` then replaces),
        or until early stopping. Returns True when finished, False when stopped (Ctrl-C, :meth:`request_stop`)."""
        cfg, s = self.cfg, self.state
        if epochs is not None:
            cfg.train.epochs = epochs
        total = cfg.train.epochs
        if s.stopped_early:
            raise CovidXrayError(
                f"the run stopped early at epoch {s.epoch}: {self.metric_name} had not improved for "
                f"{s.evals_since_best} evaluations (best at epoch {s.best_epoch}, checkpoints/best.pt)",
                "Start a new run (e.g. with a larger eval.patience) to train further")
        if s.epoch >= total:
            raise CovidXrayError(
                f"the run is already trained to epoch {s.epoch} (asked: {total})",
                f"Pass --epochs larger than {s.epoch} to continue it",
            )
        fresh = s.step == 0 and s.batch_in_epoch == 0
        main = self.dist.is_main
        if fresh:
            if main:
                atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
                self.task.on_start()
            self.log(f"run {self.run_dir}: {self.spec.name} on {len(self.data)} images "
                     f"({', '.join(self.data.classes)}) at {self.data_spec.image_size} px, device {self.device}, "
                     f"seed {cfg.train.seed}")
        else:
            self.log(f"resuming {self.run_dir} at epoch {s.epoch}, step {s.step} (batch {s.batch_in_epoch}), to epoch {total}")
        if main:  # temporaries of a run killed while writing (a checkpoint, the stats) go
            for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "samples"):
                sweep_stale_temps(folder)

        meter, epoch_meter = self.interval_meter, self.epoch_meter
        t_log = time.perf_counter()
        imgs_since_log = 0
        progress = ProgressBar(self.console if main else None, "train", total * self.batches_per_epoch,
                               completed=s.epoch * self.batches_per_epoch + s.batch_in_epoch, info=True)
        lo, hi = self.dist.rank * self.rank_batch_size, (self.dist.rank + 1) * self.rank_batch_size
        if cfg.train.tensorboard and main:  # a resumed run's events past its checkpoint are dropped, as its lines are
            self._tb = tensorboard.ScalarWriter(self.run_dir, purge_step=None if fresh else s.step + 1)
        with self._signals(), progress, self._closing_tensorboard():
            while s.epoch < total:
                progress.update(description=f"epoch {s.epoch + 1}/{total}")
                if s.perm is None:
                    s.perm = torch.randperm(len(self.data), generator=self.shuffle_gen)
                perm = s.perm.to(self.data.images.device)
                # What a step learns from beside the images: class labels, lung masks (segmenters) or both (pix2pix).
                fields = [getattr(self.data, f) for f in self.task.batch_fields]
                for b in range(s.batch_in_epoch, self.batches_per_epoch):
                    idx = perm[b * self.batch_size:(b + 1) * self.batch_size][lo:hi]  # this rank's slice
                    images = self.data.images[idx].to(self.device, non_blocking=True)
                    targets = [f[idx].to(self.device, non_blocking=True) for f in fields]
                    out = self._step_with_fallback(images, *targets)
                    meter.add(**out)
                    epoch_meter.add(**out)
                    s.step += 1
                    s.batch_in_epoch = b + 1
                    s.images_seen += self.batch_size  # all ranks' images
                    imgs_since_log += self.batch_size
                    progress.advance()
                    if s.step % cfg.train.log_every == 0:
                        now = time.perf_counter()
                        rec = self._stats_record(self._check_finite(self.dist.mean(meter.pop())),
                                                 imgs_since_log / max(now - t_log, 1e-9))
                        t_log, imgs_since_log = now, 0
                        self._write_stats(rec)
                        progress.update(info=self._fmt_info(rec))
                    if self.on_step is not None:
                        self.on_step(self)
                    if self.dist.enabled:  # a stop asked on any rank stops every rank after this same step
                        self._stop = self.dist.any(self._stop)
                    if self._stop:
                        path = self.save()
                        self.log(f"stopped at epoch {s.epoch} batch {s.batch_in_epoch} (step {s.step}); "
                                 f"checkpoint {path}; continue with `covidxray train --resume {self.run_dir}`")
                        return False
                # epoch finished
                s.epoch += 1
                s.batch_in_epoch, s.perm = 0, None
                rec = self._stats_record(self._check_finite(self.dist.mean(epoch_meter.pop())), None, kind="epoch")
                self._write_stats(rec)
                if self.eval_data is not None and s.epoch % cfg.eval.every == 0:
                    rec = {**rec, **self._evaluate()}
                last = s.epoch == total or s.stopped_early
                if (s.epoch % cfg.train.snapshot_every == 0 or last) and main:
                    self.task.snapshot()
                if s.epoch % cfg.train.checkpoint_every == 0 or last:
                    self.save()
                if cfg.train.keep_every and s.epoch % cfg.train.keep_every == 0:
                    self.save(f"epoch_{s.epoch:04d}.pt")
                self._log_epoch(rec)
                if s.stopped_early:
                    self.log(f"early stopping at epoch {s.epoch}: {self.metric_name} has not improved for "
                             f"{s.evals_since_best} evaluations; best {self.metric_name} {s.best_metric:.4f} at epoch "
                             f"{s.best_epoch}: {self.run_dir / 'checkpoints' / 'best.pt'}")
                    break
        distributed.sync_buffers(self.task.models.values(), self.dist)  # identical networks on every rank
        self.log(f"done: {s.epoch} epochs, {s.step} steps, {s.images_seen / 1000:.1f} kimg; "
                 f"checkpoint {self.run_dir / 'checkpoints' / 'last.pt'}")
        return True

    @contextmanager
    def _closing_tensorboard(self):
        try:
            yield
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    # ------------------------------------------------------------- evaluation
    def _evaluate(self) -> dict[str, float]:
        """Evaluate on ``eval.split``; write the record, ``best.pt`` on improvement, count patience."""
        cfg, s = self.cfg, self.state
        # A forked RNG: the evaluation (Monte-Carlo dropout, say) neither disturbs nor depends on the
        # training's random streams, so a run trains the same weights whatever eval.* says.
        # Under torchrun, tasks whose validation splits into per-image rows and metrics (classifiers, segmenters)
        # score a shard of the split on each rank and rank 0 reduces the gathered rows; for the others rank 0
        # evaluates alone (its weights are every rank's). Rank 0 tells the others the values, so that all ranks
        # take the same best.pt and early-stopping decisions.
        d = self.dist
        devices = [self.device] if self.device.type == "cuda" else []

        def forked(fn, data, offset: int = 0):
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.train.seed + 7919 * s.epoch + offset)
                return fn(data)

        values = None
        if d.enabled and self.task.shards_evaluation and len(self.eval_data) >= d.world_size:
            e, n = self.eval_data, len(self.eval_data)
            lo, hi = d.rank * n // d.world_size, (d.rank + 1) * n // d.world_size
            shard = TensorData(e.images[lo:hi], e.labels[lo:hi], e.classes, e.ids[lo:hi],
                               None if e.masks is None else e.masks[lo:hi])
            parts = d.gather(forked(self.task.evaluate_outputs, shard, d.rank))
            if d.is_main:
                values = self.task.evaluate_metrics({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        elif d.is_main:
            values = forked(self.task.evaluate, self.eval_data)
        values = d.broadcast(values)
        values = {f"{cfg.eval.split}_{k}": v for k, v in values.items()}
        key = f"{cfg.eval.split}_{self.metric_name}"
        value = values[key]
        if not math.isfinite(value):
            raise CovidXrayError(f"evaluation at epoch {s.epoch} gave {key} = {value}", self.task.divergence_hint())
        delta = cfg.eval.min_delta
        better = (s.best_metric is None or
                  (value < s.best_metric - delta if self.metric_mode == "min" else value > s.best_metric + delta))
        if better:
            s.best_metric, s.best_epoch, s.evals_since_best = value, s.epoch, 0
        else:
            s.evals_since_best += 1
        if cfg.eval.patience and s.evals_since_best >= cfg.eval.patience:
            s.stopped_early = True
        if better:
            self.save("best.pt")
        rec = {"kind": "eval", "step": s.step, "epoch": s.epoch, "kimg": round(s.images_seen / 1000, 3),
               **{k: round(v, 5) for k, v in values.items()}, "best_epoch": s.best_epoch}
        self._write_stats(rec)
        return values

    def _check_finite(self, values: dict[str, float]) -> dict[str, float]:
        """Stop with a clear message when a loss became NaN/inf (the last checkpoint stays good)."""
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise CovidXrayError(f"training diverged at step {self.state.step}: {', '.join(bad)} became NaN/inf",
                                 self.task.divergence_hint())
        return values

    def _stats_record(self, values: dict[str, float], images_per_s: float | None, kind: str = "interval") -> dict:
        s = self.state
        rec = {"kind": kind, "step": s.step, "epoch": s.epoch, "kimg": round(s.images_seen / 1000, 3),
               **{k: round(v, 5) for k, v in values.items()}}
        if images_per_s is not None:
            rec["images_per_s"] = round(images_per_s, 1)
        return rec

    def _fmt_info(self, rec: dict) -> str:
        parts = [f"{k} {_fmt_value(rec[k])}" for k in self.task.progress_keys if k in rec]
        if self.eval_data is not None:
            key = f"{self.cfg.eval.split}_{self.metric_name}"
            if key in rec:
                parts.append(f"{key} {_fmt_value(rec[key])}")
        if "images_per_s" in rec:
            parts.append(f"{rec['images_per_s']:.0f} img/s")
        return "  ".join(parts)

    def _log_epoch(self, rec: dict) -> None:
        line = f"epoch {rec['epoch']}/{self.cfg.train.epochs} step {rec['step']} kimg {rec['kimg']}: {self._fmt_info(rec)}"
        if self.console is None or self.cfg.train.epochs <= 50 or rec["epoch"] % max(1, self.cfg.train.epochs // 20) == 0:
            self.log(line)
        else:  # keep the terminal readable on long runs; log.txt gets every epoch
            with (self.run_dir / "log.txt").open("a", encoding="utf-8") as fh:
                fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


def _fmt_value(v: float) -> str:
    """Three decimals, or three significant digits for small values (a learning rate)."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"


@contextmanager
def _distributed(cfg: Config):
    """Join torchrun's process group for one run (nothing without torchrun) and leave it afterwards."""
    joined = distributed.launched() and not distributed.current().enabled
    d = distributed.setup(cfg.train.device, cfg.train.dist_timeout) if joined else distributed.current()
    try:
        yield d
        if joined:
            d.barrier()  # leave together: a rank that closes its connections early can make gloo abort a peer
    finally:
        if joined:
            distributed.teardown()


def _fit(trainer: Trainer, d) -> bool:
    """``trainer.fit()``; under torchrun the DDP wrappers are dropped afterwards, before the process group goes
    (a DDP reducer that outlives its group can abort the process at exit)."""
    try:
        return trainer.fit()
    finally:
        if d.enabled:
            trainer.task.undistribute()
            gc.collect()


def start_run(cfg: Config, console=None, on_step=None) -> tuple[Trainer, bool]:
    """Create a run folder for ``cfg`` and train it (under torchrun: rank 0 creates it, every rank trains)."""
    with _distributed(cfg) as d:
        parent_existed = Path(cfg.out).exists()
        run_dir = Path(d.broadcast(str(new_run_dir(cfg.out, cfg.model.name)) if d.is_main else None))
        try:
            trainer = Trainer(cfg, run_dir, console=console if d.is_main else None, on_step=on_step)
        except BaseException:
            # Nothing was trained: do not leave a run folder behind (at most the data-loading lines of
            # log.txt were written; the error itself is shown to the user), nor the runs/ folder made for it.
            if d.is_main and {p.name for p in run_dir.iterdir()} <= {"log.txt"}:
                shutil.rmtree(run_dir, ignore_errors=True)
                if not parent_existed:
                    with contextlib.suppress(OSError):
                        Path(cfg.out).rmdir()
            raise
        return trainer, _fit(trainer, d)


def resume_run(run_dir: str | Path, epochs: int | None = None, data: str | None = None,
               device: str | None = None, console=None, on_step=None) -> tuple[Trainer, bool]:
    """Continue the run in ``run_dir`` from ``checkpoints/last.pt``; ``epochs`` is the new total."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CovidXrayError(f"run folder {run_dir} does not exist", "Pass the folder printed by `covidxray train`")
    ckpt = load_checkpoint(run_dir, resume=True)
    cfg = config_from_dict(ckpt["config"], family=ckpt.get("family"))
    if epochs is not None:
        cfg.train.epochs = epochs
    if data is not None:
        cfg.data.path = str(Path(data).resolve())
    if device is not None:
        cfg.train.device = device
    with _distributed(cfg) as d:
        trainer = Trainer(cfg, run_dir, checkpoint=ckpt, console=console if d.is_main else None, on_step=on_step)
        if epochs is not None and d.is_main:
            atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        return trainer, _fit(trainer, d)
