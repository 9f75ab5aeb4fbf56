"""What the benchmarks share: data per size, the environment, building and timing a trainer, the main skeleton.

Used by ``gan_throughput.py`` (every GAN x size vs a plain DCGAN step), ``gan_vs_example.py`` (rawgan
vs pytorch/examples ``dcgan/main.py``) and ``gan_schedule.py`` (the seed's 1.7 M-image schedule).
Not a script. Only the public API of :class:`covidxray.train.loop.Trainer` is used (``step``,
``epoch``, ``images_seen``, ``batch_in_epoch``, ``cuda_graphs``, ``train_step``, ``fit(epochs)``,
``on_step``, ``task.models``).

Data per size: ``--data64/--data128/--data256`` or ``--data FOLDER`` (size read from its
prepare.json), else ``--data-root DIR`` holding ``cxr64``/``cxr128``/``cxr256``, else
``--prepare-from SRC`` (``covidxray prepare`` of a raw data set into the temp dir), else demo
phantoms (``prepare_demo``, ``--per-class 400``, seed 0). The log names the data of each size.

A model is measured (:func:`measure_model`) with its *default* config (only ``data.path``,
``data.image_size``, ``train.batch_size``, ``train.device`` set, plus
``train.snapshot_every``/``train.checkpoint_every`` huge; ``--set key=value`` comes on top):

- *step*: ``--warmup`` then ``--steps`` timed calls of ``Trainer.train_step`` on one fixed batch
  already on the device (CUDA synchronised around the timed loop);
- *epoch*: the same trainer then runs ``fit()`` for ``--epochs`` more epochs (data order, indexing,
  logging, epoch ends included). Timed from the end of the first step to the end of the last step
  with the ``on_step`` callback (CUDA synchronised at both), so the run-start files and the last
  epoch's snapshot/checkpoint are outside the window (:func:`timed_fit`).

Ctrl-C or SIGTERM (``timeout``) ends a script early, also inside ``fit()`` (whose own handler stops
that run first); the JSON and the tables of what was measured still come (:func:`run_bench`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # fallback when run as `python bench/<script>.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

HUGE = 10**9                       # snapshot/checkpoint interval that never triggers (except at the last epoch)
QUICK = {"sizes": [64], "steps": 3, "warmup": 1, "epochs": 1, "per_class": 40, "batch": 32, "peer_niter": 1}
FULL = {"sizes": [64, 128, 256], "steps": 30, "warmup": 5, "epochs": 2, "per_class": 400, "batch": 128,
        "peer_niter": 2}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short(exc: BaseException, n: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:n]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rate(images: float, seconds: float) -> float | None:
    return images / seconds if seconds > 0 and images > 0 else None


def fmt(x: float | None, spec: str = "{:,.0f}") -> str:
    return "-" if x is None else spec.format(x)


def hms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def gan_models() -> list[str]:
    """Every registered GAN (``family == "gan"``)."""
    from covidxray.models.registry import list_models

    return [m.name for m in list_models("gan")]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


# --------------------------------------------------------------------------------------------
# Data: prepared folders per size, else demo phantoms
# --------------------------------------------------------------------------------------------


@dataclass
class DataInfo:
    size: int
    path: Path | None = None
    kind: str = ""                 # "real" | "phantoms"
    n_train: int = 0
    note: str = ""
    error: str | None = None


class DataResolver:
    """Finds (or generates) a prepared folder for each image size, once."""

    def __init__(self, args, tmp: Path, log: Callable[[str], None]):
        self.args, self.tmp, self.log = args, tmp, log
        self.cache: dict[int, DataInfo] = {}
        self.explicit: dict[int, Path] = {}
        for size in (64, 128, 256):
            p = getattr(args, f"data{size}")
            if p:
                self.explicit[size] = Path(p)
        if args.data:
            p = Path(args.data)
            self.explicit.setdefault(self._size_of(p), p)

    @staticmethod
    def _size_of(path: Path) -> int:
        from covidxray.data.datasets import read_prepared_info

        return int(read_prepared_info(path)["size"])

    def _from_root(self, size: int) -> Path | None:
        root = Path(self.args.data_root)
        for name in (f"cxr{size}", f"{size}", f"cxr-{size}", f"prepared{size}"):
            if (root / name / "prepare.json").is_file():
                return root / name
        for sub in sorted(p for p in root.iterdir() if (p / "prepare.json").is_file()):
            try:
                if self._size_of(sub) == size:
                    return sub
            except Exception:
                continue
        return None

    def get(self, size: int) -> DataInfo:
        if size in self.cache:
            return self.cache[size]
        info = DataInfo(size)
        t0 = time.perf_counter()
        try:
            from covidxray.data.datasets import read_prepared_info, read_records

            path = self.explicit.get(size) or (self._from_root(size) if self.args.data_root else None)
            if path is None and self.args.prepare_from:
                from covidxray.data.prepare import prepare

                base = Path(self.args.phantom_dir) if self.args.phantom_dir else self.tmp
                path = base / f"cxr{size}"
                prepare(self.args.prepare_from, path, size=size, workers=max(1, min(os.cpu_count() or 1, 8)),
                        progress=False)
                info.note = f"prepared from {self.args.prepare_from} in {time.perf_counter() - t0:.1f} s"
            if path is None:
                from covidxray.data.prepare import prepare_demo

                base = Path(self.args.phantom_dir) if self.args.phantom_dir else self.tmp
                path = base / f"phantoms{size}-pc{self.args.per_class}"
                prepare_demo(path, per_class=self.args.per_class, size=size, seed=0,
                             workers=max(1, min(os.cpu_count() or 1, 8)), progress=False)
                info.note = f"generated in {time.perf_counter() - t0:.1f} s"
            meta = read_prepared_info(path)
            if int(meta["size"]) != size:
                raise ValueError(f"{path} was prepared at {meta['size']} px, not {size} px")
            records, _ = read_records(path, "train")
            info.path, info.n_train = path.resolve(), len(records)
            info.kind = "phantoms" if meta.get("synthetic") else "real"
            self.log(f"data {size} px: {info.kind} ({meta.get('layout', '?')}), {info.n_train} train images, "
                     f"{info.path}{'; ' + info.note if info.note else ''}")
        except Exception as exc:
            info.error = short(exc)
            self.log(f"data {size} px: ERROR {info.error}")
        self.cache[size] = info
        return info


def run_timestamped(cmd: list[str], cwd: Path, timeout: float,
                    pattern: "re.Pattern[str]") -> tuple[int, list[tuple[float, tuple[int, ...]]], list[str], float, float]:
    """Run a peer script, timestamping each output line that matches ``pattern`` as it arrives.

    Returns ``(returncode, [(time, integer groups)], other lines, t_start, t_exit)``; the process is
    killed after ``timeout`` seconds.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, cwd=cwd)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines: list[tuple[float, tuple[int, ...]]] = []
    other: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter()
            m = pattern.match(line)
            if m:
                lines.append((t, tuple(int(g) for g in m.groups())))
            else:
                other.append(line.rstrip())
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    return rc, lines, other, t_start, time.perf_counter()


def image_folder_tree(prepared: Path, split: str, dst: Path) -> int:
    """A ``torchvision.datasets.ImageFolder`` tree of symlinks to one split's images (no masks), as the
    peers and plain loops read them; returns the image count."""
    from covidxray.data.datasets import read_records

    records, _ = read_records(prepared, split)
    for rec in records:
        d = dst / rec.label
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(rec.file).name).symlink_to(Path(prepared, rec.file).resolve())
    return len(records)


# --------------------------------------------------------------------------------------------
# Our trainer: step-only rate, then the epoch rate of fit()
# --------------------------------------------------------------------------------------------


def build_trainer(model: str, size: int, data: DataInfo, batch: int, device: torch.device, run_dir: Path,
                  args, train_flags: dict[str, Any] | None = None):
    """A :class:`~covidxray.train.loop.Trainer` of ``model`` with its default config (see the module docstring)."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import Trainer

    train = {"batch_size": batch, "device": str(device), "snapshot_every": HUGE, "checkpoint_every": HUGE}
    train.update(train_flags or {})
    cfg = resolve_config(model, flags={"data": {"path": str(data.path), "image_size": size}, "train": train},
                         sets=args.set)
    return Trainer(cfg, run_dir)


def timed_fit(trainer, epochs: int, device: torch.device) -> dict[str, Any]:
    """Run ``epochs`` more epochs of fit(); rate from the end of the first step to the end of the last."""
    first = trainer.step + 1
    last = trainer.step + epochs * trainer.batches_per_epoch - trainer.batch_in_epoch
    stamps: list[tuple[float, int, int]] = []       # (time, images_seen, batch_in_epoch)

    def on_step(tr) -> None:
        if tr.step in (first, last):
            sync(device)
        stamps.append((time.perf_counter(), tr.images_seen, tr.batch_in_epoch))

    old = trainer.on_step
    trainer.on_step = on_step
    t0 = time.perf_counter()
    try:
        finished = trainer.fit(trainer.epoch + epochs)  # False when stopped early (Ctrl-C, SIGTERM from `timeout`)
    finally:
        trainer.on_step = old
    sync(device)
    t_end = time.perf_counter()
    if not stamps:
        raise RuntimeError("fit() ran no step")
    if len(stamps) >= 2:
        window, images = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
        note = ""
    else:  # one step per window: time it from the fit() call (includes fit's start)
        window, images = stamps[-1][0] - t0, stamps[-1][1] - (stamps[0][1] - trainer.batch_size)
        note = "1 step only: timed from the fit() call"
    # Epoch-end work (stats line, snapshot/checkpoint when due, new permutation): the gap before
    # the first step of an epoch minus a typical step gap. Host-side times: approximate on CUDA.
    gaps = [b[0] - a[0] for a, b in zip(stamps[:-1], stamps[1:])]
    starts = [g for g, st in zip(gaps, stamps[1:]) if st[2] == 1]
    inner = sorted(g for g, st in zip(gaps, stamps[1:]) if st[2] != 1)
    typical = inner[len(inner) // 2] if inner else 0.0
    epoch_end_s = sum(max(0.0, g - typical) for g in starts)
    return {"images_per_s": rate(images, window), "window_s": window, "window_images": images,
            "steps": len(stamps), "fit_total_s": t_end - t0, "epoch_end_s": epoch_end_s, "note": note,
            "finished": bool(finished), "images_seen": trainer.images_seen}


def measure_model(model: str, size: int, data: DataInfo, batch: int, device: torch.device, args, tmp: Path,
                  epochs: int) -> dict[str, Any]:
    """Step rate and epoch rate of one model at one size (see the module docstring); errors go into the row."""
    row: dict[str, Any] = {"model": model, "size": size, "batch": batch, "data": data.kind}
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-{size}-", dir=tmp))
    trainer = None
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        trainer = build_trainer(model, size, data, batch, device, run_dir, args)
        n, nets = trainer.batch_size, trainer.task.models
        row.update(batch=n, amp=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
                   channels_last=trainer.memory_format == torch.channels_last,
                   ema=trainer.task.ema is not None,
                   batches_per_epoch=trainer.batches_per_epoch, n_train=len(trainer.data),
                   params_G=sum(p.numel() for p in nets["G"].parameters()),
                   params_D=sum(p.numel() for p in nets["D"].parameters()))
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(trainer.data), generator=g)[:n].to(trainer.data.images.device)
        real = trainer.data.images[idx].to(trainer.device)
        labels = trainer.data.labels[idx].to(trainer.device)
        for _ in range(args.warmup):
            trainer.train_step(real, labels)
        sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(real, labels)
        sync(trainer.device)
        dt_s = time.perf_counter() - t0
        row["step_images_per_s"] = rate(args.steps * n, dt_s)
        row["step_s"] = dt_s / args.steps
        row["cuda_graphs"] = trainer.cuda_graphs  # whole-step CUDA graphs: replayed, failed (eager fallback), or off
        fit = timed_fit(trainer, epochs, trainer.device)
        row["epoch_images_per_s"] = fit.pop("images_per_s")
        row.update({f"fit_{k}": v for k, v in fit.items()})
        if row["step_images_per_s"] and row["epoch_images_per_s"]:
            row["epoch_over_step"] = row["epoch_images_per_s"] / row["step_images_per_s"]
    except Exception as exc:
        row["error"] = short(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        del trainer
        free(device)
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


def measure_and_log(b: "Bench", model: str, size: int) -> dict[str, Any]:
    """:func:`measure_model` at ``--batch`` for ``--epochs``, appended to ``res["models"]`` and logged."""
    t_m = time.perf_counter()
    row = measure_model(model, size, b.data.get(size), b.args.batch, b.device, b.args, b.tmp, b.args.epochs)
    row["elapsed_s"] = time.perf_counter() - t_m
    b.res["models"].append(row)
    stopped = row.get("fit_finished") is False
    if row.get("error"):
        b.log(f"{model} {size} px: ERROR {row['error']}")
    else:
        b.log(f"{model} {size} px: step {fmt(row['step_images_per_s'])} img/s, epoch "
              f"{fmt(row['epoch_images_per_s'])} img/s (x{fmt(row.get('epoch_over_step'), '{:.2f}')}) "
              f"[{row['elapsed_s']:.1f} s]{'; fit() stopped before its last epoch' if stopped else ''}")
    if stopped:  # fit() took a Ctrl-C or SIGTERM (`timeout`) and returned: end the measurements too
        raise KeyboardInterrupt
    return row


# --------------------------------------------------------------------------------------------
# Command line and the main skeleton of every script
# --------------------------------------------------------------------------------------------


def parser(doc: str) -> argparse.ArgumentParser:
    """The options of every GAN benchmark: device, batch, steps, ``--set``, data, output."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, help="images per step (default 128; --quick: 32)")
    ap.add_argument("--steps", type=int, help="timed train_step calls (default 30; --quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 5; --quick: 1)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every model (e.g. arch.g_channels=8)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: 3 steps, 1 epoch, 40 phantoms/class, batch 32")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="also enable cudnn.benchmark for covidxray's trainer (default: off, as `covidxray train`)")
    g = ap.add_argument_group("data (a prepared folder per size; else --prepare-from SRC; else demo phantoms)")
    g.add_argument("--data", help="one prepared folder (its size is read from prepare.json)")
    g.add_argument("--data64")
    g.add_argument("--data128")
    g.add_argument("--data256")
    g.add_argument("--data-root", help="folder holding prepared folders named cxr64, cxr128, cxr256")
    g.add_argument("--prepare-from", metavar="SRC",
                   help="prepare sizes without a folder from this raw data set (covidxray prepare) instead of phantoms")
    g.add_argument("--per-class", type=int, help="phantoms per class when generating (default 400; --quick: 40)")
    g.add_argument("--phantom-dir", help="keep/reuse generated phantoms / prepared data here (default: a temp dir)")
    g = ap.add_argument_group("output")
    g.add_argument("--json", help="write every number and the environment to this JSON file")
    g.add_argument("--tmp-dir", help="parent of the temporary folders (default: the system temp dir)")
    g.add_argument("--keep-tmp", action="store_true", help="do not delete the temporary folder")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, fill the defaults of ``FULL`` (``--quick``: ``QUICK``) and check the counts."""
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key, "absent") is None:
            setattr(args, key, value)
    if getattr(args, "peer_batch", "absent") is None:
        args.peer_batch = args.batch
    for key in ("batch", "steps", "epochs", "per_class", "peer_batch", "peer_niter"):
        if getattr(args, key, 1) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


@dataclass
class Bench:
    """What every section gets: the options, the results so far, the data, the device, a temp folder, the log."""

    args: argparse.Namespace
    res: dict[str, Any]
    data: DataResolver
    device: torch.device
    tmp: Path
    log: Callable[[str], None]


Section = Callable[[Bench], None]


def run_bench(prog: str, args, *, gans: list[str], sizes: list[int], sections: list[tuple[str, Section]],
              header: str, tables: Callable[[Any, dict[str, Any], Any], None],
              results: dict[str, Any] | None = None) -> int:
    """Check the models, resolve the data of ``sizes`` (all before CUDA is touched), run the sections
    (an error in one costs only its own numbers), write the JSON, print ``tables`` and the total last.

    Returns the exit code: 0, 2 for a user error (unknown model, no such device), 130 when interrupted.
    """
    from rich.console import Console

    from covidxray.errors import CovidXrayError
    from covidxray.models.registry import get_model
    from covidxray.utils import resolve_device

    console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 120)), highlight=False)
    log = lambda msg: console.print(msg, markup=False)  # noqa: E731
    t_all = time.perf_counter()
    try:
        device = resolve_device(args.device)
        for name in gans:
            if get_model(name).family != "gan":  # unknown names raise with the valid ones
                raise CovidXrayError(f"{name} is not a GAN (family {get_model(name).family})")
    except CovidXrayError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix=prog.replace("_", "-") + "-", dir=args.tmp_dir))
    res: dict[str, Any] = {"env": {}, "args": vars(args), "data": {}, **(results or {}), "sections_s": {}}
    b = Bench(args, res, DataResolver(args, tmp, log), device, tmp, log)
    rc = 0
    # SIGTERM (from `timeout`) ends the measurements like Ctrl-C: the JSON and the tables still come.
    # Inside fit() the trainer's own handler takes it, stops that run and returns (see measure_and_log).
    try:
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread
        old_term = None
    try:
        # All data first: phantoms are rendered in forked workers, before this process touches CUDA.
        t_sec = time.perf_counter()
        for size in dict.fromkeys(sizes):
            b.data.get(size)
        res["sections_s"]["data"] = time.perf_counter() - t_sec
        try:
            env = environment(device)
        except Exception as exc:  # e.g. a CUDA driver problem: say so in the results, measure anyway
            env = {"device": str(device), "device_name": f"? ({short(exc)})", "torch": torch.__version__,
                   "cpu_count": os.cpu_count()}
        res["env"] = env
        log(f"{prog}: {env['device_name']} ({device}), torch {env['torch']}, {env['cpu_count']} CPUs, {header}")
        for name, run in sections:
            t_sec = time.perf_counter()
            try:
                run(b)
            except Exception as exc:  # a bug in one section must not cost the others' numbers
                traceback.print_exc(file=sys.stderr)
                res.setdefault("section_errors", {})[name] = short(exc, 300)
                log(f"section {name}: ERROR {short(exc)}")
            res["sections_s"][name] = time.perf_counter() - t_sec
            log(f"section {name}: {hms(res['sections_s'][name])}")
    except KeyboardInterrupt:
        log("interrupted: printing what was measured")
        rc = 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        res["data"] = {str(s): {"path": str(i.path) if i.path else None, "kind": i.kind, "n_train": i.n_train,
                                "note": i.note, "error": i.error} for s, i in b.data.cache.items()}
        res["total_s"] = time.perf_counter() - t_all
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        if args.keep_tmp:
            log(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    console.print()
    env = res["env"]
    env.setdefault("device_name", "?"), env.setdefault("device", "?"), env.setdefault("torch", torch.__version__)
    tables(console, res, args)
    for name, err in res.get("section_errors", {}).items():
        console.print(f"[red]section {name} failed:[/] {err}")
    parts = ", ".join(f"{k} {hms(v)}" for k, v in res["sections_s"].items())
    console.print(f"total {hms(res['total_s'])} ({parts}); torch {env['torch']}"
                  + (f"; JSON {args.json}" if args.json else ""))
    return rc
