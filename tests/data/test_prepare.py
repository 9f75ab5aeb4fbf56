"""The prepare engine: output contract, split, duplicates, patients, bad input, resume, demo, real data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import covidxray.data.prepare as P
from covidxray.data.prepare import MANIFEST_COLUMNS, assign_splits, output_names, prepare, prepare_demo, sanitize_stem
from covidxray.errors import CovidXrayError
from tests.conftest import REPO, make_source_tree, noise_array, write_image
from tests.fixtures import interrupt_after

CONTRACT_KEYS = {"format", "format_version", "covidxray_version", "complete", "layout", "source", "size", "fit",
                 "val", "test", "seed", "masks", "classes", "synthetic", "counts", "masks_counts", "rejected",
                 "duplicates", "cross_class_duplicates"}


def run(src, out, **kw):
    kw.setdefault("size", 16)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare(src, out, **kw)


def manifest(out) -> list[dict[str, str]]:
    with open(Path(out) / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def rejected(out) -> dict[str, str]:
    with open(Path(out) / "rejected.csv", newline="") as fh:
        return {row["path"]: row["reason"] for row in csv.DictReader(fh)}


def snapshot(out) -> dict[str, bytes]:
    """Every file under OUT (hidden ones included) -> its bytes."""
    out = Path(out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------


def test_output_follows_the_contract(make_tree, tmp_path):
    src = make_tree({"COVID": 10, "Normal": 10}, size=(20, 12))
    out = tmp_path / "out"
    info = run(src, out, size=24)

    assert CONTRACT_KEYS <= set(info)
    assert json.loads((out / "prepare.json").read_text()) == info
    assert info["format"] == "covidxray-prepared" and info["complete"] is True and info["synthetic"] is False
    assert info["classes"] == ["covid", "normal"] and info["layout"] == "kaggle-v2v3"
    rows = manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert len(rows) == 20 == sum(n for split in info["counts"].values() for n in split.values())
    for row in rows:
        img = Image.open(out / row["file"])
        assert img.mode == "L" and img.size == (24, 24)
        assert row["file"] == f"{row['split']}/{row['class']}/{Path(row['source']).stem}.png"
        assert (row["orig_width"], row["orig_height"], row["orig_mode"]) == ("20", "12", "L")
        assert row["synthetic"] == "0" and row["mask"] == "" and len(row["pixel_sha256"]) == 64
    assert (out / "rejected.csv").read_text() == "path,reason\n"
    assert not (out / P.STAGING_DIR).exists()
    assert sorted(p.name for p in out.iterdir()) == [
        ".covidxray-output.json", ".prepare-state.json", "manifest.csv", "prepare.json", "rejected.csv", "test",
        "train", "val"]
    assert json.loads((out / ".covidxray-output.json").read_text())["kind"] == "prepare"


def test_rerun_on_complete_output_changes_nothing(make_tree, tmp_path):
    src, out = make_tree({"a": 5, "b": 5}), tmp_path / "out"
    info = run(src, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert run(src, out) == info
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


# --------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_depends_on_seed(make_tree, tmp_path):
    src = make_tree({"a": 30, "b": 20})
    run(src, tmp_path / "s0", seed=0)
    run(src, tmp_path / "s0b", seed=0, workers=2)
    run(src, tmp_path / "s1", seed=1)
    assert manifest(tmp_path / "s0") == manifest(tmp_path / "s0b")
    assert snapshot(tmp_path / "s0") == snapshot(tmp_path / "s0b")  # workers do not change a byte
    split_of = lambda out: {r["source"]: r["split"] for r in manifest(out)}  # noqa: E731
    assert split_of(tmp_path / "s0") != split_of(tmp_path / "s1")


def test_split_is_stratified(make_tree, tmp_path):
    info = run(make_tree({"a": 50, "b": 20}), tmp_path / "out", val=0.2, test=0.1)
    assert info["counts"]["train"] == {"a": 35, "b": 14}
    assert info["counts"]["val"] == {"a": 10, "b": 4}
    assert info["counts"]["test"] == {"a": 5, "b": 2}


@pytest.mark.parametrize("seed", range(5))
def test_assign_splits_groups_and_fractions(seed):
    items = [(f"x{i}", "a" if i < 60 else "b", [f"g{i // 3}"]) for i in range(90)]
    splits = assign_splits(items, 0.2, 0.2, seed)
    for g in range(30):
        assert len({splits[f"x{i}"] for i in range(3 * g, 3 * g + 3)}) == 1
    per_class = Counter((item[1], splits[item[0]]) for item in items)
    assert per_class["a", "val"] == 12 and per_class["a", "test"] == 12  # groups of 3: 12 = 4 groups
    assert per_class["b", "val"] == 6 and per_class["b", "test"] == 6


def test_no_val_or_test(make_tree, tmp_path):
    info = run(make_tree({"a": 7}), tmp_path / "out", val=0, test=0)
    assert info["counts"] == {"train": {"a": 7}, "val": {"a": 0}, "test": {"a": 0}}


# --------------------------------------------------------------------------------------------
# Duplicates and patients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_duplicates_land_in_one_split(make_tree, tmp_path, seed):
    src = make_tree({"covid": 20, "normal": 10})
    for i in range(5):  # a byte copy, and the same pixels as BMP under another name
        shutil.copy(src / "covid" / f"covid-{i}.png", src / "covid" / f"copy of {i}.png")
        Image.open(src / "covid" / f"covid-{i}.png").save(src / "covid" / f"again-{i}.bmp")
    info = run(src, tmp_path / "out", seed=seed, val=0.2, test=0.2)
    by_hash = defaultdict(set)
    for row in manifest(tmp_path / "out"):
        by_hash[row["pixel_sha256"]].add(row["split"])
    assert len(by_hash) == 30
    assert all(len(splits) == 1 for splits in by_hash.values())
    assert info["duplicates"] == 5 and info["rejected"] == 0


def test_same_image_in_two_classes_is_rejected_and_reported(make_tree, tmp_path):
    src = make_tree({"covid": 6, "normal": 6})
    shutil.copy(src / "covid" / "covid-0.png", src / "normal" / "covid-0.png")
    out = tmp_path / "out"
    info = run(src, out)
    assert info["cross_class_duplicates"] == 1 and info["rejected"] == 2
    reasons = rejected(out)
    assert reasons["covid/covid-0.png"] == reasons["normal/covid-0.png"] == "same image in classes covid and normal"
    assert all(r["source"] not in reasons for r in manifest(out))
    assert len(manifest(out)) == 11


def test_patients_from_metadata_csv_are_kept_in_one_split(make_tree, tmp_path):
    src = make_tree({"COVID": 36, "Normal": 24})
    lines = ["FILE NAME,Patient ID,finding"]
    for folder, n in (("COVID", 36), ("Normal", 24)):
        for i in range(n):
            # Stems only, as the Kaggle metadata lists them; patient P0 has images in both classes.
            lines.append(f"{folder}-{i},{'P0' if i < 4 else f'{folder[0]}{i // 4}'},x")
    lines.append("COVID-5,,x")  # blank patient: ignored (COVID-5 keeps its first id)
    (src / "metadata.csv").write_text("\n".join(lines) + "\n")
    (src / "other.xlsx").write_bytes(b"not read")
    out = tmp_path / "out"
    info = run(src, out, val=0.2, test=0.2, progress=True)

    rows = manifest(out)
    splits_of = defaultdict(set)
    for row in rows:
        assert row["patient_id"]
        splits_of[row["patient_id"]].add(row["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    assert info["patients"] == 1 + 8 + 5 and info["metadata_files"] == ["metadata.csv"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert any("other.xlsx" in note and "not read" in note for note in info["notes"])
    assert info["ignored_files"] == 1  # the spreadsheet


def test_metadata_matched_on_relative_path(tmp_path):
    src = tmp_path / "src"
    make_source_tree(src, {"COVID": 4, "Normal": 4}, subdir="images")
    rows = ["image,patient_id"] + [f"{c}/images/{c}-{i}.png,pt{i % 2}" for c in ("COVID", "Normal") for i in range(4)]
    (src / "manifest.csv").write_text("\n".join(rows) + "\n")
    run(src, tmp_path / "out", val=0.25, test=0.25)
    assert {r["patient_id"] for r in manifest(tmp_path / "out")} == {"pt0", "pt1"}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_unreadable_files_are_rejected_not_dropped(make_tree, tmp_path):
    src = make_tree({"covid": 6, "normal": 4})
    good = (src / "covid" / "covid-0.png").read_bytes()
    big = write_image(tmp_path / "big.png", noise_array(9, (64, 64))).read_bytes()
    (src / "covid" / "truncated.png").write_bytes(big[: len(big) // 2])
    (src / "covid" / "empty.png").write_bytes(b"")
    (src / "covid" / "text.png").write_text("this is not a png\n")
    (src / "covid" / "garbage.tif").write_bytes(b"II*\x00" + os.urandom(64))
    (src / "covid" / "notes.txt").write_text("ignored")
    (src / "covid" / ".DS_Store").write_bytes(b"\0\0")
    assert good  # the good files stay readable
    out = tmp_path / "out"
    info = run(src, out)

    reasons = rejected(out)
    assert set(reasons) == {"covid/truncated.png", "covid/empty.png", "covid/text.png", "covid/garbage.tif"}
    assert "truncated" in reasons["covid/truncated.png"]
    assert "empty file" in reasons["covid/empty.png"]
    assert "not an image" in reasons["covid/text.png"]
    assert "unsupported format" in reasons["covid/garbage.tif"]
    assert info["rejected"] == 4 and info["images_found"] == 14 and info["images_kept"] == 10
    assert info["ignored_files"] == 2 and len(manifest(out)) == 10


def _v4_with_masks(root: Path) -> Path:
    """COVID: 7 images 30x30; masks 26x26 RGB for 0-2, bad masks for 3-5, none for 6, an orphan."""
    make_source_tree(root, {"COVID": 7, "Viral Pneumonia": 3}, size=(30, 30), subdir="images")
    for folder, idx in (("COVID", range(3)), ("Viral Pneumonia", range(3))):
        for i in idx:
            m = np.zeros((26, 26, 3), np.uint8)
            m[4:22, 3:12] = 255
            m[4:22, 14:23] = 255
            write_image(root / folder / "masks" / f"{folder}-{i}.png", m)
    write_image(root / "COVID" / "masks" / "COVID-3.png", np.full((13, 26), 255, np.uint8))  # 2:1 vs 1:1
    (root / "COVID" / "masks" / "COVID-4.png").write_text("not a mask")
    write_image(root / "COVID" / "masks" / "COVID-5.png", np.zeros((26, 26), np.uint8))
    write_image(root / "COVID" / "masks" / "COVID-99.png", np.full((26, 26), 255, np.uint8))
    return root


def test_v4_masks_are_paired_resized_and_checked(tmp_path):
    src = _v4_with_masks(tmp_path / "COVID-19_Radiography_Dataset")
    out = tmp_path / "out"
    info = run(src, out, size=20, val=0.0, test=0.0)

    assert info["layout"] == "kaggle-v4"
    reasons = rejected(out)
    assert reasons["COVID/masks/COVID-99.png"] == "mask without image"
    assert "does not fit its image" in reasons["COVID/masks/COVID-3.png"]
    assert "unreadable mask" in reasons["COVID/masks/COVID-4.png"]
    assert reasons["COVID/masks/COVID-5.png"] == "empty mask (all zero)"
    rows = {r["source"]: r for r in manifest(out)}
    assert len(rows) == 10  # every image is kept, with or without its mask
    assert [r["mask"] != "" for s, r in sorted(rows.items()) if s.startswith("COVID/")] == [True] * 3 + [False] * 4
    assert info["masks_counts"]["train"] == {"covid": 3, "viral_pneumonia": 3}
    assert info["images_without_mask"] == 4
    for row in rows.values():
        if row["mask"]:
            assert row["mask"] == f"train/{row['class']}/masks/{Path(row['file']).name}"
            mask = np.asarray(Image.open(out / row["mask"]))
            assert mask.shape == (20, 20) and set(np.unique(mask)) == {0, 255}


def test_no_masks_option(tmp_path):
    src = _v4_with_masks(tmp_path / "src")
    info = run(src, tmp_path / "out", masks=False)
    assert info["masks"] is False and info["rejected"] == 0
    assert not list((tmp_path / "out").rglob("masks"))
    assert all(r["mask"] == "" for r in manifest(tmp_path / "out"))


def test_fit_crop_keeps_image_and_mask_aligned(tmp_path):
    src = tmp_path / "src"
    img = np.zeros((20, 40), np.uint8)
    img[:, 20:30] = 255  # a bright band right of centre
    write_image(src / "a" / "images" / "x.png", img)
    mask = np.zeros((10, 20), np.uint8)  # half resolution, same band
    mask[:, 10:15] = 255
    write_image(src / "a" / "masks" / "x.png", mask)
    run(src, tmp_path / "out", size=20, fit="crop", val=0, test=0)
    out_img = np.asarray(Image.open(tmp_path / "out/train/a/x.png")).astype(int)
    out_mask = np.asarray(Image.open(tmp_path / "out/train/a/masks/x.png"))
    # Centre crop x in 10..30: the band is the right half of the output, in both.
    assert out_img[:, 12:18].min() > 200 and out_img[:, :8].max() < 30
    assert out_mask[:, 10:].min() == 255 and out_mask[:, :10].max() == 0


def test_sixteen_bit_and_exif_sources(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a" / "deep.png", np.linspace(1000, 3000, 12 * 8).reshape(8, 12).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(src / "a" / "photo.jpg", noise_array(3, (8, 12)), exif=exif)
    run(src, tmp_path / "out", val=0, test=0)
    rows = {Path(r["source"]).name: r for r in manifest(tmp_path / "out")}
    assert rows["deep.png"]["orig_mode"] == "I;16"
    deep = np.asarray(Image.open(tmp_path / "out" / rows["deep.png"]["file"]))
    assert deep.min() < 10 and deep.max() > 245
    assert (rows["photo.jpg"]["orig_width"], rows["photo.jpg"]["orig_height"]) == ("8", "12")  # upright


def test_output_names_are_sanitised_and_unique():
    assert sanitize_stem("COVID-19 (12)") == "COVID-19_12"
    assert sanitize_stem("..") == "image"
    names = output_names(["c/a b.png", "c/a_b.jpg", "c/x/y.png", "c/y.png", "c/ok.png"])
    assert names["c/ok.png"] == "ok"
    assert names["c/a b.png"].startswith("a_b-") and names["c/a_b.jpg"].startswith("a_b-")
    assert len(set(names.values())) == 5


@pytest.mark.parametrize("case, message", [
    ("empty_class", "holds no images"),
    ("unknown_class", "unknown class 'tb'.*covid, normal"),
    ("bad_fractions", "leaves nothing for training"),
    ("negative", "must be a fraction"),
    ("bad_fit", "unknown --fit"),
    ("tiny", "out of range"),
    ("empty_src", "found 0 images"),
    ("missing_src", "does not exist"),
    ("different_out", "different options \\(size\\)"),
    ("different_source", "different source"),
    ("foreign_out", "holds files covidxray did not write there \\(e.g. something.txt\\); nothing was changed"),
    ("prepared_names_only", "holds no covidxray preparation"),
    ("out_is_file", "is not a folder"),
])
def test_user_errors(make_tree, tmp_path, case, message):
    src = make_tree({"covid": 4, "normal": 4})
    out = tmp_path / "out"
    kw: dict = {}
    if case == "empty_class":
        (src / "empty").mkdir()
        (src / "empty" / "readme.txt").write_text("x")
    elif case == "unknown_class":
        kw["classes"] = "covid,tb"
    elif case == "bad_fractions":
        kw.update(val=0.5, test=0.5)
    elif case == "negative":
        kw["val"] = -0.1
    elif case == "bad_fit":
        kw["fit"] = "zoom"
    elif case == "tiny":
        kw["size"] = 2
    elif case == "empty_src":
        src = tmp_path / "nothing"
        src.mkdir()
    elif case == "missing_src":
        src = tmp_path / "missing"
    elif case == "different_out":
        run(src, out, size=16)
        kw["size"] = 24
    elif case == "different_source":
        run(src, out)
        write_image(src / "covid" / "new.png", noise_array("new"))
    elif case == "foreign_out":
        out.mkdir()
        (out / "something.txt").write_text("x")
    elif case == "prepared_names_only":
        (out / "train").mkdir(parents=True)
    elif case == "out_is_file":
        out.write_text("x")
    with pytest.raises(CovidXrayError, match=message):
        run(src, out, **kw)


def test_classes_subset_skips_an_empty_folder(make_tree, tmp_path):
    src = make_tree({"COVID-19": 4, "Normal": 4})
    (src / "empty").mkdir()
    info = run(src, tmp_path / "out", classes="covid-19, normal")
    assert info["classes"] == ["covid", "normal"]


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def _interrupt_after(monkeypatch, name: str, k: int) -> list[int]:
    """Make ``P.<name>`` raise KeyboardInterrupt on its k-th call; returns the call counter."""
    return interrupt_after(monkeypatch, P, name, k)


def _source_with_masks(tmp_path) -> Path:
    src = _v4_with_masks(tmp_path / "src")
    make_source_tree(src, {"Normal": 12}, size=(24, 30), subdir="images")
    shutil.copy(src / "Normal/images/Normal-0.png", src / "Normal/images/dup.png")
    return src


@pytest.mark.parametrize("where, k", [("process_task", 6), ("_place", 9)])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch, where, k):
    src = _source_with_masks(tmp_path)
    run(src, tmp_path / "clean", size=20)

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, where, k)
        with pytest.raises(KeyboardInterrupt):
            run(src, out, size=20)
    assert not (out / "prepare.json").exists()  # never looks complete
    assert (out / P.STATE_FILE).exists()

    calls = [0]
    real = P.process_task

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "process_task", counting)
    run(src, out, size=20)
    total = 23
    if where == "process_task":
        assert calls[0] == total - (k - 1)  # finished items were not decoded again
    else:
        assert calls[0] == 0
    assert snapshot(out) == snapshot(tmp_path / "clean")


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_kill_9_with_torn_journal_then_resume(tmp_path):
    """A real SIGKILL mid-run (no cleanup at all), plus a torn last journal line."""
    src = _source_with_masks(tmp_path)
    run(src, tmp_path / "clean", size=20)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import covidxray.data.prepare as P
        real, n = P.process_task, [0]
        def killer(job, task):
            n[0] += 1
            if n[0] == 8:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(job, task)
        P.process_task = killer
        P.prepare({str(src)!r}, {str(out)!r}, size=20, workers=1, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not (out / "prepare.json").exists()
    journal = out / P.STAGING_DIR / P.JOURNAL_FILE
    assert len(journal.read_text().splitlines()) == 7
    with open(journal, "a") as fh:
        fh.write('{"rel": "COVID/images/COVID-6.png", "ok": tr')  # torn write
    run(src, out, size=20)
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_lost_staged_file_is_remade(make_tree, tmp_path, monkeypatch):
    src = make_tree({"a": 6})
    run(src, tmp_path / "clean")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, "_place", 3)
        with pytest.raises(KeyboardInterrupt):
            run(src, out)
    for staged in (out / P.STAGING_DIR).glob("*.png"):
        staged.unlink()
    run(src, out)
    assert snapshot(out) == snapshot(tmp_path / "clean")


# --------------------------------------------------------------------------------------------
# Demo
# --------------------------------------------------------------------------------------------


def test_prepare_demo(tmp_path):
    out = tmp_path / "demo"
    info = prepare_demo(out, per_class=4, size=32, seed=3, workers=1, progress=False)
    assert info["layout"] == "demo-phantoms" and info["synthetic"] is True and info["size"] == 32
    assert info["classes"] == ["covid", "normal", "viral_pneumonia"]
    rows = manifest(out)
    assert len(rows) == 12 and {r["synthetic"] for r in rows} == {"1"}
    for row in rows:
        assert row["mask"] and Image.open(out / row["file"]).size == (32, 32)
        assert set(np.unique(np.asarray(Image.open(out / row["mask"])))) <= {0, 255}
    prepare_demo(tmp_path / "demo2", per_class=4, size=32, seed=3, workers=2, progress=False)
    assert snapshot(out) == snapshot(tmp_path / "demo2")
    with pytest.raises(CovidXrayError, match="different options"):
        prepare_demo(out, per_class=5, size=32, seed=3, progress=False)


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


@pytest.mark.realdata
def test_real_v4_set(real_data_dir, tmp_path):
    out = tmp_path / "real"
    info = prepare(real_data_dir, out, size=64, workers=2, progress=False)
    rows = manifest(out)
    reasons = rejected(out)
    sources = sorted(p.relative_to(real_data_dir).as_posix() for p in real_data_dir.glob("*/images/*"))

    assert info["layout"] == "kaggle-v4"
    assert info["images_found"] == len(sources)
    assert len(rows) == info["images_kept"] == len(sources) - sum(1 for p in reasons if "/images/" in p)
    # Every source mask is either prepared or listed in rejected.csv.
    for row in rows:
        mask_src = row["source"].replace("/images/", "/masks/")
        if (real_data_dir / mask_src).exists():
            assert row["mask"] or mask_src in reasons
            if row["mask"]:
                assert (out / row["mask"]).is_file()
        else:
            assert not row["mask"]
    splits_of = defaultdict(set)
    for row in rows:
        if row["patient_id"]:
            splits_of[row["patient_id"]].add(row["split"])
    assert splits_of and all(len(s) == 1 for s in splits_of.values())
    assert Image.open(out / rows[0]["file"]).size == (64, 64)
