"""Lung segmentation of any X-ray with a trained segmenter (``covidxray segment``).

Steps, for each input image (one file, or every image file under a folder, searched recursively; links
to folders are not followed):

1. read the bytes and :func:`~covidxray.data.imaging.decode` them (the EXIF orientation is applied:
   every output is in the *upright* orientation of the decoded image, and the CSV's width/height are
   those of the upright image), then :func:`~covidxray.data.imaging.to_gray8` (16-bit, RGB/RGBA,
   palette images);
2. fit the image into the checkpoint's S x S square exactly as ``prepare`` fitted the training X-rays
   (:func:`~covidxray.data.imaging.fit_image` with the checkpoint's ``fit``: stretch, pad or crop);
3. predict the lung probability in batches (:func:`~covidxray.infer.predict.iter_mask_probs`: on the GPU when
   there is one, in bf16; on the CPU in bf16 where it is native, else float32; ``channels_last``;
   optionally with left-right test-time augmentation); decoding, post-processing and writing run in a
   small thread pool so that the model is kept busy;
4. map the S x S probability back onto the *original* width x height by inverting the fit
   (:func:`inverse_fit`: stretch -> bilinear resize; pad -> the inner box at its offset, resized;
   crop -> resized into the centre square, 0 outside it), threshold it (default: the checkpoint's
   ``eval.threshold``) and post-process it (:func:`~covidxray.data.masks.postprocess`: the two largest
   components, holes filled; can be switched off).

Outputs in ``OUT`` (names keep the input's sub-folders, the suffix becomes ``.png``; two inputs that would
get the same name, such as ``x.jpg`` and ``x.png``, are named ``x.jpg.png`` and ``x.png.png``; a file name
that is not UTF-8 keeps its bytes):

* ``masks/<name>.png``: the mask, 0/255, at the original (upright) size;
* ``overlays/<name>.png``: the X-ray with the lung outline (unless ``overlay=False``);
* ``crops/<name>.png`` (with ``crop=True``): the gray X-ray cut to the lungs' bounding box widened by
  ``crop_margin`` x the side; no crop when no lung was found (the status says so);
* ``segment.csv``, one row per input, columns :data:`CSV_COLUMNS`: ``file`` (path relative to the input
  folder, with ``/``; bytes that are not UTF-8 written as ``\\xNN``), ``width``, ``height``,
  ``lung_area_px``, ``lung_fraction`` (of the image, 4 decimals), ``image_left_px`` / ``image_right_px``
  (the largest component on each side of the image's vertical midline), ``components``,
  ``mean_intensity`` (mean 8-bit gray value inside the lungs, 1 decimal; empty without lungs) and
  ``status``: ``ok``, ``suspicious: no lung found``, ``suspicious: one lung``, ``suspicious: N large
  components`` or ``unreadable: <reason>`` (numbers empty; also broken links, files that are no regular
  files, sub-folders that cannot be listed and images under :data:`MIN_SIDE` px a side: nothing is left
  out silently);
* ``segment.json``: the settings, the checkpoint, model and image size; ``counts`` describe the whole
  ``segment.csv`` (every run into OUT), ``last_run`` the last run.

Sides are **image** sides, not the patient's: on a standard PA film the patient's right lung is on the
image's left.

OUT must be new, empty or an earlier ``segment`` output (:func:`~covidxray.outdir.check_output_dir`; it
may not be the input folder or lie inside it); it is marked as segment's and the temporary files of a
killed earlier run are removed at the start. Every image file is written atomically (temporary file +
rename); a row is appended to ``segment.csv`` once the image's files are written, and the rows are made
durable (flush + fsync) after every batch; at the end (also on Ctrl-C) the table is rewritten whole and
sorted. A rerun with the same command, also after a kill, skips exactly the images that have their row,
mask (and overlay); a half-written last line is dropped (that image is redone). A rerun is refused when
the settings recorded in ``segment.json`` differ, unless ``overwrite=True`` (which redoes every image).
A single INPUT file that cannot be read is an error; in a folder, unreadable files get their row.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import stat
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from covidxray import __version__
from covidxray.data.imaging import UnreadableImage, decode, fit_geometry, fit_image, is_image_name, save_png, to_gray8
from covidxray.data.masks import bounding_box, lung_stats
from covidxray.data.masks import postprocess as postprocess_mask
from covidxray.data.overlays import overlay as draw_overlay
from covidxray.data.overlays import save_rgb
from covidxray.errors import CovidXrayError
from covidxray.infer.predict import LoadedSegmenter, inference_settings, iter_mask_probs, load_segmenter
from covidxray.outdir import check_output_dir, claim
from covidxray.utils import ProgressBar, atomic_path, atomic_write_text, sweep_stale_temps

#: The columns of ``segment.csv``, in order.
CSV_COLUMNS = ("file", "width", "height", "lung_area_px", "lung_fraction", "image_left_px", "image_right_px",
               "components", "mean_intensity", "status")

CSV_NAME = "segment.csv"
JSON_NAME = "segment.json"

#: The output folder's kind (:func:`~covidxray.outdir.check_output_dir`) and the names ``segment`` has
#: always written there (an OUT holding only these, without the marker, is an earlier segment output).
KIND = "segment"
LEGACY_NAMES = ("masks", "overlays", "crops", CSV_NAME, JSON_NAME)

#: Images narrower or lower than this are ``unreadable: image too small`` (nothing to segment).
MIN_SIDE = 8

#: The settings that must match between a run and a rerun into the same output folder.
SETTING_KEYS = ("input", "checkpoint", "checkpoint_step", "threshold", "postprocess", "tta", "crop", "crop_margin")


# ------------------------------------------------------------------------------------------ prediction
def inverse_fit(prob: torch.Tensor, width: int, height: int, fit: str) -> torch.Tensor:
    """Map an S x S map of a fitted image back onto the original ``width`` x ``height`` image.

    The inverse of :func:`~covidxray.data.imaging.fit_geometry`: ``stretch`` resizes the whole square;
    ``pad`` takes the inner box at its offset and resizes it; ``crop`` resizes the square into the
    centre-square box of the original and leaves 0 outside it. Bilinear (antialiased when shrinking).

    Args:
        prob: S x S (or 1 x S x S, 1 x 1 x S x S) float tensor, on any device.
        width: original width.
        height: original height.
        fit: ``stretch``, ``pad`` or ``crop``.

    Returns:
        ``height`` x ``width`` float32 tensor on ``prob``'s device.
    """
    size = int(prob.shape[-1])
    p = prob.reshape(1, 1, size, size).float()
    geo = fit_geometry(width, height, size, fit)
    if fit == "pad":
        (iw, ih), (ox, oy) = geo.inner, geo.offset
        return _resize(p[..., oy:oy + ih, ox:ox + iw], height, width)
    if fit == "crop":
        bl, bt, br, bb = geo.box
        x0, y0, x1, y1 = round(bl * width), round(bt * height), round(br * width), round(bb * height)
        out = torch.zeros(height, width, dtype=torch.float32, device=p.device)
        out[y0:y1, x0:x1] = _resize(p, y1 - y0, x1 - x0)
        return out
    return _resize(p, height, width)  # stretch (fit_geometry has rejected unknown fits)


def _resize(p: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(p.shape[-2:]) == (height, width):
        return p[0, 0]
    shrink = height < p.shape[-2] or width < p.shape[-1]
    return F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)[0, 0]


def _ready(loaded: LoadedSegmenter, device: torch.device) -> None:
    loaded.net.to(device=device, memory_format=torch.channels_last)
    loaded.net.eval()


def predict_masks(loaded: LoadedSegmenter, fitted: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
                  device: torch.device, threshold: float, tta: bool = False,
                  amp_dtype: torch.dtype | None = None) -> list[np.ndarray]:
    """Raw (not post-processed) boolean masks at the original sizes of already fitted images.

    Args:
        loaded: the segmenter (its net must already be on ``device``).
        fitted: S x S uint8 arrays (from :func:`~covidxray.data.imaging.fit_image`), one batch.
        sizes: the original (width, height) of each.
        device: where to predict.
        threshold: lung where the probability is above it.
        tta: left-right test-time augmentation.
        amp_dtype: autocast dtype, or None for float32.
    """
    if not len(fitted):
        return []
    x = torch.from_numpy(np.stack([np.asarray(f, dtype=np.uint8) for f in fitted]))[:, None]
    if device.type == "cuda":
        x = x.pin_memory()
    masks: list[np.ndarray] = []
    for start, probs in iter_mask_probs(loaded.net, x, device, len(fitted), amp_dtype, torch.channels_last, tta):
        for j in range(probs.shape[0]):
            w, h = sizes[start + j]
            masks.append((inverse_fit(probs[j, 0], w, h, loaded.fit) > threshold).cpu().numpy())
    return masks


def segment_array(loaded: LoadedSegmenter, gray_list: Iterable[Any], batch_size: int = 16,
                  device: str | torch.device = "auto", threshold: float | None = None, tta: bool = False,
                  postprocess: bool = True, *, amp: str = "auto") -> list[np.ndarray]:
    """Lung masks of in-memory grayscale X-rays, at their own sizes (for benchmarks and ``evaluate``).

    Args:
        loaded: from :func:`~covidxray.infer.predict.load_segmenter`.
        gray_list: H x W uint8 arrays or ``L`` Pillow images, of any sizes (upright already).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``... or a ``torch.device``.
        threshold: default the checkpoint's ``eval.threshold``.
        tta: left-right test-time augmentation.
        postprocess: keep the two largest components and fill their holes.
        amp: ``auto``, ``bf16`` or ``off`` (see :func:`inference_settings`).

    Returns:
        One boolean H x W mask per image.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    dev, amp_dtype = inference_settings(device, amp)
    _ready(loaded, dev)
    thr = loaded.threshold if threshold is None else float(threshold)
    grays = [_as_gray_image(g) for g in gray_list]
    out: list[np.ndarray] = []
    for i in range(0, len(grays), batch_size):
        chunk = grays[i:i + batch_size]
        fitted = [np.asarray(fit_image(g, loaded.image_size, loaded.fit)) for g in chunk]
        out += predict_masks(loaded, fitted, [g.size for g in chunk], dev, thr, tta, amp_dtype)
    return [postprocess_mask(m) for m in out] if postprocess else out


def _as_gray_image(g: Any) -> Image.Image:
    if isinstance(g, Image.Image):
        return g if g.mode == "L" else to_gray8(g)
    a = np.asarray(g.cpu() if hasattr(g, "cpu") else g)
    a = np.squeeze(a) if a.ndim > 2 else a
    if a.ndim != 2 or a.dtype != np.uint8:
        raise ValueError(f"expected H x W uint8 gray images, got {a.dtype} of shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a), mode="L")


# ------------------------------------------------------------------------------------------ the command
def shown(name: str | os.PathLike) -> str:
    """A file name as text for ``segment.csv`` and messages: bytes that are not UTF-8 (names from other
    systems, which Python reads as surrogate escapes) are written as ``\\xNN``; never raises."""
    s = os.fspath(name)
    try:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class _Item:
    path: Path
    file: str  # relative to the input root, "/"-separated, shown readably (the CSV's key)
    name: str  # output name relative to masks/ (".png"), with the input's real (maybe non-UTF-8) name
    reason: str | None = None  # known unreadable before reading (broken link, not a file, ...)


def _entry_reason(p: Path, out_r: Path) -> str | None:
    """Why an image-named entry of the input folder cannot be read, or None when it is a readable-looking file."""
    try:
        st = os.stat(p)
    except OSError as exc:
        if p.is_symlink():
            return ("broken link (a loop of links)" if exc.errno == errno.ELOOP
                    else "broken link (its target does not exist)")
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    rp = p.resolve()
    if rp == out_r or out_r in rp.parents:
        return "a link into OUT (segment's own output)"
    return None


def list_inputs(inputs: Path, out: Path) -> list[_Item]:
    """The images to segment: ``inputs`` itself when a file, else every image-named entry under it
    (recursively, sorted, links to folders not followed), each with its unique output name.

    Nothing is skipped silently: broken or looping links, entries that are no regular files and
    sub-folders that cannot be listed come back with their ``reason`` (rows ``unreadable: ...``).
    """
    if not inputs.is_dir():
        return [_Item(inputs, shown(inputs.name), output_names([inputs.name])[0])]
    out_r = out.resolve()
    found: list[tuple[Path, str, str | None]] = []
    folders: list[tuple[Path, str, str]] = []  # sub-folders that could not be listed

    def unlistable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else inputs
        if where == inputs:
            raise CovidXrayError(f"cannot list the input folder {shown(inputs)} "
                                 f"({exc.strerror or type(exc).__name__})", "Check its permissions")
        folders.append((where, where.relative_to(inputs).as_posix() + "/",
                        f"cannot list the folder ({exc.strerror or type(exc).__name__})"))

    for root, _dirs, names in os.walk(inputs, onerror=unlistable):
        for n in names:
            if not is_image_name(n):
                continue
            p = Path(root, n)
            found.append((p, p.relative_to(inputs).as_posix(), _entry_reason(p, out_r)))
    found.sort(key=lambda t: t[1])
    items = [_Item(p, shown(rel), name, reason)
             for (p, rel, reason), name in zip(found, output_names([rel for _, rel, _ in found]))]
    items += [_Item(p, shown(rel), "", reason) for p, rel, reason in folders]
    return sorted(items, key=lambda it: it.file)


def output_names(files: Sequence[str]) -> list[str]:
    """Unique output names (``.png``) for relative input paths: the suffix is replaced (``a/x.jpg`` ->
    ``a/x.png``); names that would clash (case-insensitively) keep the whole file name (``x.jpg.png``),
    and any clash left gets a counter (``x.jpg.1.png``), in the sorted order of the inputs."""

    def plain(f: str) -> str:
        stem, _ = os.path.splitext(f)
        return stem + ".png"

    counts: dict[str, int] = {}
    for f in files:
        counts[plain(f).lower()] = counts.get(plain(f).lower(), 0) + 1
    names = [plain(f) if counts[plain(f).lower()] == 1 else f + ".png" for f in files]
    seen: set[str] = set()
    result = []
    for name in names:
        unique, k = name, 0
        while unique.lower() in seen:
            k += 1
            unique = f"{name[:-4]}.{k}.png"
        seen.add(unique.lower())
        result.append(unique)
    return result


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier run's ``segment.csv`` (the last row of a file wins). A killed run may have
    left a half-written last line: it is dropped (its image is redone), as is any row that is not whole."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CovidXrayError(f"cannot read {shown(path)} ({exc.strerror or type(exc).__name__})",
                             "Check its permissions, or choose another OUT") from None
    text = raw.decode("utf-8", "replace")
    text = text[:text.rfind("\n") + 1]  # a line is whole once its newline is written
    if not text:
        return {}
    reader = csv.reader(io.StringIO(text, newline=""))
    if tuple(next(reader, None) or ()) != CSV_COLUMNS:
        raise CovidXrayError(f"{shown(path)} does not have the columns of covidxray segment",
                             "Pass --overwrite to redo every image, or choose another OUT")
    rows: dict[str, dict[str, str]] = {}
    for rec in reader:
        if len(rec) == len(CSV_COLUMNS) and rec[-1]:
            rows[rec[0]] = dict(zip(CSV_COLUMNS, rec))
    return rows


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_csv(path: Path, rows: dict[str, dict[str, str]]) -> None:
    """Rewrite ``segment.csv`` whole and durably (temporary file, fsync, rename), rows sorted by file."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for key in sorted(rows):
                writer.writerow([rows[key][c] for c in CSV_COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_dir(path.parent)


class _Journal:
    """Rows appended to ``segment.csv`` as images finish; :meth:`sync` (once per batch) makes them durable
    (flush + fsync), so that a rerun after a kill skips exactly the images whose rows are on disk."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "a", encoding="utf-8", errors="backslashreplace", newline="")
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.dirty = False

    def append(self, row: dict[str, str]) -> None:
        self.writer.writerow([row[c] for c in CSV_COLUMNS])
        self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.dirty = False

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self.fh.close()


def _row(file: str, width: int | None = None, height: int | None = None, stats: dict | None = None,
         status: str = "") -> dict[str, str]:
    row = dict.fromkeys(CSV_COLUMNS, "")
    row["file"] = file
    if stats is not None:
        mean = stats["mean_intensity"]
        row.update(width=str(width), height=str(height), lung_area_px=str(stats["area_px"]),
                   lung_fraction=f"{stats['area_fraction']:.4f}", image_left_px=str(stats["image_left_px"]),
                   image_right_px=str(stats["image_right_px"]), components=str(stats["components"]),
                   mean_intensity="" if mean is None else f"{mean:.1f}", status=stats["status"])
    else:
        row["status"] = status
    return row


def _counts(rows: dict[str, dict[str, str]]) -> dict[str, int]:
    """What ``segment.csv`` holds: rows, and how many are ok, suspicious, unreadable (all runs into OUT)."""
    statuses = [r["status"] for r in rows.values()]
    ok = sum(s == "ok" for s in statuses)
    suspicious = sum(s.startswith("suspicious") for s in statuses)
    unreadable = sum(s.startswith("unreadable") for s in statuses)
    return {"rows": len(statuses), "segmented": ok + suspicious, "ok": ok, "suspicious": suspicious,
            "unreadable": unreadable}


def _read_gray(item: _Item) -> Image.Image | str:
    """Decode one input to its upright gray image, or the reason it is unreadable."""
    if item.reason:
        return item.reason
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or type(exc).__name__})"
    try:
        gray = to_gray8(decode(data))
    except UnreadableImage as exc:
        return str(exc)
    except Exception as exc:  # an exotic mode that cannot become grayscale
        return f"cannot convert to grayscale ({type(exc).__name__}: {exc})"
    if min(gray.size) < MIN_SIDE:
        return f"image too small ({gray.width} x {gray.height} px; at least {MIN_SIDE} px a side)"
    return gray


def _load(item: _Item, size: int, fit: str) -> tuple[Image.Image, np.ndarray] | str:
    """Decode one input: ``(upright gray image, fitted S x S uint8)`` or the reason it is unreadable."""
    gray = _read_gray(item)
    if isinstance(gray, str):
        return gray
    return gray, np.asarray(fit_image(gray, size, fit))


def _prefetch(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, window: int) -> Iterator[tuple[Any, Any]]:
    """``(item, fn(item))`` in order, with at most ``window`` calls running ahead in ``pool``."""
    queue: deque[tuple[Any, Future]] = deque()
    it = iter(items)
    for item in it:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= window:
            break
    while queue:
        item, fut = queue.popleft()
        nxt = next(it, None)
        if nxt is not None:
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, fut.result()


@contextlib.contextmanager
def _writing(what: str, out: Path) -> Iterator[None]:
    """OSError (disk full, permissions) while writing OUT -> a one-line CovidXrayError."""
    try:
        yield
    except OSError as exc:
        raise CovidXrayError(f"cannot write {what} in {shown(out)} ({exc.strerror or type(exc).__name__})",
                             "Free some space or fix the permissions, then run the same command again to "
                             "resume") from None


def segment_images(checkpoint: str | os.PathLike | LoadedSegmenter, inputs: str | os.PathLike,
                   out: str | os.PathLike, *,
                   batch_size: int = 16, threshold: float | None = None, overlay: bool = True, crop: bool = False,
                   crop_margin: float = 0.05, tta: bool = False, postprocess: bool = True, device: str = "auto",
                   overwrite: bool = False, console=None, workers: int | None = None) -> dict[str, Any]:
    """Segment the lungs of one image or a folder of images; see the module docstring.

    Args:
        checkpoint: a segmenter's run folder (its ``best.pt``, else ``last.pt``) or ``.pt`` file, or an
            already loaded :class:`~covidxray.infer.predict.LoadedSegmenter`.
        inputs: an image file, or a folder searched recursively.
        out: the output folder: new, empty, or an earlier ``segment`` output (resumed); neither the input
            folder nor inside it.
        batch_size: images per forward pass.
        threshold: lung probability threshold in (0, 1); default the checkpoint's ``eval.threshold``.
        overlay: write ``overlays/``.
        crop: write ``crops/`` (the X-ray cut to the lungs' bounding box).
        crop_margin: the crop's margin as a fraction of the image's side, in [0, 0.5).
        tta: left-right test-time augmentation.
        postprocess: keep the two largest components, fill holes.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overwrite: redo every image (and accept other settings than the folder's earlier run).
        console: a rich console for the progress bar (None: no progress display).
        workers: threads for decoding and writing (default: up to 4).

    Returns:
        ``segmented``, ``skipped``, ``unreadable`` (list of (file, reason)), ``suspicious`` (among the
        images segmented now), ``csv``, ``out``, ``images_per_s``, ``threshold``, ``seconds``.

    Raises:
        CovidXrayError: bad options, a missing or (single file) unreadable input, no images, an OUT that
            :func:`~covidxray.outdir.check_output_dir` refuses, a checkpoint that is not a segmenter, or other
            settings than the earlier run into ``out`` (without ``overwrite``).
    """
    inputs, out = Path(inputs), Path(out)
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise CovidXrayError(f"--batch-size must be at least 1, got {batch_size}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise CovidXrayError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    if not 0.0 <= crop_margin < 0.5:
        raise CovidXrayError(f"--crop-margin must be at least 0 and below 0.5, got {crop_margin}")
    if not inputs.exists():
        if inputs.is_symlink():
            raise CovidXrayError(f"input {shown(inputs)} is a broken link", "Pass an image file or a folder of images")
        raise CovidXrayError(f"input {shown(inputs)} does not exist", "Pass an image file or a folder of images")
    check_output_dir(out, KIND, legacy=LEGACY_NAMES, inputs=[inputs] if inputs.is_dir() else [], option="OUT")
    items = list_inputs(inputs, out)
    if not items:
        raise CovidXrayError(f"no images in {shown(inputs)} (looked for .png, .jpg, .jpeg, .bmp, .tif, .tiff, "
                             "recursively)")
    if not inputs.is_dir():  # one file: unreadable is an input error, not a row
        gray = _read_gray(items[0])
        if isinstance(gray, str):
            raise CovidXrayError(f"cannot segment {shown(inputs)}: {gray}",
                                 "Pass a PNG, JPEG, BMP or TIFF X-ray (or a folder of them)")

    dev, amp_dtype = inference_settings(device)
    loaded = checkpoint if isinstance(checkpoint, LoadedSegmenter) else load_segmenter(checkpoint)
    thr = loaded.threshold if threshold is None else float(threshold)
    if tta and loaded.tta_note() and console is not None:
        console.print(loaded.tta_note(), highlight=False, markup=False, soft_wrap=True)
    ckpt_path = loaded.checkpoint.get("path")
    settings = {"input": str(inputs.resolve()), "checkpoint": str(Path(ckpt_path).resolve()) if ckpt_path else None,
                "checkpoint_step": int(loaded.checkpoint.get("step", 0)), "threshold": thr,
                "postprocess": bool(postprocess), "tta": bool(tta), "crop": bool(crop),
                "crop_margin": float(crop_margin) if crop else None}
    csv_path, json_path = out / CSV_NAME, out / JSON_NAME
    rows = {} if overwrite else _previous_rows(json_path, csv_path, settings)

    # what is already done: a row (not unreadable), its mask and (when asked) its overlay
    def written(path: Path) -> bool:
        try:
            return path.is_file() and path.stat().st_size > 0
        except OSError:
            return False

    def done(item: _Item) -> bool:
        row = rows.get(item.file)
        return (row is not None and not item.reason and not row["status"].startswith("unreadable")
                and written(out / "masks" / item.name)
                and (not overlay or written(out / "overlays" / item.name)))

    todo = [it for it in items if not done(it)]
    skipped = len(items) - len(todo)
    for it in todo:  # a row appears again only once the image's files are written
        rows.pop(it.file, None)

    meta = {"covidxray_version": __version__, "settings": settings, "model": loaded.checkpoint.get("model"),
            "image_size": loaded.image_size, "fit": loaded.fit, "overlay": bool(overlay), "counts": None,
            "last_run": None}

    def write_json(last_run: dict[str, int] | None) -> None:
        meta["counts"], meta["last_run"] = _counts(rows), last_run
        atomic_write_text(json_path, json.dumps(meta, indent=2) + "\n")

    with _writing(CSV_NAME, out):
        claim(out, KIND, KIND, settings)  # (the resume check compares segment.json's copy: older OUTs have it)
        sweep_stale_temps(out, recursive=True)  # what a killed earlier run left half-written
        _write_csv(csv_path, rows)  # first: never a CSV of older settings beside this run's segment.json
        write_json(None)
        journal = _Journal(csv_path)

    _ready(loaded, dev)
    size, fit = loaded.image_size, loaded.fit
    n_workers = workers or max(1, min(4, os.cpu_count() or 1))
    counts = {"segmented": 0, "suspicious": 0}
    unreadable: list[tuple[str, str]] = []

    def finish(item: _Item, gray: Image.Image, raw: np.ndarray) -> dict[str, str]:
        mask = postprocess_mask(raw) if postprocess else raw
        g = np.asarray(gray)
        stats = lung_stats(mask, g)
        with _writing(f"the outputs of {item.file}", out):
            if crop:
                crop_path = out / "crops" / item.name
                box = bounding_box(mask, crop_margin)
                if box is not None:
                    crop_path.parent.mkdir(parents=True, exist_ok=True)
                    save_png(gray.crop(box), crop_path)
                else:
                    crop_path.unlink(missing_ok=True)  # no stale crop of an earlier run
            if overlay:
                save_rgb(draw_overlay(g, mask), out / "overlays" / item.name)
            mask_path = out / "masks" / item.name
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            save_png(mask.astype(np.uint8) * 255, mask_path)
        return _row(item.file, gray.width, gray.height, stats)

    def add(row: dict[str, str]) -> None:
        rows[row["file"]] = row
        with _writing(CSV_NAME, out):
            journal.append(row)

    progress = ProgressBar(console, "segment", len(todo))
    pending: deque[Future] = deque()
    t0 = time.perf_counter()

    def collect(fut: Future) -> None:
        row = fut.result()
        add(row)
        counts["segmented"] += 1
        counts["suspicious"] += row["status"].startswith("suspicious")
        progress.advance()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            collect(pending.popleft())
        while pending and pending[0].done():
            collect(pending.popleft())
        with _writing(CSV_NAME, out):
            journal.sync()  # once per batch: the rows so far survive a kill

    # images decoded ahead / waiting to be written: the next batch is ready when the model wants it,
    # and memory stays bounded (originals can be large)
    ahead = batch_size + 2 * n_workers
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix="covidxray-segment")
    failed = False
    try:
        with progress:
            batch: list[tuple[_Item, Image.Image, np.ndarray]] = []

            def run_batch() -> None:
                masks = predict_masks(loaded, [b[2] for b in batch], [b[1].size for b in batch], dev, thr, tta,
                                      amp_dtype)
                for (item, gray, _), raw in zip(batch, masks):
                    pending.append(pool.submit(finish, item, gray, raw))
                batch.clear()
                drain(ahead)

            for item, loaded_img in _prefetch(pool, lambda it: _load(it, size, fit), todo, ahead):
                if isinstance(loaded_img, str):
                    add(_row(item.file, status=f"unreadable: {loaded_img}"))
                    unreadable.append((item.file, loaded_img))
                    progress.advance()
                    continue
                batch.append((item, *loaded_img))
                if len(batch) == batch_size:
                    run_batch()
            if batch:
                run_batch()
            drain(0)
    except BaseException:
        failed = True
        raise
    finally:
        # Ctrl-C or an error: keep what was finished; running writes complete (they are atomic anyway)
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                row = fut.result()
                rows[row["file"]] = row
        try:
            with _writing(CSV_NAME, out):
                journal.close()
                _write_csv(csv_path, rows)  # sorted, whole
                write_json(None)
        except CovidXrayError:
            if not failed:
                raise
            # the first error is the one to report; the rows on disk are whole up to the last batch
    seconds = time.perf_counter() - t0
    result = {"segmented": counts["segmented"], "skipped": skipped, "unreadable": unreadable,
              "suspicious": counts["suspicious"], "csv": csv_path, "out": out, "threshold": thr,
              "seconds": seconds, "images_per_s": counts["segmented"] / seconds if seconds > 0 else 0.0,
              "device": str(dev)}
    with _writing(JSON_NAME, out):
        write_json({"segmented": counts["segmented"], "skipped": skipped, "unreadable": len(unreadable),
                    "suspicious": counts["suspicious"]})
    return result


def _previous_rows(json_path: Path, csv_path: Path, settings: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The rows of an earlier run into the same folder, after checking that its settings are these."""
    if not json_path.is_file():
        _read_csv(csv_path)  # a segment.csv of no known run: only checked to be segment's (then redone)
        return {}
    hint = "Pass --overwrite to redo every image with the new settings, or choose another OUT"
    try:
        old = json.loads(json_path.read_text(encoding="utf-8"))["settings"]
        changed = [f"{k} {old.get(k)!r} -> {settings[k]!r}" for k in SETTING_KEYS if old.get(k) != settings[k]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise CovidXrayError(f"{shown(json_path)} is unreadable, so the settings of the earlier run are unknown",
                             hint) from None
    if changed:
        raise CovidXrayError(f"{shown(json_path.parent)} holds a segmentation with other settings "
                             f"({'; '.join(changed)})", hint)
    return _read_csv(csv_path)
