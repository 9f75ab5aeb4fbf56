"""Reconstructions by a trained autoencoder of any folder of X-rays (``covidxray sample CKPT OUT --reconstruct DIR``).

Every image file under ``DIR`` (recursively) is decoded as ``prepare`` decodes (16-bit, RGB/RGBA, EXIF
orientation), fitted into the model's square as its training data were (``stretch``, ``pad`` or ``crop``, from
the checkpoint), encoded and decoded in batches (a VAE's code is its mean: the reconstruction is
deterministic), and written as ``OUT/<name>.png``: the fitted input and its reconstruction side by side. One
row per image goes into ``OUT/reconstruct.csv``: ``file``, ``mse``, ``psnr`` (dB), ``ssim`` (images in [0, 1]) and
``status`` (``ok`` or ``unreadable: <reason>``; unreadable files never stop the rest). A cVAE needs the class
of the images (``class_name``). Files are written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from covidxray.data import imaging
from covidxray.data.datasets import to_float, to_uint8
from covidxray.errors import CovidXrayError
from covidxray.infer.protocol import Reconstructor, require
from covidxray.metrics import image as IM
from covidxray.outdir import OutputDir
from covidxray.utils import resolve_device

CSV_COLUMNS = ("file", "mse", "psnr", "ssim", "status")


def reconstruct_folder(checkpoint: str | os.PathLike, inputs: str | os.PathLike, out: str | os.PathLike,
                       class_name: str | None = None, batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Reconstruct every image under ``inputs`` into ``out`` (module docstring); returns counts and the CSV path."""
    inputs, out = Path(inputs), Path(out)
    if batch_size < 1:
        raise CovidXrayError(f"--batch-size must be at least 1, got {batch_size}")
    if not inputs.exists():
        raise CovidXrayError(f"--reconstruct {inputs} does not exist", "Pass a folder (or file) of X-rays")
    od = OutputDir(out, "reconstruct", legacy=("reconstruct.csv",), inputs=[inputs] if inputs.is_dir() else [],
                   command="sample")
    loaded = require(checkpoint, Reconstructor, "--reconstruct", "Pass a run of autoencoder, vae or cvae")
    net, cfg, ckpt = loaded.net, loaded.cfg, loaded.checkpoint
    classes = list(ckpt.get("classes", []))
    label = None
    if net.n_classes:
        if class_name is None or class_name == "all":
            raise CovidXrayError(f"'{cfg.model.name}' is class-conditional: --reconstruct needs the images' class",
                                 f"Pass --class NAME ({', '.join(classes)})")
        if class_name not in classes:
            raise CovidXrayError(f"unknown class '{class_name}'; this model knows: {', '.join(classes)}")
        label = classes.index(class_name)
    elif class_name is not None:
        raise CovidXrayError(f"'{cfg.model.name}' is not class-conditional", "Drop --class")
    files = ([inputs] if inputs.is_file() else
             sorted(p for p in inputs.rglob("*") if p.is_file() and imaging.is_image_name(p.name)
                    and out.resolve() not in p.resolve().parents))
    if not files:
        raise CovidXrayError(f"no images in {inputs} (looked for .png, .jpg, .jpeg, .bmp, .tif, .tiff, recursively)")
    size, fit = int(ckpt["image_size"]), str(ckpt.get("fit", "stretch"))
    dev = resolve_device(device)
    net = net.to(dev)
    rows: dict[str, dict[str, str]] = {}
    root = inputs if inputs.is_dir() else inputs.parent
    ok: list[tuple[str, np.ndarray]] = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        try:
            gray = imaging.to_gray8(imaging.decode(f.read_bytes()))
        except (OSError, imaging.UnreadableImage) as exc:
            rows[rel] = {"file": rel, "mse": "", "psnr": "", "ssim": "", "status": f"unreadable: {exc}"}
            continue
        ok.append((rel, np.asarray(imaging.fit_image(gray, size, fit))))
    with od.writing(last=("reconstruct.csv",)) as tmp, torch.no_grad():
        for i in range(0, len(ok), batch_size):
            chunk = ok[i:i + batch_size]
            x_u8 = torch.from_numpy(np.stack([a for _, a in chunk]))[:, None]
            x = to_float(x_u8.to(dev))
            y = torch.full((len(chunk),), label, dtype=torch.long, device=dev) if label is not None else None
            recon, _, _ = net(x, y)
            a, b = (recon.float() + 1) / 2, (x + 1) / 2
            m, p, s = IM.mse(a, b), IM.psnr(a, b), IM.ssim(a, b)
            rec_u8 = to_uint8(recon).cpu()
            for j, (rel, arr) in enumerate(chunk):
                pair = np.concatenate([arr, np.full((size, 2), 0, np.uint8), rec_u8[j, 0].numpy()], axis=1)
                target = tmp / Path(rel).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                imaging.save_png(Image.fromarray(pair, mode="L"), target)
                rows[rel] = {"file": rel, "mse": f"{float(m[j]):.6f}", "psnr": f"{float(p[j]):.3f}",
                             "ssim": f"{float(s[j]):.5f}", "status": "ok"}
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        for rel in sorted(rows):
            w.writerow(rows[rel])
        (tmp / "reconstruct.csv").write_text(buf.getvalue(), encoding="utf-8")
    csv_path = out / "reconstruct.csv"
    bad = [(r["file"], r["status"][len("unreadable: "):]) for r in rows.values() if r["status"] != "ok"]
    done = [r for r in rows.values() if r["status"] == "ok"]
    return {"reconstructed": len(done), "unreadable": bad, "csv": csv_path, "out": out, "model": cfg.model.name,
            "checkpoint": str(Path(ckpt["path"]).resolve()),
            "mean_psnr": float(np.mean([float(r["psnr"]) for r in done])) if done else None,
            "mean_ssim": float(np.mean([float(r["ssim"]) for r in done])) if done else None}
