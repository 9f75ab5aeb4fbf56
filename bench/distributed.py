"""The cost of torchrun/DDP: training images/s of one process against N processes on the same hardware.

    # CPU (2 cores): 1 process x 2 threads, global batch B, against torchrun 2 processes x 1 thread, B/2 each
    python bench/distributed.py --device cpu --data .devdata/cxr64 --model smallcnn --procs 2 --epochs 3
    # one machine with N GPUs: 1 GPU (plain path) against torchrun N GPUs (per-GPU images/s, scaling efficiency)
    python bench/distributed.py --device cuda --data .devdata/cxr128 --model cgan --procs 8 --epochs 3
    # one GPU: the DDP path (torchrun, one process) against the plain path on the same GPU
    python bench/distributed.py --device cuda --data .devdata/cxr128 --model cgan --procs 1 --epochs 3

Both arms run the real command (`python -m covidxray train ...` and `python -m torch.distributed.run
--nproc_per_node N -m covidxray train ...`) on the same prepared data and config, alternating, ``--rounds``
times. The rate of an arm is the median ``images_per_s`` of its run's ``stats.jsonl`` interval lines after the
first (which holds the warm-up), i.e. training steps only, without start-up, data loading or checkpoints.

On the CPU both arms get the same cores (``--threads`` in all: the single process uses all of them, each of the
N processes ``threads / N``), so the ratio is the overhead of the distributed path (gradient all-reduce, the
per-step stop agreement, smaller per-process batches). On N GPUs the ratio per GPU is the scaling efficiency.
``--procs 1`` times the DDP path itself against the plain one (``torchrun --nproc_per_node 1`` wraps the networks
in DDP on one process): on one GPU, the 1-GPU overhead the distributed issue asks for. Without ``--data`` the
built-in phantoms are prepared first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(run: Path) -> tuple[float, int]:
    recs = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in recs if r.get("kind") == "interval" and "images_per_s" in r][1:]
    if not rates:
        raise SystemExit(f"{run}: too few logged intervals to time (raise --epochs or lower --log-every)")
    return statistics.median(rates), len(rates)


def run_arm(procs: int, args, out: Path, threads: int, launcher: bool) -> dict:
    train = ["-m", "covidxray", "train", "--model", args.model, "--data", str(args.data), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch_size), "--device", args.device, "--out", str(out),
             "--set", f"train.num_threads={threads}", "--set", f"train.log_every={args.log_every}",
             "--set", "train.checkpoint_every=1000", "--set", "train.snapshot_every=1000",
             *sum((["--set", s] for s in args.set), [])]
    if launcher:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(_free_port()), *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    run = max(out.iterdir())
    rate, n = _rate(run)
    return {"procs": procs, "torchrun": launcher, "images_per_s": rate, "intervals": n, "wall_s": round(time.perf_counter() - t0, 1),
            "run": str(run)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="prepared folder (default: phantoms prepared in a temporary folder)")
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--procs", type=int, default=2, help="processes of the torchrun arm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU: threads of each arm in all")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32, help="the global batch of both arms")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for both arms")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, help="keep the runs in this folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp) if args.work is None else args.work
        if args.data is None:
            sys.path.insert(0, str(ROOT))
            from covidxray.data.prepare import prepare_demo

            args.data = tmp / "phantoms"
            prepare_demo(args.data, per_class=32, size=64, seed=0, workers=1, progress=False)
        cpu = args.device == "cpu"
        rounds: dict[str, list] = {"plain": [], "torchrun": []}
        for k in range(args.rounds):
            for arm in (("plain", "torchrun") if k % 2 == 0 else ("torchrun", "plain")):
                procs = 1 if arm == "plain" else args.procs
                threads = max(1, args.threads // procs) if cpu else 1
                res = run_arm(procs, args, tmp / f"r{k}-{arm}", threads, arm == "torchrun")
                rounds[arm].append(res)
                print(f"round {k + 1}: {arm} ({procs} process{'es' if procs > 1 else ''}): "
                      f"{res['images_per_s']:.1f} img/s ({res['intervals']} intervals, {res['wall_s']} s wall)",
                      flush=True)
    one = max(r["images_per_s"] for r in rounds["plain"])
    many = max(r["images_per_s"] for r in rounds["torchrun"])
    summary = {"model": args.model, "device": args.device, "batch_size": args.batch_size, "procs": args.procs,
               "threads": args.threads if cpu else None, "best_1": one, "best_n": many,
               "ratio": many / one, "rounds": rounds}
    if cpu:
        print(f"\n{args.model}, global batch {args.batch_size}, {args.threads} CPU threads in all: "
              f"1 process {one:.1f} img/s, torchrun {args.procs} processes {many:.1f} img/s: "
              f"ratio {many / one:.3f} (overhead {100 * (1 - many / one):+.1f} %), best of {args.rounds} rounds")
    elif args.procs == 1:
        print(f"\n{args.model}, global batch {args.batch_size}: 1 GPU plain {one:.1f} img/s, torchrun (DDP) on the "
              f"same GPU {many:.1f} img/s: DDP-path overhead {100 * (1 - many / one):+.1f} %, best of {args.rounds} rounds")
    else:
        print(f"\n{args.model}, global batch {args.batch_size}: 1 GPU {one:.1f} img/s, {args.procs} GPUs "
              f"{many:.1f} img/s = {many / args.procs:.1f} per GPU; scaling efficiency "
              f"{many / (one * args.procs):.3f}, best of {args.rounds} rounds")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
