"""The ``prepare`` engine: source layout -> the prepared folder of ``docs/data.md``.

Design (two passes, resumable, bounded memory):

1. **Plan** (main process, cheap): recognise the layout, select classes, pair masks, read patient
   ids from a metadata CSV, ``stat`` every file. Options plus a fingerprint of the file set go to
   ``OUT/.prepare-state.json`` *before* any other write, so a rerun recognises its own unfinished
   work and refuses to mix in a different preparation.
2. **Pass 1** (process pool, one visit per image): read the bytes once -> SHA-256 -> decode ->
   upright -> 8-bit gray -> pixel SHA-256 -> fit/resize -> PNG into ``OUT/.staging/<key>.png``
   (atomic); the paired mask is done in the same visit. Workers return a small record that the
   main process appends to ``OUT/.staging/journal.jsonl`` and flushes per item. Work is submitted
   in a bounded window, so memory does not grow with the number of images.
3. **Split** (main process): drop unreadable files and images found under two classes, group
   images by union-find over (pixel hash, patient id), and deal whole groups to train/val/test per
   class with the seeded RNG so that every class gets as close as possible to the fractions asked.
4. **Pass 2** (main process): rename staged files to ``OUT/{split}/{class}/<name>.png`` (cheap,
   atomic), then write ``rejected.csv``, ``manifest.csv`` and, last, ``prepare.json``.

Resume: a rerun with the same options and files keeps every journal record whose file size and
mtime are unchanged (a torn last line is ignored), so finished images are not decoded again; the
split is recomputed from the journaled hashes and is therefore identical; pass 2 skips placed
files and re-makes any staged file that went missing. Every output is deterministic, so an
interrupted-then-resumed run is byte-identical to an uninterrupted one, whatever ``workers`` is.

Example:
    >>> from covidxray.data.prepare import prepare, prepare_demo
    >>> info = prepare("data/COVID-19_Radiography_Dataset", "data/prepared", size=224)  # doctest: +SKIP
    >>> info["counts"]["train"]["covid"]  # doctest: +SKIP
    2893
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image
from rich.markup import escape

from covidxray import __version__
from covidxray.data import imaging
from covidxray.data.layouts import Layout, canonical_class_name, detect_layout, shown, unreadable_class_error
from covidxray.errors import CovidXrayError
from covidxray.outdir import MARKER, check_output_dir, claim
from covidxray.utils import ProgressBar, atomic_path, atomic_write_text, is_temp_name, make_console, sweep_stale_temps

FORMAT = "covidxray-prepared"
FORMAT_VERSION = 1
STATE_FORMAT = "covidxray-prepare-state"
STATE_FILE = ".prepare-state.json"
STAGING_DIR = ".staging"
JOURNAL_FILE = "journal.jsonl"
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = (
    "split", "class", "file", "mask", "source", "source_sha256", "pixel_sha256",
    "orig_width", "orig_height", "orig_mode", "patient_id", "synthetic",
)
REJECTED_COLUMNS = ("path", "reason")
DEMO_LAYOUT = "demo-phantoms"
MIN_SIZE, MAX_SIZE = 8, 8192
#: What ``prepare`` writes in OUT (and training/evaluation add: ``.cache``): an OUT holding only these
#: names, without the ``.covidxray-output.json`` marker, is a preparation of an older covidxray.
OUT_KIND = "prepare"
OUT_LEGACY = ("train", "val", "test", "manifest.csv", "rejected.csv", "prepare.json", STATE_FILE, STAGING_DIR,
              ".cache")
UNREADABLE_FOLDER = "cannot read folder ({why}): the files in it were not prepared"

# Metadata CSV column names, compared after lower-casing and dropping non-alphanumerics
# ("FILE NAME" -> "filename", "Patient ID" -> "patientid").
_IMAGE_COLUMNS = ("image", "file", "filename", "path", "imagepath", "imagefile", "imagename", "filepath", "img")
_PATIENT_COLUMNS = ("patientid", "patient")


# --------------------------------------------------------------------------------------------
# Pass 1: one task per source image, run in worker processes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """One image to decode (or phantom to render), with its mask.

    Attributes:
        key: staging file stem (a hash of ``rel``: safe characters, unique).
        rel: source path relative to SRC (POSIX), or the phantom's pseudo-path.
        cls: canonical class name.
        path: absolute source path (``None`` for a phantom).
        stat: (size, mtime_ns) of the source, to recognise unchanged files on resume.
        mask_rel: mask path relative to SRC, if any.
        mask_path: absolute mask path, if any.
        mask_stat: (size, mtime_ns) of the mask.
        phantom: (seed, class index, image index) for a demo phantom.
    """

    key: str
    rel: str
    cls: str
    path: str | None = None
    stat: tuple[int, int] | None = None
    mask_rel: str | None = None
    mask_path: str | None = None
    mask_stat: tuple[int, int] | None = None
    phantom: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Job:
    """What every task of one run shares."""

    staging: str
    size: int
    fit: str


def staged_paths(job: Job, key: str) -> tuple[Path, Path]:
    """Staging paths of a task's image and mask."""
    return Path(job.staging, f"{key}.png"), Path(job.staging, f"{key}.mask.png")


def process_task(job: Job, task: Task) -> dict[str, Any]:
    """Decode, convert, hash, fit and stage one image and its mask (the per-item writer).

    Runs in a worker process. Never raises for bad input: an unreadable image or mask comes back
    as a record with ``ok``/``mask_ok`` false and a reason.

    Returns:
        A JSON-able record for the journal.
    """
    rec: dict[str, Any] = {
        "rel": task.rel, "cls": task.cls, "key": task.key, "stat": task.stat,
        "mask_rel": task.mask_rel, "mask_stat": task.mask_stat,
        "ok": False, "reason": "", "mask_ok": None, "mask_reason": "",
    }
    img_path, mask_path = staged_paths(job, task.key)
    mask_img = None
    if task.phantom is not None:
        gray, mask_img = _render_phantom(task, job.size)
        rec.update(sha=imaging.pixel_sha256(gray), mode="L")
    else:
        try:
            data = Path(task.path).read_bytes()
        except OSError as exc:
            rec["reason"] = f"cannot read file ({exc.strerror or exc})"
            return rec
        rec["sha"] = hashlib.sha256(data).hexdigest()
        try:
            img = imaging.decode(data)
        except imaging.UnreadableImage as exc:
            rec["reason"] = str(exc)
            return rec
        del data  # the decoded image is all we need from here on
        rec["mode"] = img.mode
        gray = imaging.to_gray8(img)
    rec.update(ok=True, pix=imaging.pixel_sha256(gray), w=gray.width, h=gray.height)
    with atomic_path(img_path) as tmp:
        imaging.save_png(imaging.fit_image(gray, job.size, job.fit), tmp, atomic=False)

    if mask_img is None and task.mask_path is not None:
        mask_img, rec["mask_reason"] = _read_mask(task.mask_path, gray.size)
    if mask_img is not None:
        mask = imaging.fit_mask(mask_img, gray.size, job.size, job.fit)
        with atomic_path(mask_path) as tmp:
            imaging.save_png(mask, tmp, atomic=False)
        rec["mask_ok"] = True
    elif task.mask_path is not None:
        rec["mask_ok"] = False
    return rec


def _read_mask(path: str, image_size: tuple[int, int]):
    """Read and binarise a mask; returns (mask or None, reason it was refused)."""
    try:
        mask = imaging.decode(Path(path).read_bytes())
    except OSError as exc:
        return None, f"unreadable mask ({exc.strerror or exc})"
    except imaging.UnreadableImage as exc:
        return None, f"unreadable mask: {exc}"
    if imaging.aspect_mismatch(image_size, mask.size):
        return None, (
            f"mask {mask.width}x{mask.height} does not fit its image {image_size[0]}x{image_size[1]} "
            f"(aspect ratio differs by more than {imaging.MASK_ASPECT_TOLERANCE:.0%})"
        )
    mask = imaging.binarize_mask(mask)
    if mask.getextrema()[1] == 0:
        # A radiograph always shows lungs: an all-zero mask is a failed annotation, and it
        # would make Dice undefined. The image is kept without it.
        return None, "empty mask (all zero)"
    return mask, ""


def _render_phantom(task: Task, size: int):
    """A demo phantom: an rng per image from (seed, class, index), so workers do not matter."""
    import numpy as np  # local: NumPy (~0.1 s) only for the demo phantoms; prepare of real data stays NumPy-free

    from covidxray.data.phantoms import PHANTOM_CLASSES, render_phantom  # local: it imports NumPy (see above)

    seed, ci, i = task.phantom
    image, mask = render_phantom(PHANTOM_CLASSES[ci], size, np.random.default_rng([seed, ci, i]))
    gray = imaging.fit_image(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L"), size, "stretch")
    mask_img = imaging.binarize_mask(Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L"))
    return gray, mask_img


def _run_chunk(job: Job, tasks: Sequence[Task]) -> list[dict[str, Any]]:
    return [process_task(job, t) for t in tasks]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _worker_init(parent: int) -> None:
    # Ctrl-C goes to the whole process group: let only the main process handle it (it stops
    # submitting and waits for the few in-flight items), instead of every worker printing a
    # traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """End this worker when its parent ``parent`` dies (even by SIGKILL, which runs no cleanup).

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``). Elsewhere,
    or where prctl is refused, a daemon thread polls ``os.getppid()``. Either way a parent that died
    before this ran is noticed at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl
            armed = False
    if os.getppid() != parent:  # the parent is already gone (reparented)
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="covidxray-parent-watch", daemon=True).start()


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    """The fallback of :func:`_die_with_parent`: exit as soon as the parent is gone."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


class _Runner:
    """Runs pass-1 tasks in-process (workers=1) or in a process pool, in a bounded window."""

    def __init__(self, job: Job, workers: int):
        self.job = job
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "_Runner":
        if self.workers > 1:
            # fork starts workers in milliseconds and they inherit the imported modules; the pool
            # is started here, before the progress bar's refresh thread exists.
            method = "fork" if sys.platform.startswith("linux") else None
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=mp.get_context(method), initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            self.pool.submit(os.getpid).result()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def map(self, tasks: Sequence[Task]) -> Iterator[list[dict[str, Any]]]:
        """Yield lists of records as tasks finish (order not kept; at most a window in flight)."""
        if self.pool is None:
            for task in tasks:
                # Looked up at call time so that tests can monkeypatch the per-item writer.
                yield [process_task(self.job, task)]
            return
        chunk = max(1, min(16, len(tasks) // (self.workers * 8) or 1))
        window = 4 * self.workers
        pending: set = set()
        for start in range(0, len(tasks), chunk):
            pending.add(self.pool.submit(_run_chunk, self.job, tasks[start:start + chunk]))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()


# --------------------------------------------------------------------------------------------
# Plan: what to do (shared by real data and the demo)
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything pass 1 and the writer need, computed before any image is decoded."""

    layout: str
    layout_description: str
    source: str
    classes: list[str]
    tasks: list[Task]
    options: dict[str, Any]
    fingerprint: str
    synthetic: bool = False
    masks: bool = True
    patients: dict[str, str] = field(default_factory=dict)            # source rel -> patient id
    pre_rejected: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) known before decoding
    ignored_files: int = 0
    images_found: int = 0
    metadata_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreadable_folders: int = 0                                        # folders of SRC that could not be listed


def _key(rel: str) -> str:
    # surrogateescape: a name that is not valid UTF-8 hashes as its bytes on disk (valid names: as UTF-8)
    return hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def _fingerprint(parts: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True).encode("utf-8")).hexdigest()


def _validate(size: int, fit: str, val: float, test: float, workers: int | None) -> int:
    """Check the common options; returns the resolved worker count."""
    if not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise CovidXrayError(f"--size {size} is out of range", f"Use {MIN_SIZE}..{MAX_SIZE} pixels")
    if fit not in imaging.FIT_MODES:
        raise CovidXrayError(f"unknown --fit {fit!r}", f"Use one of: {', '.join(imaging.FIT_MODES)}")
    for name, value in (("--val", val), ("--test", test)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise CovidXrayError(f"{name} {value} must be a fraction >= 0", f"e.g. {name} 0.1")
    if val + test >= 1:
        raise CovidXrayError(
            f"--val {val} + --test {test} leaves nothing for training", "Make --val + --test less than 1"
        )
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise CovidXrayError(f"--workers {workers} must be at least 1", "Leave it out to use all cores")
    return workers


def _select_classes(layout: Layout, classes: str | Sequence[str] | None) -> list[str]:
    found = list(layout.classes)
    if classes is None or (isinstance(classes, str) and not classes.strip()):
        selected = found
    else:
        names = classes.split(",") if isinstance(classes, str) else list(classes)
        selected = []
        for raw in (n.strip() for n in names):
            if not raw:
                continue
            name = canonical_class_name(raw)
            if name not in layout.classes:
                raise CovidXrayError(
                    f"unknown class {raw!r} in --classes", f"Classes found in the source: {', '.join(found)}"
                )
            if name not in selected:
                selected.append(name)
    for name in selected:
        if not layout.classes[name].listed:
            others = [n for n in sorted(layout.classes) if layout.classes[n].listed and layout.classes[n].images]
            raise unreadable_class_error(layout.classes[name], layout.src, others)
    for name in selected:
        if not layout.classes[name].images:
            raise CovidXrayError(
                f"class folder '{shown(layout.classes[name].folder)}' holds no images",
                "Add images to it, remove it, or leave it out with --classes",
            )
    return sorted(selected)


def _norm_col(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _read_patients(layout: Layout, images: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """Patient ids from ``*.csv`` metadata beside the class folders.

    A CSV is used when it has an image column (``image``, ``file``, ``filename``, ``FILE NAME``,
    ``path``...) and a patient column (``patient_id``, ``patientid``, ``Patient ID``). Its image
    values are matched on the path relative to the CSV's folder, else the file name, else the stem
    (all case-insensitive); a name or stem given two different patients is not used.

    Returns:
        (image rel -> patient id, notes, CSV files used).
    """
    by_rel: dict[str, str] = {}
    by_name: dict[str, str | None] = {}
    by_stem: dict[str, str | None] = {}
    notes: list[str] = []
    used: list[str] = []
    for meta in layout.metadata:
        suffix = PurePosixPath(meta).suffix.lower()
        if suffix in (".xlsx", ".xls"):
            notes.append(f"metadata spreadsheet {shown(meta)} not read (export it as CSV to use its patient ids)")
            continue
        try:
            with open(layout.src / meta, newline="", encoding="utf-8-sig", errors="replace") as fh:
                reader = csv.DictReader(fh)
                columns = {_norm_col(c): c for c in (reader.fieldnames or [])}
                image_col = next((columns[c] for c in _IMAGE_COLUMNS if c in columns), None)
                patient_col = next((columns[c] for c in _PATIENT_COLUMNS if c in columns), None)
                if image_col is None or patient_col is None:
                    notes.append(f"metadata {shown(meta)} has no image and patient column; not used")
                    continue
                base = PurePosixPath(meta).parent
                for row in reader:
                    value = (row.get(image_col) or "").strip().replace("\\", "/")
                    patient = (row.get(patient_col) or "").strip()
                    if not value or not patient:
                        continue
                    rel = (base / value.removeprefix("./")).as_posix().lower()
                    by_rel.setdefault(rel, patient)
                    name = PurePosixPath(value).name.lower()
                    stem = PurePosixPath(value).stem.lower()
                    for table, k in ((by_name, name), (by_stem, stem)):
                        if table.get(k, patient) != patient:
                            table[k] = None  # ambiguous: two patients share this name
                        else:
                            table[k] = patient
        except (OSError, csv.Error) as exc:
            notes.append(f"metadata {shown(meta)} could not be read ({shown(str(exc))}); not used")
            continue
        used.append(meta)
    patients: dict[str, str] = {}
    if used:
        for rel in images:
            p = PurePosixPath(rel)
            pid = by_rel.get(rel.lower()) or by_name.get(p.name.lower()) or by_stem.get(p.stem.lower())
            if pid:
                patients[rel] = pid
    return patients, notes, used


def _plan_real(src: str | os.PathLike, out: Path, *, size: int, fit: str, val: float, test: float, seed: int,
               classes: str | Sequence[str] | None, masks: bool) -> Plan:
    """List the work for a real source folder (no image is decoded here)."""
    src_path = Path(src).expanduser()
    layout = detect_layout(src_path, exclude=out)
    selected = _select_classes(layout, classes)
    src_root = layout.src

    tasks: list[Task] = []
    pre_rejected: list[tuple[str, str]] = []
    fp_files: list[Any] = []
    notes: list[str] = []
    unreadable = 0
    for name in selected:
        folder = layout.classes[name]
        if shown(folder.folder) != folder.folder:
            notes.append(f"class folder '{shown(folder.folder)}' has a name that is not valid UTF-8; "
                         f"its class is called {name}")
        for rel, why in folder.unreadable:  # never passed over in silence: its images are unknown
            pre_rejected.append((rel + "/", UNREADABLE_FOLDER.format(why=why)))
            unreadable += 1
        for rel in folder.images:
            st = _stat(src_root / rel)
            if st is None:
                pre_rejected.append((rel, "cannot read file (broken link or no permission)"))
                continue
            mask_rel = folder.masks.get(rel) if masks else None
            mask_stat = _stat(src_root / mask_rel) if mask_rel else None
            if mask_rel and mask_stat is None:
                pre_rejected.append((mask_rel, "unreadable mask (broken link or no permission)"))
                mask_rel = None
            tasks.append(Task(
                key=_key(rel), rel=rel, cls=name, path=str(src_root / rel), stat=st,
                mask_rel=mask_rel, mask_path=str(src_root / mask_rel) if mask_rel else None,
                mask_stat=mask_stat,
            ))
            fp_files.append((rel, st[0], mask_rel, mask_stat[0] if mask_stat else None))
        if masks:
            pre_rejected.extend((m, "mask without image") for m in folder.orphan_masks)
            pre_rejected.extend((m, "second mask for one image (only the first is used)") for m in folder.extra_masks)
    if not masks and any(layout.classes[n].masks for n in selected):
        notes.append("masks not prepared (--no-masks)")

    if unreadable:
        notes.append(f"{unreadable} folder(s) of SRC could not be read; their files were not prepared "
                     "(each is listed in rejected.csv; fix the permissions and prepare into a new OUT)")
    undecodable = sum(1 for t in tasks if shown(t.rel) != t.rel)
    if undecodable:
        notes.append(f"{undecodable} image path(s) are not valid UTF-8; manifest.csv shows their bytes as \\xNN "
                     "and the prepared files get plain names")

    patients, meta_notes, used = _read_patients(layout, [t.rel for t in tasks])
    notes.extend(meta_notes)
    meta_hashes = [(m, hashlib.sha256((src_root / m).read_bytes()).hexdigest()) for m in used]
    options = {"mode": "real", "size": size, "fit": fit, "val": val, "test": test, "seed": seed,
               "classes": selected, "masks": masks}
    return Plan(
        layout=layout.name,
        layout_description=layout.description,
        source=str(src_root),
        classes=selected,
        tasks=sorted(tasks, key=lambda t: t.rel),
        options=options,
        fingerprint=_fingerprint([fp_files, meta_hashes, sorted(pre_rejected)]),
        masks=masks,
        patients=patients,
        pre_rejected=pre_rejected,
        ignored_files=len(layout.ignored) + sum(1 for m in layout.metadata if m not in used),
        images_found=sum(len(layout.classes[n].images) for n in selected),
        metadata_files=used,
        notes=notes,
        unreadable_folders=unreadable,
    )


def _plan_demo(*, per_class: int, size: int, seed: int, val: float, test: float) -> Plan:
    """List the work for the demo phantoms."""
    from covidxray.data import phantoms  # local: it imports NumPy, which only the demo needs

    tasks = []
    for ci, cls in enumerate(phantoms.PHANTOM_CLASSES):
        for i in range(per_class):
            rel = f"phantoms/{cls}/{cls}_{i:04d}.png"
            tasks.append(Task(key=_key(rel), rel=rel, cls=cls, phantom=(seed, ci, i)))
    # The generator's code is part of the fingerprint: a resumed demo must not mix two versions.
    try:
        generator = hashlib.sha256(Path(phantoms.__file__).read_bytes()).hexdigest()
    except OSError:
        generator = phantoms.__name__
    options = {"mode": "demo", "per_class": per_class, "size": size, "fit": "stretch", "val": val,
               "test": test, "seed": seed, "classes": sorted(phantoms.PHANTOM_CLASSES), "masks": True}
    return Plan(
        layout=DEMO_LAYOUT,
        layout_description="synthetic phantoms (covidxray.data.phantoms; not medical data)",
        source="synthetic:covidxray.data.phantoms",
        classes=sorted(phantoms.PHANTOM_CLASSES),
        tasks=sorted(tasks, key=lambda t: t.rel),
        options=options,
        fingerprint=_fingerprint([generator, per_class]),
        synthetic=True,
    )


# --------------------------------------------------------------------------------------------
# OUT: state, journal
# --------------------------------------------------------------------------------------------


def _state(plan: Plan) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, "options": plan.options,
            "fingerprint": plan.fingerprint}


def _check_out(out: Path, state: dict[str, Any]) -> str:
    """Classify OUT: ``fresh``, ``resume`` (our own unfinished work) or ``complete``.

    Raises:
        CovidXrayError: OUT is a file, holds something else, or a different preparation.
    """
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise CovidXrayError(f"OUT {shown(out)} exists and is not a folder", "Choose another OUT")
    # The marker alone (a run killed right after claiming OUT) or a dead run's temporaries: still new.
    if not any(n != MARKER and not is_temp_name(n) for n in os.listdir(out)):
        return "fresh"
    state_path = out / STATE_FILE
    if not state_path.is_file():
        if (out / "prepare.json").exists():
            raise CovidXrayError(
                f"OUT {shown(out)} already holds a preparation without its {STATE_FILE}",
                "Choose another OUT or delete it",
            )
        raise CovidXrayError(
            f"OUT {shown(out)} is not empty and holds no covidxray preparation", "Choose an empty or new folder for OUT"
        )
    try:
        old = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise CovidXrayError(f"{shown(state_path)} is unreadable",
                             "Choose a new OUT (or delete this one) and run again")
    if old != state:
        old_opts, new_opts = old.get("options", {}), state["options"]
        diff = sorted(k for k in set(old_opts) | set(new_opts) if old_opts.get(k) != new_opts.get(k))
        what = f"with different options ({', '.join(diff)})" if diff else "of a different source (its files differ)"
        raise CovidXrayError(
            f"OUT {shown(out)} already holds a preparation {what}",
            "Choose another OUT or delete it",
        )
    info_path = out / "prepare.json"
    if info_path.is_file():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(info_path.read_text(encoding="utf-8")).get("complete"):
                return "complete"
    return "resume"


def _load_journal(path: Path) -> dict[str, dict[str, Any]]:
    """Records by source path; a torn or garbled line (kill -9 mid-write) is skipped."""
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("rel"), str):
                records[rec["rel"]] = rec
    return records


def _same_stat(rec: dict[str, Any], task: Task) -> bool:
    as_tuple = lambda v: tuple(v) if v is not None else None  # noqa: E731 (JSON turns tuples into lists)
    return (as_tuple(rec.get("stat")) == task.stat and rec.get("mask_rel") == task.mask_rel
            and as_tuple(rec.get("mask_stat")) == task.mask_stat)


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # smallest index as root: order-independent


def assign_splits(
    items: Sequence[tuple[str, str, Sequence[str]]], val: float, test: float, seed: int
) -> dict[str, str]:
    """Deal groups of items to train/val/test, stratified by class.

    Items sharing any group key (pixel hash, patient id) end in the same split (union-find).
    Groups are visited in a seeded random order (largest first, since they are the hardest to
    place) and each goes to the split whose classes are furthest below their target
    ``fraction x class size``: every class ends as close as whole groups allow to the fractions.

    Args:
        items: (item id, class, group keys) per item; ids must be unique.
        val: fraction for validation.
        test: fraction for test.
        seed: RNG seed.

    Returns:
        item id -> split name.
    """
    items = sorted(items, key=lambda t: t[0])
    uf = _UnionFind(len(items))
    first_with_key: dict[str, int] = {}
    for i, (_, _, keys) in enumerate(items):
        for k in keys:
            j = first_with_key.setdefault(k, i)
            if j != i:
                uf.union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(items)):
        groups[uf.find(i)].append(i)
    order = sorted(groups)  # roots are smallest member indices: a stable, sorted-path order
    random.Random(seed).shuffle(order)
    order.sort(key=lambda r: -len(groups[r]))  # stable: the seeded order remains among equal sizes

    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    class_sizes = Counter(cls for _, cls, _ in items)
    filled: dict[str, Counter] = {s: Counter() for s in SPLITS}
    result: dict[str, str] = {}
    for root in order:
        members = groups[root]
        comp = Counter(items[i][1] for i in members)

        def need(split: str) -> float:
            # < 0: the group's classes are below target in this split (weighted by how many of
            # the group's images are of each class, relative to the class size).
            return sum(n * (filled[split][c] - fractions[split] * class_sizes[c]) / class_sizes[c]
                       for c, n in comp.items())

        split = min(SPLITS, key=lambda s: (need(s), SPLITS.index(s)))
        filled[split].update(comp)
        for i in members:
            result[items[i][0]] = split
    return result


# --------------------------------------------------------------------------------------------
# Output names, CSVs
# --------------------------------------------------------------------------------------------


def sanitize_stem(stem: str) -> str:
    """A file-name stem reduced to ``[A-Za-z0-9._-]`` (spaces and others -> ``_``, runs collapsed).

    Example:
        >>> sanitize_stem("COVID-19 (12)")
        'COVID-19_12'
    """
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_.")
    return re.sub(r"_+", "_", name) or "image"


def output_names(rels: Iterable[str]) -> dict[str, str]:
    """Output stems for the sources of one class: sanitised stems, with a short hash of the
    source path appended to every stem that two sources share."""
    rels = sorted(rels)
    # shown(): a name that is not valid UTF-8 keeps its bytes readable (caf\\xe9 -> caf_xe9), never a surrogate
    stems = {rel: sanitize_stem(PurePosixPath(shown(rel)).stem) for rel in rels}
    count = Counter(s.lower() for s in stems.values())  # lower: case-insensitive file systems
    names = {rel: (s if count[s.lower()] == 1 else f"{s}-{_key(rel)[:8]}") for rel, s in stems.items()}
    if len({n.lower() for n in names.values()}) != len(names):  # a hash suffix met a real name
        names = {rel: f"{s}-{_key(rel)}" for rel, s in stems.items()}
    return names


def _csv_text(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text; names that are not valid UTF-8 are written with their bytes as ``\\xNN`` (:func:`shown`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([shown(v) if isinstance(v, str) else v for v in row] for row in rows)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The shared driver
# --------------------------------------------------------------------------------------------


def _say(console, text: str) -> None:
    """Print a line (rich markup allowed: escape file names and other dynamic text)."""
    if console is not None:
        console.print(text, highlight=False, soft_wrap=True)


def _execute(plan: Plan, out: Path, workers: int, progress: bool, console) -> dict[str, Any]:
    if progress and console is None:
        console = make_console()
    if not progress:
        console = None
    state = _state(plan)
    status = _check_out(out, state)
    staging = out / STAGING_DIR
    n_classes = len(plan.classes)
    _say(console, f"layout: [bold]{plan.layout}[/] - {escape(plan.layout_description)} "
                  f"({len(plan.tasks)} images in {n_classes} class{'es' if n_classes != 1 else ''})")
    if status == "complete":
        _say(console, f"{escape(shown(out))} already holds this preparation: nothing to do")
        shutil.rmtree(staging, ignore_errors=True)  # left over if killed right after prepare.json
        return json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    for note in plan.notes:
        _say(console, f"note: {escape(shown(note))}")

    claim(out, OUT_KIND, "prepare")  # creates OUT; its marker says covidxray writes here
    if status == "fresh":
        atomic_write_text(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
    staging.mkdir(exist_ok=True)
    job = Job(staging=str(staging), size=plan.options["size"], fit=plan.options["fit"])
    journal_path = staging / JOURNAL_FILE

    # Resume: keep records of unchanged files; rewrite the journal without a torn tail so that
    # new lines are appended after a clean newline.
    old = _load_journal(journal_path)
    records: dict[str, dict[str, Any]] = {}
    todo: list[Task] = []
    for task in plan.tasks:
        rec = old.get(task.rel)
        if rec is not None and _same_stat(rec, task):
            records[task.rel] = rec
        else:
            todo.append(task)
    if status == "resume":
        _say(console, f"resuming: {len(records)} of {len(plan.tasks)} images already done")
    atomic_write_text(journal_path, "".join(json.dumps(records[r]) + "\n" for r in sorted(records)))

    bar = ProgressBar((console or make_console()) if progress else None, "images", len(plan.tasks),
                      completed=len(records), rate="img/s", elapsed=True)
    with _Runner(job, min(workers, max(1, len(todo)))) as runner, open(journal_path, "a", encoding="utf-8") as journal:
        with bar:
            for batch in runner.map(todo):
                for rec in batch:
                    prev = old.get(rec["rel"])
                    if prev is not None and prev.get("sha") and rec.get("sha") and prev["sha"] != rec["sha"]:
                        raise CovidXrayError(
                            f"source file {shown(rec['rel'])} changed since the interrupted run",
                            "Prepare into a new OUT (or delete this one) and run again",
                        )
                    journal.write(json.dumps(rec) + "\n")
                    journal.flush()  # one finished item = one durable line (survives kill -9)
                    records[rec["rel"]] = rec
                bar.advance(len(batch))

    info = _finish(plan, out, job, records, console)
    shutil.rmtree(staging, ignore_errors=True)
    return info


def _place(staged: Path, dst: Path, remake) -> None:
    """Move a staged file to its final place; already placed -> nothing; lost -> remake it."""
    if dst.exists():
        staged.unlink(missing_ok=True)
        return
    if not staged.exists():
        remake()
    os.replace(staged, dst)


def _finish(plan: Plan, out: Path, job: Job, records: dict[str, dict[str, Any]], console) -> dict[str, Any]:
    """Split, place the staged files, write the CSVs and, last, prepare.json."""
    tasks = {t.rel: t for t in plan.tasks}
    rejected: list[tuple[str, str]] = list(plan.pre_rejected)
    kept: list[dict[str, Any]] = []
    for rel in sorted(records):
        rec = records[rel]
        if not rec["ok"]:
            rejected.append((rel, rec["reason"]))
            continue
        if rec.get("mask_ok") is False:
            rejected.append((rec["mask_rel"], rec["mask_reason"]))
        kept.append(rec)

    # The same picture under two labels cannot be trusted under either: reject every copy.
    classes_of: dict[str, set[str]] = defaultdict(set)
    for rec in kept:
        classes_of[rec["pix"]].add(rec["cls"])
    conflicts = {pix: sorted(c) for pix, c in classes_of.items() if len(c) > 1}
    if conflicts:
        still = []
        for rec in kept:
            if rec["pix"] in conflicts:
                rejected.append((rec["rel"], f"same image in classes {' and '.join(conflicts[rec['pix']])}"))
            else:
                still.append(rec)
        kept = still
        _say(console, f"[yellow]warning:[/] {len(conflicts)} image(s) found under two classes; "
                      "all copies rejected (see rejected.csv)")
    dup_groups = sum(1 for n in Counter(r["pix"] for r in kept).values() if n > 1)

    patients = plan.patients
    splits = assign_splits(
        [(r["rel"], r["cls"], [f"pix:{r['pix']}"] + ([f"patient:{patients[r['rel']]}"] if r["rel"] in patients else []))
         for r in kept],
        plan.options["val"], plan.options["test"], plan.options["seed"],
    )
    names: dict[str, str] = {}
    for cls in plan.classes:
        names.update(output_names(r["rel"] for r in kept if r["cls"] == cls))

    for split in SPLITS:
        for cls in plan.classes:
            (out / split / cls).mkdir(parents=True, exist_ok=True)
    counts = {s: {c: 0 for c in plan.classes} for s in SPLITS}
    mask_counts = {s: {c: 0 for c in plan.classes} for s in SPLITS}
    rows = []
    for rec in kept:
        rel, cls, split = rec["rel"], rec["cls"], splits[rec["rel"]]
        file_rel = f"{split}/{cls}/{names[rel]}.png"
        staged_img, staged_mask = staged_paths(job, rec["key"])
        remake = lambda rel=rel: _remake(job, tasks[rel], records[rel])  # noqa: E731
        _place(staged_img, out / file_rel, remake)
        mask_rel = ""
        if rec.get("mask_ok"):
            mask_rel = f"{split}/{cls}/masks/{names[rel]}.png"
            (out / mask_rel).parent.mkdir(exist_ok=True)
            _place(staged_mask, out / mask_rel, remake)
            mask_counts[split][cls] += 1
        counts[split][cls] += 1
        rows.append((split, cls, file_rel, mask_rel, rel, rec["sha"], rec["pix"], rec["w"], rec["h"],
                     rec["mode"], patients.get(rel, ""), int(plan.synthetic)))
    rows.sort(key=lambda r: (SPLITS.index(r[0]), r[1], r[2]))
    rejected.sort()

    atomic_write_text(out / "rejected.csv", _csv_text(REJECTED_COLUMNS, rejected))
    atomic_write_text(out / "manifest.csv", _csv_text(MANIFEST_COLUMNS, rows))
    with_mask = sum(sum(c.values()) for c in mask_counts.values())
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "covidxray_version": __version__,
        "complete": True,
        "layout": plan.layout,
        "source": shown(plan.source),
        "size": plan.options["size"],
        "fit": plan.options["fit"],
        "val": plan.options["val"],
        "test": plan.options["test"],
        "seed": plan.options["seed"],
        "masks": plan.masks,
        "classes": plan.classes,
        "synthetic": plan.synthetic,
        "counts": counts,
        "masks_counts": mask_counts,
        "rejected": len(rejected),
        "duplicates": dup_groups,
        "cross_class_duplicates": len(conflicts),
        # Beyond the contract's keys: what the summary table shows.
        "layout_description": plan.layout_description,
        "images_found": plan.images_found or len(plan.tasks),  # the demo has no listing
        "images_kept": len(rows),
        "images_without_mask": len(rows) - with_mask,
        "ignored_files": plan.ignored_files,
        "unreadable_folders": plan.unreadable_folders,
        "patients": len({patients[r[4]] for r in rows if r[4] in patients}),
        "metadata_files": [shown(m) for m in plan.metadata_files],
        "notes": [shown(n) for n in plan.notes],
    }
    if plan.synthetic:
        info["per_class"] = plan.options["per_class"]
    atomic_write_text(out / "prepare.json", json.dumps(info, indent=2) + "\n")
    return info


def _remake(job: Job, task: Task, rec: dict[str, Any]) -> None:
    """Re-stage a finished item whose staged file vanished (e.g. deleted by hand)."""
    again = process_task(job, task)
    if again.get("pix") != rec.get("pix"):
        raise CovidXrayError(f"source file {shown(task.rel)} changed during the preparation",
                             "Prepare into a new OUT (or delete this one) and run again")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 224,                      # output side in pixels (square)
    fit: str = "stretch",                 # stretch | pad (letterbox, black) | crop (centre square)
    val: float = 0.1,                     # validation fraction per class
    test: float = 0.1,                    # test fraction per class
    seed: int = 0,                        # split seed
    workers: int | None = None,           # processes for decoding (None: all cores; 1: in-process)
    classes: str | Sequence[str] | None = None,  # subset of classes ("covid,normal"); None: all
    masks: bool = True,                   # prepare lung masks where the source has them
    progress: bool = True,                # print layout, notes and a progress bar
    console=None,                         # rich Console to print to (default: stdout)
) -> dict[str, Any]:
    """Prepare a source folder of chest X-rays into the folder layout of ``docs/data.md``.

    Rerunning the same call resumes an interrupted run; on a complete OUT it does nothing.

    Returns:
        The content of ``OUT/prepare.json``.

    Raises:
        CovidXrayError: missing/empty/unrecognised SRC, a class folder without images, an unknown
            class in ``classes``, bad options, or an OUT holding something else.
    """
    workers = _validate(size, fit, val, test, workers)
    val, test = float(val), float(test)  # 0 and 0.0 must record (and compare) the same
    out = _check_output(out, inputs=[Path(src).expanduser()])
    plan = _plan_real(src, out, size=size, fit=fit, val=val, test=test, seed=seed, classes=classes, masks=masks)
    return _execute(plan, out, workers, progress, console)


def prepare_demo(
    out: str | os.PathLike,
    *,
    per_class: int = 120,                 # phantoms per class (3 classes)
    size: int = 128,                      # output side in pixels
    seed: int = 0,                        # phantom and split seed
    val: float = 0.1,                     # validation fraction per class
    test: float = 0.1,                    # test fraction per class
    workers: int = 1,                     # processes (output does not depend on it)
    progress: bool = True,                # print a progress bar
    console=None,                         # rich Console to print to (default: stdout)
) -> dict[str, Any]:
    """Write deterministic synthetic phantoms (with masks) in the prepared layout.

    Same writer, split and summary as :func:`prepare`; the manifest says ``synthetic=1`` and
    ``prepare.json`` has ``"synthetic": true`` and ``"layout": "demo-phantoms"``.

    Returns:
        The content of ``OUT/prepare.json``.
    """
    workers = _validate(size, "stretch", val, test, workers)
    if not isinstance(per_class, int) or per_class < 1:
        raise CovidXrayError(f"--per-class {per_class} must be at least 1", "e.g. --per-class 120")
    if not isinstance(seed, int) or seed < 0:
        raise CovidXrayError(f"--seed {seed} must be a whole number >= 0", "e.g. --seed 0")
    out = _check_output(out, inputs=[])
    plan = _plan_demo(per_class=per_class, size=size, seed=seed, val=float(val), test=float(test))
    return _execute(plan, out, workers, progress, console)


def _check_output(out: str | os.PathLike, inputs: Sequence[Path]) -> Path:
    """The output-folder policy, before any work: OUT is new, empty or a preparation (this one's to
    resume, or one to refuse later with its own message), not SRC, inside it nor holding it. Then the
    temporaries a killed earlier run left in OUT are removed."""
    out = check_output_dir(Path(out).expanduser(), OUT_KIND, legacy=OUT_LEGACY, inputs=inputs, option="OUT")
    sweep_stale_temps(out, recursive=True)
    return out
