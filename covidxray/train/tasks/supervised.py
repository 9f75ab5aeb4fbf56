"""What the supervised tasks (classifiers, segmenters) share: one network ``net`` trained by AdamW or SGD with
a per-step learning-rate schedule, its loss scaler, ``torch.compile``, and the CUDA-graph rule for SGD.

The learning rate of each step is set on the host before the step (:meth:`SupervisedTask.step_variant`;
not a graph key); with CUDA graphs and AdamW it lives in a device tensor that the captured update reads.
"""

from __future__ import annotations

import torch

from covidxray.train.optim import build_optimizer, schedule_factor, set_lr
from covidxray.train.tasks.base import Task


class SupervisedTask(Task):
    """Base of the one-network tasks: call :meth:`setup_net` in ``__init__`` after ``super().__init__``."""

    train_forwards = (("net_train", "net"),)

    def setup_net(self, net: torch.nn.Module) -> None:
        """Put ``net`` on the device, build its optimizer and scaler (checkpoint names ``net``)."""
        t, cfg = self.trainer, self.cfg
        self.net = net.to(self.device, memory_format=t.memory_format)
        self.net_train = self.net
        self.models = {"net": self.net}
        self.opt = build_optimizer(self.net.parameters(), cfg.optim, self.device,
                                   tensor_lr=t.use_graphs and cfg.optim.name == "adamw")
        self.optimizers = {"net": self.opt}
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp_dtype == torch.float16)
        self.scalers = {"net": self.scaler}

    @classmethod
    def graphs_unsupported(cls, cfg) -> str:
        # SGD keeps its learning rate as a host float, which a captured update would freeze.
        if cfg.optim.name == "sgd":
            return "optim.name=sgd keeps its learning rate on the host, so its update cannot be captured (use adamw)"
        return ""

    # ------------------------------------------------------------ compile
    def compile(self, mode: str) -> None:
        self.net_train = torch.compile(self.train_module("net"), mode=mode)
        self.compiled = True

    def uncompile(self) -> None:
        self.net_train = self.train_module("net")
        self.compiled = False

    # ------------------------------------------------------------ learning rate
    def current_lr(self) -> float:
        t, o = self.trainer, self.cfg.optim
        epoch_float = t.state.step / max(t.batches_per_epoch, 1)
        return o.lr * schedule_factor(o.schedule, epoch_float, self.cfg.train.epochs, o.warmup_epochs,
                                      o.step_epochs, o.step_gamma)

    def step_variant(self) -> tuple:
        # Not a graph key: the learning rate of this step is written where the update reads it.
        set_lr(self.opt, self.current_lr())
        return ()

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward and one (scaled) optimizer step on ``loss``."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
