"""rawgan vs the PyTorch DCGAN example: pytorch/examples ``dcgan/main.py`` as a subprocess, same images.

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=. python bench/gan_vs_example.py --peer .devdata/peer/main.py [--peer-size 64]
        [--peer-batch 128] [--peer-niter 2] [--device auto|cpu|cuda]
        [--data-root DIR | --data64 DIR ... | --prepare-from SRC] [--json OUT.json]

The example is not vendored: extract it with ``git --git-dir=<mirror> show HEAD:dcgan/main.py >
.devdata/peer/main.py``. A missing script is reported as the peer's error row, not a crash.

Section **peer**: the example runs as a subprocess on an ImageFolder tree of symlinks to the
prepared *train* images only (masks excluded), ``--peer-niter`` epochs; its per-batch lines
``[e/n][i/len] Loss_D ...`` are timestamped as they arrive and its rate is measured from the
first batch line to the last (start-up excluded, epoch ends included). Ours: rawgan at the same
size and batch on the same images, epoch rate as in ``bench/gan_throughput.py`` (``fit()`` from
the end of its first step to the end of its last; ``bench/_bench.py``). The example reads the
PNGs as RGB (nc=3): its normal use.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as gb  # noqa: E402  (it puts the repository root on sys.path)
import torch  # noqa: E402

PEER_LINE = re.compile(r"^\[(\d+)/(\d+)\]\[(\d+)/(\d+)\]\s*Loss_D")


# --------------------------------------------------------------------------------------------
# Peer: pytorch/examples dcgan/main.py as a subprocess
# --------------------------------------------------------------------------------------------


def _peer_device_flag(script: Path, device: torch.device) -> list[str]:
    if device.type != "cuda":
        return []
    text = script.read_text(encoding="utf-8", errors="replace")
    for flag in ("--accel", "--cuda"):        # current example: --accel; older versions: --cuda
        if f"'{flag}'" in text or f'"{flag}"' in text:
            return [flag]
    raise RuntimeError(f"{script} has neither --accel nor --cuda; cannot put it on the GPU")


def run_peer(script: Path, data: gb.DataInfo, size: int, batch: int, niter: int, workers: int, device: torch.device,
             tmp: Path, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"script": str(script), "size": size, "batch": batch, "niter": niter, "workers": workers,
                           "data": data.kind}
    work = Path(tempfile.mkdtemp(prefix="peer-", dir=tmp))
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        if not script.is_file():
            raise FileNotFoundError(f"peer script {script} not found")
        n_img = gb.image_folder_tree(data.path, "train", work / "data")
        res["n_images"] = n_img
        cmd = [sys.executable, "-u", str(script), "--dataset", "folder", "--dataroot", str(work / "data"),
               "--imageSize", str(size), "--batchSize", str(batch), "--niter", str(niter),
               "--workers", str(workers), "--outf", str(work / "out"), "--manualSeed", "0",
               *_peer_device_flag(script, device)]
        res["command"] = shlex.join(cmd)
        log(f"peer: {res['command']}")
        rc, found, other, t_start, t_exit = gb.run_timestamped(cmd, work, timeout, PEER_LINE)
        lines = [(t, *groups) for t, groups in found]   # (t, epoch, niter, i, len)
        res.update(returncode=rc, total_s=t_exit - t_start)
        if rc != 0 or len(lines) < 2:
            tail = " | ".join(other[-3:])
            raise RuntimeError(f"peer exited with {rc} after {len(lines)} batch lines"
                               f"{' (timeout)' if t_exit - t_start >= timeout else ''}: {tail[-300:]}")

        def bs(i: int, n_batches: int) -> int:  # DataLoader keeps the last, smaller batch
            return batch if i < n_batches - 1 else n_img - (n_batches - 1) * batch

        res["startup_s"] = lines[0][0] - t_start
        res["batches_per_epoch"] = lines[0][4]
        window = lines[-1][0] - lines[0][0]
        images = sum(bs(ln[3], ln[4]) for ln in lines[1:])
        res.update(window_s=window, window_images=images, images_per_s=gb.rate(images, window),
                   s_per_epoch=window * n_img / images if images else None)
        # Steady rate (niter >= 2): from the last line of epoch 0, i.e. epochs 1.. with their epoch starts.
        last0 = max(k for k, ln in enumerate(lines) if ln[1] == 0)
        if last0 < len(lines) - 1:
            w2 = lines[-1][0] - lines[last0][0]
            i2 = sum(bs(ln[3], ln[4]) for ln in lines[last0 + 1:])
            res.update(steady_images_per_s=gb.rate(i2, w2))
    except Exception as exc:
        res["error"] = gb.short(exc, 400)
        if not isinstance(exc, FileNotFoundError):  # a missing script needs no traceback: the row says it
            traceback.print_exc(file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
# Section and output
# --------------------------------------------------------------------------------------------


def _section_peer(b: gb.Bench) -> None:
    res, args, device, tmp, log = b.res, b.args, b.device, b.tmp, b.log
    d = b.data.get(args.peer_size)
    peer = run_peer(Path(args.peer).resolve(), d, args.peer_size, args.peer_batch, args.peer_niter,
                    args.peer_workers, device, tmp, args.peer_timeout, log)
    res["peer"] = peer
    log("peer: " + (f"ERROR {peer['error']}" if peer.get("error") else
                    f"{gb.fmt(peer['images_per_s'])} img/s ({peer['window_images']} images in "
                    f"{peer['window_s']:.2f} s; start-up {peer['startup_s']:.1f} s)"))
    ours = gb.measure_model("rawgan", args.peer_size, d, args.peer_batch, device, args, tmp, args.peer_niter)
    res["peer_ours"] = ours
    log("ours rawgan: " + (f"ERROR {ours['error']}" if ours.get("error") else
                           f"epoch {gb.fmt(ours['epoch_images_per_s'])} img/s, step {gb.fmt(ours['step_images_per_s'])} img/s"))
    if peer.get("images_per_s") and ours.get("epoch_images_per_s"):
        res["peer_ratio"] = ours["epoch_images_per_s"] / peer["images_per_s"]


def _peer_table(console, res) -> None:
    from rich.table import Table

    p, o, sec = res["peer"], res.get("peer_ours", {}), res["sections_s"]
    t = Table(title=f"vs pytorch/examples dcgan - {p['size']} px, batch {p['batch']}, {p['niter']} epoch(s), "
                    f"{p.get('n_images', '?')} {p.get('data', '')} images, {gb.hms(sec.get('peer'))}",
              title_justify="left")
    for col in ("trainer", "epoch img/s", "s/epoch", "note"):
        t.add_column(col, justify="left" if col in ("trainer", "note") else "right")
    if p.get("error"):
        t.add_row("peer", "[red]error[/]", "", p["error"][:60])
    else:
        t.add_row("peer dcgan/main.py", gb.fmt(p.get("images_per_s")), gb.fmt(p.get("s_per_epoch"), "{:.2f}"),
                  f"nc=3, {p['workers']} loader workers; steady {gb.fmt(p.get('steady_images_per_s'))}")
    if o.get("error"):
        t.add_row("ours rawgan", "[red]error[/]", "", o["error"][:60])
    else:
        n = o.get("n_train") or 0
        ep = o.get("epoch_images_per_s")
        t.add_row("ours rawgan", gb.fmt(ep), gb.fmt(n / ep if ep and n else None, "{:.2f}"),
                  f"nc=1, amp {o.get('amp', '?')}, step {gb.fmt(o.get('step_images_per_s'))}"
                  + (f"; --set {' '.join(res['args']['set'])}" if res["args"].get("set") else ""))
    t.add_row("[bold]ours / peer[/]", f"[bold]{gb.fmt(res.get('peer_ratio'), '{:.2f}x')}[/]", "", "")
    console.print(t)


def print_tables(console, res: dict[str, Any], args) -> None:
    if res.get("peer"):
        _peer_table(console, res)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    ap = gb.parser(__doc__)
    g = ap.add_argument_group("peer: pytorch/examples dcgan/main.py")
    g.add_argument("--peer", required=True, help="path to the example's dcgan/main.py")
    g.add_argument("--peer-size", type=int, default=64, choices=(64, 128, 256))
    g.add_argument("--peer-batch", type=int, help="batch of both sides (default: --batch)")
    g.add_argument("--peer-niter", type=int, help="epochs of both sides (default 2; --quick: 1)")
    g.add_argument("--peer-workers", type=int, default=2, help="the example's --workers (its default: 2)")
    g.add_argument("--peer-timeout", type=float, default=600.0, help="kill the peer after this many seconds")
    return gb.parse(ap, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return gb.run_bench(
        "gan_vs_example", args, gans=["rawgan"], sizes=[args.peer_size], sections=[("peer", _section_peer)],
        header=f"{args.peer_size} px, batch {args.peer_batch}, {args.peer_niter} epoch(s), "
               f"ours: steps {args.steps} (+{args.warmup} warm-up), peer {args.peer}",
        tables=print_tables)


if __name__ == "__main__":
    sys.exit(main())
