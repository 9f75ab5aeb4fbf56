"""GAN training throughput: every registered GAN vs a plain DCGAN step and vs the PyTorch DCGAN example.

Usage (from the repository root; the package need not be installed)::

    PYTHONPATH=. python bench/gan_throughput.py [--models rawgan cgan] [--sizes 64 128 256]
        [--device auto|cpu|cuda] [--batch 128] [--data-root DIR | --data64 DIR ... | --prepare-from SRC]
        [--peer .devdata/peer/main.py] [--also-plain-bf16] [--run-schedule MODEL] [--json OUT.json]
    python bench/gan_throughput.py --quick --device cpu            # CPU smoke test

Data per size: ``--data64/--data128/--data256`` or ``--data FOLDER`` (size read from its
prepare.json), else ``--data-root DIR`` holding ``cxr64``/``cxr128``/``cxr256``, else
``--prepare-from SRC`` (``covidxray prepare`` of a raw data set into the temp dir), else demo
phantoms (``prepare_demo``, ``--per-class 400``, seed 0). The log names the data of each size.

Sections (each prints its elapsed time; the summary tables come last):

* **models** - for each GAN (``family == "gan"``) and size, with the model's *default* config
  (only ``data.path``, ``data.image_size``, ``train.batch_size``, ``train.device`` set, plus
  ``train.snapshot_every``/``train.checkpoint_every`` huge; ``--set key=value`` comes on top):

  - *step*: ``--warmup`` then ``--steps`` timed calls of ``GANTrainer.train_step`` on one fixed
    batch already on the device (CUDA synchronised around the timed loop);
  - *epoch*: the same trainer then runs ``fit()`` for ``--epochs`` more epochs (data order,
    indexing, logging, epoch ends included). Timed from the end of the first step to the end
    of the last step with the ``on_step`` callback (CUDA synchronised at both), so the
    run-start files and the last epoch's snapshot/checkpoint are outside the window;
  - *ref*: a plain DCGAN step of the same size in the same process (below): ``x ref`` =
    model step rate / reference step rate.

* **peer** (``--peer PATH`` to pytorch/examples ``dcgan/main.py``): the example runs as a
  subprocess on an ImageFolder tree of symlinks to the prepared *train* images only (masks
  excluded), ``--niter`` epochs; its per-batch lines ``[e/n][i/len] Loss_D ...`` are
  timestamped as they arrive and its rate is measured from the first batch line to the last
  (start-up excluded, epoch ends included). Ours: rawgan at the same size and batch on the same
  images, epoch rate as above. The example reads the PNGs as RGB (nc=3): its normal use.

* **schedule** - projected wall time of ``--schedule-images`` images at each model's 128 px
  epoch rate; ``--run-schedule MODEL`` really trains that many images (``fit()``, default config,
  snapshots every ~epochs/10) and reports the measured wall time.

Reference DCGAN (written here, following pytorch/examples ``dcgan/main.py``): G = ConvTranspose2d
stack (nz=100 -> 4x4, then stride-2 stages) with BatchNorm+ReLU and a Tanh output; D = Conv2d stack
with LeakyReLU(0.2) (+BatchNorm after the first layer), a 4x4 conv to one value and Sigmoid;
BCELoss; Adam(2e-4, betas (0.5, 0.999)); nc=1; fp32, eager, contiguous; cudnn.benchmark on (as the
example sets it). The example's step order: D(real) backward, D(fake.detach()) backward, D step,
then D(fake) backward, G step (G runs once per step). Its per-step ``.item()`` logging is left
out. Extension to 128/256 px, following the example's pattern of doubling the width at every
stage away from the image: with n = log2(size) - 2 stages, G widths are ngf * 2**(n-1) ... ngf
(64 px: 8,4,2,1 x ngf as in the example; 128 px: 16..1; 256 px: 32..1) and D widths ndf ... ndf *
2**(n-1). Unlike covidxray's DCGAN, the widths are not capped at 512 (``--ref-max-channels 512``
caps them the same way), so at 128/256 px the reference has wider low-resolution layers.
``--also-plain-bf16`` adds the reference under bf16 autocast + channels_last (BCE in fp32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import re
import shlex
import shutil
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
if str(REPO) not in sys.path:  # fallback when run as `python bench/gan_throughput.py` without PYTHONPATH
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

HUGE = 10**9                       # snapshot/checkpoint interval that never triggers (except at the last epoch)
PEER_LINE = re.compile(r"^\[(\d+)/(\d+)\]\[(\d+)/(\d+)\]\s*Loss_D")
QUICK = {"sizes": [64], "steps": 3, "warmup": 1, "epochs": 1, "per_class": 40, "batch": 32, "peer_niter": 1}
FULL = {"sizes": [64, 128, 256], "steps": 30, "warmup": 5, "epochs": 2, "per_class": 400, "batch": 128,
        "peer_niter": 2}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short(exc: BaseException, n: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:n]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rate(images: float, seconds: float) -> float | None:
    return images / seconds if seconds > 0 and images > 0 else None


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
            info.error = _short(exc)
            self.log(f"data {size} px: ERROR {info.error}")
        self.cache[size] = info
        return info


# --------------------------------------------------------------------------------------------
# Reference: the PyTorch-examples DCGAN, extended to 128/256 px (see the module docstring)
# --------------------------------------------------------------------------------------------


def _ref_widths(size: int, base: int, cap: int | None) -> list[int]:
    n = int(math.log2(size)) - 2                       # stride-2 stages: 64 px -> 4 (as in the example)
    widths = [base * 2 ** (n - 1 - i) for i in range(n)]  # G: ngf*8, *4, *2, *1 at 64 px
    return [min(w, cap) for w in widths] if cap else widths


class RefGenerator(nn.Module):
    def __init__(self, size: int, nz: int = 100, ngf: int = 64, nc: int = 1, cap: int | None = None):
        super().__init__()
        w = _ref_widths(size, ngf, cap)
        layers: list[nn.Module] = [nn.ConvTranspose2d(nz, w[0], 4, 1, 0, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(True)]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(w[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class RefDiscriminator(nn.Module):
    def __init__(self, size: int, ndf: int = 64, nc: int = 1, cap: int | None = None):
        super().__init__()
        w = _ref_widths(size, ndf, cap)[::-1]             # ndf, ndf*2, ... (mirror of G)
        layers: list[nn.Module] = [nn.Conv2d(nc, w[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        for a, b in zip(w[:-1], w[1:]):
            layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(w[-1], 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x).view(-1, 1).squeeze(1)


def _ref_init(m: nn.Module) -> None:
    name = m.__class__.__name__
    if name.find("Conv") != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif name.find("BatchNorm") != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def measure_reference(size: int, batch: int, device: torch.device, args, bf16_cl: bool = False) -> dict[str, Any]:
    """images/s of the plain DCGAN step (fp32 eager contiguous, or bf16 autocast + channels_last)."""
    old_bench = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True             # the example sets it
    try:
        torch.manual_seed(0)
        fmt = torch.channels_last if bf16_cl else torch.contiguous_format
        netG = RefGenerator(size, 100, args.ref_width, 1, args.ref_max_channels).to(device, memory_format=fmt)
        netD = RefDiscriminator(size, args.ref_width, 1, args.ref_max_channels).to(device, memory_format=fmt)
        netG.apply(_ref_init)
        netD.apply(_ref_init)
        criterion = nn.BCELoss()
        optD = torch.optim.Adam(netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        optG = torch.optim.Adam(netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        real = (torch.rand(batch, 1, size, size, device=device) * 2 - 1).contiguous(memory_format=fmt)
        ones = torch.full((batch,), 1.0, device=device)
        zeros = torch.full((batch,), 0.0, device=device)
        use_amp = bf16_cl

        def ac():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

        def step() -> None:
            # (1) D: maximise log D(x) + log(1 - D(G(z))); BCE outside autocast (it is autocast-unsafe)
            netD.zero_grad()
            with ac():
                out = netD(real)
            criterion(out.float(), ones).backward()
            noise = torch.randn(batch, 100, 1, 1, device=device)
            with ac():
                fake = netG(noise)
                out = netD(fake.detach())
            criterion(out.float(), zeros).backward()
            optD.step()
            # (2) G: maximise log D(G(z))
            netG.zero_grad()
            with ac():
                out = netD(fake)
            criterion(out.float(), ones).backward()
            optG.step()

        for _ in range(args.warmup):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        dt_s = time.perf_counter() - t0
        return {"size": size, "batch": batch, "variant": "bf16+channels_last" if bf16_cl else "fp32",
                "step_s": dt_s / args.steps, "images_per_s": _rate(args.steps * batch, dt_s),
                "params_G": sum(p.numel() for p in netG.parameters()),
                "params_D": sum(p.numel() for p in netD.parameters())}
    finally:
        torch.backends.cudnn.benchmark = old_bench
        _free(device)


# --------------------------------------------------------------------------------------------
# Our trainer: step-only rate, then the epoch rate of fit()
# --------------------------------------------------------------------------------------------


def _build_trainer(model: str, size: int, data: DataInfo, batch: int, device: torch.device, run_dir: Path,
                   args, train_flags: dict[str, Any] | None = None):
    from covidxray.config import resolve_config
    from covidxray.train.gan import GANTrainer

    train = {"batch_size": batch, "device": str(device), "snapshot_every": HUGE, "checkpoint_every": HUGE}
    train.update(train_flags or {})
    cfg = resolve_config(model, flags={"data": {"path": str(data.path), "image_size": size}, "train": train},
                         sets=args.set)
    return GANTrainer(cfg, run_dir)


def _timed_fit(trainer, epochs: int, device: torch.device) -> dict[str, Any]:
    """Run ``epochs`` more epochs of fit(); rate from the end of the first step to the end of the last."""
    s = trainer.state
    first = s.step + 1
    trainer.cfg.train.epochs = s.epoch + epochs
    last = s.step + epochs * trainer.batches_per_epoch - s.batch_in_epoch
    stamps: list[tuple[float, int, int]] = []       # (time, images_seen, batch_in_epoch)

    def on_step(tr) -> None:
        if tr.state.step in (first, last):
            _sync(device)
        stamps.append((time.perf_counter(), tr.state.images_seen, tr.state.batch_in_epoch))

    old = trainer.on_step
    trainer.on_step = on_step
    t0 = time.perf_counter()
    try:
        finished = trainer.fit()  # False when stopped early (Ctrl-C, SIGTERM from `timeout`)
    finally:
        trainer.on_step = old
    _sync(device)
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
    return {"images_per_s": _rate(images, window), "window_s": window, "window_images": images,
            "steps": len(stamps), "fit_total_s": t_end - t0, "epoch_end_s": epoch_end_s, "note": note,
            "finished": bool(finished), "images_seen": s.images_seen}


def measure_model(model: str, size: int, data: DataInfo, batch: int, device: torch.device, args, tmp: Path,
                  epochs: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model, "size": size, "batch": batch, "data": data.kind}
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-{size}-", dir=tmp))
    trainer = None
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        trainer = _build_trainer(model, size, data, batch, device, run_dir, args)
        n = trainer.batch_size
        row.update(batch=n, amp=str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
                   channels_last=trainer.memory_format == torch.channels_last, ema=trainer.ema is not None,
                   batches_per_epoch=trainer.batches_per_epoch, n_train=len(trainer.data),
                   params_G=sum(p.numel() for p in trainer.G.parameters()),
                   params_D=sum(p.numel() for p in trainer.D.parameters()))
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(trainer.data), generator=g)[:n].to(trainer.data.images.device)
        real = trainer.data.images[idx].to(trainer.device)
        labels = trainer.data.labels[idx].to(trainer.device)
        for _ in range(args.warmup):
            trainer.train_step(real, labels)
        _sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step(real, labels)
        _sync(trainer.device)
        dt_s = time.perf_counter() - t0
        row["step_images_per_s"] = _rate(args.steps * n, dt_s)
        row["step_s"] = dt_s / args.steps
        gr = trainer.graphs  # whole-step CUDA graphs: replayed, failed (eager fallback), or off
        row["cuda_graphs"] = "off" if gr is None else "failed" if gr.failed else f"{len(gr.graphs)} replayed"
        fit = _timed_fit(trainer, epochs, trainer.device)
        row["epoch_images_per_s"] = fit.pop("images_per_s")
        row.update({f"fit_{k}": v for k, v in fit.items()})
        if row["step_images_per_s"] and row["epoch_images_per_s"]:
            row["epoch_over_step"] = row["epoch_images_per_s"] / row["step_images_per_s"]
    except Exception as exc:
        row["error"] = _short(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        del trainer
        _free(device)
        shutil.rmtree(run_dir, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------------
# Peer: pytorch/examples dcgan/main.py as a subprocess
# --------------------------------------------------------------------------------------------


def _peer_tree(data: DataInfo, dst: Path) -> int:
    """ImageFolder tree of symlinks to the train images only (no masks); returns the image count."""
    from covidxray.data.datasets import read_records

    records, _ = read_records(data.path, "train")
    for rec in records:
        d = dst / rec.label
        d.mkdir(parents=True, exist_ok=True)
        (d / Path(rec.file).name).symlink_to(Path(data.path, rec.file).resolve())
    return len(records)


def _peer_device_flag(script: Path, device: torch.device) -> list[str]:
    if device.type != "cuda":
        return []
    text = script.read_text(encoding="utf-8", errors="replace")
    for flag in ("--accel", "--cuda"):        # current example: --accel; older versions: --cuda
        if f"'{flag}'" in text or f'"{flag}"' in text:
            return [flag]
    raise RuntimeError(f"{script} has neither --accel nor --cuda; cannot put it on the GPU")


def run_peer(script: Path, data: DataInfo, size: int, batch: int, niter: int, workers: int, device: torch.device,
             tmp: Path, timeout: float, log: Callable[[str], None]) -> dict[str, Any]:
    res: dict[str, Any] = {"script": str(script), "size": size, "batch": batch, "niter": niter, "workers": workers,
                           "data": data.kind}
    work = Path(tempfile.mkdtemp(prefix="peer-", dir=tmp))
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        if not script.is_file():
            raise FileNotFoundError(f"peer script {script} not found")
        n_img = _peer_tree(data, work / "data")
        res["n_images"] = n_img
        cmd = [sys.executable, "-u", str(script), "--dataset", "folder", "--dataroot", str(work / "data"),
               "--imageSize", str(size), "--batchSize", str(batch), "--niter", str(niter),
               "--workers", str(workers), "--outf", str(work / "out"), "--manualSeed", "0",
               *_peer_device_flag(script, device)]
        res["command"] = shlex.join(cmd)
        log(f"peer: {res['command']}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t_start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=env, cwd=work)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        lines: list[tuple[float, int, int, int, int]] = []   # (t, epoch, niter, i, len)
        other: list[str] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                t = time.perf_counter()
                m = PEER_LINE.match(line)
                if m:
                    lines.append((t, *map(int, m.groups())))
                else:
                    other.append(line.rstrip())
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        t_exit = time.perf_counter()
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
        res.update(window_s=window, window_images=images, images_per_s=_rate(images, window),
                   s_per_epoch=window * n_img / images if images else None)
        # Steady rate (niter >= 2): from the last line of epoch 0, i.e. epochs 1.. with their epoch starts.
        last0 = max(k for k, ln in enumerate(lines) if ln[1] == 0)
        if last0 < len(lines) - 1:
            w2 = lines[-1][0] - lines[last0][0]
            i2 = sum(bs(ln[3], ln[4]) for ln in lines[last0 + 1:])
            res.update(steady_images_per_s=_rate(i2, w2))
    except Exception as exc:
        res["error"] = _short(exc, 400)
        traceback.print_exc(file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return res


# --------------------------------------------------------------------------------------------
# Schedule run
# --------------------------------------------------------------------------------------------


def run_schedule(model: str, data: DataInfo, batch: int, images: int, device: torch.device, args, tmp: Path,
                 log: Callable[[str], None]) -> dict[str, Any]:
    from covidxray.train.gan import new_run_dir

    res: dict[str, Any] = {"model": model, "size": 128, "batch": batch, "images": images, "data": data.kind}
    keep = bool(args.schedule_out)
    run_dir = new_run_dir(args.schedule_out, model) if keep else Path(tempfile.mkdtemp(prefix="schedule-", dir=tmp))
    trainer = None
    try:
        if data.error:
            raise RuntimeError(f"no data: {data.error}")
        epochs = math.ceil(images / data.n_train)
        t0 = time.perf_counter()
        # Default config; snapshots every ~epochs/10 (checkpoint_every stays the model's default).
        trainer = _build_trainer(model, 128, data, batch, device, run_dir, args,
                                 {"epochs": epochs, "snapshot_every": max(1, round(epochs / 10)),
                                  "checkpoint_every": _default_checkpoint_every(model)})
        res.update(epochs=epochs, n_train=len(trainer.data), batch=trainer.batch_size,
                   images_trained=epochs * trainer.batches_per_epoch * trainer.batch_size,
                   snapshot_every=trainer.cfg.train.snapshot_every,
                   checkpoint_every=trainer.cfg.train.checkpoint_every)
        log(f"schedule run: {model} at 128 px, {epochs} epochs x {trainer.batches_per_epoch} steps of "
            f"{trainer.batch_size} ({res['images_trained']} images) in {run_dir}")
        t_built = time.perf_counter()
        fit = _timed_fit(trainer, epochs, trainer.device)
        res.update(build_s=t_built - t0, fit_s=fit["fit_total_s"], wall_s=time.perf_counter() - t0,
                   train_images_per_s=fit["images_per_s"], epoch_end_s=fit["epoch_end_s"],
                   epoch_end_per_epoch_s=fit["epoch_end_s"] / max(1, epochs - 1),
                   run_dir=str(run_dir) if keep else None, finished=fit["finished"],
                   images_done=fit["images_seen"])
        if not fit["finished"]:
            # Stopped before the end (e.g. by a time limit): the wall time is not the schedule's.
            res["error"] = (f"stopped after {fit['images_seen']:,} of {res['images_trained']:,} images "
                            f"({res['wall_s']:.0f} s)")
    except Exception as exc:
        res["error"] = _short(exc, 300)
        traceback.print_exc(file=sys.stderr)
    finally:
        del trainer
        _free(device)
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return res


def _default_checkpoint_every(model: str) -> int:
    from covidxray.config import resolve_config

    return resolve_config(model).train.checkpoint_every


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _f(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _hms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def print_tables(console, res: dict[str, Any], args) -> None:
    env, sec = res["env"], res["sections_s"]
    env.setdefault("device_name", "?"), env.setdefault("device", "?"), env.setdefault("torch", torch.__version__)
    refs = {(r["size"], r["variant"]): r for r in res["reference"]}
    has_bf16 = any(v == "bf16+channels_last" for _, v in refs)
    if res["models"]:
        _models_table(console, res, args, refs, has_bf16)
    for r in res["reference"]:
        if r.get("error"):
            console.print(f"[red]reference {r['size']} px {r['variant']}: {r['error']}[/]")

    if res.get("peer"):
        _peer_table(console, res)
    sched = res.get("schedule")
    if sched and (sched.get("estimates") or sched.get("run")):
        _schedule_table(console, sched)
    for name, err in res.get("section_errors", {}).items():
        console.print(f"[red]section {name} failed:[/] {err}")
    parts = ", ".join(f"{k} {_hms(v)}" for k, v in sec.items())
    console.print(f"total {_hms(res['total_s'])} ({parts}); torch {env['torch']}"
                  + (f"; JSON {args.json}" if args.json else ""))


def _models_table(console, res, args, refs, has_bf16) -> None:
    from rich.table import Table

    env, sec = res["env"], res["sections_s"]
    t = Table(title=f"GAN training img/s - {env['device_name']} ({env['device']}), batch {args.batch}, "
                    f"{_hms(sec.get('models'))}", title_justify="left")
    for col in ("model", "px", "data", "graphs", "step", "epoch", "ep/step", "ref fp32", "x ref"):
        t.add_column(col, justify="left" if col in ("model", "data") else "right")
    if has_bf16:
        t.add_column("ref bf16CL", justify="right")
    errors: list[str] = []
    for r in res["models"]:
        ref = refs.get((r["size"], "fp32"), {})
        ref_b = refs.get((r["size"], "bf16+channels_last"), {})
        ratio = (r["step_images_per_s"] / ref["images_per_s"]
                 if r.get("step_images_per_s") and ref.get("images_per_s") else None)
        if r.get("error"):
            cells = [r["model"], str(r["size"]), r.get("data", ""), "-", "[red]error[/]", "-", "-", "-", "-"]
            errors.append(f"{r['model']} {r['size']} px: {r['error']}")
        else:
            cells = [r["model"], str(r["size"]), r.get("data", ""), r.get("cuda_graphs", "?"),
                     _f(r.get("step_images_per_s")),
                     _f(r.get("epoch_images_per_s")), _f(r.get("epoch_over_step"), "{:.2f}"),
                     _f(ref.get("images_per_s")) if "error" not in ref else "err", _f(ratio, "{:.2f}x")]
        if has_bf16:
            cells.append(_f(ref_b.get("images_per_s")) if "error" not in ref_b else "err")
        t.add_row(*cells)
    console.print(t)
    for e in errors:
        console.print(f"[red]error[/] {e}")


def _peer_table(console, res) -> None:
    from rich.table import Table

    p, o, sec = res["peer"], res.get("peer_ours", {}), res["sections_s"]
    t = Table(title=f"vs pytorch/examples dcgan - {p['size']} px, batch {p['batch']}, {p['niter']} epoch(s), "
                    f"{p.get('n_images', '?')} {p.get('data', '')} images, {_hms(sec.get('peer'))}",
              title_justify="left")
    for col in ("trainer", "epoch img/s", "s/epoch", "note"):
        t.add_column(col, justify="left" if col in ("trainer", "note") else "right")
    if p.get("error"):
        t.add_row("peer", "[red]error[/]", "", p["error"][:60])
    else:
        t.add_row("peer dcgan/main.py", _f(p.get("images_per_s")), _f(p.get("s_per_epoch"), "{:.2f}"),
                  f"nc=3, {p['workers']} loader workers; steady {_f(p.get('steady_images_per_s'))}")
    if o.get("error"):
        t.add_row("ours rawgan", "[red]error[/]", "", o["error"][:60])
    else:
        n = o.get("n_train") or 0
        ep = o.get("epoch_images_per_s")
        t.add_row("ours rawgan", _f(ep), _f(n / ep if ep and n else None, "{:.2f}"),
                  f"nc=1, amp {o.get('amp', '?')}, step {_f(o.get('step_images_per_s'))}"
                  + (f"; --set {' '.join(res['args']['set'])}" if res["args"].get("set") else ""))
    t.add_row("[bold]ours / peer[/]", f"[bold]{_f(res.get('peer_ratio'), '{:.2f}x')}[/]", "", "")
    console.print(t)


def _schedule_table(console, sched) -> None:
    from rich.table import Table

    t = Table(title=f"schedule: {sched['images']:,} images at 128 px (target < 5 min)", title_justify="left",
              caption="projected = images / epoch rate: no start-up, no per-epoch snapshots or checkpoints",
              caption_justify="left")
    for col in ("model", "epoch img/s", "epochs", "projected", "measured"):
        t.add_column(col, justify="left" if col == "model" else "right")
    run = sched.get("run") or {}
    for e in sched.get("estimates", []):
        meas = ""
        if run and run.get("model") == e["model"]:
            meas = f"[red]{run['error'][:40]}[/]" if run.get("error") else _hms(run.get("wall_s"))
        t.add_row(e["model"], _f(e.get("epoch_images_per_s")), _f(e.get("epochs")), _hms(e.get("projected_s")), meas)
    if run and run.get("model") not in {e["model"] for e in sched.get("estimates", [])}:
        t.add_row(run["model"], "", _f(run.get("epochs")), "",
                  f"[red]{run['error'][:40]}[/]" if run.get("error") else _hms(run.get("wall_s")))
    console.print(t)
    if run and "fit_s" in run:
        if run.get("error"):
            console.print(f"[red]schedule run {run['model']} {run['error']}: not a measurement of the schedule[/]")
        console.print(f"schedule run {run['model']}: wall {_hms(run['wall_s'])} (fit {_hms(run['fit_s'])}, "
                      f"steps at {_f(run.get('train_images_per_s'))} img/s, {run.get('epochs')} epoch ends "
                      f"~{_hms(run.get('epoch_end_s'))} = {_f(run.get('epoch_end_per_epoch_s'), '{:.3f}')} s each, "
                      f"checkpoint every {run.get('checkpoint_every')}, snapshot every {run.get('snapshot_every')})"
                      + (f"; run folder {run['run_dir']}" if run.get("run_dir") else ""))


def _section_models(res, args, names, data, device, tmp, log) -> None:
    for size in args.sizes:
        d = data.get(size)
        for bf16 in [False] + ([True] if args.also_plain_bf16 else []):
            try:
                ref = measure_reference(size, args.batch, device, args, bf16_cl=bf16)
            except Exception as exc:
                ref = {"size": size, "batch": args.batch, "variant": "bf16+channels_last" if bf16 else "fp32",
                       "error": _short(exc)}
                traceback.print_exc(file=sys.stderr)
            res["reference"].append(ref)
            log(f"reference {size} px {ref['variant']}: "
                + (f"ERROR {ref['error']}" if "error" in ref else f"{ref['images_per_s']:,.0f} img/s"))
        for name in names:
            t_m = time.perf_counter()
            row = measure_model(name, size, d, args.batch, device, args, tmp, args.epochs)
            row["elapsed_s"] = time.perf_counter() - t_m
            res["models"].append(row)
            if row.get("error"):
                log(f"{name} {size} px: ERROR {row['error']}")
            else:
                log(f"{name} {size} px: step {_f(row['step_images_per_s'])} img/s, epoch "
                    f"{_f(row['epoch_images_per_s'])} img/s (x{_f(row.get('epoch_over_step'), '{:.2f}')}) "
                    f"[{row['elapsed_s']:.1f} s]")


def _section_peer(res, args, data, device, tmp, log) -> None:
    d = data.get(args.peer_size)
    peer = run_peer(Path(args.peer).resolve(), d, args.peer_size, args.peer_batch, args.peer_niter,
                    args.peer_workers, device, tmp, args.peer_timeout, log)
    res["peer"] = peer
    log("peer: " + (f"ERROR {peer['error']}" if peer.get("error") else
                    f"{_f(peer['images_per_s'])} img/s ({peer['window_images']} images in "
                    f"{peer['window_s']:.2f} s; start-up {peer['startup_s']:.1f} s)"))
    ours = measure_model("rawgan", args.peer_size, d, args.peer_batch, device, args, tmp, args.peer_niter)
    res["peer_ours"] = ours
    log("ours rawgan: " + (f"ERROR {ours['error']}" if ours.get("error") else
                           f"epoch {_f(ours['epoch_images_per_s'])} img/s, step {_f(ours['step_images_per_s'])} img/s"))
    if peer.get("images_per_s") and ours.get("epoch_images_per_s"):
        res["peer_ratio"] = ours["epoch_images_per_s"] / peer["images_per_s"]


def _section_schedule(res, args, data, device, tmp, log) -> None:
    sched: dict[str, Any] = {"images": args.schedule_images, "estimates": []}
    res["schedule"] = sched
    n128 = data.cache[128].n_train if 128 in data.cache and data.cache[128].n_train else None
    for r in res["models"]:
        if r["size"] == 128 and r.get("epoch_images_per_s"):
            sched["estimates"].append({
                "model": r["model"], "epoch_images_per_s": r["epoch_images_per_s"],
                "projected_s": args.schedule_images / r["epoch_images_per_s"],
                "epochs": math.ceil(args.schedule_images / n128) if n128 else None})
    if args.run_schedule:
        if device.type != "cuda":
            log("note: --run-schedule on the CPU will take a very long time")
        sched["run"] = run_schedule(args.run_schedule, data.get(128), args.batch, args.schedule_images,
                                    device, args, tmp, log)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", help="registered GANs to time (default: every family == 'gan' model)")
    ap.add_argument("--sizes", nargs="+", type=int, choices=(64, 128, 256), help="image sizes (default: 64 128 256)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, help="images per step (default 128; --quick: 32)")
    ap.add_argument("--steps", type=int, help="timed train_step calls (default 30; --quick: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 5; --quick: 1)")
    ap.add_argument("--epochs", type=int, help="fit() epochs for the epoch rate (default 2; --quick: 1)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to every model (e.g. arch.g_channels=8)")
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: 64 px, 3 steps, 1 epoch, 40 phantoms/class")
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
    g = ap.add_argument_group("reference DCGAN")
    g.add_argument("--also-plain-bf16", action="store_true", help="also time the reference under bf16 + channels_last")
    g.add_argument("--ref-width", type=int, default=64, help="ngf = ndf of the reference (default 64)")
    g.add_argument("--ref-max-channels", type=int, default=None,
                   help="cap the reference widths (default: none, the example's pattern; 512 = covidxray's cap)")
    g.add_argument("--cudnn-benchmark", action="store_true",
                   help="also enable cudnn.benchmark for covidxray's trainer (default: off, as `covidxray train`)")
    g = ap.add_argument_group("peer: pytorch/examples dcgan/main.py")
    g.add_argument("--peer", help="path to the example's dcgan/main.py")
    g.add_argument("--peer-size", type=int, default=64, choices=(64, 128, 256))
    g.add_argument("--peer-batch", type=int, help="batch of both sides (default: --batch)")
    g.add_argument("--peer-niter", type=int, help="epochs of both sides (default 2; --quick: 1)")
    g.add_argument("--peer-workers", type=int, default=2, help="the example's --workers (its default: 2)")
    g.add_argument("--peer-timeout", type=float, default=600.0, help="kill the peer after this many seconds")
    g = ap.add_argument_group("schedule")
    g.add_argument("--schedule-images", type=int, default=1_700_000,
                   help="project the wall time of this many images at 128 px (0: skip)")
    g.add_argument("--run-schedule", metavar="MODEL", help="really train MODEL at 128 px for --schedule-images images")
    g.add_argument("--schedule-out", help="keep the --run-schedule run folder under this folder")
    ap.add_argument("--skip-models", action="store_true", help="skip the models section (e.g. peer or schedule only)")
    ap.add_argument("--json", help="write every number and the environment to this JSON file")
    ap.add_argument("--tmp-dir", help="parent of the temporary folders (default: the system temp dir)")
    ap.add_argument("--keep-tmp", action="store_true", help="do not delete the temporary folder")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key in ("sizes", "steps", "warmup", "epochs", "per_class", "batch", "peer_niter"):
        if getattr(args, key) is None:
            setattr(args, key, base[key])
    if args.peer_batch is None:
        args.peer_batch = args.batch
    for key in ("batch", "steps", "epochs", "per_class", "peer_batch", "peer_niter"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    from covidxray.errors import CovidXrayError
    from covidxray.models.registry import get_model, list_models
    from covidxray.train.gan import resolve_device

    console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 120)), highlight=False)
    log = lambda msg: console.print(msg, markup=False)  # noqa: E731
    t_all = time.perf_counter()
    try:
        device = resolve_device(args.device)
        names = args.models or [m.name for m in list_models() if m.family == "gan"]
        for name in names + ([args.run_schedule] if args.run_schedule else []):
            if get_model(name).family != "gan":  # unknown names raise with the valid ones
                raise CovidXrayError(f"{name} is not a GAN (family {get_model(name).family})")
    except CovidXrayError as exc:
        console.print(f"error: {exc}", markup=False)
        return 2
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    tmp = Path(tempfile.mkdtemp(prefix="gan-throughput-", dir=args.tmp_dir))
    res: dict[str, Any] = {"env": {}, "args": vars(args), "data": {}, "models": [], "reference": [],
                           "sections_s": {}}
    data = DataResolver(args, tmp, log)
    sections: list[tuple[str, Callable[[], None]]] = []
    if not args.skip_models:
        sections.append(("models", lambda: _section_models(res, args, names, data, device, tmp, log)))
    if args.peer:
        sections.append(("peer", lambda: _section_peer(res, args, data, device, tmp, log)))
    if args.schedule_images > 0 and (args.run_schedule or (128 in args.sizes and not args.skip_models)):
        sections.append(("schedule", lambda: _section_schedule(res, args, data, device, tmp, log)))
    rc = 0
    try:
        # All data first: phantoms are rendered in forked workers, before this process touches CUDA.
        t_sec = time.perf_counter()
        needed = ([] if args.skip_models else list(args.sizes)) + ([args.peer_size] if args.peer else []) \
            + ([128] if args.run_schedule else [])
        for size in dict.fromkeys(needed):
            data.get(size)
        res["sections_s"]["data"] = time.perf_counter() - t_sec
        try:
            env = environment(device)
        except Exception as exc:  # e.g. a CUDA driver problem: say so in the results, measure anyway
            env = {"device": str(device), "device_name": f"? ({_short(exc)})", "torch": torch.__version__,
                   "cpu_count": os.cpu_count()}
        res["env"] = env
        log(f"gan_throughput: {env['device_name']} ({device}), torch {env['torch']}, {env['cpu_count']} CPUs, "
            f"batch {args.batch}, steps {args.steps} (+{args.warmup} warm-up), {args.epochs} epoch(s), "
            f"models {' '.join(names)}")
        for name, run in sections:
            t_sec = time.perf_counter()
            try:
                run()
            except Exception as exc:  # a bug in one section must not cost the others' numbers
                traceback.print_exc(file=sys.stderr)
                res.setdefault("section_errors", {})[name] = _short(exc, 300)
                log(f"section {name}: ERROR {_short(exc)}")
            res["sections_s"][name] = time.perf_counter() - t_sec
            log(f"section {name}: {_hms(res['sections_s'][name])}")
    except KeyboardInterrupt:
        log("interrupted: printing what was measured")
        rc = 130
    finally:
        res["data"] = {str(s): {"path": str(i.path) if i.path else None, "kind": i.kind, "n_train": i.n_train,
                                "note": i.note, "error": i.error} for s, i in data.cache.items()}
        res["total_s"] = time.perf_counter() - t_all
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n", encoding="utf-8")
        if args.keep_tmp:
            log(f"temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    console.print()
    print_tables(console, res, args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
