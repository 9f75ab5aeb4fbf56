"""Small shared helpers: seeding, the device choice, atomic file writes, console factory."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) RNGs.

    Args:
        seed: the seed; stored with each run so that it can be repeated.
        deterministic: also ask cuDNN/PyTorch for deterministic kernels (slower).

    Returns:
        The seed, for chaining.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return seed


def resolve_device(name: str):
    """``auto`` -> CUDA when available, else CPU; a CUDA device asked for on a machine without one
    is a user error (:class:`~covidxray.errors.CovidXrayError`)."""
    import torch

    from covidxray.errors import CovidXrayError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CovidXrayError(f"device '{name}' was asked but no CUDA GPU is available", "Use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CovidXrayError(f"unknown device '{name}'", "Use auto, cpu, cuda or cuda:N") from None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (Intel AMX or AVX512-BF16), where
    oneDNN's bf16 convolutions are faster than float32 ones (elsewhere they are emulated and slower)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # pragma: no cover - a private helper that changed
            continue
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A reader never sees a half-written file: either the old file or the new one.
    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; put it in place of ``path`` (replaced whole) on success.

    A reader sees the old folder or the new one, never a half-written one; on an exception the
    temporary folder is removed and ``path`` is untouched.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file + rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def make_console(stderr: bool = False):
    """A rich Console; created on demand so that tests can set TERM/COLUMNS first."""
    from rich.console import Console

    return Console(stderr=stderr)
