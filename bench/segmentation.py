"""Segmentation speed: covidxray against the plain PyTorch a user would otherwise write, side by side in one process.

Usage (from the repository root)::

    python bench/segmentation.py --data PREPARED [--parts train,segment,nets] [--size 128] [--batch 16]
        [--epochs 1] [--workers 2] [--n-images 1000] [--side 299] [--device auto] [--json OUT.json]
    python bench/segmentation.py --quick --device cpu          # a smoke test on demo phantoms

Parts (each prints a row; the summary table comes last; ``--json`` holds every number and the environment):

* **train** - U-Net training images/s at ``--size`` with batch ``--batch``:
  *ours* = ``covidxray.train.loop.Trainer`` with the ``unet`` defaults (uint8 images and masks on the device,
  the paired on-device augmentation, bf16 on CUDA and on CPUs with native bf16, channels-last, CUDA graphs on a
  GPU; validation and checkpoints off), ``fit()`` timed from the end of its first step to the end of its last;
  *plain* = ``PreparedDataset`` (PNG decoding per item) with a ``torchvision.transforms.v2`` pipeline that warps
  image and mask together (``RandomAffine(10, translate 0.05, scale 0.9-1.1)``) and jitters the image
  (``ColorJitter(0.1, 0.1)``), a ``DataLoader`` (shuffle, drop_last, ``--workers``), the **same network** with the
  same initial weights, AdamW with the same learning rate, the same Dice + BCE loss, fp32, eager, contiguous;
  the same timing window. Target (issue 10): ours >= 1.2x plain on the CPU; >= 1.0x a plain fp32 eager step on
  one H100/H200 (the ``step`` rows: one fixed batch on the device, no data loading, both sides).
* **segment** - ``covidxray segment`` on a folder of ``--n-images`` X-rays at ``--side`` px (written from the
  prepared images) against a plain per-image loop with the same model: PIL open -> tensor -> resize to the
  model's side -> model (fp32, batch 1) -> sigmoid > threshold -> resize back -> PIL save. Target: >= 2x on
  the CPU.
* **nets** - one training step of our ``UNet`` against MONAI's ``BasicUNet`` of the same widths (32 -> 512,
  BatchNorm, when MONAI is installed), fp32 and the run's precision: the measured side of "written here, not
  taken from MONAI".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HUGE = 10**9


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _env(dev: torch.device) -> dict[str, Any]:
    from covidxray.utils import cpu_has_native_bf16

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "device": str(dev), "native_bf16_cpu": cpu_has_native_bf16(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _dice_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from covidxray.train.tasks.segmentation import soft_dice_loss

    return F.binary_cross_entropy_with_logits(logits.float(), target) + soft_dice_loss(logits, target)


# ------------------------------------------------------------------------------------------ train
def train_ours(data: Path, size: int, batch: int, epochs: int, dev: torch.device, tmp: Path,
               sets: list[str]) -> dict[str, Any]:
    from covidxray.config import resolve_config
    from covidxray.train.loop import Trainer

    cfg = resolve_config("unet", flags={"data": {"path": str(data), "image_size": size},
                                        "train": {"batch_size": batch, "device": str(dev), "epochs": epochs,
                                                  "checkpoint_every": HUGE, "snapshot_every": HUGE}},
                         sets=["eval.every=0", *sets])
    run = Path(tempfile.mkdtemp(prefix="ours-", dir=tmp))
    trainer = Trainer(cfg, run)
    stamps: list[tuple[float, int]] = []

    def on_step(t):
        if len(stamps) == 0 or t.step == epochs * t.batches_per_epoch:
            _sync(dev)
        stamps.append((time.perf_counter(), t.images_seen))

    trainer.on_step = on_step
    trainer.fit()
    window, images = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
    row = {"side": "ours", "n_train": len(trainer.data), "batch": trainer.batch_size, "steps": len(stamps),
           "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "off",
           "cuda_graphs": trainer.cuda_graphs, "images_per_s": images / window, "window_s": window,
           "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}
    # a step on one fixed batch on the device (no data loading): the GPU anchor's kind of number
    x, m = trainer.data.images[:trainer.batch_size].to(dev), trainer.data.masks[:trainer.batch_size].to(dev)
    for _ in range(3):
        trainer.train_step(x, m)
    _sync(dev)
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        trainer.train_step(x, m)
    _sync(dev)
    row["step_images_per_s"] = n * trainer.batch_size / (time.perf_counter() - t0)
    shutil.rmtree(run, ignore_errors=True)
    return row


def train_plain(data: Path, size: int, batch: int, epochs: int, workers: int, dev: torch.device, lr: float,
                weight_decay: float, sets: list[str]) -> dict[str, Any]:
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2 as T

    from covidxray.config import resolve_config
    from covidxray.data.datasets import PreparedDataset
    from covidxray.models import DataSpec, get_model

    tf = T.Compose([T.RandomAffine(10, translate=(0.05, 0.05), scale=(0.9, 1.1)), T.ColorJitter(0.1, 0.1)])

    class Masked(torch.utils.data.Dataset):
        def __init__(self):
            self.ds = PreparedDataset(data, "train", transform=tf)
            self.ds.records = [r for r in self.ds.records if r.mask]

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            item = self.ds[i]
            x = item["image"].float() / 127.5 - 1
            m = (item["mask"] > 127).float()
            if x.shape[-1] != size:
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]
                m = (F.interpolate(m[None], size=(size, size), mode="bilinear") > 0.5)[0].float()
            return x, m

    ds = Masked()
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(0)
    net = get_model("unet").build(resolve_config("unet", sets=sets), DataSpec(3, size))["net"].to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    stamps: list[tuple[float, int]] = []
    seen, total = 0, epochs * len(loader)
    for _ in range(epochs):
        for x, m in loader:
            x, m = x.to(dev, non_blocking=True), m.to(dev, non_blocking=True)
            loss = _dice_bce(net(x), m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
            if len(stamps) in (0, total - 1):
                _sync(dev)
            stamps.append((time.perf_counter(), seen))
    window, images = stamps[-1][0] - stamps[0][0], stamps[-1][1] - stamps[0][1]
    row = {"side": "plain", "n_train": len(ds), "batch": batch, "steps": len(stamps), "workers": workers,
           "amp": "off", "images_per_s": images / window, "window_s": window}
    x, m = x[:batch], m[:batch]
    for _ in range(3):
        loss = _dice_bce(net(x), m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        loss = _dice_bce(net(x), m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    row["step_images_per_s"] = n * batch / (time.perf_counter() - t0)
    del loader
    return row


# ------------------------------------------------------------------------------------------ segment
def make_folder(data: Path, n: int, side: int, folder: Path) -> int:
    """``n`` PNGs at ``side`` px from the prepared images (cycled when there are fewer)."""
    from PIL import Image

    from covidxray.data.datasets import read_records

    recs = []
    for split in ("train", "val", "test"):
        try:
            recs += read_records(data, split)[0]
        except Exception:
            pass
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rec = recs[i % len(recs)]
        with Image.open(data / rec.file) as im:
            im.convert("L").resize((side, side), Image.Resampling.BILINEAR).save(folder / f"x{i:05d}.png")
    return n


def segment_plain(run: Path, folder: Path, out: Path, dev: torch.device) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from covidxray.infer.predict import load_segmenter

    loaded = load_segmenter(run)
    net, size, thr = loaded.net.to(dev).eval(), loaded.image_size, loaded.threshold
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.glob("*.png"))
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in files:
            with Image.open(f) as im:
                gray = im.convert("L")
            w, h = gray.size
            x = torch.from_numpy(np.asarray(gray, dtype=np.float32) / 127.5 - 1)[None, None].to(dev)
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            p = torch.sigmoid(net(x))
            p = F.interpolate(p, size=(h, w), mode="bilinear")
            mask = ((p[0, 0] > thr).cpu().numpy().astype(np.uint8) * 255)
            Image.fromarray(mask).save(out / f.name)
    _sync(dev)
    dt = time.perf_counter() - t0
    return {"side": "plain", "images": len(files), "seconds": dt, "images_per_s": len(files) / dt}


def segment_ours(run: Path, folder: Path, out: Path, dev: torch.device, batch: int, overlay: bool) -> dict[str, Any]:
    from covidxray.infer.segment import segment_images

    t0 = time.perf_counter()
    res = segment_images(run, folder, out, batch_size=batch, device=str(dev), overwrite=True, overlay=overlay)
    dt = time.perf_counter() - t0
    what = "masks + overlays + segment.csv" if overlay else "masks + segment.csv"
    return {"side": "ours", "images": res["segmented"], "seconds": dt, "images_per_s": res["segmented"] / dt,
            "batch": batch, "note": f"{what} (post-processed)"}


# ------------------------------------------------------------------------------------------ nets
def nets_rows(size: int, batch: int, dev: torch.device) -> list[dict[str, Any]]:
    from covidxray.models.segmentation import UNet

    builders = {"covidxray UNet": lambda: UNet(width=32, depth=4)}
    try:
        from monai.networks.nets import BasicUNet

        builders["MONAI BasicUNet"] = lambda: BasicUNet(spatial_dims=2, in_channels=1, out_channels=1,
                                                        features=(32, 64, 128, 256, 512, 32), norm="batch",
                                                        act="relu", upsample="nontrainable")
    except Exception:
        pass
    from covidxray.infer.predict import inference_settings

    amp = inference_settings(dev)[1]
    rows = []
    for name, build in builders.items():
        for dtype in ([None, amp] if amp is not None else [None]):
            torch.manual_seed(0)
            net = build().to(dev, memory_format=torch.channels_last)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            x = torch.randn(batch, 1, size, size, device=dev).contiguous(memory_format=torch.channels_last)
            m = (torch.rand(batch, 1, size, size, device=dev) > 0.5).float()

            def step():
                with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    y = net(x)
                loss = _dice_bce(y, m)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(2):
                step()
            _sync(dev)
            t0, n = time.perf_counter(), 5
            for _ in range(n):
                step()
            _sync(dev)
            rows.append({"net": name, "params": sum(p.numel() for p in net.parameters()),
                         "precision": "bf16" if dtype else "fp32",
                         "images_per_s": n * batch / (time.perf_counter() - t0)})
    return rows


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="prepared folder with masks (default with --quick: demo phantoms)")
    ap.add_argument("--parts", default="train,segment,nets")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-images", type=int, default=1000)
    ap.add_argument("--side", type=int, default=299)
    ap.add_argument("--seg-epochs", type=int, default=1, help="epochs of the U-Net that `segment` uses")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], help="config override for ours, key=value")
    ap.add_argument("--quick", action="store_true", help="tiny sizes on demo phantoms (a smoke test)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from covidxray.utils import resolve_device

    dev = resolve_device(args.device)
    parts = [p for p in args.parts.split(",") if p]
    tmp = Path(tempfile.mkdtemp(prefix="segbench-"))
    res: dict[str, Any] = {"env": _env(dev), "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        data = args.data
        if args.quick:
            args.size, args.batch, args.n_images, args.side = 64, 8, 16, 96
            args.set = ["arch.width=8", "arch.depth=3", *args.set]
        if data is None:
            from covidxray.data.prepare import prepare_demo

            data = tmp / "demo"
            prepare_demo(data, per_class=24 if args.quick else 200, size=args.size, seed=0, workers=1, progress=False)
        res["data"] = str(data)
        if "train" in parts:
            try:
                ours = train_ours(data, args.size, args.batch, args.epochs, dev, tmp, args.set)
                print("train ours ", json.dumps(ours), flush=True)
                plain = train_plain(data, args.size, args.batch, args.epochs, args.workers, dev, ours["lr"],
                                    ours["weight_decay"], [s for s in args.set if s.startswith("arch.")])
                print("train plain", json.dumps(plain), flush=True)
                res["train"] = {"ours": ours, "plain": plain, "ratio": ours["images_per_s"] / plain["images_per_s"],
                                "step_ratio": ours["step_images_per_s"] / plain["step_images_per_s"]}
            except Exception as exc:
                traceback.print_exc()
                res["train"] = {"error": f"{type(exc).__name__}: {exc}"}
        if "segment" in parts:
            try:
                from covidxray.config import resolve_config
                from covidxray.train.loop import start_run

                cfg = resolve_config("unet", flags={"data": {"path": str(data), "image_size": args.size},
                                                    "train": {"epochs": args.seg_epochs, "device": str(dev),
                                                              "batch_size": args.batch}}, sets=args.set)
                cfg.out = str(tmp / "runs")
                trainer, _ = start_run(cfg)
                folder = tmp / "xrays"
                make_folder(data, args.n_images, args.side, folder)
                warm = tmp / "warm"  # first passes (oneDNN kernels, threads) stay out of both timings
                make_folder(data, min(8, args.n_images), args.side, warm)
                segment_ours(trainer.run_dir, warm, tmp / "warm-ours", dev, args.batch, overlay=True)
                segment_plain(trainer.run_dir, warm, tmp / "warm-plain", dev)
                ours = segment_ours(trainer.run_dir, folder, tmp / "seg-ours", dev, args.batch, overlay=False)
                print("segment ours ", json.dumps(ours), flush=True)
                full = segment_ours(trainer.run_dir, folder, tmp / "seg-ours-overlays", dev, args.batch, overlay=True)
                print("segment ours+overlays", json.dumps(full), flush=True)
                plain = segment_plain(trainer.run_dir, folder, tmp / "seg-plain", dev)
                print("segment plain", json.dumps(plain), flush=True)
                res["segment"] = {"ours": ours, "ours_overlays": full, "plain": plain,
                                  "ratio": ours["images_per_s"] / plain["images_per_s"],
                                  "ratio_overlays": full["images_per_s"] / plain["images_per_s"],
                                  "model_side": args.size, "input_side": args.side}
            except Exception as exc:
                traceback.print_exc()
                res["segment"] = {"error": f"{type(exc).__name__}: {exc}"}
        if "nets" in parts:
            res["nets"] = nets_rows(args.size, args.batch, dev)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"\n| part | ours img/s | plain img/s | ours / plain |  ({res['env'].get('gpu', 'CPU')}, "
          f"{res['env']['threads']} threads)")
    print("|---|---|---|---|")
    for part in ("train", "segment"):
        r = res.get(part)
        if r and "ratio" in r:
            print(f"| {part} | {r['ours']['images_per_s']:.1f} | {r['plain']['images_per_s']:.1f} | {r['ratio']:.2f}x |")
            if part == "segment":
                print(f"| segment with overlays | {r['ours_overlays']['images_per_s']:.1f} | "
                      f"{r['plain']['images_per_s']:.1f} | {r['ratio_overlays']:.2f}x |")
            if part == "train":
                print(f"| train step (fixed batch) | {r['ours']['step_images_per_s']:.1f} | "
                      f"{r['plain']['step_images_per_s']:.1f} | {r['step_ratio']:.2f}x |")
        elif r:
            print(f"| {part} | error: {r.get('error')} | | |")
    for r in res.get("nets", []):
        print(f"| net {r['net']} ({r['params'] / 1e6:.1f} M, {r['precision']}) | {r['images_per_s']:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
