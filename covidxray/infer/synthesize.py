"""Paired synthetic data from a trained pix2pix ``mask2xray`` run: lung masks in, (X-ray, mask) pairs out, written
in the prepared layout so that ``covidxray train --model unet --data OUT`` reads them as they are.

``covidxray sample PIX2PIX_RUN OUT --from-data PREPARED [--split train] [--deform] [--copies K] [--mix]``:

* the masks are those of ``PREPARED``'s ``--split`` (images with a mask only), resized to the model's side when
  the sides differ (bilinear, then > 0.5; said so); with ``--deform`` each copy of a mask first gets a random
  smooth deformation (a small affine warp: rotation +-8 deg, zoom +-8 %, shift +-5 %; then an elastic field,
  displacement std 2 % of the side on a 4 x 4 grid), post-processed to two components without holes, so that new
  anatomies appear; ``--copies K`` writes K pairs per mask (each with its own deformation and dropout noise);
* G (in sampling mode: dropout on, the paper's noise; seeded by ``--seed``) draws the X-ray of each mask;
* a class-conditional run (``model.class_maps``) draws each X-ray of a class: by default the class of the image
  the mask came from; ``--class NAME`` draws every mask's X-ray as NAME (e.g. COVID-19 X-rays on the lungs of
  normal patients), ``--class all`` one pair per mask per class;
* the pairs form ``OUT``'s **train** split (class = the class G was asked for, else the class of the image the
  mask came from); ``OUT``'s val and
  test splits are copies of ``PREPARED``'s real ones, so a segmenter trained on ``OUT`` is selected and tested on
  real X-rays; ``--mix`` also copies the real training images (real + synthetic pairs in one train split).

``covidxray sample PIX2PIX_RUN OUT --masks FOLDER`` takes any folder of mask images instead (binarised at half
their range: a mask that was not binary is thresholded, and one of another size resized, both said so); those
pairs are the train split (class ``synthetic`` from an unconditional run; from a conditional one, one pair per
mask per class, or ``--class NAME``) and there are no val/test splits (train with ``--set
eval.every=0``, or use ``--from-data``).

``manifest.csv`` marks every synthetic row ``synthetic=1`` with ``source`` = ``pix2pix:<checkpoint>#<mask source>``;
``prepare.json`` says ``"synthetic": true``, the checkpoint, its step and the settings. Everything is written into a
temporary folder beside ``OUT`` that replaces it whole at the end (never half a data set).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from covidxray import __version__
from covidxray.data import imaging
from covidxray.data.datasets import load_tensor_data, read_prepared_info, resize_masks, to_float, to_uint8
from covidxray.data.imaging import save_png
from covidxray.data.overlays import save_rgb
from covidxray.data.transforms import DEFORM, deform_masks
from covidxray.errors import CovidXrayError
from covidxray.infer.load import build_from_checkpoint
from covidxray.infer.protocol import Generator, MaskTranslator, Translator, register_loader, require
from covidxray.models.pix2pix import draw_xrays, sampling_mode, uses_class_maps
from covidxray.outdir import MARKER, OutputDir
from covidxray.utils import resolve_device

MANIFEST_COLUMNS = ("split", "class", "file", "mask", "source", "source_sha256", "pixel_sha256",
                    "orig_width", "orig_height", "orig_mode", "patient_id", "synthetic")


def conditioning_classes(cfg, ckpt: dict) -> list[str]:
    """The classes a pix2pix run's G is conditioned on (its class maps, in label order); [] when unconditional."""
    classes = list(ckpt.get("classes", ()))
    return classes if uses_class_maps(cfg, len(classes)) else []


class LoadedPix2Pix(Translator):
    """A pix2pix run's G in sampling mode (BatchNorm on running statistics, dropout on: the paper's noise)."""

    def __init__(self, G: torch.nn.Module, cfg, checkpoint: dict):
        self.G, self.cfg, self.checkpoint = G, cfg, checkpoint

    def lacks(self, capability: type) -> str:
        return (f"a pix2pix {self.cfg.model.task} run renders X-rays in pseudo-colour, it makes no X-rays "
                f"(sample --images FOLDER)")


class LoadedMask2Xray(LoadedPix2Pix, MaskTranslator):
    """A ``mask2xray`` pix2pix run: lung masks (and classes, with class maps) -> X-rays."""

    @property
    def conditioning(self) -> list[str]:
        return conditioning_classes(self.cfg, self.checkpoint)

    def lacks(self, capability: type) -> str:
        if issubclass(capability, Generator):
            return ("it draws X-rays from masks and has no latent to sample: pass --from-data PREPARED or "
                    "--masks FOLDER")
        return super().lacks(capability)

    def translate_masks(self, masks, labels, device, batch_size):
        return draw_xrays(self.G.to(device), masks, labels, len(self.conditioning), device, batch_size)


@register_loader("image2image", Translator, MaskTranslator)
def load_pix2pix(ckpt: dict) -> LoadedPix2Pix:
    """G of a pix2pix checkpoint in sampling mode: a mask -> X-ray run draws X-rays from masks."""
    nets, cfg = build_from_checkpoint(ckpt, "image2image")
    G = nets["G"]
    G.load_state_dict(ckpt["models"]["G"])
    sampling_mode(G)
    return (LoadedMask2Xray if cfg.model.task == "mask2xray" else LoadedPix2Pix)(G, cfg, ckpt)


def pair_jobs(conditioned: list[str], class_name: str | None, own: list[str] | None, n: int,
              path: str) -> list[tuple[int, str | None]]:
    """The (mask index, class asked of G) pairs of ``sample --from-data/--masks``, in writing order: each mask with
    its own class (``own``, the classes of a prepared split's images; None for a mask folder), every mask as
    ``class_name``, or with ``all`` (and by default for a mask folder) every mask once per class; the class is
    None for an unconditional G."""
    if not conditioned:
        if class_name is not None:
            raise CovidXrayError(f"--class {class_name}: {path} is not class-conditional (a mask2xray run without "
                                 f"class maps)", "Drop --class")
        return [(i, None) for i in range(n)]
    if class_name not in (None, "all") and class_name not in conditioned:
        raise CovidXrayError(f"--class {class_name}: not a class of {path} ({', '.join(conditioned)})",
                             "Pass one of them, or all")
    if class_name == "all" or (class_name is None and own is None):
        return [(i, c) for c in conditioned for i in range(n)]
    if class_name is not None:
        return [(i, class_name) for i in range(n)]
    missing = sorted(set(own) - set(conditioned))
    if missing:
        raise CovidXrayError(f"the masks' classes {', '.join(missing)} are not among those {path} was trained on "
                             f"({', '.join(conditioned)})", "Pass --class NAME to draw them as one of those")
    return [(i, c) for i, c in enumerate(own)]


def _read_mask_folder(folder: Path, size: int, log: Callable[[str], None]) -> tuple[torch.Tensor, list[str]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and imaging.is_image_name(p.name))
    if not files:
        raise CovidXrayError(f"no mask images in {folder}", "Pass a folder of lung masks (PNG, 0/255)")
    masks, names, resized, thresholded, bad = [], [], 0, 0, []
    for f in files:
        try:
            img = imaging.to_gray8(imaging.decode(f.read_bytes()))
        except (OSError, imaging.UnreadableImage) as exc:
            bad.append(f"{f.name} ({exc})")
            continue
        arr = np.asarray(img)
        if len(np.unique(arr)) > 2:
            thresholded += 1
        if img.size != (size, size):
            resized += 1
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(img)
        hi = int(arr.max())
        masks.append(torch.from_numpy((arr > hi / 2).astype(np.uint8) if hi > 0 else arr * 0)[None])
        names.append(f.relative_to(folder).with_suffix("").as_posix().replace("/", "_"))
    if thresholded:
        log(f"note: {thresholded} masks were not binary and were thresholded at half their range")
    if resized:
        log(f"note: {resized} masks were resized to the model's {size} px (bilinear, then > 0.5)")
    if bad:
        log(f"unreadable, left out ({len(bad)}): {'; '.join(bad[:5])}")
    if not masks:
        raise CovidXrayError(f"none of the {len(files)} files in {folder} is a readable image")
    return torch.stack(masks), names


#: What a folder of synthetic pairs holds (the prepared layout; also the names written before the marker).
PAIRS_OUTPUTS = ("train", "val", "test", "manifest.csv", "rejected.csv", "prepare.json")


def synthesize_pairs(checkpoint: str | os.PathLike, out: str | os.PathLike, *, from_data: str | os.PathLike | None = None,
                     split: str = "train", masks: str | os.PathLike | None = None, deform: bool = False,
                     copies: int = 1, mix: bool = False, seed: int = 0, batch_size: int = 64, device: str = "auto",
                     class_name: str | None = None, overwrite: bool = False, sampling: dict[str, Any] | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write paired synthetic (X-ray, mask) data in the prepared layout (module docstring); returns its summary.
    ``sampling``: a diffusion model's sampler options (``steps``, ``guidance``, ``sampler``; see ``configure``)."""
    log = log or (lambda msg: None)
    if (from_data is None) == (masks is None):
        raise CovidXrayError("pix2pix needs masks to translate: pass one of --from-data PREPARED or --masks FOLDER",
                             "e.g. covidxray sample RUN OUT --from-data data/cxr128 --deform")
    if copies < 1 or batch_size < 1:
        raise CovidXrayError(f"--copies and --batch-size must be at least 1; got {copies} and {batch_size}")
    if mix and from_data is None:
        raise CovidXrayError("--mix copies the real images of --from-data", "Pass --from-data PREPARED")
    od = OutputDir(out, "pix2pix-pairs", legacy=PAIRS_OUTPUTS, option="OUT", command="sample",
                   inputs=[p for p in (from_data, masks) if p is not None])
    out = od.path
    if not overwrite and any(p.name != MARKER for p in out.glob("*")):
        raise CovidXrayError(f"{out} already holds synthetic pairs", "Choose another OUT or pass --overwrite")
    loaded = require(checkpoint, MaskTranslator, "--from-data/--masks",
                     "Train one: covidxray train --model pix2pix")
    sampler = loaded.configure(**(sampling or {}))
    cfg, ckpt = loaded.cfg, loaded.checkpoint
    size = int(ckpt["image_size"])
    conditioned = loaded.conditioning
    if from_data is not None:
        src = Path(from_data)
        info = read_prepared_info(src)
        td = load_tensor_data(src, split, None, None, True, log, masks=True)
        m = td.masks
        if m.shape[-1] != size:
            log(f"masks prepared at {m.shape[-1]} px are resized to the model's {size} px (bilinear, then > 0.5)")
            m = resize_masks(m, size)
        own = [td.classes[int(k)] for k in td.labels]
        names = list(td.ids)
        source = f"{src.resolve()}:{split}"
    else:
        info, own = None, None
        m, names = _read_mask_folder(Path(masks), size, log)
        source = str(Path(masks).resolve())
    # (mask index, class asked of G or None, the pair's class folder), in writing order
    pairs = [(i, c, c or (own[i] if own is not None else "synthetic"))
             for i, c in pair_jobs(conditioned, class_name, own, len(names), ckpt["path"])]
    if conditioned:
        log(f"class-conditional G ({', '.join(conditioned)}): "
            + ", ".join(f"{sum(1 for p in pairs if p[1] == c)} x {c}" for c in conditioned) + " per copy")
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # G's dropout noise
    ckpt_ref = f"pix2pix:{Path(ckpt['path']).resolve()}"
    rows: list[tuple] = []
    t0 = time.perf_counter()
    with od.writing(last=("prepare.json",)) as tmp:
        n_pairs = 0
        for k in range(copies):
            mk = deform_masks(m, gen) if deform else m
            batch = mk[torch.tensor([p[0] for p in pairs])]
            labels = torch.tensor([conditioned.index(p[1]) for p in pairs]) if conditioned else None
            fake = loaded.translate_masks(batch, labels, dev, batch_size)
            for j, (idx, asked, cls) in enumerate(pairs):
                tag = f"_{asked}" if asked is not None and (own is None or asked != own[idx]) else ""
                stem = f"syn_{names[idx]}{tag}_{k:02d}"
                rel = f"train/{cls}/{stem}.png"
                rel_mask = f"train/{cls}/masks/{stem}.png"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel_mask).parent.mkdir(parents=True, exist_ok=True)
                img = fake[j, 0]
                save_png(img, tmp / rel, atomic=False)
                save_png(batch[j, 0] * 255, tmp / rel_mask, atomic=False)
                pix = hashlib.sha256(img.numpy().tobytes()).hexdigest()
                rows.append(("train", cls, rel, rel_mask, f"{ckpt_ref}#{source}/{names[idx]}", "", pix, size, size,
                             "L", "", 1))
                n_pairs += 1
        copied = {"train": 0, "val": 0, "test": 0}
        if info is not None:  # the real val/test (and with --mix, train) splits, as they are
            src_rows = list(csv.DictReader((src / "manifest.csv").open(newline="", encoding="utf-8")))
            for r in src_rows:
                if r["split"] in ("val", "test") or (mix and r["split"] == "train"):
                    for key in ("file", "mask"):
                        if r.get(key):
                            (tmp / r[key]).parent.mkdir(parents=True, exist_ok=True)
                            shutil.copy2(src / r[key], tmp / r[key])
                    rows.append(tuple(r.get(c, "") for c in MANIFEST_COLUMNS))
                    copied[r["split"]] += 1
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(MANIFEST_COLUMNS)
        w.writerows(rows)
        (tmp / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
        (tmp / "rejected.csv").write_text("path,reason\n", encoding="utf-8")
        all_classes = sorted({p[2] for p in pairs} | ({c for c in info.get("classes", [])} if info else set()))
        counts: dict[str, dict[str, int]] = {}
        for r in rows:
            counts.setdefault(r[0], {}).setdefault(r[1], 0)
            counts[r[0]][r[1]] += 1
        summary = {
            "format": "covidxray-prepared", "format_version": 1, "covidxray_version": __version__, "complete": True,
            "layout": "pix2pix-pairs", "source": source, "size": size,
            "fit": info.get("fit", "stretch") if info else "stretch", "masks": True, "classes": all_classes,
            "synthetic": True, "counts": counts,
            "generator": {"checkpoint": str(Path(ckpt["path"]).resolve()), "model": cfg.model.name,
                          "step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0))},
            "settings": {"split": split if info else None, "deform": dict(DEFORM) if deform else None, **sampler,
                         "copies": copies, "mix": mix, "seed": seed, "class": class_name,
                         "conditioned_on": conditioned},
            "pairs": n_pairs, "real_copied": copied,
        }
        (tmp / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary


def colorize_folder(checkpoint: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                    batch_size: int = 64, device: str = "auto", seed: int = 0,
                    log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A ``colorize`` pix2pix run's pseudo-colour renderings of every X-ray under ``images`` (any size and format;
    resized to the model's square), written as ``OUT/<name>.png`` (RGB, at the model's side); unreadable files are
    listed and left out."""
    log = log or (lambda msg: None)
    loaded = require(checkpoint, Translator, "--images", "Train one: covidxray train --model pix2pix "
                     "--set model.task=colorize")
    G, cfg, ckpt = loaded.G, loaded.cfg, loaded.checkpoint
    if cfg.model.task != "colorize":  # the family's own tasks: mask2xray translates masks, not X-rays
        raise CovidXrayError(f"{ckpt['path']} is a pix2pix {cfg.model.task} run; --images needs a colorize run",
                             "For mask2xray pass --from-data PREPARED or --masks FOLDER")
    folder, out = Path(images), Path(out)
    if not folder.exists():
        raise CovidXrayError(f"--images {folder} does not exist", "Pass a folder of X-rays")
    od = OutputDir(out, "colorize", inputs=[folder] if folder.is_dir() else [], command="sample")
    files = [folder] if folder.is_file() else sorted(
        p for p in folder.rglob("*") if p.is_file() and imaging.is_image_name(p.name))
    if not files:
        raise CovidXrayError(f"no images in {folder}")
    size = int(ckpt["image_size"])
    root = folder if folder.is_dir() else folder.parent
    arrays, names, bad = [], [], []
    for f in files:
        try:
            gray = imaging.to_gray8(imaging.decode(f.read_bytes()))
        except (OSError, imaging.UnreadableImage) as exc:
            bad.append((f.relative_to(root).as_posix(), str(exc)))
            continue
        arrays.append(np.asarray(imaging.fit_image(gray, size, "stretch")))
        names.append(f.relative_to(root).with_suffix(".png").as_posix())
    for name, why in bad:
        log(f"unreadable, left out: {name} ({why})")
    dev = resolve_device(device)
    G = G.to(dev)
    torch.manual_seed(seed)  # G's dropout noise
    with od.writing(last=()) as tmp, torch.no_grad():
        for i in range(0, len(arrays), batch_size):
            x = torch.from_numpy(np.stack(arrays[i:i + batch_size]))[:, None]
            rgb = to_uint8(G(to_float(x.to(dev)))).cpu()
            for j, name in enumerate(names[i:i + batch_size]):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                save_rgb(rgb[j].permute(1, 2, 0).numpy(), tmp / name)
    return {"colorized": len(names), "unreadable": bad, "out": str(out)}
