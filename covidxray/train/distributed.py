"""Multi-process training with ``torch.distributed`` (DDP), launched by ``torchrun``.

``torchrun --nproc_per_node N [--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT] -m covidxray train ...``
starts one process per GPU (or per CPU worker); each finds its place in the environment torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Without those variables a run is the
plain single process and nothing here does anything; ``torchrun --nproc_per_node 1`` takes the DDP path on one
process (what ``bench/distributed.py`` compares with the plain path on one GPU).

:func:`setup` joins the process group once per process: NCCL on CUDA, gloo on the CPU, with
``train.dist_timeout`` seconds for every collective, so that a rank that died makes the others stop with a
message instead of hanging. A second gloo group carries the host-side agreements (the stop flag, objects), so
they never wait on a CUDA stream. :class:`Dist` wraps the few collectives the loop needs and turns a failed
one into one clear :class:`~covidxray.errors.CovidXrayError`.

What the loop (``covidxray/train/loop.py``) does with it - docs/distributed.md has the user's view:

* every rank holds the whole uint8 training set and draws the same seeded epoch order; global batch ``b``
  (``train.batch_size`` images) is cut into ``world_size`` equal slices, rank ``r`` taking slice ``r``, so
  a config means the same optimisation at any world size;
* each trained network is wrapped in ``DistributedDataParallel`` (gradients averaged over ranks in backward;
  BatchNorm buffers broadcast from rank 0; ``SyncBatchNorm`` on CUDA with ``train.sync_batchnorm``);
* rank 0 alone writes the run folder; the logged scalars are means over ranks; a checkpoint holds every
  rank's random-generator states, so ``--resume`` at the same world size continues exactly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from covidxray.errors import CovidXrayError

#: Added (times the rank) to the seeds of rank > 0's random streams: noise, augmentation, dropout.
RANK_SEED_STRIDE = 1_000_003


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets its environment)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def env_world_size() -> int:
    """``WORLD_SIZE`` of the environment (torchrun's), 1 without one."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CovidXrayError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number",
                             "Launch with torchrun, which sets it, or unset it") from None


@dataclass
class Dist:
    """This process's place in the run (rank 0 of 1 when not distributed) and the collectives the loop uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    timeout_s: float = 0.0
    host_group: Any = None  # the gloo group of host-side agreements

    @property
    def enabled(self) -> bool:
        """In a process group (launched by torchrun), of any size."""
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ collectives
    def _failed(self, what: str, exc: BaseException) -> CovidXrayError:
        return CovidXrayError(
            f"distributed training stopped on rank {self.rank} of {self.world_size}: {what} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'no message'}); another rank "
            f"probably died or stopped (see its log), or did not answer within train.dist_timeout={self.timeout_s:g} s",
            "Look at the first error of the other ranks; `covidxray train --resume RUN` continues from the last "
            "checkpoint")

    def barrier(self) -> None:
        if self.enabled:
            try:
                dist.barrier(group=self.host_group)
            except Exception as exc:  # noqa: BLE001 - any backend error is the same story for the user
                raise self._failed("a barrier", exc) from None

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (a host-side all-reduce)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        except Exception as exc:  # noqa: BLE001
            raise self._failed("the stop-flag agreement", exc) from None
        return bool(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (every rank passes the same keys)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        try:
            dist.all_reduce(t, group=self.host_group)
        except Exception as exc:  # noqa: BLE001
            raise self._failed("averaging the logged scalars", exc) from None
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        try:
            dist.broadcast_object_list(box, src=0, group=self.host_group)
        except Exception as exc:  # noqa: BLE001
            raise self._failed("a broadcast from rank 0", exc) from None
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the others."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        try:
            dist.gather_object(obj, out, dst=0, group=self.host_group)
        except Exception as exc:  # noqa: BLE001
            raise self._failed("gathering the ranks' states", exc) from None
        return out


_CURRENT = Dist()


def current() -> Dist:
    """This process's :class:`Dist` (set by :func:`setup`)."""
    return _CURRENT


def setup(device: str, timeout_s: float) -> Dist:
    """Join the process group torchrun's environment describes (once per process; a no-op without one).

    ``device`` is ``train.device``: CUDA (``auto`` on a GPU machine) takes NCCL and the GPU of this local
    rank; the CPU takes gloo.
    """
    global _CURRENT
    world = env_world_size()
    if not launched():
        _CURRENT = Dist()
        return _CURRENT
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CovidXrayError(f"WORLD_SIZE={world} is set but {', '.join(missing)} not",
                             "Launch with torchrun --nproc_per_node N -m covidxray train ..., which sets them all")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise CovidXrayError(f"device '{device}' was asked but no CUDA GPU is available", "Use --device cpu")
        if local >= torch.cuda.device_count():
            raise CovidXrayError(f"local rank {local} has no GPU of its own (this machine has "
                                 f"{torch.cuda.device_count()})", "Start at most one process per GPU "
                                 "(torchrun --nproc_per_node <= the GPU count)")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        try:
            kw = {"device_id": torch.device("cuda", local)} if cuda else {}
            dist.init_process_group(backend, timeout=timeout, **kw)
        except Exception as exc:  # noqa: BLE001
            raise CovidXrayError(f"could not join the process group as rank {rank} of {world} ({backend}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                                 "Check MASTER_ADDR/MASTER_PORT (torchrun's --rdzv-endpoint) and that every node "
                                 "started") from None
    host = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    _CURRENT = Dist(rank, world, local, backend, float(timeout_s), host)
    return _CURRENT


def teardown() -> None:
    """Leave the process group (end of a run)."""
    global _CURRENT
    if _CURRENT.enabled:
        if dist.is_initialized():
            dist.destroy_process_group()
    _CURRENT = Dist()


def device_for(dist_ctx: Dist, device: torch.device) -> torch.device:
    """The device of this rank: its local GPU on CUDA (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    if dist_ctx.enabled and device.type == "cuda":
        return torch.device("cuda", dist_ctx.local_rank)
    return device


def wrap(module: torch.nn.Module, dist_ctx: Dist, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """``module`` in ``DistributedDataParallel`` (its BatchNorms made ``SyncBatchNorm`` first when ``sync_bn``)."""
    if sync_bn:
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        assert converted is module  # children are replaced in place: optimizers keep the same parameters
    ids = [device.index if device.index is not None else dist_ctx.local_rank] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)  # buffers (BatchNorm statistics): rank 0's, broadcast at each forward


def sync_buffers(modules, dist_ctx: Dist) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): DDP broadcasts them at the start of
    each forward, so after the last step each rank holds its own update of them; the loop calls this at the end."""
    if not dist_ctx.enabled:
        return
    try:
        for m in modules:
            for buf in m.buffers():
                dist.broadcast(buf, src=0)
    except Exception as exc:  # noqa: BLE001
        raise dist_ctx._failed("broadcasting rank 0's BatchNorm statistics", exc) from None


def has_batchnorm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
