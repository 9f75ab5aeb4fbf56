"""Exponential moving average of the generator's weights (G_ema).

Averaging G's weights over the recent past gives visibly smoother, better-FID
samples at no training cost (Yazıcı et al., "The Unusual Effectiveness of
Averaging in GAN Training", ICLR 2019; used for every result of Karras et al.,
StyleGAN2-ADA, NeurIPS 2020). Samples, metrics and exported generators use
``ema.ema_model``; only the raw G is trained.

The decay is set by a half-life in images (``train.ema_kimg``), not per step, so
it does not change with the batch size (:func:`decay_for`).

Example:
    >>> import torch
    >>> g = torch.nn.Linear(2, 2)
    >>> ema = EMA(g)
    >>> ema.update(g, decay_for(batch_size=64, half_life_kimg=10.0))
    >>> ema.ema_model.training, ema.ema_model.weight.requires_grad
    (False, False)
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["EMA", "decay_for"]


def decay_for(
    batch_size: int,
    half_life_kimg: float,
    rampup: float | None = None,
    images_seen: int = 0,
) -> float:
    """EMA decay per step from a half-life counted in images (StyleGAN2-ADA).

    ``beta = 0.5 ** (batch_size / (half_life_kimg * 1000))``: after
    ``half_life_kimg`` thousand images the old weights count half. With a ramp-up
    the half-life is ``min(half_life, images_seen * rampup)`` so the average does
    not drag in the random initial weights early in training (``beta`` is 0 - a
    plain copy - at ``images_seen = 0``).

    Args:
        batch_size: images per G step.
        half_life_kimg: half-life in thousands of images (``train.ema_kimg``, e.g. 10); must be > 0.
        rampup: ramp-up as a fraction of images seen (``train.ema_rampup``, e.g. 0.05); None or 0 = off.
        images_seen: images shown so far (the run's counter).

    Returns:
        The decay ``beta`` in [0, 1) for :meth:`EMA.update`.

    Raises:
        ValueError: non-positive batch size or half-life, or negative ramp-up/images.

    Example:
        >>> decay_for(64, 10.0) == 0.5 ** (64 / 10_000)
        True
    """
    if batch_size < 1 or half_life_kimg <= 0:
        raise ValueError(f"need batch_size >= 1 and half_life_kimg > 0, got {batch_size} and {half_life_kimg}")
    if (rampup is not None and rampup < 0) or images_seen < 0:
        raise ValueError(f"rampup and images_seen must be >= 0, got {rampup} and {images_seen}")
    half_life = half_life_kimg * 1000.0
    if rampup:
        half_life = min(half_life, images_seen * rampup)
    # The max() keeps a zero half-life (ramp-up at the start) finite: 0.5 ** huge == 0.0, a plain copy.
    return 0.5 ** (batch_size / max(half_life, 1e-8))


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (``_orig_mod``) or DDP/DataParallel (``module``) wrappers."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _split(named: Any) -> tuple[list[str], list[torch.Tensor]]:
    """``named_parameters()``/``named_buffers()`` -> (names, tensors)."""
    items = list(named)
    return [n for n, _ in items], [t for _, t in items]


class EMA:
    """Exponential moving average of a model's weights, kept in a deep copy.

    ``update(model, beta)`` sets every floating-point parameter to
    ``beta * ema + (1 - beta) * param`` (one fused ``torch._foreach_lerp_`` over
    all parameters, not a Python loop) and copies every buffer (BatchNorm running
    statistics, spectral-norm ``u``/``v`` vectors) as it is, as StyleGAN2-ADA does:
    averaging running statistics of different weights would mismatch them.

    ``ema_model`` is in eval mode with ``requires_grad=False``; it lives on the
    device of the model it was copied from (move both together with ``.to()``).
    Pass the plain module; compiled/DDP wrappers are unwrapped.

    Args:
        model: the module to average (usually G), copied at construction.

    Example:
        >>> g = torch.nn.Linear(1, 1, bias=False)
        >>> ema = EMA(g)
        >>> with torch.no_grad():
        ...     _ = g.weight.fill_(2.0); _ = ema.ema_model.weight.fill_(0.0)
        >>> ema.update(g, 0.5)
        >>> float(ema.ema_model.weight)
        1.0
    """

    def __init__(self, model: nn.Module):
        self.ema_model: nn.Module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        self._param_names = [n for n, _ in self.ema_model.named_parameters()]
        self._buffer_names = [n for n, _ in self.ema_model.named_buffers()]
        self._all_float = all(p.is_floating_point() for p in self.ema_model.parameters())
        # Tensor lists are not cached: Module.to() replaces buffer objects, so they are re-read per update.

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """Move the average towards ``model``: ``ema = decay * ema + (1 - decay) * model``.

        Args:
            model: the trained module; must have the same parameter and buffer names as ``ema_model``.
            decay: ``beta`` in [0, 1] (see :func:`decay_for`); 0 copies, 1 keeps the average.

        Raises:
            ValueError: ``decay`` outside [0, 1], or a model with other parameter/buffer names.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        model = _unwrap(model)
        names, params = _split(model.named_parameters())
        if names != self._param_names:
            raise ValueError(
                f"model has {len(names)} parameters that do not match the EMA copy's {len(self._param_names)} "
                "(pass the same architecture that EMA was built from)"
            )
        ema_params = list(self.ema_model.parameters())
        src_params = [p.detach() for p in params]
        if not self._all_float:  # rare integer parameters: copy them, average the rest
            for e, p in zip(ema_params, src_params):
                if not e.is_floating_point():
                    e.copy_(p)
            pairs = [(e, p) for e, p in zip(ema_params, src_params) if e.is_floating_point()]
            ema_params, src_params = [e for e, _ in pairs], [p for _, p in pairs]
        if ema_params:
            weight = 1.0 - decay  # lerp(ema, p, 1 - beta) = beta * ema + (1 - beta) * p; exact at 0 and 1
            if hasattr(torch, "_foreach_lerp_"):
                # One fused kernel per device/dtype group instead of one launch per tensor.
                torch._foreach_lerp_(ema_params, src_params, weight)
            else:  # pragma: no cover - torch < 2.0
                for e, p in zip(ema_params, src_params):
                    e.lerp_(p, weight)

        buf_names, buffers = _split(model.named_buffers())
        if buf_names != self._buffer_names:
            raise ValueError(
                f"model has {len(buf_names)} buffers that do not match the EMA copy's {len(self._buffer_names)}"
            )
        if buffers:
            ema_buffers = list(self.ema_model.buffers())
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(ema_buffers, buffers)
            else:  # pragma: no cover - torch < 2.1
                for e, b in zip(ema_buffers, buffers):
                    e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        """The EMA model's state dict (saved as ``G_ema`` in checkpoints)."""
        return self.ema_model.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any:
        """Restore the EMA model's weights and buffers (as saved by :meth:`state_dict`)."""
        return self.ema_model.load_state_dict(state_dict, strict=strict)

    decay_for = staticmethod(decay_for)
