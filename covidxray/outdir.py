"""The one output-folder policy of every command that writes a folder (``evaluate``, ``segment``,
``sample``, ``prepare``, ``sample --from-data``).

An output folder is either **new** (or empty), or **one covidxray wrote for the same kind of result**;
anything else is refused before any work starts, naming the folder and the fix. Even in a folder of
its own kind a command replaces only the files it writes: nothing else in it is deleted.

A folder is known as covidxray's by its marker, ``.covidxray-output.json`` (the kind, the command and
the files written), or, for folders written before the marker existed, by holding only names of that
kind's outputs (``legacy``). Results are published file by file: written whole into a temporary folder
inside OUT, then each file renamed into place, ``metrics.json``-like summaries last (``last``), so a
reader sees every file whole, old or new. A killed run leaves only its pid-named temporary folder,
which the next start removes (:func:`covidxray.utils.sweep_stale_temps`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_write_text, is_temp_name, make_temp_dir, sweep_stale_temps

MARKER = ".covidxray-output.json"


def _show(path: Path) -> str:
    """A path for a message: undecodable bytes of a file name shown escaped, never raising."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_marker(folder: Path) -> dict | None:
    """The marker of a covidxray output folder, or None (absent or unreadable)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_dir(out: str | os.PathLike, kind: str, *, legacy: Sequence[str] = (),
                     inputs: Iterable[str | os.PathLike] = (), option: str = "OUT") -> Path:
    """Refuse an output folder that is not new, empty or covidxray's own output of ``kind``.

    Args:
        out: the folder asked for.
        kind: what the command writes there (e.g. ``evaluate-generator``, ``segment``, ``sample``).
        legacy: glob patterns of the top-level names an older covidxray wrote there for this kind
            (a folder holding only such names, without a marker, is taken as this kind's).
        inputs: folders the command reads; OUT may be neither one of them nor inside one (a rerun
            would read its own outputs), nor hold one (its files are the user's).
        option: how the command names this folder in messages (``OUT``, ``--out``...).

    Returns:
        ``out`` as a Path. Nothing is created.
    """
    out = Path(out)
    shown = _show(out)
    fix = f"Choose a new {option} (a folder that does not exist yet)"
    resolved = out.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if Path(src).is_dir() and (_inside(resolved, src_r) or _inside(src_r, resolved)):
            where = "is" if resolved == src_r else ("lies inside" if _inside(resolved, src_r) else "holds")
            raise CovidXrayError(f"{option} {shown} {where} the input folder {_show(Path(src))}",
                                 f"{fix} outside the input")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CovidXrayError(f"{option} {shown} exists and is not a folder", fix)
        try:
            names = sorted(os.listdir(out))
        except OSError as exc:
            raise CovidXrayError(f"cannot read {option} {shown} ({exc.strerror or type(exc).__name__})", fix) from None
        names = [n for n in names if n != MARKER and not is_temp_name(n)]
        marker = read_marker(out)
        if marker is not None:
            if marker.get("kind") != kind:
                raise CovidXrayError(f"{option} {shown} holds a covidxray '{marker.get('kind')}' output, not a "
                                     f"'{kind}' one", fix)
        elif names and not all(any(fnmatch.fnmatch(n, pat) for pat in legacy) for n in names):
            foreign = next(n for n in names if not any(fnmatch.fnmatch(n, pat) for pat in legacy))
            raise CovidXrayError(f"{option} {shown} already exists and holds files covidxray did not write there "
                                 f"(e.g. {os.fsencode(foreign).decode('utf-8', 'backslashreplace')}); nothing was "
                                 f"changed", fix)
    _check_writable(out, option)
    return out


def _check_writable(out: Path, option: str) -> None:
    """Refuse a folder (or, for a new one, the nearest existing parent) this process cannot write."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise CovidXrayError(f"{option} {_show(out)} cannot be created: {_show(probe)} is a file",
                             f"Choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CovidXrayError(f"{option} {_show(out)} is not writable ({_show(probe)}: permission denied)",
                             "Choose a folder you can write, or fix its permissions")


def claim(out: Path, kind: str, command: str, settings: dict | None = None) -> None:
    """Create ``out`` if needed and write its marker: kind, command and the ``settings`` that decide what
    is written (a command that resumes compares them with the marker's before it goes on)."""
    out.mkdir(parents=True, exist_ok=True)
    old = read_marker(out) or {}
    new = {"kind": kind, "command": command, "files": old.get("files", []), "settings": settings}
    if any(old.get(k) != v for k, v in new.items()):
        atomic_write_text(out / MARKER, json.dumps(new, indent=1) + "\n")


def publish(tmp: Path, out: Path, kind: str, command: str, last: Sequence[str] = ("metrics.json",)) -> list[str]:
    """Move every file of the temporary folder ``tmp`` into ``out`` (each rename atomic), ``last`` ones
    last, then remove ``tmp``. Files an earlier run of this kind wrote that this one did not are removed;
    nothing else of ``out`` is touched.

    Returns:
        The files written, relative to ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    files.sort(key=lambda f: f in last)
    old = read_marker(out) or {}
    for rel in files:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            raise CovidXrayError(f"{_show(dest)} is a folder; covidxray would write a file there",
                                 "Move it away or choose another output folder")
        os.replace(tmp / rel, dest)
    for rel in old.get("files", []) if old.get("kind") == kind else []:
        if rel not in files and (out / rel).is_file():
            (out / rel).unlink()
    atomic_write_text(out / MARKER, json.dumps({"kind": kind, "command": command, "files": files}, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return files


class OutputDir:
    """An output folder checked at the start (:func:`check_output_dir`) and written at the end.

    Use::

        od = OutputDir(out, "evaluate-classifier", legacy=("metrics.json", "*.png"))   # checks now
        ...                                   # the long work
        with od.writing() as tmp:             # files written into tmp ...
            (tmp / "metrics.json").write_text(...)
        # ... are now in out, each whole; out's other files untouched
    """

    def __init__(self, out: str | os.PathLike, kind: str, *, legacy: Sequence[str] = (),
                 inputs: Iterable[str | os.PathLike] = (), option: str = "OUT", command: str = ""):
        self.kind, self.legacy, self.option = kind, tuple(legacy), option
        self.command = command or kind.split("-")[0]
        self.path = check_output_dir(out, kind, legacy=legacy, inputs=inputs, option=option)

    @contextlib.contextmanager
    def writing(self, last: Sequence[str] = ("metrics.json",)):
        """Yield a temporary folder inside OUT; publish its files into OUT on success (see the class doc)."""
        sweep_stale_temps(self.path)
        # checked again: another process may have written into OUT during the long work
        check_output_dir(self.path, self.kind, legacy=self.legacy, option=self.option)
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(self.path / "t")  # .t.<pid>.<random>.tmp inside OUT
        try:
            yield tmp
            publish(tmp, self.path, self.kind, self.command, last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created:  # leave no empty folder behind a failed first run
                with contextlib.suppress(OSError):
                    self.path.rmdir()
            raise
