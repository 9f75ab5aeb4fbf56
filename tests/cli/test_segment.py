"""``covidxray segment``: masks at the original size and orientation, overlays, crops, segment.csv, reruns,
interrupts and one-line errors; the inverse of the fit checked with nets of known output."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from covidxray.data.masks import bounding_box
from covidxray.predict import LoadedSegmenter
from covidxray.segment import CSV_COLUMNS, output_names, segment_array, segment_images
from tests.fixtures import train_tiny_unet

#: The readable inputs of the test folder, with their upright (width, height).
SIZES = {"wide.png": (100, 80), "tall.png": (64, 96), "deep16.png": (70, 50), "rotated.jpg": (60, 90),
         "sub/inner.png": (64, 64), "dup/x.png": (48, 40), "dup/x.jpg": (40, 48)}
#: Their mask names (x.png and x.jpg would both be x.png: they keep their whole name).
NAMES = {"wide.png": "wide.png", "tall.png": "tall.png", "deep16.png": "deep16.png", "rotated.jpg": "rotated.png",
         "sub/inner.png": "sub/inner.png", "dup/x.png": "dup/x.png.png", "dup/x.jpg": "dup/x.jpg.png"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def seg_run(demo_at_size, tmp_path_factory) -> Path:
    """A tiny U-Net: 30 epochs of one batch (a few seconds) give masks that are neither empty nor full."""
    torch.set_num_threads(1)
    return train_tiny_unet(demo_at_size(64), tmp_path_factory.mktemp("segrun"), epochs=30)


@pytest.fixture(scope="module")
def xrays(demo_at_size, tmp_path_factory) -> Path:
    """An input folder: phantoms of several sizes, a 16-bit PNG, an EXIF-rotated RGB JPEG, a sub-folder,
    two files that would get the same output name, a corrupt file and a non-image."""
    root = tmp_path_factory.mktemp("xrays") / "in"
    phantoms = sorted((demo_at_size(64) / "train").glob("*/*.png"))
    ph = [Image.open(p).convert("L") for p in phantoms[:4]]
    (root / "sub").mkdir(parents=True)
    (root / "dup").mkdir()
    ph[0].resize((100, 80)).save(root / "wide.png")
    ph[1].resize((64, 96)).save(root / "tall.png")
    deep = np.asarray(ph[2].resize((70, 50)), dtype=np.uint16) * 200 + 1000  # 1000..52000: 16-bit only
    Image.fromarray(deep).save(root / "deep16.png")
    assert Image.open(root / "deep16.png").mode.startswith("I")
    # stored 90 x 60 (landscape), EXIF orientation 6: upright it is 60 x 90
    stored = ph[3].resize((60, 90)).transpose(Image.Transpose.ROTATE_90).convert("RGB")
    assert stored.size == (90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "rotated.jpg", exif=exif, quality=95)
    ph[0].save(root / "sub" / "inner.png")
    ph[1].resize((48, 40)).save(root / "dup" / "x.png")
    ph[2].resize((40, 48)).save(root / "dup" / "x.jpg")
    (root / "broken.png").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    (root / "notes.txt").write_text("not an image")
    return root


def _csv(path: Path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), {r["file"]: r for r in reader}


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ the command
def test_segment_folder_writes_masks_overlays_crops_and_csv(cli, seg_run, xrays, tmp_path):
    out = tmp_path / "seg"
    r = cli("segment", seg_run, xrays, out, "--crop", "--batch-size", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    assert "segmented 7 images" in r.clean_stdout and "1 unreadable" in r.clean_stdout
    assert "broken.png" in r.clean_stdout

    header, rows = _csv(out / "segment.csv")
    assert header == list(CSV_COLUMNS)
    assert header == ["file", "width", "height", "lung_area_px", "lung_fraction", "image_left_px", "image_right_px",
                      "components", "mean_intensity", "status"]
    assert set(rows) == set(SIZES) | {"broken.png"}  # one row per input; notes.txt is no image
    assert rows["broken.png"]["status"].startswith("unreadable: ")
    assert all(rows["broken.png"][c] == "" for c in CSV_COLUMNS[1:-1])

    for file, (w, h) in SIZES.items():
        row, name = rows[file], NAMES[file]
        mask = np.asarray(Image.open(out / "masks" / name))
        assert mask.shape == (h, w), file  # original, upright size (rotated.jpg: swapped)
        assert set(np.unique(mask)) <= {0, 255}
        assert (int(row["width"]), int(row["height"])) == (w, h)
        area = int((mask == 255).sum())
        assert int(row["lung_area_px"]) == area
        assert abs(float(row["lung_fraction"]) - area / (w * h)) < 6e-5
        assert row["status"] == "ok" or row["status"].startswith("suspicious: ")
        assert int(row["image_left_px"]) + int(row["image_right_px"]) <= area
        ov = Image.open(out / "overlays" / name)
        assert ov.mode == "RGB" and ov.size == (w, h)
        box = bounding_box(mask, 0.05)
        crop = out / "crops" / name
        if box is None:
            assert not crop.exists() and row["status"] == "suspicious: no lung found"
        else:
            assert Image.open(crop).size == (box[2] - box[0], box[3] - box[1])
            gray = np.asarray(Image.open(crop))
            assert gray.ndim == 2
    # the tiny model is not useless: some lung, not everything
    areas = [float(rows[f]["lung_fraction"]) for f in SIZES]
    assert 0 < min(areas) and max(areas) < 1
    assert (out / "segment.json").is_file()


def test_rerun_skips_what_is_done_and_refuses_other_settings(cli, seg_run, xrays, tmp_path):
    src = tmp_path / "in"
    shutil.copytree(xrays, src)
    out = src / "seg"  # inside INPUT: its PNGs are no inputs
    r = cli("segment", seg_run, src, out, "--no-overlay")
    assert r.exit_code == 0, r.output
    assert not (out / "overlays").exists()
    before, csv_before = _mtimes(out), (out / "segment.csv").read_text()

    r = cli("segment", seg_run, src, out, "--no-overlay")
    assert r.exit_code == 0, r.output
    assert "segmented 0 images, 7 skipped" in r.clean_stdout
    assert (out / "segment.csv").read_text() == csv_before  # old rows kept, nothing added from OUT
    after = _mtimes(out)
    assert {k: v for k, v in after.items() if k.startswith("masks")} == \
           {k: v for k, v in before.items() if k.startswith("masks")}

    r = cli("segment", seg_run, src, out, "--no-overlay", "--threshold", "0.7")
    assert r.exit_code == 2
    assert "other settings" in r.clean_stderr and "threshold 0.5 -> 0.7" in r.clean_stderr
    assert len(r.clean_stderr.strip().splitlines()) == 1 and "Traceback" not in r.output

    r = cli("segment", seg_run, src, out, "--no-overlay", "--threshold", "0.7", "--overwrite")
    assert r.exit_code == 0, r.output
    assert "segmented 7 images, 0 skipped" in r.clean_stdout
    header, rows = _csv(out / "segment.csv")
    assert len(rows) == 8


def test_an_interrupted_run_leaves_a_whole_csv_and_resumes(cli, seg_run, xrays, tmp_path, monkeypatch):
    import covidxray.segment as seg

    real, calls = seg.save_png, []

    def save_then_stop(image, path, *a, **k):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(image, path, *a, **k)

    monkeypatch.setattr(seg, "save_png", save_then_stop)
    out = tmp_path / "seg"
    r = cli("segment", seg_run, xrays, out, "--no-overlay", "--batch-size", "2")
    assert r.exit_code == 130
    assert "Traceback" not in r.output
    header, rows = _csv(out / "segment.csv")
    assert header == list(CSV_COLUMNS)
    done = [f for f, row in rows.items() if not row["status"].startswith("unreadable")]
    assert 0 < len(done) < 7
    assert all((out / "masks" / NAMES[f]).is_file() for f in done)
    assert not [p for p in out.rglob("*.tmp")]

    monkeypatch.setattr(seg, "save_png", real)
    r = cli("segment", seg_run, xrays, out, "--no-overlay", "--batch-size", "2")
    assert r.exit_code == 0, r.output
    assert f"segmented {7 - len(done)} images, {len(done)} skipped" in r.clean_stdout
    assert len(_csv(out / "segment.csv")[1]) == 8


def test_help_lists_the_options(cli):
    r = cli("segment", "--help")
    assert r.exit_code == 0
    for opt in ("--batch-size", "--threshold", "--no-overlay", "--crop-margin", "--tta", "--no-postprocess",
                "--overwrite"):
        assert opt in r.clean_stdout


@pytest.mark.parametrize("case, message", [
    ("missing-checkpoint", "does not exist"),
    ("random-pt", "is not a readable covidxray checkpoint"),
    ("classifier", "not a segmenter"),
    ("empty-folder", "no images in"),
    ("missing-input", "input"),
    ("batch-size", "--batch-size must be at least 1"),
    ("threshold", "--threshold must be between 0 and 1"),
])
def test_user_errors_are_one_line_with_exit_2(cli, seg_run, xrays, tmp_path, case, message):
    ckpt, inputs, extra = seg_run, xrays, []
    if case == "missing-checkpoint":
        ckpt = tmp_path / "nosuch.pt"
    elif case == "random-pt":
        ckpt = tmp_path / "random.pt"
        ckpt.write_bytes(os.urandom(200))
    elif case == "classifier":
        blob = torch.load(seg_run / "checkpoints" / "best.pt", weights_only=True)
        blob["family"] = "classifier"
        ckpt = tmp_path / "clf.pt"
        torch.save(blob, ckpt)
    elif case == "empty-folder":
        inputs = tmp_path / "empty"
        inputs.mkdir()
        (inputs / "readme.txt").write_text("no images here")
    elif case == "missing-input":
        inputs = tmp_path / "nosuch"
    elif case == "batch-size":
        extra = ["--batch-size", "0"]
    elif case == "threshold":
        extra = ["--threshold", "1.5"]
    r = cli("segment", ckpt, inputs, tmp_path / "out", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.clean_stderr
    assert len(r.clean_stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    assert not (tmp_path / "out" / "masks").exists()


def test_output_names_keep_folders_and_never_clash():
    assert output_names(["a/x.jpg", "b/x.jpg", "c.tif"]) == ["a/x.png", "b/x.png", "c.png"]
    assert output_names(["d/x.jpg", "d/x.png", "d/y.PNG"]) == ["d/x.jpg.png", "d/x.png.png", "d/y.png"]
    # a name that stays taken after keeping the whole file name gets a counter
    names = output_names(["x.jpg", "x.jpg.png", "x.png"])
    assert len({n.lower() for n in names}) == 3 and all(n.endswith(".png") for n in names)


# ------------------------------------------------------------------------------------------ the inverse fit
class _Identity(nn.Module):
    """A "segmenter" whose logits are the image itself (x in [-1, 1], x 4): lung = bright pixels."""

    def forward(self, x):
        return 4 * x


class _LeftHalf(nn.Module):
    """A "segmenter" whose logits are +4 on the left half of the square, ``right`` on the right half."""

    def __init__(self, right: float = -4.0):
        super().__init__()
        self.right = right

    def forward(self, x):
        out = torch.full_like(x, self.right)
        out[..., : x.shape[-1] // 2] = 4.0
        return out


def _fake(net: nn.Module, size: int, fit: str) -> LoadedSegmenter:
    cfg = SimpleNamespace(model=SimpleNamespace(name="fake"), eval=SimpleNamespace(threshold=0.5))
    return LoadedSegmenter(net.eval(), cfg, {"image_size": size, "fit": fit, "model": "fake", "step": 0})


def _inside_and_outside_match(mask: np.ndarray, expected: np.ndarray, band: int = 3) -> None:
    from scipy import ndimage

    assert mask.shape == expected.shape and mask.dtype == bool
    core = ndimage.binary_erosion(expected, iterations=band)
    far = ~ndimage.binary_dilation(expected, iterations=band)
    assert mask[core].all() and not mask[far].any()


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
@pytest.mark.parametrize("width, height", [(120, 60), (60, 120)])
def test_inverse_fit_puts_the_prediction_back_at_the_original_size(fit, width, height):
    gray = np.zeros((height, width), np.uint8)
    gray[5:25, 10:50] = 255  # a bright block off-centre: a misplaced inverse would move it
    gray[height - 20:height - 6, width - 30:width - 8] = 255
    expected = gray > 0
    if fit == "crop":  # only the centre square is seen: 0 outside it
        side = min(width, height)
        x0, y0 = (width - side) // 2, (height - side) // 2
        seen = np.zeros_like(expected)
        seen[y0:y0 + side, x0:x0 + side] = True
        expected &= seen
    [mask] = segment_array(_fake(_Identity(), 48, fit), [gray], batch_size=4, device="cpu", threshold=0.5,
                           postprocess=False, amp="off")
    _inside_and_outside_match(mask, expected)


def test_pad_fitted_wide_image_gets_the_left_half():
    masks = segment_array(_fake(_LeftHalf(), 32, "pad"), [np.zeros((60, 120), np.uint8), np.zeros((30, 50), np.uint8)],
                          batch_size=2, device="cpu", postprocess=False, amp="off")
    for mask, (h, w) in zip(masks, [(60, 120), (30, 50)]):
        expected = np.zeros((h, w), bool)
        expected[:, : w // 2] = True
        assert mask.shape == (h, w)
        assert (mask == expected).all()


def test_library_returns_counts_and_crops_the_lungs(tmp_path):
    gray = np.zeros((90, 150), np.uint8)
    gray[20:70, 15:60] = 200
    gray[25:75, 90:140] = 180
    Image.fromarray(gray).save(tmp_path / "one.png")
    res = segment_images(_fake(_Identity(), 64, "stretch"), tmp_path / "one.png", tmp_path / "out", crop=True,
                         crop_margin=0.04, device="cpu")
    assert res["segmented"] == 1 and res["skipped"] == 0 and res["unreadable"] == [] and res["suspicious"] == 0
    assert res["csv"] == tmp_path / "out" / "segment.csv" and res["out"] == tmp_path / "out"
    assert res["images_per_s"] > 0
    _, rows = _csv(res["csv"])
    row = rows["one.png"]
    assert row["status"] == "ok" and row["components"] == "2"
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "one.png")) > 0
    _inside_and_outside_match(mask, gray > 0)
    assert int(row["image_left_px"]) > 0 and int(row["image_right_px"]) > 0
    assert abs(float(row["mean_intensity"]) - gray[mask].mean()) < 0.051
    box = bounding_box(mask, 0.04)
    assert box[0] > 0 and box[2] < 150  # a real crop, narrower than the image
    crop = np.asarray(Image.open(tmp_path / "out" / "crops" / "one.png"))
    assert (crop == gray[box[1]:box[3], box[0]:box[2]]).all()


def test_tta_averages_with_the_mirror_image():
    gray = np.zeros((40, 70), np.uint8)
    gray[5:30, 8:30] = 255
    ident = _fake(_Identity(), 32, "pad")
    plain, = segment_array(ident, [gray], device="cpu", postprocess=False, amp="off")
    tta, = segment_array(ident, [gray], device="cpu", postprocess=False, amp="off", tta=True)
    assert (plain == tta).all()  # the identity is its own mirror image
    # left half +4, right half -6; mirrored back: the other way round; their mean is -1 everywhere
    half = _fake(_LeftHalf(right=-6.0), 32, "pad")
    plain, = segment_array(half, [gray], device="cpu", postprocess=False, amp="off")
    tta, = segment_array(half, [gray], device="cpu", postprocess=False, amp="off", tta=True)
    assert plain[:, :35].all() and not tta.any()
