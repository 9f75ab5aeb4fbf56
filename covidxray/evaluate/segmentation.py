"""Scoring a trained lung segmenter: per-image Dice, IoU, HD95 and ASD, their summaries, the worst cases.

Two sources of ground truth:

* ``data`` + ``split`` (default ``test``): the images of a prepared folder that have a lung mask (the others
  are counted and left out). Images are resized to the model's side when the sides differ; the prediction is
  resized back (bilinear on the probabilities) and scored at the prepared resolution.
* ``images`` + ``masks``: any folder of X-rays and a folder of ground-truth masks paired by relative path and
  file stem (``x.png`` with ``x.png``, ``x_mask.png``, ``x-mask.png``...). Each X-ray is segmented as
  ``covidxray segment`` does (fitted as the training data were, predicted, mapped back to its original size);
  a mask of another size is resized to its image with nearest neighbour; unpaired and unreadable files are
  listed, never fatal.

The predicted mask is the sigmoid above ``threshold`` (default: the run's ``eval.threshold``), post-processed
as ``segment`` does unless ``postprocess=False`` (the two largest components, holes filled), optionally with
test-time augmentation (``tta``: the mean with the mirror image's prediction). Distances are in pixels of the
scored resolution. Empty masks never give NaN (:mod:`covidxray.metrics.segmentation`): both empty scores
Dice 1 / HD95 0, one empty Dice 0 / HD95 = the image diagonal, and such cases are counted in the report.

One output folder, written whole or not at all: ``metrics.json`` (every number, N, settings, versions, the
overlap check with the training images), ``per_image.csv``, ``worst.png`` (the 8 lowest-Dice cases: predicted
outline yellow, true outline green, Dice in the corner) and ``report.md``.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from covidxray import __version__
from covidxray.data import imaging
from covidxray.data.datasets import load_tensor_data, resize_u8
from covidxray.data.imaging import is_image_name
from covidxray.data.layouts import MASK_SUFFIX
from covidxray.data.masks import postprocess as postprocess_mask
from covidxray.data.overlays import outline_grid
from covidxray.errors import CovidXrayError
from covidxray.evaluate.classifier import default_out, overlap_with_training
from covidxray.infer.predict import inference_settings, iter_mask_probs, load_segmenter
from covidxray.infer.protocol import Loaded
from covidxray.infer.segment import segment_array
from covidxray.metrics.segmentation import segmentation_report, summarize
from covidxray.outdir import OutputDir
from covidxray.utils import resolve_device

#: Cases shown in worst.png.
WORST = 8
METRICS = ("dice", "iou", "hd95", "asd")
LABELS = {"dice": "Dice", "iou": "IoU", "hd95": "HD95", "asd": "ASD"}


def predict_prepared(loaded, images_u8: torch.Tensor, dev: torch.device, batch_size: int, threshold: float,
                     tta: bool, postprocess: bool) -> np.ndarray:
    """Boolean masks (N x H x W, at the images' own side) of square uint8 images (N x 1 x H x W)."""
    side = int(images_u8.shape[-1])
    size = loaded.image_size
    x = images_u8 if side == size else resize_u8(images_u8, size)
    net = loaded.net.to(dev, memory_format=torch.channels_last)
    out = np.zeros((images_u8.shape[0], side, side), dtype=bool)
    for i, probs in iter_mask_probs(net, x, dev, batch_size, inference_settings(dev)[1], torch.channels_last, tta):
        if side != size:
            probs = F.interpolate(probs, size=(side, side), mode="bilinear", align_corners=False)
        masks = (probs[:, 0] > threshold).cpu().numpy()
        for j, m in enumerate(masks):
            out[i + j] = postprocess_mask(m) if postprocess else m
    return out


def pair_folders(images: Path, masks: Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """``(name, image, mask)`` pairs by relative folder + stem (mask suffixes such as ``_mask`` ignored), plus
    the images without a mask and the masks without an image (relative paths)."""

    def key(rel: Path, strip: bool) -> str:
        stem = MASK_SUFFIX.sub("", rel.stem) if strip else rel.stem
        return str(rel.parent / stem).lower()

    def walk(root: Path) -> list[Path]:
        if not root.is_dir():
            raise CovidXrayError(f"{root} is not a folder", "Pass folders to --images and --masks")
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and is_image_name(p.name))

    image_files, mask_files = walk(images), walk(masks)
    if not image_files:
        raise CovidXrayError(f"no image files in {images}", "Pass the folder of X-rays (PNG, JPEG, BMP, TIFF)")
    by_key: dict[str, Path] = {}
    for rel in mask_files:
        by_key.setdefault(key(rel, True), rel)
    pairs, unpaired, used = [], [], set()
    for rel in image_files:
        m = by_key.get(key(rel, False))
        if m is None:
            unpaired.append(rel.as_posix())
        else:
            used.add(m)
            pairs.append((rel.as_posix(), images / rel, masks / m))
    orphans = [m.as_posix() for m in mask_files if m not in used]
    if not pairs:
        raise CovidXrayError(f"no image of {images} has a mask in {masks} (paired by folder and file name, e.g. "
                             f"x.png with x.png or x_mask.png)", "Check the two folders")
    return pairs, unpaired, orphans


def _read_pairs(pairs, log):

    grays, truths, names, unreadable = [], [], [], []
    for name, ip, mp in pairs:
        try:
            gray = imaging.to_gray8(imaging.decode(ip.read_bytes()))
        except (OSError, imaging.UnreadableImage) as exc:
            unreadable.append((name, f"image: {exc}"))
            continue
        try:
            mask = imaging.binarize_mask(imaging.decode(mp.read_bytes()))
        except (OSError, imaging.UnreadableImage) as exc:
            unreadable.append((name, f"mask: {exc}"))
            continue
        if mask.size != gray.size:
            mask = mask.resize(gray.size, Image.Resampling.NEAREST)
        grays.append(np.asarray(gray))
        truths.append(np.asarray(mask) > 127)
        names.append(name)
    for name, why in unreadable:
        log(f"unreadable, left out: {name} ({why})")
    return grays, truths, names, unreadable


def evaluate_segmenter(checkpoint: str | Path, data: str | Path | None = None, split: str = "test",
                       images: str | Path | None = None, masks: str | Path | None = None,
                       out: str | Path | None = None, device: str = "auto", batch_size: int = 32,
                       threshold: float | None = None, tta: bool = False, postprocess: bool = True,
                       log: Callable[[str], None] | None = None,
                       loaded: Loaded | None = None) -> dict[str, Any]:
    """Score a segmenter (run folder: ``best.pt`` when present) against prepared masks or a mask folder.

    Returns the report written to ``metrics.json`` (plus ``out``). See the module docstring.
    """
    log = log or (lambda msg: None)
    if (images is None) != (masks is None):
        raise CovidXrayError("--images and --masks go together", "Pass both folders, or --data PREPARED instead")
    if images is None and data is None:
        raise CovidXrayError("nothing to score against", "Pass --data PREPARED (its masks), or --images DIR --masks DIR")
    if split not in ("train", "val", "test"):
        raise CovidXrayError(f"--split must be train, val or test; got '{split}'")
    if batch_size < 1:
        raise CovidXrayError(f"--batch-size must be at least 1, got {batch_size}")
    loaded = load_segmenter(checkpoint if loaded is None else loaded, "evaluate")
    ckpt = loaded.checkpoint
    ckpt_path = Path(ckpt["path"])
    if out is None:
        tag = split if images is None else "folder"
        out = default_out(ckpt_path, tag).with_name(f"eval-seg-{tag}-{ckpt_path.stem}")
    od = OutputDir(out, "evaluate-segmenter", legacy=SEGMENTER_OUTPUTS, option="--out",
                   inputs=[p for p in (data, images, masks) if p is not None])
    thr = loaded.threshold if threshold is None else float(threshold)
    if tta and loaded.tta_note():
        log(loaded.tta_note())
    if not 0.0 < thr < 1.0:
        raise CovidXrayError(f"--threshold must be in (0, 1); got {thr:g}")
    dev = resolve_device(device)
    cfg = loaded.cfg
    t0 = time.perf_counter()
    source: dict[str, Any]
    overlap = None
    if images is None:
        data = Path(data)
        td = load_tensor_data(data, split, None, None, True, log, masks=True)
        preds = predict_prepared(loaded, td.images, dev, batch_size, thr, tta, postprocess)
        truths = td.masks[:, 0].numpy().astype(bool)
        grays = list(td.images[:, 0].numpy())
        names = list(td.ids)
        classes = [td.classes[int(k)] for k in td.labels]
        side = int(td.images.shape[-1])
        source = {"data": str(data.resolve()), "split": split, "resolution": f"{side} x {side} px (prepared)",
                  "resized_to_model": side != loaded.image_size}
        overlap = overlap_with_training(cfg.data.path, cfg.data.split, data, split, list(td.classes))
        if overlap.get("same_pixels") or overlap.get("same_patient"):
            log(f"warning: {overlap['same_pixels']} scored images have the same pixels as training images and "
                f"{overlap['same_patient']} share a patient with them: this is not a held-out score")
        if Path(cfg.data.path).resolve() == data.resolve() and split == cfg.data.split:
            log(f"warning: split '{split}' is the model's training split: this is not a held-out score")
        pred_list, truth_list = list(preds), list(truths)
    else:
        pairs, unpaired, orphans = pair_folders(Path(images), Path(masks))
        for what, files in (("images without a mask", unpaired), ("masks without an image", orphans)):
            if files:
                log(f"{len(files)} {what}, left out: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
        grays, truth_list, names, unreadable = _read_pairs(pairs, log)
        if not grays:
            raise CovidXrayError(f"none of the {len(pairs)} image/mask pairs is readable", "See the files listed above")
        pred_list = segment_array(loaded, grays, batch_size=batch_size, device=dev, threshold=thr, tta=tta,
                                  postprocess=postprocess)
        classes = [""] * len(names)
        source = {"images": str(Path(images).resolve()), "masks": str(Path(masks).resolve()),
                  "resolution": "original size of each image", "unpaired_images": unpaired,
                  "unpaired_masks": orphans, "unreadable": [list(u) for u in unreadable]}
    seconds = time.perf_counter() - t0
    rows, summary, counts = _score(pred_list, truth_list)
    per_class = {}
    for c in sorted(set(classes) - {""}):
        idx = [i for i, k in enumerate(classes) if k == c]
        per_class[c] = {m: summarize([rows[i][m] for i in idx]) for m in METRICS}

    import scipy  # local: only its version is recorded

    result = {
        "kind": "segmentation",
        "model": cfg.model.name,
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_epoch": int(ckpt["epoch"]),
        "best_val": {"metric": ckpt.get("eval_metric"), "value": ckpt.get("best_metric")},
        **source,
        "n": len(rows),
        "model_image_size": loaded.image_size,
        "fit": loaded.fit,
        "threshold": thr,
        "postprocess": "two largest components, holes filled" if postprocess else "none",
        "tta": "mean with the mirror image" if tta else "none",
        "distance_unit": "pixels of the scored resolution",
        "summary": summary,
        "per_class": per_class,
        **counts,
        "overlap_with_training": overlap,
        "seconds": round(seconds, 3),
        "device": str(dev),
        "versions": {"covidxray": __version__, "torch": torch.__version__, "scipy": scipy.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(od, result, rows, names, classes, grays, pred_list, truth_list)
    result["out"] = str(od.path)
    return result


def _score(preds: list[np.ndarray], truths: list[np.ndarray]):
    """Per-image rows and summaries; images of different sizes are scored one by one."""
    rows = []
    for p, t in zip(preds, truths):
        rep = segmentation_report(p[None], t[None])
        row = {m: rep["per_image"][m][0] for m in METRICS}
        row.update(pred_px=int(p.sum()), true_px=int(t.sum()), width=int(t.shape[1]), height=int(t.shape[0]))
        rows.append(row)
    summary = {m: summarize([r[m] for r in rows]) for m in METRICS}
    counts = {"n_empty_target": sum(r["true_px"] == 0 for r in rows), "n_empty_pred": sum(r["pred_px"] == 0 for r in rows),
              "n_one_empty": sum((r["true_px"] == 0) != (r["pred_px"] == 0) for r in rows)}
    return rows, summary, counts


def _per_image_csv(rows, names, classes) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "class", "width", "height", "dice", "iou", "hd95", "asd", "pred_px", "true_px"])
    for name, c, r in zip(names, classes, rows):
        w.writerow([name, c, r["width"], r["height"], *(f"{r[m]:.5f}" for m in METRICS), r["pred_px"], r["true_px"]])
    return buf.getvalue()


def _worst_grid(path: Path, rows, names, grays, preds, truths) -> None:
    order = sorted(range(len(rows)), key=lambda i: rows[i]["dice"])[:WORST]
    side = 160  # a common tile side: the images may all differ in size
    tiles, pm, tm = [], [], []
    for i in order:
        g = torch.from_numpy(np.array(grays[i], dtype=np.uint8))[None, None].float()
        tiles.append(F.interpolate(g, size=(side, side), mode="bilinear", antialias=True).round().clamp(0, 255).byte())
        for src, dst in ((preds[i], pm), (truths[i], tm)):
            m = torch.from_numpy(np.ascontiguousarray(src, dtype=np.uint8))[None, None].float()
            dst.append(F.interpolate(m, size=(side, side), mode="nearest").byte())
    captions = [f"Dice {rows[i]['dice']:.3f} {Path(names[i]).stem[:14]}" for i in order]
    outline_grid(torch.cat(tiles), torch.cat(pm), torch.cat(tm), path, nrow=4, captions=captions)


def report_markdown(result: dict[str, Any]) -> str:
    s = result["summary"]
    where = (f"the {result['split']} split of `{result['data']}`" if "data" in result
             else f"`{result['images']}` against the masks in `{result['masks']}`")
    lines = [f"# {result['model']}: lung segmentation on {where}", "",
             f"Checkpoint `{result['checkpoint']}` (epoch {result['checkpoint_epoch']}); N = {result['n']} images "
             f"scored at {result['resolution']}; model input {result['model_image_size']} px (fit "
             f"{result['fit']}); threshold {result['threshold']:g}; post-processing: {result['postprocess']}; "
             f"test-time augmentation: {result['tta']}. HD95 and ASD are in {result['distance_unit']}.", "",
             "| metric | mean ± std | median | min | max |", "|---|---|---|---|---|"]
    for m in METRICS:
        v = s[m]
        lines.append(f"| {LABELS[m]} | {v['mean']:.4f} ± {v['std']:.4f} | {v['median']:.4f} "
                     f"| {v['min']:.4f} | {v['max']:.4f} |")
    lines += ["", f"Empty masks: {result['n_empty_target']} empty ground truths, {result['n_empty_pred']} empty "
              f"predictions, {result['n_one_empty']} cases where exactly one is empty (scored Dice 0 and HD95 = the "
              f"image diagonal, never left out of the means)."]
    if result["per_class"]:
        lines += ["", "| class | N | Dice mean ± std | HD95 mean ± std |", "|---|---|---|---|"]
        for c, v in result["per_class"].items():
            lines.append(f"| {c} | {v['dice']['n']} | {v['dice']['mean']:.4f} ± {v['dice']['std']:.4f} | "
                         f"{v['hd95']['mean']:.2f} ± {v['hd95']['std']:.2f} |")
    ov = result.get("overlap_with_training")
    if ov:
        lines += ["", "Overlap with the training split: " + (
            f"{ov['same_pixels']} same-pixel images, {ov['same_patient']} same-patient images." if ov["checked"]
            else f"not checked ({ov['reason']}).")]
    for key, what in (("unpaired_images", "images without a mask"), ("unpaired_masks", "masks without an image"),
                      ("unreadable", "unreadable pairs")):
        if result.get(key):
            lines.append(f"\n{len(result[key])} {what} were left out (listed in metrics.json).")
    lines += ["", f"![the {WORST} lowest-Dice cases: predicted outline yellow, true outline green](worst.png)", "",
              "Per-image scores: `per_image.csv`; every number: `metrics.json`."]
    return "\n".join(lines) + "\n"


#: What a segmenter's evaluate output folder holds (also the names of those written before the marker).
SEGMENTER_OUTPUTS = ("metrics.json", "report.md", "per_image.csv", "worst.png")


def _write(od: OutputDir, result, rows, names, classes, grays, preds, truths) -> None:
    with od.writing() as tmp:
        (tmp / "per_image.csv").write_text(_per_image_csv(rows, names, classes), encoding="utf-8")
        _worst_grid(tmp / "worst.png", rows, names, grays, preds, truths)
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        (tmp / "report.md").write_text(report_markdown(result), encoding="utf-8")
