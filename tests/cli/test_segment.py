"""``covidxray segment``: masks at the original size and orientation, overlays, crops, segment.csv, reruns,
interrupts and one-line errors; the inverse of the fit checked with nets of known output."""

from __future__ import annotations

import csv
import json
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
from covidxray.infer.predict import LoadedSegmenter
from covidxray.infer.segment import CSV_COLUMNS, output_names, segment_array, segment_images
from tests.fixtures import train_tiny_unet

#: The readable inputs of the test folder, with their upright (width, height).
SIZES = {"wide.png": (100, 80), "tall.png": (64, 96), "deep16.png": (70, 50), "rotated.jpg": (60, 90),
         "sub/inner.png": (64, 64), "dup/x.png": (48, 40), "dup/x.jpg": (40, 48)}
#: Their mask names (x.png and x.jpg would both be x.png: they keep their whole name).
NAMES = {"wide.png": "wide.png", "tall.png": "tall.png", "deep16.png": "deep16.png", "rotated.jpg": "rotated.png",
         "sub/inner.png": "sub/inner.png", "dup/x.png": "dup/x.png.png", "dup/x.jpg": "dup/x.jpg.png"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def _json(out: Path) -> dict:
    return json.loads((out / "segment.json").read_text())


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
    out = tmp_path / "seg"
    r = cli("segment", seg_run, src, out, "--no-overlay")
    assert r.exit_code == 0, r.output
    assert not (out / "overlays").exists()
    before, csv_before = _mtimes(out), (out / "segment.csv").read_text()
    counts = {"rows": 8, "segmented": 7, "unreadable": 1}
    assert {k: _json(out)["counts"][k] for k in counts} == counts

    r = cli("segment", seg_run, src, out, "--no-overlay")
    assert r.exit_code == 0, r.output
    assert "segmented 0 images, 7 skipped" in r.clean_stdout
    assert (out / "segment.csv").read_text() == csv_before  # old rows kept
    # the counts describe the whole OUT, not only this run (which segmented nothing)
    assert {k: _json(out)["counts"][k] for k in counts} == counts
    assert _json(out)["last_run"]["segmented"] == 0 and _json(out)["last_run"]["skipped"] == 7
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
    import covidxray.infer.segment as seg

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
    ("classifier", "needs a segmenter"),
    ("empty-folder", "no images in"),
    ("missing-input", "input"),
    ("batch-size", "'0' is not a whole number >= 1"),
    ("threshold", "'1.5' is not a finite number > 0 and < 1"),
    ("out-is-input", "is the input folder"),
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
    out = tmp_path / "out"
    if case == "out-is-input":
        inputs = out = tmp_path / "in"
        shutil.copytree(xrays, inputs)
    r = cli("segment", ckpt, inputs, out, *extra)
    assert r.exit_code == 2, r.output
    assert message in r.clean_stderr
    assert len(r.clean_stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    assert not (out / "masks").exists() and not (out / ".covidxray-output.json").exists()


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


# ------------------------------------------------------------------------------------------ reliability
def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.clean_stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.clean_stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _folder(xrays: Path, root: Path, n: int = 0) -> Path:
    """A copy of the test folder, with ``n`` more small X-rays (extra/e00.png ...)."""
    shutil.copytree(xrays, root)
    if n:
        (root / "extra").mkdir()
        src = Image.open(xrays / "wide.png")
        for i in range(n):
            src.resize((40 + i, 36 + i)).save(root / "extra" / f"e{i:02d}.png")
    return root


#: Runs the CLI (argv[2:]) and SIGKILLs itself as soon as segment.csv in OUT (argv[1]) holds 3 durable rows.
_KILL_WHEN_3_ROWS = r"""
import os, signal, sys
from pathlib import Path

table = Path(sys.argv[1]) / "segment.csv"
real_fsync = os.fsync

def fsync_then_die(fd):
    real_fsync(fd)
    try:
        lines = table.read_bytes().count(b"\n")
    except OSError:
        return
    if lines >= 4:  # the header and 3 rows are on disk
        os.kill(os.getpid(), signal.SIGKILL)

os.fsync = fsync_then_die
import torch
torch.set_num_threads(1)
from covidxray.cli import app
app(sys.argv[2:], prog_name="covidxray")
"""


def test_a_killed_run_resumes_exactly_where_its_durable_rows_stop(cli, seg_run, xrays, tmp_path):
    import signal
    import subprocess
    import sys

    src = _folder(xrays, tmp_path / "in", n=12)  # 19 images and broken.png
    out = tmp_path / "seg"
    args = ["segment", str(seg_run), str(src), str(out), "--no-overlay", "--batch-size", "1", "--device", "cpu"]
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TERM": "dumb", "NO_COLOR": "1"}
    p = subprocess.run([sys.executable, "-c", _KILL_WHEN_3_ROWS, str(out), *args], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stdout, p.stderr)

    header, rows = _csv(out / "segment.csv")  # what the killed run made durable
    assert header == list(CSV_COLUMNS)
    done = [f for f, row in rows.items() if not row["status"].startswith("unreadable")]
    assert 0 < len(done) < 19
    assert all((out / "masks" / NAMES.get(f, f)).is_file() for f in done)  # a row only after its mask
    with open(out / "segment.csv", "a") as fh:  # a torn last line, as a kill in the middle of a write leaves
        fh.write("extra/e99.png,40,36,1")

    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert f"segmented {19 - len(done)} images, {len(done)} skipped" in r.clean_stdout
    lines = (out / "segment.csv").read_text().splitlines()
    header, rows = _csv(out / "segment.csv")
    assert len(lines) == 1 + 20 == 1 + len(rows)  # one whole row per input, none twice, no half row
    assert "extra/e99.png" not in rows
    assert all(row["status"] for row in rows.values())
    assert _json(out)["counts"]["rows"] == 20 and _json(out)["counts"]["segmented"] == 19
    assert not [q for q in out.rglob("*") if q.name.endswith(".tmp")]  # the killed run's temporaries are gone


def test_an_interrupted_and_resumed_run_counts_the_whole_output(cli, seg_run, xrays, tmp_path, monkeypatch):
    import covidxray.infer.segment as seg

    real, calls = seg.save_png, []

    def save_then_stop(image, path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(image, path, *a, **k)

    monkeypatch.setattr(seg, "save_png", save_then_stop)
    out = tmp_path / "seg"
    assert cli("segment", seg_run, xrays, out, "--no-overlay", "--batch-size", "1").exit_code == 130
    monkeypatch.setattr(seg, "save_png", real)
    r = cli("segment", seg_run, xrays, out, "--no-overlay", "--batch-size", "1")
    assert r.exit_code == 0, r.output
    counts = _json(out)["counts"]
    assert (counts["rows"], counts["segmented"], counts["unreadable"]) == (8, 7, 1)
    assert counts["segmented"] == counts["ok"] + counts["suspicious"]
    assert _json(out)["last_run"]["skipped"] > 0


def test_images_too_small_to_segment_get_a_row_and_the_folder_goes_on(cli, seg_run, xrays, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(xrays / "wide.png", src / "normal.png")
    for name, size in {"w1.png": (1, 50), "h1.png": (50, 1), "dot.png": (1, 1), "tiny.png": (5, 60)}.items():
        Image.new("L", size, 120).save(src / name)
    out = tmp_path / "seg"
    for _ in range(2):  # and a rerun does not fail on them either
        r = cli("segment", seg_run, src, out, "--crop")
        assert r.exit_code == 0, r.output
        assert "Traceback" not in r.output and "4 unreadable" in r.clean_stdout
    _, rows = _csv(out / "segment.csv")
    assert set(rows) == {"normal.png", "w1.png", "h1.png", "dot.png", "tiny.png"}
    assert not rows["normal.png"]["status"].startswith("unreadable")
    for name in ("w1.png", "h1.png", "dot.png", "tiny.png"):
        assert rows[name]["status"].startswith("unreadable: image too small"), rows[name]
    assert "1 x 50 px" in rows["w1.png"]["status"]


def test_broken_and_looping_links_get_rows(cli, seg_run, xrays, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(xrays / "wide.png", src / "normal.png")
    (src / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (src / "loop.png").symlink_to(src / "loop.png")
    (src / "good-link.png").symlink_to(src / "normal.png")
    out = tmp_path / "seg"
    r = cli("segment", seg_run, src, out)
    assert r.exit_code == 0, r.output
    assert "segmented 2 images" in r.clean_stdout and "2 unreadable" in r.clean_stdout
    _, rows = _csv(out / "segment.csv")
    assert set(rows) == {"normal.png", "gone.png", "loop.png", "good-link.png"}
    assert rows["gone.png"]["status"].startswith("unreadable: broken link")
    assert rows["loop.png"]["status"].startswith("unreadable: broken link")
    assert (out / "masks" / "good-link.png").is_file()


def test_a_folder_that_cannot_be_listed_gets_a_row(cli, seg_run, xrays, tmp_path, monkeypatch):
    src = _folder(xrays, tmp_path / "in")
    real = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == src / "sub":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = cli("segment", seg_run, src, tmp_path / "seg", "--no-overlay")
    assert r.exit_code == 0, r.output
    _, rows = _csv(tmp_path / "seg" / "segment.csv")
    assert rows["sub/"]["status"] == "unreadable: cannot list the folder (Permission denied)"
    assert "sub/inner.png" not in rows


@pytest.mark.parametrize("kind", ["corrupt", "one-pixel", "text", "broken-link"])
def test_one_unreadable_input_file_is_an_input_error(cli, seg_run, tmp_path, kind):
    bad = tmp_path / "x.png"
    if kind == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    elif kind == "one-pixel":
        Image.new("L", (1, 64), 100).save(bad)
    elif kind == "text":
        bad = tmp_path / "notes.txt"
        bad.write_text("not an image")
    else:
        bad.symlink_to(tmp_path / "nowhere.png")
    out = tmp_path / "seg"
    r = cli("segment", seg_run, bad, out)
    _one_line_error(r, bad.name)
    assert not out.exists()


def test_a_name_that_is_not_utf8_is_segmented_under_its_own_name(cli, seg_run, xrays, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    raw = os.path.join(os.fsencode(src), b"caf\xe9.png")
    try:
        with open(raw, "wb") as fh:
            fh.write((xrays / "wide.png").read_bytes())
    except OSError as exc:  # a file system that only takes UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 file name here: {exc}")
    shutil.copy(xrays / "tall.png", src / "tall.png")
    out = tmp_path / "seg"
    r = cli("segment", seg_run, src, out)
    assert r.exit_code == 0, r.output
    assert "segmented 2 images" in r.clean_stdout
    _, rows = _csv(out / "segment.csv")
    assert set(rows) == {"caf\\xe9.png", "tall.png"}
    assert rows["caf\\xe9.png"]["width"] == "100"
    for sub in (b"masks", b"overlays"):
        assert os.path.isfile(os.path.join(os.fsencode(out), sub, b"caf\xe9.png"))
    r = cli("segment", seg_run, src, out)
    assert r.exit_code == 0, r.output
    assert "segmented 0 images, 2 skipped" in r.clean_stdout


def test_out_inside_the_input_or_foreign_is_refused_and_left_alone(cli, seg_run, xrays, tmp_path):
    src = _folder(xrays, tmp_path / "in")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    _one_line_error(cli("segment", seg_run, src, src / "seg"), "inside the input folder")
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # nothing written into INPUT

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("my work")
    _one_line_error(cli("segment", seg_run, src, foreign), "did not write")
    assert [p.name for p in foreign.iterdir()] == ["thesis.docx"]

    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line_error(cli("segment", seg_run, src, afile), "not a folder")
    assert afile.read_text() == "x"


def test_an_earlier_output_is_resumed_and_stale_temporaries_removed(cli, seg_run, xrays, tmp_path):
    out = tmp_path / "seg"
    assert cli("segment", seg_run, xrays, out).exit_code == 0
    assert json.loads((out / ".covidxray-output.json").read_text())["kind"] == "segment"
    (out / ".covidxray-output.json").unlink()  # as an older covidxray left it: only segment's own names
    dead = 999_999_999  # no such process
    stale = [out / f".segment.csv.{dead}.abcdefgh.tmp", out / "masks" / "sub" / f".inner.png.{dead}.abcdefgh.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    r = cli("segment", seg_run, xrays, out)
    assert r.exit_code == 0, r.output
    assert "segmented 0 images, 7 skipped" in r.clean_stdout
    assert not any(p.exists() for p in stale)
    assert (out / ".covidxray-output.json").is_file()


@pytest.mark.parametrize("option, value", [("--threshold", "0"), ("--threshold", "1"), ("--threshold", "nan"),
                                           ("--crop-margin", "-0.1"), ("--crop-margin", "0.5"),
                                           ("--crop-margin", "inf"), ("--batch-size", "0"),
                                           ("--batch-size", "abc")])
def test_bad_numbers_are_one_line_usage_errors(cli, seg_run, xrays, tmp_path, option, value):
    out = tmp_path / "seg"
    _one_line_error(cli("segment", seg_run, xrays, out, "--crop", option, value), option)
    assert not out.exists()


def test_an_unwritable_out_is_one_line(cli, seg_run, xrays, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access

    def access(path, mode, *a, **k):  # as a non-root user sees a read-only folder
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    _one_line_error(cli("segment", seg_run, xrays, locked / "seg"), "not writable")
    assert not (locked / "seg").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes any folder: no permission "
                    "error to see (the monkeypatched test above covers it)")
def test_an_unwritable_out_is_one_line_for_real(cli, seg_run, xrays, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _one_line_error(cli("segment", seg_run, xrays, locked / "seg"), "not writable")
    finally:
        locked.chmod(0o755)
