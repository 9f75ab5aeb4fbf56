"""What a family's task gives the one training loop (:class:`~covidxray.train.loop.Trainer`).

A task owns the arithmetic of its family: it builds the networks and optimizers from the registry,
does the device work of one step, evaluates, writes snapshots, and names the extra state its
checkpoints need. The loop owns the rest (run folder, data, precision, graphs, checkpoints,
resume, signals, progress, evaluation schedule, ``best.pt``, early stopping).

A step is split in three so that it can be replayed as a CUDA graph:

1. :meth:`Task.step_variant` - host decisions for this step (a tuple; each value gets its own graph);
2. :meth:`Task.device_step` ``(images_u8, *targets, *variant)`` - device work only, no host syncs;
   returns a dict of scalar tensors for the logs; ``targets`` are the batch's rows of the data fields
   named by :attr:`Task.batch_fields` (by default the class labels);
3. :meth:`Task.after_step` ``(n_images)`` - host-driven work after it (e.g. the EMA update).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from covidxray.train.optim import adam_pair

if TYPE_CHECKING:  # pragma: no cover
    from covidxray.train.loop import Trainer


#: family -> its task class; a subclass of :class:`Task` that names a ``family`` registers itself here.
TASKS: dict[str, type["Task"]] = {}


class Task:
    """Base class of the per-family tasks; subclasses set the class attributes and the step. A subclass that
    sets ``family`` is that family's task (:data:`TASKS`): defining it is its registration.

    Class attributes:
        family: the family this task trains.
        resizes_data: the data may be resized to ``data.image_size`` on the device (classifiers);
            otherwise the prepared size must be the asked one (GANs).
        evaluates: the task implements :meth:`evaluate` (the loop then loads ``eval.split``).
        needs_masks: train on the images that have a lung mask only (the loop loads the masks beside them).
        batch_fields: the data fields (``labels``, ``masks``) whose batch rows follow the images into
            :meth:`device_step`, in this order: ``("labels",)`` by default, ``("masks",)`` for the
            segmenters (uint8 N x 1 x H x W of 0/1), ``("masks", "labels")`` for pix2pix.
        progress_keys: the step scalars the progress bar and log lines show.
        bf16_on_native_cpu: ``train.amp=auto`` means bf16 on a CPU with native bf16 too (AMX /
            AVX512-BF16), not only on CUDA.

    Attributes (set by subclasses in ``__init__``):
        models: the trained networks by checkpoint name (``{"G", "D"}``, ``{"net"}``).
        optimizers, scalers: by name, saved and restored by the loop.
    """

    family: ClassVar[str] = ""
    resizes_data: ClassVar[bool] = False
    evaluates: ClassVar[bool] = False
    needs_masks: ClassVar[bool] = False
    batch_fields: ClassVar[tuple[str, ...]] = ("labels",)
    #: (attribute, ``models`` key) of the forwards a training step calls (``G_train`` -> ``G``): under torchrun
    #: the loop points them at the networks' DistributedDataParallel wrappers (:meth:`distribute`), and
    #: ``torch.compile`` compiles what they point at; ``self.G`` etc. stay the plain networks (checkpoints, EMA,
    #: evaluation, snapshots).
    train_forwards: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Generators of host-side step decisions (:meth:`step_variant`): the same stream on every rank under
    #: torchrun, so that all ranks take the same kind of step; the others get a stream per rank.
    shared_generators: ClassVar[tuple[str, ...]] = ()
    #: The validation splits into :meth:`evaluate_outputs` (per-image rows, on any slice of the split) and
    #: :meth:`evaluate_metrics` (on all rows): under torchrun each rank scores its shard and rank 0 the metrics.
    shards_evaluation: ClassVar[bool] = False
    progress_keys: ClassVar[tuple[str, ...]] = ()
    bf16_on_native_cpu: ClassVar[bool] = False
    #: The CPU precision ("off" | "bf16") of ``train.amp=auto`` when checkpoints did not record it yet (before
    #: 2026-12-05); None = the current rule. A resumed run from such a checkpoint goes on in it.
    cpu_precision_before_record: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            TASKS[cls.family] = cls

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.cfg = trainer.cfg
        self.device = trainer.device
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.compiled = False
        self.ddp: dict[str, nn.Module] = {}

    def distribute(self, wrappers: dict[str, nn.Module]) -> None:
        """Train through these DistributedDataParallel wrappers (by ``models`` key; the loop calls it)."""
        self.ddp = dict(wrappers)
        for attr, name in self.train_forwards:
            setattr(self, attr, self.ddp[name])

    def undistribute(self) -> None:
        """Back to the plain networks (the loop calls it before leaving the process group)."""
        self.ddp = {}
        for attr, name in self.train_forwards:
            setattr(self, attr, self.models[name])

    def train_module(self, name: str) -> nn.Module:
        """What a training step's forward of ``models[name]`` runs: its DDP wrapper under torchrun, else it."""
        return self.ddp.get(name, self.models[name])

    def setup_pair(self, nets: dict[str, nn.Module]) -> None:
        """The two-network tasks' (GANs, pix2pix) set-up: ``G`` and ``D`` on the device in the run's memory
        format, with their Adam optimizers and loss scalers (:func:`~covidxray.train.optim.adam_pair`)."""
        t = self.trainer
        self.G = nets["G"].to(self.device, memory_format=t.memory_format)
        self.D = nets["D"].to(self.device, memory_format=t.memory_format)
        self.models = {"G": self.G, "D": self.D}
        self.G_train, self.D_train = self.G, self.D  # the training forwards (train_forwards)
        self.opt_g, self.opt_d, self.scaler_g, self.scaler_d = adam_pair(self.G, self.D, self.cfg.optim, t)
        self.optimizers = {"G": self.opt_g, "D": self.opt_d}
        self.scalers = {"G": self.scaler_g, "D": self.scaler_d}

    @classmethod
    def wants_masks(cls, cfg) -> bool:
        """Whether this run trains on the images with a lung mask, the masks loaded beside them (default:
        :attr:`needs_masks`; a family whose models differ, such as ``edm``/``edm_mask``, asks the model)."""
        return cls.needs_masks

    @classmethod
    def check_config(cls, cfg, spec) -> None:
        """Checks that need the model's spec as well as the config (called before any data is read)."""

    # ------------------------------------------------------------ the step
    def step_variant(self) -> tuple:
        """Host decisions of the next step (the CUDA graph key); default: none."""
        return ()

    def device_step(self, images_u8: torch.Tensor, *targets_and_variant) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, n_images: int) -> None:
        """Host-driven work after each step (default: nothing)."""

    def graph_generators(self) -> list[torch.Generator]:
        """CUDA generators the device step draws from (registered with every CUDA graph)."""
        return [g for g, _ in self.generators().values() if g.device.type == "cuda"]

    @classmethod
    def graphs_unsupported(cls, cfg) -> str:
        """Why this configuration's step cannot be captured as a CUDA graph ("" when it can); asked before
        the task is built, so that its optimizers are made for the right mode."""
        return ""

    # ------------------------------------------------------------ autocast and compile
    def autocast(self):
        """Autocast context of the trainer's precision (no cast cache with CUDA graphs: a cached cast
        would outlive the capture)."""
        t = self.trainer
        return torch.autocast(self.device.type, dtype=t.amp_dtype or torch.float32,
                              enabled=t.amp_dtype is not None, cache_enabled=not t.use_graphs)

    def compile(self, mode: str) -> None:
        """Wrap the trained networks in ``torch.compile`` (subclasses keep eager references)."""
        raise NotImplementedError(f"the {self.family} task does not support torch.compile")

    def uncompile(self) -> None:
        """Go back to the eager networks after a compile failure."""
        self.compiled = False

    # ------------------------------------------------------------ run events
    def on_start(self) -> None:
        """Files of a fresh run's start (GANs: ``reals.png`` and the untrained G's grid)."""

    def snapshot(self) -> None:
        """The periodic snapshot (every ``train.snapshot_every`` epochs and at the end)."""

    @torch.no_grad()
    def evaluate(self, data) -> dict[str, float]:
        """Metrics on the evaluated split (``evaluates = True`` tasks), names without the split prefix."""
        if self.shards_evaluation:
            return self.evaluate_metrics(self.evaluate_outputs(data))
        raise NotImplementedError

    @torch.no_grad()
    def evaluate_outputs(self, data) -> dict[str, torch.Tensor]:
        """Per-image results (CPU tensors, one row per image of ``data``) that :meth:`evaluate_metrics` reduces."""
        raise NotImplementedError

    def evaluate_metrics(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of the rows of :meth:`evaluate_outputs`, of one or of several shards concatenated."""
        raise NotImplementedError

    def divergence_hint(self) -> str:
        """Advice when a loss became NaN/inf."""
        if self.trainer.amp_dtype is not None:
            return "Try --set train.amp=off (full precision), a lower learning rate, or resume from the last checkpoint"
        return "Try a lower learning rate, or resume from the last checkpoint"

    # ------------------------------------------------------------ checkpoint state
    def generators(self) -> dict[str, tuple[torch.Generator, int]]:
        """The task's random generators, ``name -> (generator, seed offset)``, saved in checkpoints.

        When a saved state cannot be restored (another device type), the loop re-seeds the generator
        with ``train.seed + offset + step``.
        """
        return {}

    def models_state(self) -> dict[str, Any]:
        return {k: m.state_dict() for k, m in self.models.items()}

    def load_models_state(self, states: dict[str, Any]) -> None:
        for k, m in self.models.items():
            m.load_state_dict(states[k])

    def extra_state(self) -> dict[str, Any]:
        """Top-level checkpoint entries besides models, optimizers, scalers and RNGs."""
        return {}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        pass
