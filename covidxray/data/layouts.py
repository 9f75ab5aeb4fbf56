"""Recognise how a folder of chest X-rays is laid out and list its images per class.

Three layouts are understood (all are "class folders", they differ in naming and in where the
images sit inside each class folder):

* ``kaggle-v2v3`` -- COVID-19 Radiography Database v2/v3: ``COVID-19`` or ``COVID``,
  ``NORMAL``/``Normal`` and ``Viral Pneumonia`` folders directly holding images
  (``COVID-19 (12).png``), metadata ``.xlsx``/``.csv`` files beside them.
* ``kaggle-v4`` -- ``COVID-19_Radiography_Dataset``: ``<Class>/images/*.png`` with lung masks
  in ``<Class>/masks/*.png`` (paired by file name). SRC may also be the parent folder holding a
  single ``COVID-19_Radiography_Dataset`` folder (what the Kaggle zip extracts to).
* ``generic`` -- any class folder names; images directly in (or nested below) each class
  folder, or in ``images/`` with ``masks/`` beside it.

Example:
    >>> layout = detect_layout("data/COVID-19_Radiography_Dataset")  # doctest: +SKIP
    >>> layout.name, sorted(layout.classes)  # doctest: +SKIP
    ('kaggle-v4', ['covid', 'lung_opacity', 'normal', 'viral_pneumonia'])
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from covidxray.errors import CovidXrayError
from covidxray.data.imaging import is_image_name

#: Folder names of the Kaggle releases (compared lower-cased) -> canonical class name.
KAGGLE_CLASS_NAMES = {
    "covid-19": "covid",
    "covid": "covid",
    "normal": "normal",
    "viral pneumonia": "viral_pneumonia",
    "lung_opacity": "lung_opacity",
    "lung opacity": "lung_opacity",
}

#: Exact folder spellings of the Kaggle releases; a layout is called "kaggle" only when every
#: class folder is spelled like this (lower-case ``covid/normal`` folders are "generic").
KAGGLE_FOLDERS = frozenset({"COVID-19", "COVID", "NORMAL", "Normal", "Viral Pneumonia", "Lung_Opacity"})

#: The folder the Kaggle v4 zip extracts to (compared lower-cased).
V4_DATASET_FOLDER = "covid-19_radiography_dataset"

LAYOUT_DESCRIPTIONS = {
    "kaggle-v2v3": "Kaggle COVID-19 Radiography Database v2/v3 (class folders holding images)",
    "kaggle-v4": "Kaggle COVID-19_Radiography_Dataset v4 (<Class>/images, <Class>/masks)",
    "generic": "generic class folders",
}

_IMAGES_DIR = "images"
_MASKS_DIR = "masks"
# Mask files are sometimes named after their image with a suffix (``x_mask.png``).
MASK_SUFFIX = re.compile(r"[_\-. ]?(mask|masks|lung_mask|lungs?)$", re.IGNORECASE)


@dataclass(frozen=True)
class ClassFolder:
    """The files of one class.

    Attributes:
        name: canonical class name (``covid``, ``normal``, ...).
        folder: the folder name on disk.
        images: image paths relative to SRC (POSIX separators), sorted.
        masks: image path -> its mask path (both relative to SRC).
        orphan_masks: masks that pair with no image, sorted.
        extra_masks: masks that pair with an image that already has a mask, sorted.
        unreadable: (folder relative to SRC, reason) of every folder of this class that could not be
            listed (its images are unknown: ``prepare`` reports each in rejected.csv), sorted.
        listed: False when the class folder itself could not be listed (then it is the first of
            ``unreadable`` and ``images`` is empty).
    """

    name: str
    folder: str
    images: tuple[str, ...]
    masks: dict[str, str] = field(default_factory=dict)
    orphan_masks: tuple[str, ...] = ()
    extra_masks: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()
    listed: bool = True


@dataclass(frozen=True)
class Layout:
    """A recognised source layout.

    Attributes:
        name: ``kaggle-v2v3``, ``kaggle-v4`` or ``generic``.
        src: the folder given by the user (resolved).
        root: the folder holding the class folders (``src`` or its ``COVID-19_Radiography_Dataset``).
        classes: canonical class name -> :class:`ClassFolder`, sorted by name.
        ignored: non-image files (relative to SRC) that are not used, sorted.
        metadata: ``.csv``/``.xlsx`` files at SRC or root level (relative to SRC), sorted.
    """

    name: str
    src: Path
    root: Path
    classes: dict[str, ClassFolder]
    ignored: tuple[str, ...] = ()
    metadata: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """A one-line human description of the layout, naming the root when it is not SRC."""
        text = LAYOUT_DESCRIPTIONS.get(self.name, self.name)
        if self.root != self.src:
            text += f" in {self.root.relative_to(self.src).as_posix()}/"
        return text

    @property
    def n_images(self) -> int:
        return sum(len(c.images) for c in self.classes.values())


def shown(name: str | os.PathLike) -> str:
    """A file name or path as text that can be printed and written to a UTF-8 file.

    Names that are not valid UTF-8 (common in archives made on other systems) reach Python as
    ``str`` with surrogate escapes (``b'caf\\xe9.png'`` -> ``'caf\\udce9.png'``); their undecodable
    bytes are shown as ``\\xNN`` (``caf\\xe9.png``). Valid names are returned unchanged.
    """
    text = os.fspath(name)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "backslashreplace")


def is_undecodable(name: str) -> bool:
    """True when ``name`` (a str from the file system) was not valid UTF-8 on disk."""
    return shown(name) != name


def generic_class_name(folder: str) -> str:
    """Canonical name of a generic class folder: lower-case, spaces and dashes turned into ``_``
    (a name that is not valid UTF-8 gets its bytes spelled out: ``caf\\xe9`` -> ``caf_xe9``)."""
    if is_undecodable(folder):
        folder = shown(folder).replace("\\", "_")
    return re.sub(r"[\s\-]", "_", folder.strip().lower())


def canonical_class_name(folder: str) -> str:
    """Canonical class name of a folder: the Kaggle names are mapped, others are normalised."""
    return KAGGLE_CLASS_NAMES.get(folder.strip().lower(), generic_class_name(folder))


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__MACOSX")


def _list_dir(path: Path) -> list[os.DirEntry]:
    """The entries of one folder of SRC: the one place SRC is listed (an OSError propagates, for the
    caller to report the folder: a folder that cannot be read is never passed over silently)."""
    with os.scandir(path) as it:
        return list(it)


def _reason(exc: OSError) -> str:
    """Why a folder could not be listed, for rejected.csv and messages."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or type(exc).__name__).lower()


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _walk_files(top: Path, unreadable: list[tuple[Path, str]], skip_dirs: set[str] = frozenset()) -> list[Path]:
    """All non-hidden files below ``top`` (hidden folders and ``skip_dirs`` names skipped).

    A folder that cannot be listed goes to ``unreadable`` (with the reason); a link to a folder is
    not followed and is returned like a file (the caller counts it as an ignored file).
    """
    found: list[Path] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = _list_dir(folder)
        except OSError as exc:
            unreadable.append((folder, _reason(exc)))
            continue
        for entry in entries:
            if _is_dir(entry) and not entry.is_symlink():
                if not _is_hidden(entry.name) and entry.name.lower() not in skip_dirs:
                    stack.append(Path(entry.path))
            else:
                found.append(Path(entry.path))
    return found


def _subdirs(path: Path, exclude: Path | None, entries: list[os.DirEntry] | None = None) -> list[Path]:
    entries = _list_dir(path) if entries is None else entries
    return sorted(
        Path(e.path) for e in entries
        if _is_dir(e) and not _is_hidden(e.name) and (exclude is None or Path(e.path).resolve() != exclude)
    )


def _child_dir(path: Path, name: str, entries: list[os.DirEntry] | None = None) -> Path | None:
    """The sub-folder of ``path`` called ``name`` (case-insensitive), if any."""
    for e in _list_dir(path) if entries is None else entries:
        if e.name.lower() == name and _is_dir(e):
            return Path(e.path)
    return None


def _mask_keys(rel: PurePosixPath) -> list[tuple[str, str]]:
    """Keys an image or mask is paired on: its parent folder plus its stem (as is and de-suffixed)."""
    parent = rel.parent.as_posix().lower()
    stem = rel.stem.lower()
    keys = [(parent, stem)]
    bare = MASK_SUFFIX.sub("", stem)
    if bare and bare != stem:
        keys.append((parent, bare))
    return keys


def _list_class(folder: Path, src: Path, ignored: list[str]) -> ClassFolder:
    """List one class folder: images (``images/`` or the folder itself) and ``masks/``."""
    try:
        entries = _list_dir(folder)
    except OSError as exc:
        return ClassFolder(canonical_class_name(folder.name), folder.name, (),
                           unreadable=((folder.relative_to(src).as_posix(), _reason(exc)),), listed=False)
    unreadable: list[tuple[Path, str]] = []
    images_dir = _child_dir(folder, _IMAGES_DIR, entries)
    masks_dir = _child_dir(folder, _MASKS_DIR, entries)
    image_top = images_dir or folder
    # Without an images/ sub-folder the class folder itself holds the images; its masks/
    # sub-folder (if any) must then not be read as images.
    image_files = _walk_files(image_top, unreadable, skip_dirs=set() if images_dir else {_MASKS_DIR})
    if images_dir is not None:
        # Files beside images/ and masks/ (README, other folders) are not used: count them.
        used = {images_dir.resolve(), masks_dir.resolve() if masks_dir else None}
        for e in entries:
            p = Path(e.path)
            is_dir = _is_dir(e) and not e.is_symlink()
            if _is_hidden(p.name) and is_dir:
                continue
            if p.resolve() in used:
                continue
            extra = _walk_files(p, unreadable) if is_dir else [p]
            ignored.extend(q.relative_to(src).as_posix() for q in extra)
    images: list[str] = []
    for p in image_files:
        rel = p.relative_to(src).as_posix()
        (images if is_image_name(p.name) else ignored).append(rel)
    mask_files: list[str] = []
    if masks_dir is not None:
        for p in _walk_files(masks_dir, unreadable):
            rel = p.relative_to(src).as_posix()
            (mask_files if is_image_name(p.name) else ignored).append(rel)
    images.sort()
    mask_files.sort()
    unlisted = tuple(sorted((p.relative_to(src).as_posix(), why) for p, why in unreadable))
    if not images and not mask_files:
        return ClassFolder(canonical_class_name(folder.name), folder.name, (), unreadable=unlisted)

    # Pair masks with images on (sub-folder, stem) relative to images/ and masks/.
    index: dict[tuple[str, str], str] = {}
    img_root = image_top.relative_to(src).as_posix()
    for rel in images:
        for key in _mask_keys(PurePosixPath(rel).relative_to(img_root)):
            index.setdefault(key, rel)
    masks: dict[str, str] = {}
    orphans: list[str] = []
    extras: list[str] = []
    if masks_dir is not None:
        mask_root = masks_dir.relative_to(src).as_posix()
        for rel in mask_files:
            image = next(
                (index[k] for k in _mask_keys(PurePosixPath(rel).relative_to(mask_root)) if k in index),
                None,
            )
            if image is None:
                orphans.append(rel)
            elif image in masks:
                extras.append(rel)
            else:
                masks[image] = rel
    return ClassFolder(
        name=canonical_class_name(folder.name),
        folder=folder.name,
        images=tuple(images),
        masks=masks,
        orphan_masks=tuple(orphans),
        extra_masks=tuple(extras),
        unreadable=unlisted,
    )


def unreadable_class_error(folder: ClassFolder, src: Path, others: list[str]) -> CovidXrayError:
    """The one-line refusal for a class folder that cannot be listed."""
    rel, why = folder.unreadable[0]
    hint = "Fix its permissions (e.g. chmod -R u+rX on it) or run as a user who can read it"
    if others:
        hint += f", or leave it out with --classes {','.join(others)}"
    return CovidXrayError(f"cannot read class folder '{shown(rel)}' of {shown(src)} ({why})", hint)


def _looks_v4(folder: Path) -> bool:
    """True when some class folder of ``folder`` has an ``images/`` sub-folder."""
    try:
        return any(_child_dir(d, _IMAGES_DIR) is not None for d in _subdirs(folder, None))
    except OSError:
        return False


def detect_layout(src: str | os.PathLike, *, exclude: str | os.PathLike | None = None) -> Layout:
    """Recognise the layout of ``src`` and list its images, masks and other files per class.

    Args:
        src: the source folder.
        exclude: a folder inside ``src`` to leave out (e.g. the output folder of ``prepare``).

    Returns:
        The :class:`Layout`. Classes may have no images (``prepare`` decides whether that matters,
        since ``--classes`` may leave them out).

    Raises:
        CovidXrayError: ``src`` is missing, not a folder, empty, or holds no class folders with images.
    """
    src = Path(src).expanduser()
    if not src.exists():
        raise CovidXrayError(f"source folder {shown(src)} does not exist", "Check the SRC path")
    if not src.is_dir():
        raise CovidXrayError(f"source {shown(src)} is not a folder", "Give the folder that holds the class folders")
    src = src.resolve()
    excluded = Path(exclude).resolve() if exclude is not None else None

    def list_top(folder: Path) -> list[os.DirEntry]:
        try:
            return _list_dir(folder)
        except OSError as exc:
            raise CovidXrayError(f"cannot read the source folder {shown(folder)} ({_reason(exc)})",
                                 "Fix its permissions (e.g. chmod -R u+rX on it) or run as a user who can "
                                 "read it") from None

    root = src
    entries = {src: list_top(src)}
    subdirs = _subdirs(src, excluded, entries[src])
    # The Kaggle v4 zip extracts to <parent>/COVID-19_Radiography_Dataset/: accept that parent.
    if len(subdirs) == 1 and (subdirs[0].name.lower() == V4_DATASET_FOLDER or _looks_v4(subdirs[0])):
        loose_images = [e for e in entries[src] if not _is_dir(e) and is_image_name(e.name)]
        if not loose_images:
            root = subdirs[0]
            entries[root] = list_top(root)
            subdirs = _subdirs(root, excluded, entries[root])

    ignored: list[str] = []
    metadata: list[str] = []
    for folder in {src, root}:
        for e in sorted(entries[folder], key=lambda e: e.name):
            if _is_dir(e):
                continue
            p = Path(e.path)
            rel = p.relative_to(src).as_posix()
            if p.suffix.lower() in (".csv", ".xlsx", ".xls"):
                metadata.append(rel)
            else:
                # Images lying beside the class folders belong to no class: not used.
                ignored.append(rel)

    classes: dict[str, ClassFolder] = {}
    folders_of: dict[str, str] = {}
    v4_style = False
    for folder in subdirs:
        listing = _list_class(folder, src, ignored)
        if listing.name in classes:
            raise CovidXrayError(
                f"folders {shown(folders_of[listing.name])!r} and {shown(folder.name)!r} both map to class "
                f"{listing.name!r}",
                "Merge them or remove one",
            )
        classes[listing.name] = listing
        folders_of[listing.name] = folder.name
        if listing.listed:
            try:
                v4_style |= _child_dir(folder, _IMAGES_DIR) is not None
            except OSError:  # became unreadable since: prepare reports the class folder
                pass

    if not any(c.images for c in classes.values()):
        unlisted = [c for c in classes.values() if not c.listed]
        if unlisted:
            raise unreadable_class_error(unlisted[0], src, [])
        loose = [r for r in ignored if "/" not in r and is_image_name(r)]
        if loose:
            raise CovidXrayError(
                f"{shown(src)} holds images but no class folders",
                "Put the images in one sub-folder per class (e.g. covid/, normal/)",
            )
        raise CovidXrayError(
            f"found 0 images in class folders of {shown(src)}",
            "Expected class sub-folders holding .png/.jpg/.jpeg/.bmp/.tif images "
            "(Kaggle COVID-19 Radiography Database v2/v3/v4 or one folder per class)",
        )

    kaggle = all(f in KAGGLE_FOLDERS for f in folders_of.values())
    if kaggle and v4_style:
        name = "kaggle-v4"
    elif kaggle:
        name = "kaggle-v2v3"
    else:
        name = "generic"
    return Layout(
        name=name,
        src=src,
        root=root,
        classes=dict(sorted(classes.items())),
        ignored=tuple(sorted(set(ignored))),
        metadata=tuple(sorted(set(metadata))),
    )
