"""Decoding, grayscale conversion, EXIF orientation, square fitting and masks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from covidxray.data import imaging


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_16bit_png_is_scaled_by_its_real_range():
    arr = np.tile(np.linspace(1000, 3000, 16), (4, 1)).astype(np.uint16)
    img = imaging.decode(_encode(Image.fromarray(arr), "PNG"))
    assert img.mode == "I;16"
    gray = np.asarray(imaging.to_gray8(img))
    assert gray.dtype == np.uint8 and gray.min() == 0 and gray.max() == 255
    # Linear: the middle of the range maps to the middle of 0..255.
    expected = np.rint((arr.astype(float) - 1000) * 255 / 2000)
    assert np.abs(gray.astype(int) - expected).max() <= 1


def test_32bit_and_constant_images():
    arr = np.array([[-5, 5], [15, 25]], np.int32)
    assert np.asarray(imaging.to_gray8(Image.fromarray(arr, mode="I"))).tolist() == [[0, 85], [170, 255]]
    const = Image.fromarray(np.full((3, 3), 4000, np.uint16))
    assert np.asarray(imaging.to_gray8(const)).max() == 0


def test_rgb_rgba_la_palette_to_gray():
    gray = np.arange(0, 256, 16, dtype=np.uint8).reshape(4, 4)
    rgb = Image.fromarray(np.stack([gray] * 3, -1))
    assert np.array_equal(np.asarray(imaging.to_gray8(rgb)), gray)  # exact for R=G=B
    rgba = Image.fromarray(np.dstack([gray] * 3 + [np.zeros_like(gray)]), mode="RGBA")
    assert np.array_equal(np.asarray(imaging.to_gray8(rgba)), gray)  # alpha dropped, not composited
    la = Image.fromarray(np.dstack([gray, np.full_like(gray, 7)]), mode="LA")
    assert np.array_equal(np.asarray(imaging.to_gray8(la)), gray)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    assert np.abs(np.asarray(imaging.to_gray8(pal)).astype(int) - gray).max() <= 2
    red = Image.new("RGB", (2, 2), (255, 0, 0))
    assert imaging.to_gray8(red).getpixel((0, 0)) == 76  # ITU-R 601 luma of pure red


def test_exif_orientation_6_is_applied():
    # Stored 40x20, left half bright: orientation 6 means "rotate 90 degrees clockwise to view",
    # so the viewed image is 20x40 with the bright half on top.
    arr = np.zeros((20, 40), np.uint8)
    arr[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    img = imaging.decode(_encode(Image.fromarray(arr), "JPEG", exif=exif, quality=95))
    assert img.size == (20, 40)
    viewed = np.asarray(imaging.to_gray8(img)).astype(float)
    assert viewed[:20].mean() > 200 and viewed[20:].mean() < 50


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, I am text named .png\n", "not an image"),
    (b"II*\x00garbage garbage garbage", "unsupported format"),
])
def test_unreadable_bytes(data, reason):
    with pytest.raises(imaging.UnreadableImage, match=reason):
        imaging.decode(data)


def test_truncated_png_and_unsupported_gif():
    png = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")
    with pytest.raises(imaging.UnreadableImage, match="truncated"):
        imaging.decode(png[: len(png) // 2])
    with pytest.raises(imaging.UnreadableImage, match="unsupported format"):
        imaging.decode(_encode(Image.new("L", (4, 4)), "GIF"))


def test_pixel_hash_ignores_container():
    arr = np.random.default_rng(1).integers(0, 255, (9, 7), dtype=np.uint8)
    a = imaging.to_gray8(imaging.decode(_encode(Image.fromarray(arr), "PNG")))
    b = imaging.to_gray8(imaging.decode(_encode(Image.fromarray(arr), "BMP")))
    assert imaging.pixel_sha256(a) == imaging.pixel_sha256(b)


def test_fit_stretch_pad_crop_geometry():
    img = Image.new("L", (40, 20), 255)
    assert imaging.fit_image(img, 32, "stretch").size == (32, 32)
    pad = np.asarray(imaging.fit_image(img, 32, "pad"))
    assert pad.shape == (32, 32)
    assert pad[:8].max() == 0 and pad[24:].max() == 0  # black letterbox above and below
    assert pad[9:23].min() > 240

    # Three vertical bands; the centre crop keeps only the middle one.
    arr = np.full((20, 40), 200, np.uint8)
    arr[:, :10] = 0
    arr[:, 30:] = 0
    crop = np.asarray(imaging.fit_image(Image.fromarray(arr), 10, "crop")).astype(int)
    assert crop.shape == (10, 10) and crop[:, 2:8].min() > 190
    with pytest.raises(ValueError):
        imaging.fit_geometry(4, 4, 8, "zoom")


def test_mask_is_binarised_and_fit_with_nearest_like_its_image():
    # Image 30x20 (a "299"), mask at another resolution with the same aspect (a "256"), RGB.
    mask_arr = np.zeros((16, 24, 3), np.uint8)
    mask_arr[:, :12] = 230  # left half foreground (> 127)
    mask_arr[:, 12:] = 90  # right half background (<= 127)
    mask = imaging.binarize_mask(Image.fromarray(mask_arr))
    assert set(np.unique(np.asarray(mask))) == {0, 255}
    for fit in imaging.FIT_MODES:
        out = np.asarray(imaging.fit_mask(mask, (30, 20), 17, fit))
        assert out.shape == (17, 17)
        assert set(np.unique(out)) <= {0, 255}
    crop = np.asarray(imaging.fit_mask(mask, (30, 20), 20, "crop"))
    assert crop[:, :4].min() == 255 and crop[:, -4:].max() == 0  # same centre square as the image
    ones = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8))
    assert np.asarray(imaging.binarize_mask(ones)).tolist() == [[0, 255], [255, 0]]


def test_aspect_mismatch():
    assert not imaging.aspect_mismatch((299, 299), (256, 256))
    assert not imaging.aspect_mismatch((300, 200), (153, 100))
    assert imaging.aspect_mismatch((300, 200), (200, 200))


def test_is_image_name():
    assert imaging.is_image_name("a.PNG") and imaging.is_image_name("b.tiff")
    assert not imaging.is_image_name("c.xlsx") and not imaging.is_image_name(".DS_Store")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 1), (13, 17), (64, 64)])
def test_encode_png_round_trips(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    arr[: shape[0] // 2] = 255  # runs as well as noise
    data = imaging.encode_png(Image.fromarray(arr))
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG" and back.mode == "L" and back.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(back), arr)
    rgb = np.stack([arr, arr[::-1], 255 - arr], axis=2)  # RGB (overlays) round-trips too
    back = Image.open(io.BytesIO(imaging.encode_png(Image.fromarray(rgb))))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), rgb)
    with pytest.raises(ValueError):
        imaging.encode_png(Image.new("RGBA", (2, 2)))
