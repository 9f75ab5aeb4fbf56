"""Small shared helpers: seeding, the device choice, atomic file writes, console factory."""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from covidxray.errors import CovidXrayError


def seed_everything(seed: int, deterministic: bool = False) -> int:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) RNGs.

    Args:
        seed: the seed; stored with each run so that it can be repeated.
        deterministic: also ask cuDNN/PyTorch for deterministic kernels (slower).

    Returns:
        The seed, for chaining.
    """
    import numpy as np  # local: covidxray.utils stays NumPy-free (covidxray.cli imports it at start-up)
    import torch  # local: covidxray.utils stays torch-free (covidxray.cli imports it at start-up)

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
    import torch  # local: covidxray.utils stays torch-free (covidxray.cli imports it at start-up)

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
    import torch  # local: covidxray.utils stays torch-free (covidxray.cli imports it at start-up)

    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, name, None)
        try:
            if check is not None and check():
                return True
        except Exception:  # pragma: no cover - a private helper that changed
            continue
    return False


#: Temporary files and folders of the atomic writes: ``.<name>.<pid>.<8 random>.tmp`` beside their target,
#: so that the next start can tell the leftovers of a killed process (pid gone) from a live writer's.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]{8}\.tmp$")
_UMASK: int | None = None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc), else set and restored once."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                _UMASK = next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
        except (OSError, StopIteration, ValueError):
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def plain_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` (0666) or ``mkdir()`` (0777) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def temp_prefix(path: Path) -> str:
    """The prefix of a temporary file beside ``path`` (its pid marks it as this process's)."""
    return f".{path.name}.{os.getpid()}."


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of the atomic writes' temporary names (see :func:`sweep_stale_temps`)."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's live process, or not a pid we can ask about: leave it
    return True


def sweep_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files and folders that a killed earlier run left in ``folder``.

    Only names of :func:`atomic_path`/:func:`atomic_dir`'s pattern whose process is gone are removed;
    a live writer's (another command writing the same folder now) are left alone.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    walker = os.walk(folder) if recursive else [(str(folder), None, None)]
    for root, _dirs, _files in walker:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            m = _TEMP_RE.match(entry.name)
            if m is None or _pid_alive(int(m.group("pid"))):
                continue
            p = Path(entry.path)
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    A reader never sees a half-written file: either the old file or the new one. The new file gets
    the mode a plain ``open()`` would give (0666 less the umask), not mkstemp's 0600.
    On an exception the temporary file is removed and ``path`` is untouched; after a SIGKILL it is
    left, named for its process, and :func:`sweep_stale_temps` removes it on the next start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp_path, plain_mode())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def make_temp_dir(beside: Path) -> Path:
    """A new temporary folder named for ``beside`` in its parent (pid-marked), with plain mkdir modes."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(beside), suffix=".tmp", dir=beside.parent))
    os.chmod(tmp, plain_mode(directory=True))
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (temp file + rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def import_submodules(package: str, path, skip: tuple[str, ...] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__``) but ``skip``: the registries' discovery, so that a
    family's module registers itself by being there (no hand-kept import list)."""
    names = [info.name for info in pkgutil.iter_modules(path) if info.name not in skip]
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class ProgressBar:
    """The one progress bar of the package (the training loop, ``prepare``, ``segment``, ``evaluate``): one rich
    task with its description, a bar, done/total, an optional rate and ETA and an optional info text; without a
    console (tests, ranks > 0, nothing to do) it does nothing.

    Use::

        with ProgressBar(console, "segment", total=n) as bar:
            for ...:
                bar.advance()
                bar.update(info="loss 0.3")       # with info=True
    """

    def __init__(self, console, description: str, total: int, *, completed: int = 0, rate: str = "",
                 info: bool = False, elapsed: bool = False, transient: bool = False):
        self.bar = None
        if console is None or total <= 0:
            return
        # local: rich.progress (~40 ms) stays out of `import covidxray.cli`, which imports utils
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text  # local: as above

        class RateColumn(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:6.0f} {rate}" if speed else f"    - {rate}", style="progress.data.speed")

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
        columns += [RateColumn()] if rate else []
        columns += [TimeElapsedColumn(), TextColumn("ETA")] if elapsed else []
        columns += [TimeRemainingColumn()]
        columns += [TextColumn("{task.fields[info]}")] if info else []
        self.bar = Progress(*columns, console=console, transient=transient)
        self.task = self.bar.add_task(description, total=total, completed=completed, info="")

    def __enter__(self) -> "ProgressBar":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
        return False

    def advance(self, k: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, k)

    def update(self, **fields) -> None:
        """New ``description`` and/or ``info`` text."""
        if self.bar is not None:
            self.bar.update(self.task, **fields)


def make_console(stderr: bool = False):
    """A rich Console; created on demand so that tests can set TERM/COLUMNS first."""
    from rich.console import Console  # local: rich (~20 ms) stays out of `import covidxray.cli`, which imports utils

    return Console(stderr=stderr)
