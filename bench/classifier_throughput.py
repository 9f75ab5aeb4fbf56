"""Classifier training images/s: covidxray's loop against the plain loop a user would otherwise write.

Usage (from the repository root)::

    python bench/classifier_throughput.py [--cases resnet18@224 smallcnn@64] [--batch 64] [--epochs 1]
        [--device auto|cpu|cuda] [--data FOLDER ... | --prepare-from SRC] [--workers N]
        [--peer .devdata/peer/imagenet_main.py] [--json OUT.json]
    python bench/classifier_throughput.py --quick --device cpu          # a smoke test on phantoms

For each case (a registered classifier at an input side), on the same prepared training images, in
one process:

* **ours** - ``covidxray.train.loop.Trainer`` with the model's *default* configuration (only the data,
  the batch, the device set; evaluation and checkpoints off, as the plain loop has neither): the
  uint8 split on the device, on-device augmentation (small affine + brightness/contrast), the
  default precision (bf16 on CUDA and on CPUs with native bf16) and channels-last, CUDA graphs on a GPU;
  ``fit()`` for ``--epochs`` epochs timed from the end of its first step to the end of its last
  (``bench/_bench.py::timed_fit``).
* **plain** - what a user writes without the tool: ``torchvision.datasets.ImageFolder`` over the same
  PNG files (symlinks), ``Grayscale(1)`` + ``RandomAffine(10, translate 0.1, scale 0.9-1.1)`` +
  ``ColorJitter(brightness 0.1, contrast 0.1)`` + ``ToTensor`` + ``Normalize(0.5, 0.5)`` (the same kind
  of augmentation), a ``DataLoader`` (shuffle, ``drop_last``, ``--workers`` default = CPU cores,
  ``pin_memory`` and persistent workers on CUDA), the **same network** (the registry's 1-channel model,
  same initial weights), ``AdamW`` with the same learning rate and weight decay, the same batch, fp32,
  eager, contiguous; the same timing window (first step end to last step end, CUDA synchronised there).
* **peer** (``--peer PATH`` to pytorch/examples ``imagenet/main.py``, fetched for the measurement and
  never committed; resnet18 at 224 px only): run as a subprocess on an ``ImageFolder`` tree of the same
  train (and val) images with ``-a resnet18 -b BATCH --epochs 1 -p 1 -j WORKERS``; its per-batch
  ``Epoch: [0][i/n]`` lines are timestamped as they arrive and its rate is taken from the first to the
  last (its start-up and its validation excluded). It reads the PNGs as RGB (3 channels, its normal use),
  with its own RandomResizedCrop + flip augmentation and SGD.

``x plain`` = ours / plain. Targets (issue 8): >= 1.2x on a 2-core CPU, >= 3x on one H100/H200.
The summary table comes last; ``--json OUT`` holds every number and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

if str(Path(__file__).resolve().parent) not in sys.path:  # bench/, also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench as gb  # noqa: E402  (it puts the repository root on sys.path)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HUGE = gb.HUGE
PEER_LINE = re.compile(r"^Epoch: \[(\d+)\]\[\s*(\d+)/\s*(\d+)\]")


def _case(text: str) -> tuple[str, int]:
    name, _, size = text.partition("@")
    if not size.isdigit():
        raise argparse.ArgumentTypeError(f"a case is MODEL@SIZE (e.g. resnet18@224), got {text!r}")
    return name, int(size)


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


def measure_ours(model: str, size: int, data: gb.DataInfo, args, device: torch.device, tmp: Path) -> dict[str, Any]:
    from covidxray.config import resolve_config
    from covidxray.train.loop import Trainer

    row: dict[str, Any] = {"trainer": "ours", "model": model, "size": size, "data": data.kind}
    run_dir = Path(tempfile.mkdtemp(prefix=f"ours-{model}-", dir=tmp))
    trainer = None
    try:
        cfg = resolve_config(model, flags={"data": {"path": str(data.path), "image_size": size},
                                           "train": {"batch_size": args.batch, "device": str(device),
                                                     "checkpoint_every": HUGE, "snapshot_every": HUGE,
                                                     "epochs": args.epochs}},
                             sets=["eval.every=0", "eval.patience=0", *args.set])
        trainer = Trainer(cfg, run_dir)
        row.update(batch=trainer.batch_size, amp=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype
                   else "off", channels_last=trainer.memory_format == torch.channels_last,
                   n_train=len(trainer.data), batches_per_epoch=trainer.batches_per_epoch,
                   lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        fit = gb.timed_fit(trainer, args.epochs, device)
        row.update(images_per_s=fit["images_per_s"], window_s=fit["window_s"], window_images=fit["window_images"],
                   steps=fit["steps"], cuda_graphs=trainer.cuda_graphs, finished=fit["finished"])
    except Exception as exc:
        row["error"] = gb.short(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        del trainer
        gb.free(device)
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------
# The plain loop
# --------------------------------------------------------------------------------------------


def measure_plain(model: str, size: int, data: gb.DataInfo, args, device: torch.device, tmp: Path,
                  lr: float, weight_decay: float) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from covidxray.config import resolve_config
    from covidxray.models import DataSpec, get_model

    row: dict[str, Any] = {"trainer": "plain", "model": model, "size": size, "data": data.kind,
                           "workers": args.workers, "amp": "off", "channels_last": False}
    work = Path(tempfile.mkdtemp(prefix=f"plain-{model}-", dir=tmp))
    loader = None
    try:
        n_img = gb.image_folder_tree(data.path, "train", work / "train")
        tf = [T.Grayscale(1)]
        if data.size != size:
            tf.append(T.Resize((size, size), antialias=True))
        tf += [T.RandomAffine(10, translate=(0.1, 0.1), scale=(0.9, 1.1)), T.ColorJitter(brightness=0.1, contrast=0.1),
               T.ToTensor(), T.Normalize([0.5], [0.5])]
        ds = datasets.ImageFolder(str(work / "train"), T.Compose(tf))
        cuda = device.type == "cuda"
        loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
                            pin_memory=cuda, persistent_workers=args.workers > 0)
        torch.manual_seed(0)
        net = get_model(model).build(resolve_config(model), DataSpec(len(ds.classes), size, 1, tuple(ds.classes)))
        net = net["net"].to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        net.train()
        stamps: list[tuple[float, int]] = []
        seen = 0
        total_steps = args.epochs * len(loader)
        for _ in range(args.epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += x.shape[0]
                if len(stamps) in (0, total_steps - 1):
                    gb.sync(device)
                stamps.append((time.perf_counter(), seen))
        if len(stamps) < 2:
            raise RuntimeError("the plain loop ran fewer than 2 steps: use more images or a smaller --batch")
        window, images = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
        row.update(n_train=n_img, batch=args.batch, images_per_s=gb.rate(images, window), window_s=window,
                   window_images=images, steps=len(stamps))
    except Exception as exc:
        row["error"] = gb.short(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        del loader  # ends the persistent workers
        gb.free(device)
        shutil.rmtree(work, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------
# The peer: pytorch/examples imagenet/main.py
# --------------------------------------------------------------------------------------------


def measure_peer(script: Path, data: gb.DataInfo, args, device: torch.device, tmp: Path,
                 log: Callable[[str], None]) -> dict[str, Any]:
    row: dict[str, Any] = {"trainer": "peer", "model": "resnet18", "size": 224, "data": data.kind,
                           "script": str(script), "workers": args.workers, "batch": args.batch}
    work = Path(tempfile.mkdtemp(prefix="peer-", dir=tmp))
    try:
        if not script.is_file():
            raise FileNotFoundError(f"peer script {script} not found")
        n_img = gb.image_folder_tree(data.path, "train", work / "data" / "train")
        gb.image_folder_tree(data.path, "val", work / "data" / "val")
        cmd = [sys.executable, "-u", str(script), str(work / "data"), "-a", "resnet18", "-b", str(args.batch),
               "--epochs", "1", "-p", "1", "-j", str(args.workers), "--seed", "0"]
        cmd += ["--gpu", "0"] if device.type == "cuda" else ["--no-accel"]
        row["command"] = shlex.join(cmd)
        log(f"peer: {row['command']}")
        rc, found, other, t_start, _ = gb.run_timestamped(cmd, work, args.peer_timeout, PEER_LINE)
        lines = [(t, i, n) for t, (epoch, i, n) in found if epoch == 0]  # epoch 0's training batches
        if rc != 0 or len(lines) < 2:
            raise RuntimeError(f"peer exited with {rc} after {len(lines)} batch lines: {' | '.join(other[-3:])[-300:]}")
        n_batches = lines[0][2]

        def bs(i: int) -> int:  # its DataLoader keeps the last, smaller batch
            return args.batch if i < n_batches else n_img - (n_batches - 1) * args.batch

        window = lines[-1][0] - lines[0][0]
        images = sum(bs(i) for _, i, _ in lines[1:])
        row.update(n_train=n_img, images_per_s=gb.rate(images, window), window_s=window, window_images=images,
                   startup_s=lines[0][0] - t_start, returncode=rc)
    except Exception as exc:
        row["error"] = gb.short(exc, 400)
        traceback.print_exc(file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def print_table(console, res: dict[str, Any]) -> None:
    from rich.table import Table

    env = res["env"]
    t = Table(title=f"classifier training img/s - {env.get('device_name', '?')} ({env.get('device', '?')}), "
                    f"batch {res['args']['batch']}, {res['args']['epochs']} epoch(s), torch {env.get('torch', '?')}",
              title_justify="left")
    for col in ("model", "px", "data", "trainer", "img/s", "x plain", "amp", "CL", "graphs", "note"):
        t.add_column(col, justify="left" if col in ("model", "data", "trainer", "note", "amp", "graphs") else "right")
    for case in res["cases"]:
        plain = case.get("plain", {}).get("images_per_s")
        for key in ("ours", "plain", "peer"):
            r = case.get(key)
            if not r:
                continue
            ratio = r.get("images_per_s") / plain if r.get("images_per_s") and plain else None
            note = r.get("error", "")[:60] or (f"{r.get('workers')} loader workers" if key != "ours" else
                                                 f"{r.get('n_train', '?')} images")
            t.add_row(case["model"], str(case["size"]), r.get("data", ""), key,
                      "[red]error[/]" if r.get("error") else gb.fmt(r.get("images_per_s"), "{:,.1f}"),
                      gb.fmt(ratio, "{:.2f}x"), str(r.get("amp", "")), "yes" if r.get("channels_last") else "no",
                      str(r.get("cuda_graphs", "")), note)
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", type=_case, help="MODEL@SIZE (default: resnet18@224 smallcnn@64)")
    ap.add_argument("--batch", type=int, default=64, help="images per step, both sides (default 64)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs timed on each side (default 1)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="plain loop / peer DataLoader workers "
                    "(default: the CPU cores)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides for ours (e.g. train.amp=off)")
    ap.add_argument("--quick", action="store_true", help="smoke test: smallcnn@64 on 16 phantoms per class, batch 16")
    g = ap.add_argument_group("data (a prepared folder per size; else --prepare-from SRC; else demo phantoms)")
    g.add_argument("--data", nargs="+", default=[], help="prepared folders (each one's size is read from prepare.json)")
    g.add_argument("--prepare-from", metavar="SRC", help="prepare each size from this raw data set (covidxray prepare)")
    g.add_argument("--per-class", type=int, default=200, help="phantoms per class when generating (default 200)")
    g.add_argument("--phantom-dir", help="keep/reuse generated or prepared data here (default: a temp dir)")
    g = ap.add_argument_group("peer: pytorch/examples imagenet/main.py (resnet18@224 only)")
    g.add_argument("--peer", help="path to the example's imagenet/main.py")
    g.add_argument("--peer-timeout", type=float, default=1800.0, help="kill the peer after this many seconds")
    ap.add_argument("--json", help="write every number and the environment to this JSON file")
    ap.add_argument("--tmp-dir", help="parent of the temporary folders")
    args = ap.parse_args(argv)
    if args.quick:
        args.cases = args.cases or [("smallcnn", 64)]
        args.per_class, args.batch = min(args.per_class, 16), min(args.batch, 16)
    args.cases = args.cases or [("resnet18", 224), ("smallcnn", 64)]
    if args.batch < 1 or args.epochs < 1 or args.workers < 0:
        ap.error("--batch and --epochs must be >= 1, --workers >= 0")

    from rich.console import Console

    from covidxray.errors import CovidXrayError
    from covidxray.models.registry import get_model
    from covidxray.utils import resolve_device

    console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 130)), highlight=False)
    log = lambda msg: console.print(msg, markup=False)  # noqa: E731
    try:
        device = resolve_device(args.device)
        for name, _ in args.cases:
            if get_model(name).family != "classifier":
                raise CovidXrayError(f"{name} is not a classifier (family {get_model(name).family})")
    except CovidXrayError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    # DataResolver's interface: one explicit folder per size, else --prepare-from, else phantoms
    ns = argparse.Namespace(data=None, data64=None, data128=None, data256=None, data_root=None,
                            prepare_from=args.prepare_from, phantom_dir=args.phantom_dir, per_class=args.per_class)
    tmp = Path(tempfile.mkdtemp(prefix="clf-throughput-", dir=args.tmp_dir))
    data = gb.DataResolver(ns, tmp, log)
    for folder in args.data:
        data.explicit[data._size_of(Path(folder))] = Path(folder)
    res: dict[str, Any] = {"args": {**vars(args), "cases": [f"{m}@{s}" for m, s in args.cases]}, "cases": []}
    t0 = time.perf_counter()
    rc = 0
    try:
        for _, size in args.cases:  # all data first (phantoms are drawn in forked workers)
            data.get(size)
        res["env"] = gb.environment(device)
        log(f"classifier_throughput: {res['env']['device_name']} ({device}), torch {res['env']['torch']}, "
            f"{res['env']['cpu_count']} CPUs, batch {args.batch}, {args.epochs} epoch(s), {args.workers} workers")
        for name, size in args.cases:
            d = data.get(size)
            case: dict[str, Any] = {"model": name, "size": size}
            res["cases"].append(case)
            if d.error:
                case["ours"] = {"error": f"no data: {d.error}"}
                continue
            case["ours"] = measure_ours(name, size, d, args, device, tmp)
            log(f"ours {name}@{size}: {gb.fmt(case['ours'].get('images_per_s'), '{:,.1f}')} img/s "
                f"{case['ours'].get('error', '')}")
            lr = case["ours"].get("lr") or 1e-3
            wd = case["ours"].get("weight_decay") or 0.0
            case["plain"] = measure_plain(name, size, d, args, device, tmp, lr, wd)
            log(f"plain {name}@{size}: {gb.fmt(case['plain'].get('images_per_s'), '{:,.1f}')} img/s "
                f"{case['plain'].get('error', '')}")
            if args.peer and name == "resnet18" and size == 224:
                case["peer"] = measure_peer(Path(args.peer).resolve(), d, args, device, tmp, log)
                log(f"peer imagenet/main.py: {gb.fmt(case['peer'].get('images_per_s'), '{:,.1f}')} img/s "
                    f"{case['peer'].get('error', '')}")
            if case["ours"].get("images_per_s") and case["plain"].get("images_per_s"):
                case["ours_over_plain"] = case["ours"]["images_per_s"] / case["plain"]["images_per_s"]
    except KeyboardInterrupt:
        log("interrupted: printing what was measured")
        rc = 130
    finally:
        res["data"] = {str(s): {"path": str(i.path) if i.path else None, "kind": i.kind, "n_train": i.n_train,
                                "note": i.note, "error": i.error} for s, i in data.cache.items()}
        res["total_s"] = time.perf_counter() - t0
        res.setdefault("env", {"device": str(device)})
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        if not args.phantom_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    console.print()
    print_table(console, res)
    console.print(f"total {gb.hms(res['total_s'])}" + (f"; JSON {args.json}" if args.json else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
