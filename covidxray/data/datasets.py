"""Datasets over a prepared folder (see ``docs/data.md`` for its layout).

Two views of the same data:

* :class:`PreparedDataset` - a map-style dataset whose items are dicts
  (``image``, ``label``, ``mask`` when present, ``id``), the torchxrayvision
  convention; a paired transform is applied to image and mask together.
* :func:`load_tensor_data` - the fast path for training: the whole split
  decoded once into one ``uint8`` tensor (N x 1 x H x W; with ``masks=True`` only
  the images that have a lung mask, the masks beside them), cached on disk beside
  the prepared data and invalidated when the data change, so that an epoch costs
  no decoding (and, on a GPU, no host-to-device copy either).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from covidxray.data.imaging import UnreadableImage, decode, is_image_name, to_gray8
from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

CACHE_DIR = ".cache"
CACHE_FORMAT = 1
SPLITS = ("train", "val", "test")
#: The fix for a prepared folder whose files were changed after ``prepare`` (deleted, damaged).
REPREPARE = "Run `covidxray prepare` again into a new folder (or restore the folder from a copy)"


def _show(path: str | os.PathLike) -> str:
    """A path for a message (undecodable bytes of a name shown as \\xNN, never raising)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def read_prepared_info(root: str | os.PathLike) -> dict:
    """Read and check ``prepare.json`` of a prepared folder; clear errors otherwise."""
    root = Path(root)
    if not root.exists():
        raise CovidXrayError(
            f"prepared data folder {root} does not exist",
            f"Create it with `covidxray prepare SRC {root}` (or `covidxray prepare --demo {root}`)",
        )
    if not root.is_dir():
        raise CovidXrayError(f"{root} is not a folder; pass the OUT folder of `covidxray prepare`")
    info_path = root / "prepare.json"
    if not info_path.is_file():
        hint = (
            "It looks like an unfinished `covidxray prepare`: run the same prepare command again to finish it"
            if (root / ".prepare-state.json").exists() or (root / "manifest.csv").exists()
            else f"Prepare the raw images first: `covidxray prepare SRC {root}`"
        )
        raise CovidXrayError(f"{root} is not a prepared data folder (no prepare.json)", hint)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: also a UnicodeDecodeError of a damaged file
        raise CovidXrayError(f"{_show(info_path)} is unreadable ({exc})", REPREPARE) from None
    if not isinstance(info, dict):
        raise CovidXrayError(f"{_show(info_path)} is damaged (not a JSON object)", REPREPARE)
    if not info.get("complete"):
        raise CovidXrayError(f"{root} holds an incomplete preparation", "Run the same prepare command again to finish it")
    size = info.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or not isinstance(info.get("classes", []), list):
        raise CovidXrayError(f"{_show(info_path)} is damaged (no valid size/classes)", REPREPARE)
    return info


@dataclass(frozen=True)
class Record:
    """One row of ``manifest.csv``."""

    split: str
    label: str
    file: str
    mask: str

    @property
    def id(self) -> str:
        return Path(self.file).stem


def read_records(root: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> tuple[list[Record], list[str]]:
    """Rows of ``split`` (optionally of some classes only), sorted, plus the class names used.

    Class names (and so label indices) are the sorted classes of the whole
    preparation, restricted to ``classes`` when given, so that labels do not
    depend on which split is read.
    """
    root = Path(root)
    info = read_prepared_info(root)
    all_classes = sorted(info.get("classes", []))
    if classes:
        unknown = [c for c in classes if c not in all_classes]
        if unknown:
            raise CovidXrayError(
                f"class(es) {', '.join(unknown)} not in {root}; it has: {', '.join(all_classes)}",
                "Fix --classes / data.classes",
            )
        all_classes = sorted(set(classes))
    records = [r for r in read_manifest(root, info) if r.split == split and r.label in all_classes]
    records.sort(key=lambda r: (r.label, r.file))
    if not records:
        raise CovidXrayError(
            f"split '{split}' of {root} has no images of class(es) {', '.join(all_classes)}",
            "Choose another split/classes or prepare with a non-zero fraction for this split",
        )
    return records, all_classes


def _safe_rel(value: str) -> bool:
    """A manifest path: relative, inside the prepared folder."""
    p = Path(value)
    return bool(value) and not p.is_absolute() and ".." not in p.parts


def read_manifest(root: str | os.PathLike, info: dict | None = None) -> list[Record]:
    """Every row of ``manifest.csv`` of a prepared folder, checked.

    A manifest that cannot be decoded, lacks the ``split``/``class``/``file`` columns, has a row with
    too few or too many fields (a truncated or garbled file), a path outside the folder, or rows that
    do not add up to the counts of ``prepare.json`` is one :class:`CovidXrayError` naming the file and
    the line, never a traceback.
    """
    root = Path(root)
    info = read_prepared_info(root) if info is None else info
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise CovidXrayError(f"{_show(manifest)} is missing", REPREPARE)

    def damaged(what: str) -> CovidXrayError:
        return CovidXrayError(f"{_show(manifest)} is damaged ({what})", REPREPARE)

    try:
        text = manifest.read_bytes().decode("utf-8")
    except OSError as exc:
        raise CovidXrayError(f"cannot read {_show(manifest)} ({exc.strerror or exc})", REPREPARE) from None
    except UnicodeDecodeError as exc:
        raise damaged(f"not UTF-8 text at byte {exc.start}") from None
    records: list[Record] = []
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\0extra")
        columns = reader.fieldnames or []
        missing = [c for c in ("split", "class", "file") if c not in columns]
        if missing:
            raise damaged(f"no {', '.join(missing)} column")
        for row in reader:
            line = reader.line_num
            extra = row.pop("\0extra", None)
            if extra is not None:
                raise damaged(f"line {line} has {len(columns) + len(extra)} fields instead of {len(columns)}")
            if any(v is None for v in row.values()):
                raise damaged(f"line {line} is cut short")
            if row["split"] not in SPLITS or not row["class"] or not _safe_rel(row["file"]):
                raise damaged(f"line {line} is not a valid row")
            mask = row.get("mask") or ""
            if mask and not _safe_rel(mask):
                raise damaged(f"line {line} is not a valid row")
            records.append(Record(row["split"], row["class"], row["file"], mask))
    except csv.Error as exc:
        raise damaged(str(exc)) from None
    counts = info.get("counts")
    if isinstance(counts, dict) and all(isinstance(c, dict) for c in counts.values()):
        expected = Counter({(s, c): n for s, per in counts.items() for c, n in per.items()
                            if isinstance(n, int) and n > 0})
        found = Counter((r.split, r.label) for r in records)
        if found != expected:
            raise damaged(f"{len(records)} rows for the {sum(expected.values())} images of prepare.json")
    return records


def _missing(path: Path) -> CovidXrayError:
    return CovidXrayError(
        f"{_show(path)} is listed in manifest.csv but missing (deleted or moved after `covidxray prepare`?)",
        REPREPARE,
    )


def check_files(root: str | os.PathLike, records: Sequence[Record]) -> None:
    """Refuse, naming the first, files of ``records`` (images and masks) that are gone from ``root``."""
    root = Path(root)
    for rec in records:
        for rel in (rec.file, rec.mask):
            if rel and not (root / rel).is_file():
                raise _missing(root / rel)


def _load_gray(path: Path, size: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("L"))  # a writable copy (torch.from_numpy needs one)
    except FileNotFoundError:
        raise _missing(path) from None
    except (OSError, ValueError) as exc:  # PIL: UnidentifiedImageError (OSError), truncated data, bad modes
        raise CovidXrayError(f"{_show(path)} is not a readable image ({exc})", REPREPARE) from None
    if size is not None and arr.shape != (size, size):
        raise CovidXrayError(f"{_show(path)} is {arr.shape[1]}x{arr.shape[0]}, expected {size}x{size}", REPREPARE)
    return arr


class PreparedDataset(torch.utils.data.Dataset):
    """Map-style dataset over one split of a prepared folder.

    Items are dicts: ``image`` (uint8 tensor 1 x H x W, or float in [-1, 1] with
    ``as_float=True``), ``label`` (int index into :attr:`classes`), ``mask``
    (uint8 1 x H x W with 0/255; only when the image has one), ``id`` (file stem)
    and ``class`` (name).

    Args:
        root: prepared folder.
        split: ``train``, ``val`` or ``test``.
        classes: subset of class names (default: all).
        transform: callable applied to ``(image, mask)``, both tensors, the same
            random draw for both (e.g. a ``torchvision.transforms.v2`` pipeline on
            ``tv_tensors.Image`` and ``tv_tensors.Mask``); ``mask`` may be None.
        as_float: return the image as float in [-1, 1] instead of uint8.

    Example:
        >>> ds = PreparedDataset("data/prepared", "train")  # doctest: +SKIP
        >>> item = ds[0]; item["image"].shape, item["label"], item["id"]  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", classes: Sequence[str] | None = None,
                 transform: Callable | None = None, as_float: bool = False):
        self.root = Path(root)
        self.info = read_prepared_info(self.root)
        self.size = int(self.info["size"])
        self.records, self.classes = read_records(self.root, split, classes)
        check_files(self.root, self.records)  # now, not in the middle of the first epoch
        self.transform = transform
        self.as_float = as_float

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        image = torch.from_numpy(_load_gray(self.root / rec.file, self.size).copy())[None]
        mask = None
        if rec.mask:
            mask = torch.from_numpy(_load_gray(self.root / rec.mask, self.size).copy())[None]
        if self.transform is not None:
            image, mask = _paired(self.transform, image, mask)
        item = {"image": to_float(image) if self.as_float else image, "label": self.classes.index(rec.label),
                "class": rec.label, "id": rec.id}
        if mask is not None:
            item["mask"] = mask
        return item


def _paired(transform: Callable, image: torch.Tensor, mask: torch.Tensor | None):
    from torchvision import tv_tensors  # local: torchvision adds ~1 s to start-up; only a transform needs it

    if mask is None:
        return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), None
    out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (the model range)."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return images.detach().float().add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)


def resize_u8(images: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """Resize uint8 images (N x C x H x W) to ``size`` x ``size``, on their device, as uint8.

    Bilinear, antialiased when shrinking (``F.interpolate(..., antialias=True)``), rounded back
    to uint8; processed in chunks of ``chunk`` images to bound the float memory.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    for i in range(0, images.shape[0], chunk):
        x = images[i:i + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < images.shape[-1])
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


@dataclass
class TensorData:
    """A whole split in memory: ``images`` uint8 N x 1 x H x W, ``labels`` int64 N, and with
    ``load_tensor_data(..., masks=True)`` ``masks`` uint8 N x 1 x H x W of 0/1 beside the images."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    ids: list[str]
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str) -> "TensorData":
        masks = None if self.masks is None else self.masks.to(device)
        return TensorData(self.images.to(device), self.labels.to(device), self.classes, self.ids, masks)


def resize_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """Resize 0/1 uint8 masks (N x 1 x H x W) to ``size``: bilinear on 0/255, antialiased when shrinking,
    then >= 128 (smoother edges than nearest neighbour, the same outline in the mean)."""
    if masks.shape[-2:] == (size, size):
        return masks
    return (resize_u8(masks * 255, size) >= 128).to(torch.uint8)


def _cache_key(root: Path, records: list[Record], classes: list[str], size: int, masks: bool = False) -> str:
    # Any change of the file list, a file's size or mtime, the classes or the size
    # gives a new key, so a stale cache is never used.
    h = hashlib.sha256(f"{CACHE_FORMAT}|{size}|{','.join(classes)}".encode())
    def stat(rel: str) -> os.stat_result:
        try:
            return (root / rel).stat()
        except FileNotFoundError:
            raise _missing(root / rel) from None
        except OSError as exc:
            raise CovidXrayError(f"cannot read {_show(root / rel)} ({exc.strerror or exc})", REPREPARE) from None

    for rec in records:
        st = stat(rec.file)
        h.update(f"|{rec.label}|{rec.file}|{st.st_size}|{st.st_mtime_ns}".encode())
        if masks:
            st = stat(rec.mask)
            h.update(f"|{rec.mask}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_tensor_data(root: str | os.PathLike, split: str = "train", classes: Sequence[str] | None = None,
                     image_size: int | None = None, cache: bool = True, log: Callable[[str], None] | None = None,
                     masks: bool = False) -> TensorData:
    """Decode a whole split into one uint8 tensor, using/writing the on-disk cache.

    Args:
        root: prepared folder.
        split: split to load.
        classes: subset of class names (default: all).
        image_size: the size the caller needs; a different prepared size is an error.
        cache: read/write ``<root>/.cache/<split>-<key>.pt``.
        log: optional callable for one-line notes (cache hit/miss).
        masks: load only the images that have a lung mask, with their masks (``TensorData.masks``, 0/1);
            how many were left out is logged, and a split without any mask is an error.
    """
    root = Path(root)
    info = read_prepared_info(root)
    size = int(info["size"])
    if image_size is not None and size != image_size:
        raise CovidXrayError(
            f"{root} was prepared at {size} px but {image_size} px was asked",
            f"Pass --image-size {size}, or prepare again with --size {image_size} into another folder",
        )
    records, class_names = read_records(root, split, classes)
    if masks:
        with_mask = [r for r in records if r.mask]
        if not with_mask:
            raise CovidXrayError(
                f"no image of the {split} split of {root} ({', '.join(class_names)}) has a lung mask",
                "Prepare from a source with masks (the Kaggle layout's <Class>/masks/ folders, without --no-masks), "
                "or try `covidxray prepare --demo` (phantoms with masks)")
        if log and len(with_mask) < len(records):
            log(f"{len(records) - len(with_mask)} of {len(records)} {split} images have no lung mask and are left "
                f"out; {len(with_mask)} images with masks are used")
        records = with_mask
    key = _cache_key(root, records, class_names, size, masks)
    prefix = f"{split}.masks-" if masks else f"{split}-"
    cache_file = root / CACHE_DIR / f"{prefix}{key}.pt"
    if cache and cache_file.is_file():
        try:
            blob = torch.load(cache_file, map_location="cpu", weights_only=True)
            if log:
                log(f"loaded {len(blob['ids'])} {split} images{' and masks' if masks else ''} from cache {cache_file}")
            return TensorData(blob["images"], blob["labels"], list(blob["classes"]), list(blob["ids"]),
                              blob.get("masks"))
        except Exception:  # a corrupt cache is rebuilt, never fatal
            if log:
                log(f"cache {cache_file} unreadable; rebuilding it")
    images = torch.empty((len(records), 1, size, size), dtype=torch.uint8)
    mask_t = torch.empty_like(images) if masks else None
    for i, rec in enumerate(records):
        images[i, 0] = torch.from_numpy(_load_gray(root / rec.file, size))
        if mask_t is not None:
            mask_t[i, 0] = torch.from_numpy((_load_gray(root / rec.mask, size) >= 128).astype(np.uint8))
    labels = torch.tensor([class_names.index(r.label) for r in records], dtype=torch.long)
    data = TensorData(images, labels, class_names, [r.id for r in records], mask_t)
    if cache:
        try:
            for old in (root / CACHE_DIR).glob(f"{prefix}*.pt"):
                old.unlink()
            blob = {"images": images, "labels": labels, "classes": class_names, "ids": data.ids}
            if mask_t is not None:
                blob["masks"] = mask_t
            with atomic_path(cache_file) as tmp:
                torch.save(blob, tmp)
            if log:
                log(f"decoded {len(records)} {split} images; cached in {cache_file}")
        except OSError as exc:  # read-only data folder: train anyway, say why it is slower next time
            if log:
                log(f"could not write cache {cache_file} ({exc}); continuing without it")
    return data


def class_counts(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` split over classes in proportion to ``weights`` (largest remainders; sums to ``n``)."""
    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    raw = n * w
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def generated_image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The image files of a folder of generated samples, sorted: dot-files and files under dot-folders are left
    out, and so is the ``grid.png`` that ``covidxray sample --grid`` writes beside them."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_name(p.name) and p.name != "grid.png"
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def decode_generated(files: Sequence[Path], what: str, skip_unreadable: bool = False,
                     fix: str = "Remove or regenerate them"
                     ) -> tuple[list[np.ndarray], list[Path], list[tuple[str, str]]]:
    """Decode generated images to uint8 grayscale arrays, all square and of one size: the arrays, their files,
    and the unreadable files with the reason. An unreadable file is refused in one message (``what`` names the
    option or key that gave the folder, ``fix`` is its hint) unless ``skip_unreadable``; sizes that are not one
    square size are always refused, counted per size."""
    arrays, kept, bad, sizes = [], [], [], {}
    for p in files:
        try:
            a = np.asarray(to_gray8(decode(p.read_bytes())), dtype=np.uint8)
        except (UnreadableImage, OSError) as exc:
            bad.append((str(p), str(exc)))
            continue
        sizes.setdefault(a.shape, []).append(str(p))
        arrays.append(a)
        kept.append(p)
    if bad and not skip_unreadable:
        first = "; ".join(f"{f}: {why}" for f, why in bad[:3])
        raise CovidXrayError(f"{what}: {len(bad)} of {len(files)} files are unreadable ({first}"
                             f"{'; ...' if len(bad) > 3 else ''})",
                             fix)
    if len(sizes) > 1 or (sizes and next(iter(sizes))[0] != next(iter(sizes))[1]):
        desc = ", ".join(f"{len(v)} of {s[1]}x{s[0]} (e.g. {v[0]})" for s, v in sizes.items())
        raise CovidXrayError(f"{what}: the images must be square and of one size; found {desc}",
                             "Draw all samples at one size (the generator's)")
    return arrays, kept, bad


def read_class_folders(folder: str | os.PathLike, classes: Sequence[str], what: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``folder``, which holds one sub-folder per class (the OUT of ``covidxray sample`` for a
    class-conditional model): uint8 images (N x 1 x S x S, one square size) and their labels, indices into
    ``classes``. Dot-files and ``grid.png`` are left out; anything else that is not a readable image of that
    size is refused in one message naming the file (``what`` names the option or key that gave the folder)."""
    folder = Path(folder)
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = generated_image_files(folder, recursive=False)
    unknown = [p.name for p in subs if p.name not in classes]
    hint = (f"Write them with `covidxray sample RUN {_show(folder)}` from a class-conditional generator trained on "
            f"these classes, or pass the generator's run itself")
    if unknown or loose or not subs:
        what_is = (f"sub-folders that are not classes of the data ({', '.join(unknown[:5])})" if unknown else
                   f"images outside class sub-folders (e.g. {loose[0].name})" if loose else "no class sub-folders")
        raise CovidXrayError(f"{what}: {_show(folder)} has {what_is}; generated images need one sub-folder per class "
                             f"({', '.join(classes)})", hint)
    files = [p for sub in subs for p in generated_image_files(sub, recursive=False)]
    if not files:
        raise CovidXrayError(f"{what}: {_show(folder)} holds no images in its class sub-folders", hint)
    arrays, kept, _ = decode_generated(files, f"{what} {_show(folder)}")
    labels = [list(classes).index(p.parent.name) for p in kept]
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1), torch.tensor(labels, dtype=torch.long)
