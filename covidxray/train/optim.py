"""Optimizer helpers shared by the tasks: loading saved state; the supervised tasks' (classifiers,
segmenters) optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``opt.load_state_dict(state)``, keeping how ``opt`` was built to run here.

    A saved optimizer carries its implementation flags (``fused``, ``capturable``,
    ``foreach``), and ``load_state_dict`` would adopt them: a run saved on a GPU and resumed
    on a CPU would ask for a CUDA-only Adam, an eager run resumed with CUDA graphs could not
    be captured. The flags of ``opt`` are kept and Adam's step counters moved to where those
    flags want them (the parameters' device for fused/capturable, the CPU otherwise). A
    learning rate held as a tensor (for CUDA graphs) stays that tensor, with the saved value.
    """
    keys = ("fused", "capturable", "foreach")
    flags = [{k: g[k] for k in keys if k in g} for g in opt.param_groups]
    lr_tensors = [g["lr"] if torch.is_tensor(g["lr"]) else None for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, f, lr in zip(opt.param_groups, flags, lr_tensors):
        group.update(f)
        if lr is not None:
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        elif torch.is_tensor(group["lr"]):
            group["lr"] = float(group["lr"])
        on_device = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            st = opt.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)


def schedule_factor(schedule: str, epoch_float: float, total_epochs: int, warmup_epochs: float = 0.0,
                    step_epochs: int = 10, step_gamma: float = 0.1) -> float:
    """Learning-rate multiplier after ``epoch_float`` epochs (fractional) of a ``total_epochs`` run.

    A linear warm-up from 0 over ``warmup_epochs``, then ``cosine`` (half a cosine from 1 down to 0
    at the end of the run, Loshchilov & Hutter 2017, without restarts), ``step`` (times
    ``step_gamma`` every ``step_epochs`` epochs) or ``none`` (constant).

    Example:
        >>> schedule_factor("cosine", 5.0, 10), schedule_factor("step", 25.0, 30, step_epochs=10)
        (0.5, 0.010000000000000002)
    """
    if warmup_epochs > 0 and epoch_float < warmup_epochs:
        return epoch_float / warmup_epochs
    if schedule == "cosine":
        span = max(total_epochs - warmup_epochs, 1e-9)
        t = min(max((epoch_float - warmup_epochs) / span, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return step_gamma ** int(epoch_float // step_epochs)
    if schedule == "none":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, step, none")


def build_optimizer(params, o, device: torch.device, tensor_lr: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD from an ``optim`` section (``name``, ``lr``, ``beta1/2``, ``weight_decay``, ``momentum``,
    ``nesterov``) of the supervised families.

    ``tensor_lr`` (AdamW, for CUDA graphs): the learning rate lives in a device tensor and the update is
    ``capturable``, so that a captured step reads the rate :func:`set_lr` writes. AdamW is fused on CUDA.
    """
    if o.name == "adamw":
        kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
        if tensor_lr:
            kw["capturable"] = True  # step counters and lr on the GPU: the update can be captured
        lr: Any = torch.tensor(o.lr, device=device) if tensor_lr else o.lr
        return torch.optim.AdamW(params, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, **kw)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (into the tensor of a ``tensor_lr`` optimizer)."""
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_stat(opt: torch.optim.Optimizer) -> torch.Tensor:
    """The first group's learning rate as a tensor for the step's logs (a host float stays on the CPU:
    no host-to-device copy per step)."""
    lr = opt.param_groups[0]["lr"]
    return lr.detach().clone() if torch.is_tensor(lr) else torch.tensor(float(lr))


def adam_pair(G: torch.nn.Module, D: torch.nn.Module, o, trainer) -> tuple:
    """The two-network tasks' (GANs, pix2pix) Adam optimizers and loss scalers: ``(opt_g, opt_d, scaler_g,
    scaler_d)`` from ``o.lr_g``, ``o.lr_d``, ``o.beta1``, ``o.beta2``; fused on CUDA, ``capturable`` with CUDA
    graphs (the step counter lives on the GPU, so the update can be captured), scalers on for fp16 only."""
    device = next(G.parameters()).device
    kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    if trainer.use_graphs:
        kw["capturable"] = True
    betas = (o.beta1, o.beta2)
    fp16 = trainer.amp_dtype == torch.float16
    return (torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=betas, **kw),
            torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=betas, **kw),
            torch.amp.GradScaler("cuda", enabled=fp16), torch.amp.GradScaler("cuda", enabled=fp16))
