"""Decoding, grayscale conversion, square fitting and PNG writing of radiographs and masks.

Everything here works on Pillow images and stays in Pillow where it can (no NumPy round-trips on
the hot path): ``prepare`` runs these functions once per image in a worker process.

Conventions (also in ``docs/data.md``):

* Orientation: the EXIF orientation tag is applied first; sizes and hashes are of the upright image.
* Grayscale: 8-bit sources become ``L`` with Pillow's ITU-R 601 luma (exact for R=G=B); alpha is
  dropped (colour channels kept as stored -- X-rays are opaque; compositing on black would darken
  any semi-transparent export); palette images go through their palette; 16/32-bit and float
  images are scaled linearly from their own min..max to 0..255 (clipping would turn a 12-bit
  radiograph white); a constant image becomes all 0.
* Fit to a square: ``stretch`` (resize, aspect not kept), ``pad`` (keep aspect, letterbox with
  black, centred) or ``crop`` (centre square crop, then resize). Images use LANCZOS, masks use
  NEAREST with the same geometry, so a 256x256 mask lines up with its 299x299 image.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageChops, ImageOps, UnidentifiedImageError

from covidxray.utils import atomic_write_bytes

#: File extensions read as images (compared lower-cased).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

#: Pillow decoders allowed (content decides, not the extension; Pillow's JPEG decoder also
#: opens multi-picture MPO camera files).
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

FIT_MODES = ("stretch", "pad", "crop")

#: ``reducing_gap`` for LANCZOS downscaling: Pillow first reduces by an integer factor with a box
#: filter while the remaining scale is > 3x; results are indistinguishable from a full LANCZOS
#: pass and large sources resize several times faster.
REDUCING_GAP = 3.0

#: Mask aspect ratio may differ from its image's by this relative amount (rounding of sizes).
MASK_ASPECT_TOLERANCE = 0.05

_EXIF_ORIENTATION = 0x0112
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_THRESHOLD_LUT = [0] * 128 + [255] * 128  # mask binarisation: > 127 -> 255


class UnreadableImage(Exception):
    """A file that cannot be decoded as an image; ``str()`` is the reason for ``rejected.csv``."""


def is_image_name(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def decode(data: bytes) -> Image.Image:
    """Decode image bytes fully and apply the EXIF orientation.

    Args:
        data: the file's bytes.

    Returns:
        The loaded, upright image in its own mode.

    Raises:
        UnreadableImage: empty file, not an image, unsupported format, truncated or corrupt data.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    # Decoders warn about corrupt metadata; the outcome (image or rejection) is what counts, and
    # warnings from worker processes would only clutter the progress display.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return upright(_decode(data))


def _decode(data: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except UnidentifiedImageError:
        raise UnreadableImage("not an image or unsupported format (PNG, JPEG, BMP, TIFF are read)") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"image too large ({exc})") from None
    except Exception as exc:  # third-party decoders raise many types (SyntaxError, struct.error...)
        raise UnreadableImage(f"unreadable image header ({type(exc).__name__}: {exc})") from None
    try:
        img.load()
    except Exception as exc:  # truncated PNG -> OSError, broken zlib -> ValueError/SyntaxError
        raise UnreadableImage(f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from None
    return img


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (2..8) if present; a broken EXIF block is ignored."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF must not cost the image
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    return img


def to_gray8(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit grayscale (mode ``L``); see the module notes.

    Example:
        >>> import numpy as np
        >>> im = Image.fromarray(np.array([[1000, 3000]], np.uint16))
        >>> list(to_gray8(im).getdata())
        [0, 255]
    """
    mode = img.mode
    if mode == "L":
        return img
    if mode in _HIGH_DEPTH_MODES:
        return _scale_to_gray8(img)
    if mode in ("LA", "La"):
        return img.getchannel("L")
    if mode in ("P", "PA"):
        # Through RGB(A) so that the palette is applied; alpha is then dropped like RGBA's.
        img = img.convert("RGBA" if (mode == "PA" or "transparency" in img.info) else "RGB")
    if img.mode in ("RGB", "RGBA", "RGBX", "RGBa", "1"):
        return img.convert("L")  # RGBA -> L uses the colour channels only (alpha dropped)
    return img.convert("RGB").convert("L")  # CMYK, YCbCr, LAB, HSV


def _scale_to_gray8(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit or float image linearly from its own min..max to 0..255."""
    import numpy as np  # local: NumPy (~0.1 s) only for high-depth sources; prepare stays NumPy-free

    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return Image.new("L", img.size, 0)
    # float32 holds every 16-bit value exactly and halves the memory of float64 on big scans.
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def pixel_sha256(gray: Image.Image) -> str:
    """SHA-256 of the raw 8-bit pixels (row-major) of an ``L`` image: the exact-duplicate key."""
    return hashlib.sha256(gray.tobytes()).hexdigest()


@dataclass(frozen=True)
class FitGeometry:
    """Where a source lands in the ``size`` x ``size`` output, in source-relative terms.

    Attributes:
        box: crop box as fractions (left, top, right, bottom) of the source's width/height.
        inner: size (w, h) the cropped source is resized to.
        offset: where ``inner`` is pasted on the black square (``pad`` only; else (0, 0)).
    """

    box: tuple[float, float, float, float]
    inner: tuple[int, int]
    offset: tuple[int, int]


def fit_geometry(width: int, height: int, size: int, fit: str) -> FitGeometry:
    """The geometry that fits a ``width`` x ``height`` image into a ``size`` square.

    Args:
        width: source width.
        height: source height.
        size: output side.
        fit: ``stretch``, ``pad`` or ``crop``.
    """
    if fit == "stretch":
        return FitGeometry((0.0, 0.0, 1.0, 1.0), (size, size), (0, 0))
    if fit == "pad":
        scale = size / max(width, height)
        inner = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
        return FitGeometry((0.0, 0.0, 1.0, 1.0), inner, ((size - inner[0]) // 2, (size - inner[1]) // 2))
    if fit == "crop":
        side = min(width, height)
        # Integer pixel box on the image itself, expressed as fractions so a mask of another
        # resolution is cut at the same place.
        left, top = (width - side) // 2, (height - side) // 2
        return FitGeometry(
            (left / width, top / height, (left + side) / width, (top + side) / height), (size, size), (0, 0)
        )
    raise ValueError(f"unknown fit {fit!r}; expected one of {FIT_MODES}")


def apply_fit(img: Image.Image, geometry: FitGeometry, size: int, resample: int) -> Image.Image:
    """Crop/resize/letterbox ``img`` by ``geometry`` into a ``size`` x ``size`` image.

    Args:
        img: the source (any resolution: masks may differ from their image).
        geometry: from :func:`fit_geometry` on the *image's* size.
        size: output side.
        resample: ``Image.Resampling.LANCZOS`` for images, ``NEAREST`` for masks.
    """
    w, h = img.size
    bl, bt, br, bb = geometry.box
    box = (bl * w, bt * h, br * w, bb * h)
    full = box == (0.0, 0.0, float(w), float(h))
    if full and img.size == geometry.inner:
        out = img
    else:
        gap = REDUCING_GAP if resample != Image.Resampling.NEAREST else None
        out = img.resize(geometry.inner, resample, box=None if full else box, reducing_gap=gap)
    if geometry.inner != (size, size):
        canvas = Image.new(out.mode, (size, size), 0)
        canvas.paste(out, geometry.offset)
        out = canvas
    return out


def fit_image(gray: Image.Image, size: int, fit: str) -> Image.Image:
    """Fit an ``L`` image into a ``size`` square with LANCZOS (antialiased)."""
    return apply_fit(gray, fit_geometry(*gray.size, size, fit), size, Image.Resampling.LANCZOS)


def binarize_mask(mask: Image.Image) -> Image.Image:
    """A mask as ``L`` with values 0/255: foreground is > 127 after grayscale conversion.

    Masks saved with values 0/1 (as from NumPy) are recognised by their maximum of 1.
    """
    gray = to_gray8(mask)
    lo, hi = gray.getextrema()
    if hi == 1:
        return gray.point([0, 255] + [255] * 254)
    return gray.point(_THRESHOLD_LUT)


def fit_mask(mask: Image.Image, image_size: tuple[int, int], size: int, fit: str) -> Image.Image:
    """Fit a binary mask like its image (geometry from ``image_size``) with NEAREST: stays 0/255."""
    return apply_fit(mask, fit_geometry(*image_size, size, fit), size, Image.Resampling.NEAREST)


def aspect_mismatch(image_size: tuple[int, int], mask_size: tuple[int, int],
                    tolerance: float = MASK_ASPECT_TOLERANCE) -> bool:
    """True when the aspect ratios differ by more than ``tolerance`` (relative)."""
    ar_img = image_size[0] / image_size[1]
    ar_mask = mask_size[0] / mask_size[1]
    return abs(ar_mask - ar_img) / ar_img > tolerance


def encode_png(gray: Image.Image) -> bytes:
    """Encode an ``L`` (or ``RGB``: overlays) image as a PNG quickly: every row "Up"-filtered, zlib level 1
    run-length.

    Why not ``Image.save``: Pillow tries all five PNG row filters on every row (adaptive filtering,
    not configurable), which is most of its encoding time. The "Up" filter (row minus the row
    above) suits radiographs and masks; measured on 224 px X-rays: 0.55 ms and 25 KB per image
    versus 1.1 ms and 23 KB with ``save(compress_level=1, compress_type=Z_RLE)`` and 5.6 ms and
    23 KB with Pillow's defaults; for a 299 px RGB overlay 2.6 ms and 88 KB versus 4.8 ms and 81 KB with
    ``save(compress_level=1)``.
    The output is a plain 8-bit grayscale (or RGB) PNG that any decoder reads.
    """
    if gray.mode not in ("L", "RGB"):
        raise ValueError(f"encode_png needs an L or RGB image, got mode {gray.mode}")
    width, height = gray.size
    row = width * (3 if gray.mode == "RGB" else 1)
    # Row y minus row y-1 (mod 256); cropping above the top edge reads zeros, as PNG specifies.
    filtered = ImageChops.subtract_modulo(gray, gray.crop((0, -1, width, height - 1))).tobytes()
    rows = b"".join([b"\x02" + filtered[y * row:(y + 1) * row] for y in range(height)])
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = deflate.compress(rows) + deflate.flush()
    colour = 2 if gray.mode == "RGB" else 0
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)  # 8-bit gray or RGB, no interlace
    return b"".join([_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")])


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def save_png(image, path: str | os.PathLike, atomic: bool = True) -> Path:
    """Write a grayscale image as PNG with :func:`encode_png`; the one PNG writer of the package.

    Args:
        image: an ``L`` Pillow image, or an H x W ``uint8`` array / tensor (CPU or GPU).
        path: where to write it.
        atomic: write a temporary file beside ``path`` and rename it (a reader never sees half a
            file). ``prepare`` passes False because it already writes into a staged temporary file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not isinstance(image, Image.Image):
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else image
        if getattr(array, "dtype", None) is None or str(array.dtype) != "uint8" or array.ndim != 2:
            raise ValueError(f"save_png needs an L image or an H x W uint8 array, got "
                             f"{getattr(array, 'dtype', type(array).__name__)} of shape {getattr(array, 'shape', '?')}")
        image = Image.fromarray(array, mode="L")
    data = encode_png(image)
    path = Path(path)
    if atomic:
        atomic_write_bytes(path, data)
    else:
        with open(path, "wb") as fh:
            fh.write(data)
    return path
