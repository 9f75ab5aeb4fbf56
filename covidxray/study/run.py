"""Running a study: every arm trained by the one loop and scored by the one generator evaluation.

For each arm of the plan (:func:`covidxray.study.spec.plan_study`), in ``OUT/arms/<arm>/``:

1. **Train** through :func:`covidxray.train.loop.start_run` (a run folder ``00000-<model>/``) for the epochs of
   its budget. The weights at each point of the budget are kept as ``checkpoints/point-<pct>.pt``, saved after
   that point's step (the run trains once, to the end, so that a learning-rate schedule over its epochs is the
   full budget's); the full budget is ``checkpoints/last.pt``. A ``max_minutes`` cap stops the training at the
   first step past it (recorded as ``capped``; the points it did not reach are not scored).
2. **Score** each point through :func:`covidxray.evaluate.generator.run_generator_evaluation` into
   ``eval-<pct>/`` with the study's protocol (the downstream arms at the full budget only) and the arm's sampler
   options (``eval.sampling``, the arm's own on top; only for a model that takes them).
3. **Report** (:mod:`covidxray.study.report`): ``study.md`` and its figures (:mod:`covidxray.study.figures`),
   after every arm; the sample grid of an arm is drawn once its training is done.

Every run records the environment it ran in (:func:`environment`: device, versions, git commit, a fingerprint
of the data, the spec verbatim) in the manifest, and each arm the software it was trained with.

The manifest ``OUT/study.json`` (written atomically after every change) records each stage: its key, status,
and what it measured (kimg, training seconds, device; the scores), and the ``--scale`` of the budgets (a folder
holds one scale: :func:`check_folder_scale`). Each change re-reads it and writes it under an exclusive lock on
``OUT/.study.lock`` (:func:`update_manifest`), so that several ``--arm`` processes can run one study at once
(POSIX ``flock``; elsewhere unlocked). A rerun skips the stages whose key is recorded as done, resumes an
interrupted training from its ``last.pt`` (bit-exact, by the loop's resume), and an arm whose training key changed
has its old folder moved to ``OUT/replaced/`` and reruns alone. Ctrl-C in training stops after the current step
with a checkpoint (the loop's own handling); anywhere else it leaves the stage undone; either way the study stops
with exit 130 and the same command continues.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

try:  # POSIX: the manifest's lock; elsewhere the read-modify-write goes unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import covidxray
from covidxray.checkpoint import load_checkpoint
from covidxray.errors import CovidXrayError
from covidxray.evaluate.generator import GeneratorEvaluation, run_generator_evaluation
from covidxray.outdir import check_output_dir, claim, read_marker
from covidxray.study.figures import draw_grid, grid_key
from covidxray.study.report import write_report
from covidxray.evaluate.pairs import segmentation_pairs, unet_test_dice
from covidxray.study.spec import ArmPlan, EvalProtocol, Point, StudySpec, segmentation_key, segmentation_real_key
from covidxray.train.graphs import WARMUP as GRAPH_WARMUP
from covidxray.train.loop import resume_run, start_run
from covidxray.utils import atomic_write_text, resolve_device

KIND = "study"
MANIFEST = "study.json"
LOCK = ".study.lock"
FORMAT = "covidxray-study"


# -------------------------------------------------------------------------------------------- manifest
def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the study in ``out`` (an empty one when there is none yet)."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "version": 1, "arms": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CovidXrayError(f"{path} is unreadable ({exc})",
                             "Move it away to start the study's bookkeeping afresh (the arms then train again)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("arms"), dict):
        raise CovidXrayError(f"{path} is not a covidxray study manifest", "Choose another --out")
    return manifest


@contextlib.contextmanager
def manifest_lock(out: Path):
    """Hold an exclusive lock on ``OUT/.study.lock`` (blocking): one read-modify-write of the manifest at a time,
    across processes (``--arm`` processes of one study) and threads. Without ``fcntl`` (Windows), or on a file
    system that refuses ``flock`` (Lustre mounted without ``-o flock``), it locks nothing (with a warning there):
    one process at a time is then safe, as before the lock."""
    if fcntl is None:
        yield
        return
    with open(Path(out) / LOCK, "a") as fh:  # each open is its own lock owner (flock), so threads exclude too
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            warnings.warn(f"{Path(out) / LOCK}: this file system refuses locks ({exc.strerror or exc}); study.json is "
                          f"updated unlocked: run one --arm process at a time on this folder", stacklevel=3)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_manifest(out: Path, arm: str | None = None, entry: dict[str, Any] | None = None,
                    edit: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> dict[str, Any]:
    """Re-read the manifest, replace one arm's entry and top-level ``fields``, apply ``edit`` (a change that
    depends on what is there, e.g. one grid added to ``grids``) and write it atomically, all under
    :func:`manifest_lock`: another ``--arm`` process's changes are kept, never overwritten by a stale copy."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        if arm is not None:
            manifest["arms"][arm] = entry
        manifest.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if edit is not None:
            edit(manifest)
        atomic_write_text(Path(out) / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def recorded_scale(out: Path) -> float | None:
    """The ``--scale`` the arms of the study in ``out`` ran at (the latest run's when they differ; arms of a
    covidxray before ``--scale`` ran at 1); None when no arm has run there."""
    if not (Path(out) / MANIFEST).is_file():
        return None
    manifest = read_manifest(out)
    if not manifest["arms"]:
        return None
    return float(manifest.get("scale", 1.0))


def check_folder_scale(out: Path, scale: float) -> None:
    """Refuse to run (or plan) a study at ``scale`` in a folder whose arms ran at another scale: a scaled study is
    another study, and rerunning it unscaled would move every arm aside and train the full budgets."""
    if not (Path(out) / MANIFEST).is_file():
        return
    other = {name: float(e.get("scale", 1.0)) for name, e in read_manifest(out)["arms"].items()
             if e is not None and float(e.get("scale", 1.0)) != scale}
    if other:
        was = sorted(set(other.values()))
        raise CovidXrayError(f"--out {out} holds a study run at --scale {', '.join(f'{s:g}' for s in was)} "
                             f"(arms {', '.join(other)}), not at --scale {scale:g}",
                             f"Pass --scale {was[0]:g} to continue it, or choose another --out for a study at "
                             f"another scale")


def check_study_dir(out: Path, data: Path | None) -> Path:
    """Refuse an OUT that is not new, empty or a study folder (:mod:`covidxray.outdir`), or a study of other data."""
    check_output_dir(out, KIND, inputs=[data] if data is not None else [], option="--out")
    marker = read_marker(out) if out.is_dir() else None
    was = ((marker or {}).get("settings") or {}).get("data")
    if data is not None and was and was != str(data.resolve()):
        raise CovidXrayError(f"--out {out} holds a study of {was}, not of {data.resolve()}",
                             "Choose a new --out for a study of other data")
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """What the study keeps of one evaluation (its ``metrics.json`` keeps the rest)."""
    m = res["metrics"]
    fd = next((k for k in ("fid", "fd_unverified") if k in m), None)
    kd = next((k for k in ("kid", "kd_unverified") if k in m), None)
    memo = res.get("memorization")
    down = res.get("downstream")
    drawn = res["n"] * res["repeats"]
    gen_s = res["timing"]["generate_s"]
    return {"n": res["n"], "repeats": res["repeats"], "floor_n": res["floor_n"], "split": res["split"],
            "reference_n": res["reference_n"], "fd_name": fd, "fd": m.get(fd), "fd_floor": m.get(f"{fd}_floor"),
            "kd_name": kd, "kd": m.get(kd), "kd_floor": m.get(f"{kd}_floor"), "precision": m.get("precision"),
            "recall": m.get("recall"), "density": m.get("density"), "coverage": m.get("coverage"),
            "copies": memo["copies"] if memo else None, "generate_s": gen_s,
            "sample_s_per_1k": round(gen_s / drawn * 1000, 3) if drawn else None, "device": res["device"],
            "downstream": None if not down else {
                **{k: down.get(k) for k in ("classifier", "seeds", "delta", "refused")},
                "gan_test": (down.get("gan_test") or {}).get("balanced_accuracy"),  # real classifier on samples
                "tstr": ((down.get("arms") or {}).get("synthetic") or {}).get("balanced_accuracy")},  # train on them
            "warnings": res["warnings"]}


# ---------------------------------------------------------------------------------------------- environment
def data_fingerprint(data: Path) -> str | None:
    """A hash of the prepared folder's ``manifest.csv`` and ``prepare.json`` (its file list, splits, labels and
    preparation options): the same fingerprint, the same data. None when either is unreadable."""
    h = hashlib.sha256()
    try:
        for name in ("manifest.csv", "prepare.json"):
            h.update(name.encode("utf-8") + b"\0" + (Path(data) / name).read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()[:16]


def git_state() -> dict[str, Any]:
    """The git commit of the covidxray checkout this process runs from, and whether tracked files differ from it
    (both None where it is not a git checkout, or git is missing)."""
    repo = Path(covidxray.__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    commit = head.stdout.strip() if head.returncode == 0 else ""
    return {"commit": commit or None, "dirty": bool(status.stdout.strip()) if commit and status.returncode == 0
            else None}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def software() -> dict[str, Any]:
    """The versions that decide what an arm learns and scores: covidxray (and its git commit), torch, Python."""
    git = git_state()
    return {"covidxray": covidxray.__version__, "git_commit": git["commit"], "git_dirty": git["dirty"],
            "torch": torch.__version__, "python": platform.python_version()}


def environment(spec: StudySpec, data: Path, device: str) -> dict[str, Any]:
    """Where and with what a study runs (kept in the manifest, shown by the report): the device, the software,
    a fingerprint of the data and the spec verbatim."""
    dev = resolve_device(device)
    return {"device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "cpu_count": os.cpu_count(), **software(), "cuda": torch.version.cuda if dev.type == "cuda" else None,
            "host": platform.node(), "data": str(Path(data).resolve()), "data_fingerprint": data_fingerprint(data),
            "spec_path": str(spec.path), "spec": spec.text, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------------------------------------- runner
class StudyRunner:
    """Runs the planned arms of a study into ``out`` (see the module docstring).

    Args:
        spec: the loaded spec; plans: its arms planned against ``data`` (:func:`plan_study`), or None for a
            runner that only reports (``--report`` without ``--data``: no arm can be told changed).
        data: the prepared folder every arm trains on and is scored against (None: a report only).
        out: the study folder (checked by :func:`check_study_dir` first).
        device: where arms train and are scored (``auto``, ``cpu``, ``cuda:N``).
        sets: execution settings for every arm and downstream classifier (``--set``, already checked).
        console: rich console for the training progress (None: none); log: one-line messages.
    """

    def __init__(self, spec: StudySpec, plans: list[ArmPlan] | None, data: Path | None, out: Path, *,
                 device: str = "auto", sets: list[str] | None = None, console=None,
                 log: Callable[[str], None] | None = None):
        self.spec, self.plans, self.out = spec, plans, Path(out)
        self.data = None if data is None else Path(data)
        self.device, self.sets, self.console = device, list(sets or []), console
        self.log = log or (lambda msg: None)
        self._spent: dict[str, list] | None = None  # seconds of the stages this process ran (run() starts it)

    def keys(self) -> dict[str, dict[str, Any]] | None:
        """Each arm's current training key and point keys (the report marks arms whose run is of an older spec);
        None without plans."""
        if self.plans is None:
            return None
        return {p.arm.name: {"train": p.key, "points": {q.label: q.key for q in p.points}} for p in self.plans}

    def run(self, only: str | None = None) -> list[dict[str, Any]]:
        """Run every arm (or the arm ``only``), then write the report; returns its rows."""
        if self.plans is None or self.data is None:
            raise ValueError("a StudyRunner without plans and data only reports")
        check_study_dir(self.out, self.data)
        check_folder_scale(self.out, self.spec.scale)
        claim(self.out, KIND, "study", {"data": str(self.data.resolve())})
        update_manifest(self.out, study=self.spec.name, spec=str(self.spec.path), data=str(self.data.resolve()),
                        scale=self.spec.scale, environment=environment(self.spec, self.data, self.device))
        self._run_plans = [p for p in self.plans if only is None or p.arm.name == only]
        self._t0, self._spent = time.perf_counter(), {"train": [], "score": [], "segment": []}
        self._progress()
        for plan in self._run_plans:
            self._arm(plan)
            self.report()
        return self.report()

    # ------------------------------------------------------------------------------------------ progress
    def _pending(self) -> list[tuple[str, ArmPlan, float]]:
        """The stages still to run: (kind, plan, kimg still to train for a training stage, else 0)."""
        manifest = read_manifest(self.out)
        todo = []
        for plan in self._run_plans:
            entry = manifest["arms"].get(plan.arm.name)
            fresh = entry is None or entry.get("key") != plan.key
            t = {} if fresh else entry["train"]
            if t.get("status") != "done":
                reached = 0.0 if fresh else float(t.get("kimg") or 0.0)
                todo.append(("train", plan, max(0.0, plan.kimg - reached)))
            for q in plan.points:
                ev = {} if fresh else ((entry["points"].get(q.label) or {}).get("eval") or {})
                if not (ev.get("status") == "done" and ev.get("key") == q.key):
                    todo.append(("score", plan, 0.0))
            if self.spec.eval.segmentation is not None and plan.masks:
                seg = {} if fresh else (entry.get("segmentation") or {})
                if not (seg.get("status") == "done" and seg.get("key") == segmentation_key(plan, self.spec)):
                    todo.append(("segment", plan, 0.0))
        return todo

    def _stage_done(self, kind: str, seconds: float, kimg: float = 0.0, model: str = "") -> None:
        self._spent[kind].append((seconds, kimg, model))
        self._progress()

    def _progress(self) -> None:
        """One line between stages: stages done of all, time spent, and the time left estimated from what this
        process measured so far (training: seconds per kimg of the same model, else of all arms; scoring and
        U-Nets: their mean stage), or why there is no estimate yet."""
        if self._spent is None:
            return
        todo = self._pending()
        done = sum(len(v) for v in self._spent.values())
        elapsed = time.perf_counter() - self._t0
        left, unknown = 0.0, set()
        train = self._spent["train"]
        for kind, plan, kimg in todo:
            if kind == "train":
                same = [(s, k) for s, k, m in train if m == plan.arm.model and k > 0]
                pool = same or [(s, k) for s, k, _ in train if k > 0]
                if pool:
                    left += kimg * sum(s for s, _ in pool) / sum(k for _, k in pool)
                else:
                    unknown.add("training")
            elif self._spent[kind]:
                left += statistics.mean(s for s, _, _ in self._spent[kind])
            else:
                unknown.add("scoring" if kind == "score" else "U-Nets")
        eta = ("nothing left" if not todo else
               f"about {_hm(left)} left" + (f" (+ the {', '.join(sorted(unknown))}: no stage measured yet)"
                                           if unknown else "") if left or not unknown else
               f"no estimate until a stage of {', '.join(sorted(unknown))} has run")
        self.log(f"study {self.spec.name}: {done} of {done + len(todo)} stages done in {_hm(elapsed)}; {eta}")

    def report(self, redraw: bool = False) -> list[dict[str, Any]]:
        """Draw the sample grids that are missing or stale (all of them with ``redraw``), then write ``study.md``
        and its figures; returns the report's rows (also kept in the manifest)."""
        self.grids(redraw)
        manifest = read_manifest(self.out)
        rows = write_report(self.out, self.spec, manifest, self.keys())
        update_manifest(self.out, report=rows)
        return rows

    def grids(self, redraw: bool = False) -> None:
        """``grid_<arm>.png`` of every trained arm of the spec whose grid is missing, or was drawn from another
        training or other sampler options (:mod:`covidxray.study.figures`)."""
        manifest = read_manifest(self.out)
        keys = self.keys()
        for arm in self.spec.arms:
            entry = manifest["arms"].get(arm.name)
            if entry is None or (keys is not None and entry.get("key") != keys[arm.name]["train"]):
                continue
            final = next((p for p in entry.get("points", {}).values() if p.get("final")), {})
            if entry["train"].get("status") != "done" or not final.get("checkpoint"):
                continue
            key = grid_key(entry, arm.sampling, self.spec.eval.seed)
            old = manifest.get("grids", {}).get(arm.name) or {}
            if not redraw and old.get("key") == key and (self.out / old.get("file", "")).is_file():
                continue
            try:
                record = draw_grid(self.out, arm.name, self.out / final["checkpoint"], arm.sampling,
                                   self.spec.eval.seed, self.device, self.log)
            except CovidXrayError as exc:  # e.g. a mask arm's training masks moved: the report goes on without it
                self.log(f"arm {arm.name}: no sample grid ({exc.message})")
                continue
            self.log(f"arm {arm.name}: drew {record['file']}")
            drawn = {**record, "key": key, "checkpoint": final["checkpoint"]}

            def add_grid(m: dict[str, Any], name: str = arm.name, grid: dict[str, Any] = drawn) -> None:
                m.setdefault("grids", {})[name] = grid  # the grids another --arm process drew stay

            manifest = update_manifest(self.out, edit=add_grid)

    # ------------------------------------------------------------------------------------------ arms
    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.out).as_posix()

    def _save(self, name: str, entry: dict[str, Any]) -> None:
        update_manifest(self.out, name, entry)

    def _arm(self, plan: ArmPlan) -> None:
        name = plan.arm.name
        entry = read_manifest(self.out)["arms"].get(name)
        if entry is not None and entry.get("key") != plan.key:
            self._set_aside(name, entry)
            entry = None
        if entry is None:
            entry = self._new_entry(plan)
            self._save(name, entry)
        if entry["train"]["status"] == "done":
            self.log(f"arm {name}: trained ({entry['train'].get('kimg')} kimg), not retrained")
        else:
            self._train(plan, entry)
        for point in plan.points:
            self._score(plan, entry, point)
        self._segment(plan, entry)

    def _set_aside(self, name: str, entry: dict[str, Any]) -> None:
        """An arm whose training key changed: its old folder goes to OUT/replaced/<arm>-<old key>/."""
        old = self.out / "arms" / name
        if old.exists():
            dest = self.out / "replaced" / f"{name}-{str(entry.get('key'))[:8]}"
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            old.rename(dest)
            self.log(f"arm {name}: changed since its run; the old run moved to {dest}, the arm reruns")
        else:
            self.log(f"arm {name}: changed since its run; the arm reruns")

    def _new_entry(self, plan: ArmPlan) -> dict[str, Any]:
        arm = plan.arm
        return {"model": arm.model, "key": plan.key, "kimg_budget": arm.kimg, "kimg_planned": plan.kimg,
                "kimg_spec": arm.spec_kimg if arm.spec_kimg is not None else arm.kimg, "scale": self.spec.scale,
                "epochs": plan.epochs, "batch_size": plan.batch_size, "train_images": plan.train_images,
                "seed": arm.seed, "sets": list(arm.sets), "max_minutes": arm.max_minutes, "run": None,
                "train": {"status": "pending", "seconds": 0.0},
                "points": {p.label: {"fraction": p.fraction, "step_planned": p.step, "final": p.final,
                                     "status": "pending"} for p in plan.points}}

    def _train(self, plan: ArmPlan, entry: dict[str, Any]) -> None:
        arm, name = plan.arm, plan.arm.name
        arm_dir = self.out / "arms" / name
        t = entry["train"]
        run_dir = self.out / entry["run"] if entry.get("run") else None
        resume = run_dir is not None and (run_dir / "checkpoints" / "last.pt").is_file()
        base_kimg = 0.0  # what an interrupted run had trained (the ETA's rate counts this process's images only)
        if resume:
            ckpt = load_checkpoint(run_dir, resume=True)  # a run that finished before the manifest said so
            if ckpt["epoch"] >= plan.epochs or ckpt.get("stopped_early"):
                return self._trained(name, entry, ckpt["step"], ckpt["images_seen"], ckpt["epoch"],
                                     t.get("device"), False, bool(ckpt.get("stopped_early")), run_dir)
            base_kimg = ckpt["images_seen"] / 1000
            del ckpt
        else:  # a first start, or one that left no checkpoint: nothing of it is worth keeping
            if arm_dir.exists():
                shutil.rmtree(arm_dir)
            run_dir = arm_dir / f"00000-{arm.model}"
            entry.update(run=self._rel(run_dir), points=self._new_entry(plan)["points"])
            t["seconds"] = 0.0
        self.log(f"arm {name}: {'resuming' if resume else 'training'} {arm.model} for {plan.kimg:g} kimg "
                 f"({plan.epochs} epochs of {plan.steps_per_epoch} steps x {plan.batch_size} images) in {run_dir}")
        pending = [p for p in plan.points if not p.final]
        base = float(t.get("seconds") or 0.0)
        cap = arm.max_minutes * 60 if arm.max_minutes else None
        capped = [False]
        t0 = time.perf_counter()

        def on_step(trainer) -> None:
            elapsed = base + time.perf_counter() - t0
            for p in pending:
                if trainer.step == p.step:
                    path = trainer.save(p.checkpoint)
                    entry["points"][p.label].update(status="reached", step=trainer.step,
                                                    kimg=trainer.images_seen / 1000, seconds=round(elapsed, 2),
                                                    checkpoint=self._rel(path))
                    self._save(name, entry)
            if cap is not None and elapsed >= cap and not capped[0]:
                capped[0] = True
                trainer.log(f"study: arm {name} reached its cap of {arm.max_minutes:g} minutes; training stops here")
                trainer.request_stop()

        t.update(status="running", software=software())
        self._save(name, entry)
        finished = False
        try:
            if resume:
                trainer, finished = resume_run(run_dir, device=self.device, console=self.console, on_step=on_step)
            else:
                cfg = copy.deepcopy(plan.cfg)
                cfg.out = str(arm_dir)
                trainer, finished = start_run(cfg, console=self.console, on_step=on_step)
                entry["run"] = self._rel(trainer.run_dir)
        except KeyboardInterrupt:
            t["status"] = "interrupted"
            raise
        except BaseException:
            t["status"] = "failed"
            raise
        finally:
            t["seconds"] = round(base + time.perf_counter() - t0, 2)
            self._save(name, entry)
        if not finished and not capped[0]:  # Ctrl-C: the loop wrote a checkpoint; the same command resumes
            t["status"] = "interrupted"
            self._save(name, entry)
            raise KeyboardInterrupt
        s = trainer.state
        self._trained(name, entry, s.step, s.images_seen, s.epoch, str(trainer.device), capped[0], s.stopped_early,
                      trainer.run_dir)
        self._stage_done("train", time.perf_counter() - t0, max(0.0, s.images_seen / 1000 - base_kimg), arm.model)
        del trainer
        gc.collect()

    def _trained(self, name: str, entry: dict[str, Any], step: int, images_seen: int, epochs: int, device: str | None,
                 capped: bool, stopped_early: bool, run_dir: Path) -> None:
        t = entry["train"]
        t.update(status="done", step=step, kimg=images_seen / 1000, epochs=epochs, device=device, capped=capped,
                 stopped_early=stopped_early)
        for p in entry["points"].values():
            if p["final"]:
                p.update(status="reached", step=step, kimg=images_seen / 1000, seconds=t["seconds"],
                         checkpoint=self._rel(run_dir / "checkpoints" / "last.pt"))
            elif p["status"] != "reached":
                p["status"] = "not reached"  # a capped or early-stopped run
        self._save(name, entry)
        self.log(f"arm {name}: trained {images_seen / 1000:g} kimg in {t['seconds']:.1f} s"
                 + (" (capped)" if capped else "") + (" (stopped early)" if stopped_early else ""))

    def _segment(self, plan: ArmPlan, entry: dict[str, Any]) -> None:
        """The segmentation table's row of a mask arm (``eval.segmentation``): U-Nets on real pairs (shared by
        every mask arm), on real + the arm's synthetic pairs, and on its synthetic pairs alone
        (:mod:`covidxray.evaluate.pairs`). An interrupted stage starts over; a finished one is kept by its key."""
        seg, name = self.spec.eval.segmentation, plan.arm.name
        final = next(p for p in plan.points if p.final)
        ckpt = entry["points"][final.label].get("checkpoint")
        if seg is None or not plan.masks or entry["points"][final.label].get("status") != "reached" or not ckpt:
            return
        key = segmentation_key(plan, self.spec)
        old = entry.get("segmentation") or {}
        if old.get("status") == "done" and old.get("key") == key:
            return
        real = self._segmentation_real()
        out = self.out / "arms" / name / "segmentation"
        if out.exists():
            shutil.rmtree(out)
        self.log(f"arm {name}: U-Nets on real + synthetic and on synthetic pairs only ({seg.seeds} seeds x "
                 f"{seg.epochs} epochs) into {out}")
        entry["segmentation"] = {"key": key, "status": "running"}
        self._save(name, entry)
        t0 = time.perf_counter()
        res = segmentation_pairs(self.out / ckpt, self.data, out, seeds=seg.seeds, epochs=seg.epochs,
                                 sets=[*seg.sets, *self.sets], copies=seg.copies, device=self.device,
                                 sampling=dict(plan.arm.sampling), real=real,
                                 log=lambda msg: self.log(f"arm {name}: {msg}"))
        for runs in (a["runs"] for a in res["arms"].values()):
            for r in runs:
                r["run"] = self._rel_or_abs(r["run"])
        entry["segmentation"] = {"key": key, "status": "done", "out": self._rel(out),
                                 "seconds": round(time.perf_counter() - t0, 1), **res}
        self._save(name, entry)
        self._stage_done("segment", time.perf_counter() - t0)

    def _segmentation_real(self) -> list[dict[str, Any]]:
        """The real-only U-Nets of the segmentation table (one per seed), trained once for every mask arm."""
        seg = self.spec.eval.segmentation
        key = segmentation_real_key(self.spec)
        done = read_manifest(self.out).get("segmentation_real") or {}
        if done.get("status") == "done" and done.get("key") == key:
            return done["runs"]
        out = self.out / "segmentation-real"
        if out.exists():
            shutil.rmtree(out)
        self.log(f"U-Nets on the real pairs ({seg.seeds} seeds x {seg.epochs} epochs) into {out}")
        runs = []
        for seed in range(seg.seeds):
            r = unet_test_dice(self.data, seed, seg.epochs, [*seg.sets, *self.sets], self.device, out / "runs")
            r["run"] = self._rel_or_abs(r["run"])
            self.log(f"U-Net seed {seed} real: test Dice {r['dice']:.4f} (N train {r['n_train']}, {r['seconds']} s)")
            runs.append(r)
        update_manifest(self.out, segmentation_real={"key": key, "status": "done", "out": self._rel(out),
                                                     "runs": runs})
        return runs

    def _rel_or_abs(self, path: str | Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.out.resolve()).as_posix()
        except ValueError:
            return str(path)

    def _score(self, plan: ArmPlan, entry: dict[str, Any], point: Point) -> None:
        name = plan.arm.name
        p = entry["points"][point.label]
        ev = p.get("eval") or {}
        if ev.get("status") == "done" and ev.get("key") == point.key:
            return
        if p.get("status") != "reached":
            return
        e = self.spec.eval
        down = None
        if point.final and e.downstream is not None:
            d = e.downstream
            down = dict(classifier=d.classifier, seeds=d.seeds, synthetic_ratio=d.synthetic_ratio, epochs=d.epochs,
                        pool=d.pool, sets=[*d.sets, *self.sets], console=self.console)
        out = self.out / "arms" / name / point.eval_dir
        self.log(f"arm {name}: scoring the {point.label} % point ({p.get('kimg')} kimg) into {out}")
        req = GeneratorEvaluation(data=self.data, run=self.out / p["checkpoint"], split=e.split, n=e.n,
                                  repeats=e.repeats, metrics=list(e.metrics), out=out, device=self.device,
                                  batch_size=e.batch_size, seed=e.seed, downstream=down,
                                  sampling=dict(plan.arm.sampling))
        t0 = time.perf_counter()
        res = run_generator_evaluation(req, self.log)
        p["eval"] = {"key": point.key, "status": "done", "out": self._rel(out), **summarize(res)}
        self._save(name, entry)
        self._stage_done("score", time.perf_counter() - t0)



def _hm(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    m = round(seconds / 60)
    return f"{m // 60} h {m % 60:02d} min" if m >= 60 else f"{m} min"


# ----------------------------------------------------------------------------------------------- probe
def probe(plan: ArmPlan, steps: int = 3, warmup: int = 1, console=None, protocol: EvalProtocol | None = None,
          score_images: int = 32) -> dict[str, Any]:
    """Train ``plan``'s arm for ``warmup + steps`` steps through the one loop, in a temporary folder that is
    removed, and project its budget's training time from the median seconds of the measured steps.

    A step whose interval holds the end of an epoch (statistics, validation, snapshot, checkpoint) is left out
    when another one is not; the projection is of the steps alone (``total_steps`` x s/step), without start-up,
    per-epoch work or scoring. With CUDA graphs their eager steps and the capture count as warm-up too.

    With ``protocol``, the probe's model also draws ``score_images`` images with the arm's sampling and the FID
    Inception encodes them (when installed), and the scoring of every point is projected from those seconds:
    ``points x repeats x n`` images drawn and encoded. The downstream classifiers are not in it.
    """
    warmup = max(1, warmup)  # the first step builds kernels and caches: never timed
    most = warmup + GRAPH_WARMUP + 1
    cfg = copy.deepcopy(plan.cfg)
    tmp = Path(tempfile.mkdtemp(prefix="covidxray-probe-"))
    cfg.out = str(tmp)
    cfg.train.epochs = max(1, math.ceil((most + steps) / plan.steps_per_epoch))
    marks: list[tuple[float, int]] = []
    skip = [warmup]

    def on_step(trainer) -> None:
        if not marks and trainer.graphs is not None:
            skip[0] = most
        marks.append((time.perf_counter(), trainer.state.batch_in_epoch))
        if len(marks) >= skip[0] + steps:
            trainer.request_stop()

    t0 = time.perf_counter()
    scoring: dict[str, Any] = {}
    try:
        trainer, _ = start_run(cfg, console=console, on_step=on_step)
        device, ckpt = str(trainer.device), trainer.run_dir / "checkpoints" / "last.pt"
        del trainer
        if protocol is not None:
            scoring = _probe_scoring(plan, protocol, ckpt, device, score_images)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next arm's probe starts from an empty cache, as its run would
    wall = time.perf_counter() - t0
    gaps = [(b[0] - a[0], b[1] == 1) for a, b in zip(marks[skip[0] - 1:], marks[skip[0]:])]
    clean = [g for g, new_epoch in gaps if not new_epoch] or [g for g, _ in gaps]
    step_s = statistics.median(clean) if clean else None
    return {"arm": plan.arm.name, "model": plan.arm.model, "device": device, "batch_size": plan.batch_size,
            "steps_warmup": skip[0], "steps_measured": len(clean), "step_s": step_s,
            "images_per_s": plan.batch_size / step_s if step_s else None, "total_steps": plan.total_steps,
            "train_minutes": plan.total_steps * step_s / 60 if step_s else None, "probe_s": wall, **scoring}


def _probe_scoring(plan: ArmPlan, protocol: EvalProtocol, ckpt: Path, device: str, k: int) -> dict[str, Any]:
    """Seconds to draw ``k`` images from the probe's checkpoint (the arm's sampling) and to encode them with the
    FID Inception, and the scoring minutes of the arm's points projected from them (None where the network is
    missing: the draw alone is then projected)."""
    from covidxray.evaluate.generator import load_source
    from covidxray.metrics.features import InceptionFeatures

    source = load_source(ckpt, None, list(plan.cfg.data.classes or []), False, lambda m: None)
    if getattr(source, "loaded", None) is not None:
        source.loaded.configure(**dict(plan.arm.sampling))
    dev = torch.device(device)

    def counts(m: int):  # a conditional model draws per class
        c = len(source.classes)
        return [m // c + (i < m % c) for i in range(c)] if source.conditional else m

    source.draw(counts(min(k, 4)), 0, dev)  # warm-up: kernels and caches
    t = time.perf_counter()
    images, _ = source.draw(counts(k), 1, dev, batch_size=k)
    draw_s = (time.perf_counter() - t) / k
    encode_s = None
    try:
        ex = InceptionFeatures(None, dev, protocol.batch_size)
        ex(images[: min(k, 4)])
        t = time.perf_counter()
        ex(images)
        encode_s = (time.perf_counter() - t) / k
    except CovidXrayError:
        pass
    n = protocol.n if protocol.n is not None else plan.train_images
    scored = len(plan.points) * protocol.repeats * n
    return {"draw_s_per_image": draw_s, "encode_s_per_image": encode_s, "scored_images": scored,
            "score_minutes": scored * (draw_s + (encode_s or 0.0)) / 60}
