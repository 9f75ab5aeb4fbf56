"""Benchmark ``covidxray prepare`` against the old one-core "seed script".

Usage::

    python bench/prepare_bench.py SRC [--size 224] [--workers 1 2] [--repeats 3] [--no-growth]

Every measurement runs in a fresh child process (so one run's memory does not inherit the last
one's) writing into a fresh temporary folder. The parent samples the resident memory (RSS) of the
child and all its descendants from ``/proc`` every 20 ms and reports the peak of their *sum*
(an upper bound: pages shared between the forked workers are counted once per process).

Rows:

* ``reference``: the seed script -- for every image: ``Image.open``, ``resize((size, size),
  Image.LANCZOS)``, ``save`` as PNG (Pillow defaults), one core, same files as ``prepare`` reads.
* ``prepare wN``: ``covidxray.data.prepare.prepare(SRC, tmp, size=..., workers=N, progress=False)``.
* memory growth: ``prepare`` on SRC and on a 2x set (every image and mask linked twice under
  two names, so every image has an exact duplicate: the duplicate grouping is exercised too).

Wall time is measured inside the child around the call (interpreter start-up excluded); the best
and the median of the repeats are shown (the best is the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SAMPLE_S = 0.02


# --------------------------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------------------------


def _child(argv: list[str]) -> None:
    """Run one measured job and print its numbers as JSON (last stdout line)."""
    kind, src, out, size, workers = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    t0 = time.perf_counter()
    if kind == "reference":
        n = _reference(Path(src), Path(out), size)
    else:
        from covidxray.data.prepare import prepare

        info = prepare(src, out, size=size, workers=workers, progress=False)
        n = info["images_found"]
    wall = time.perf_counter() - t0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "wall": wall, "images": n,
        "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
        "maxrss_self_mib": me.ru_maxrss / 1024, "maxrss_child_mib": kids.ru_maxrss / 1024,
    }))


def _reference(src: Path, out: Path, size: int) -> int:
    """The old seed script: open, LANCZOS resize, save PNG; one core; same files as prepare."""
    from PIL import Image

    from covidxray.data.layouts import detect_layout

    layout = detect_layout(src)
    files = [rel for c in layout.classes.values() for rel in c.images]
    out.mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(files):
        img = Image.open(src / rel)
        img = img.resize((size, size), Image.LANCZOS)
        img.save(out / f"{i}.png")
    return len(files)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return found


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(kind: str, src: Path, size: int, workers: int, tmp_root: Path) -> dict:
    """Run one job in a child process; returns its numbers plus the sampled peak tree RSS."""
    out = Path(tempfile.mkdtemp(prefix=f"{kind}-w{workers}-", dir=tmp_root)) / "out"
    cmd = [sys.executable, __file__, "--_child", kind, str(src), str(out), str(size), str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], sum(_rss_kib(p) for p in _descendants(proc.pid)))
            done.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed ({proc.returncode}):\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_tree_rss_mib"] = peak[0] / 1024
    return result


def doubled_source(src: Path, dst: Path) -> Path:
    """A 2x copy of a class-folder tree made of symlinks: every file linked as ``x`` and ``copy-x``.

    Metadata CSVs are left out (their names would not match the copies).
    """
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.parent == src:
            continue
        rel = path.relative_to(src)
        for name in (rel.name, f"copy-{rel.name}"):
            target = dst / rel.parent / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path.resolve())
    return dst


def _row(results: list[dict]) -> dict:
    walls = [r["wall"] for r in results]
    best = min(results, key=lambda r: r["wall"])
    return {
        "images": best["images"],
        "best": min(walls),
        "median": statistics.median(walls),
        "ips": best["images"] / min(walls),
        "cpu": best["cpu"],
        "peak": max(r["peak_tree_rss_mib"] for r in results),
        "maxrss": max(max(r["maxrss_self_mib"], r["maxrss_child_mib"]) for r in results),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-growth", action="store_true", help="skip the 2x memory-growth check")
    parser.add_argument("--tmp", type=Path, default=None, help="folder for the outputs (default: system temp)")
    args = parser.parse_args()

    from PIL import __version__ as pillow_version
    from rich.console import Console
    from rich.table import Table

    console = Console()
    command = "python bench/prepare_bench.py " + " ".join(sys.argv[1:])
    env = (f"{dt.date.today().isoformat()}, nproc={os.cpu_count()}, {platform.machine()}, "
           f"Python {platform.python_version()}, Pillow {pillow_version}, loadavg at start "
           f"{os.getloadavg()[0]:.2f}")
    console.print(f"[bold]prepare benchmark[/]: {args.src} -> {args.size} px, {args.repeats} repeats", highlight=False)
    console.print(f"{env}\n$ {command}", highlight=False, soft_wrap=True)

    tmp_root = Path(tempfile.mkdtemp(prefix="prepare-bench-", dir=args.tmp))
    rows: dict[str, dict] = {}
    try:
        jobs = [("reference", 1)] + [("prepare", w) for w in args.workers]
        for kind, workers in jobs:
            label = f"prepare --workers {workers}"
            if kind == "reference":
                label = "reference (open + LANCZOS + save, 1 core)"
            results = []
            for _ in range(args.repeats):
                results.append(measure(kind, args.src, args.size, workers, tmp_root))
            rows[label] = _row(results)
            console.print(f"  {label}: best {rows[label]['best']:.2f} s", highlight=False)
        growth = None
        if not args.no_growth:
            w = max(args.workers)
            double = doubled_source(args.src, tmp_root / "double-src")
            one = _row([measure("prepare", args.src, args.size, w, tmp_root) for _ in range(args.repeats)])
            two = _row([measure("prepare", double, args.size, w, tmp_root) for _ in range(args.repeats)])
            growth = (w, one, two)
    finally:
        # Removing thousands of files is slow on some disks: done once, after all timings.
        shutil.rmtree(tmp_root, ignore_errors=True)

    ref = next(iter(rows.values()))
    table = Table(title=f"prepare {args.src.name} -> {args.size} px ({ref['images']} images)", title_justify="left")
    for col in ("job", "wall best (s)", "wall median (s)", "images/s", "CPU (s)", "peak RSS, tree (MiB)",
                "vs reference"):
        table.add_column(col, justify="left" if col == "job" else "right")
    md = ["| job | wall best (s) | wall median (s) | images/s | CPU (s) | peak RSS, tree (MiB) | vs reference |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        cells = [f"{r['best']:.2f}", f"{r['median']:.2f}", f"{r['ips']:.0f}", f"{r['cpu']:.2f}", f"{r['peak']:.0f}",
                 f"{ref['best'] / r['best']:.2f}x"]
        table.add_row(label, *cells)
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    console.print(table)
    if growth is not None:
        w, one, two = growth
        gt = Table(title=f"memory growth (prepare --workers {w})", title_justify="left")
        for col in ("set", "images", "wall best (s)", "peak RSS, tree (MiB)", "max RSS one process (MiB)"):
            gt.add_column(col, justify="left" if col == "set" else "right")
        md += ["", "| set | images | wall best (s) | peak RSS, tree (MiB) | max RSS one process (MiB) |",
               "|---|---:|---:|---:|---:|"]
        for name, r in (("1x", one), ("2x (symlinked copies)", two)):
            cells = [str(r["images"]), f"{r['best']:.2f}", f"{r['peak']:.0f}", f"{r['maxrss']:.0f}"]
            gt.add_row(name, *cells)
            md.append(f"| {name} | " + " | ".join(cells) + " |")
        console.print(gt)
        console.print(f"peak RSS 2x / 1x: {two['peak'] / one['peak']:.2f}", highlight=False)
        md.append(f"\npeak RSS 2x / 1x: {two['peak'] / one['peak']:.2f}")
    console.print("\nmarkdown:\n" + "\n".join([env, f"`{command}`", ""] + md), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
