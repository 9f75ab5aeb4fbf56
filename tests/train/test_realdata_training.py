"""A short rawgan run on real chest X-rays (skipped with the reason when the data are absent)."""

import json

import pytest
import torch

from covidxray.config import resolve_config
from covidxray.data.prepare import prepare
from covidxray.infer.generate import load_generator
from covidxray.train.loop import start_run
from tests.fixtures import TINY_SETS

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def test_short_rawgan_run_on_real_xrays(real_data_dir, tmp_path):
    data = tmp_path / "cxr64"
    info = prepare(real_data_dir, data, size=64, workers=2, progress=False)
    n_train = sum(info["counts"]["train"].values())
    assert n_train > 500  # the shared developer set has 1,205 images
    cfg = resolve_config("rawgan", flags={"data": {"path": str(data), "image_size": 64},
                                          "train": {"epochs": 1, "device": "cpu"}},
                         sets=TINY_SETS + ["train.batch_size=64"])
    cfg.out = str(tmp_path / "runs")
    trainer, finished = start_run(cfg)
    assert finished and len(trainer.data) == n_train
    assert trainer.data.classes == sorted(info["counts"]["train"])
    stats = [json.loads(line) for line in (trainer.run_dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["kind"] == "epoch" and stats[-1]["step"] == n_train // 64
    assert all(torch.isfinite(torch.tensor(stats[-1][k])) for k in ("loss_d", "loss_g"))
    images = load_generator(trainer.run_dir).sample(4, seed=0)
    assert images.shape == (4, 1, 64, 64) and images.dtype == torch.uint8


def test_smallcnn_classifies_real_xrays_well_above_chance(real_data_dir, tmp_path, cli):
    # The full path a user runs: prepare -> train a classifier -> evaluate on the held-out test split.
    data = tmp_path / "cxr64"
    prepare(real_data_dir, data, size=64, workers=2, progress=False)
    runs = tmp_path / "runs"
    r = cli("train", "--model", "smallcnn", "--data", data, "--epochs", "8", "--out", runs, "--device", "cpu",
            "--set", "train.num_threads=2")
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval"
    r = cli("evaluate", runs / "00000-smallcnn", "--data", data, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics.json").read_text())
    assert res["metrics"]["n"] > 100 and res["overlap_with_training"]["same_pixels"] == 0
    # three classes: chance is 1/3; the COVID / normal / viral-pneumonia sources differ visibly
    assert res["metrics"]["balanced_accuracy"] > 0.6, res["metrics"]


def test_unet_segments_real_xrays_from_the_cli(real_data_dir, tmp_path, cli):
    # prepare (keeps the lung masks) -> train a small U-Net -> evaluate on the test masks -> segment originals
    import csv as _csv

    from PIL import Image

    data = tmp_path / "cxr64"
    prepare(real_data_dir, data, size=64, workers=2, progress=False)
    runs = tmp_path / "runs"
    r = cli("train", "--model", "unet", "--data", data, "--epochs", "6", "--out", runs, "--device", "cpu",
            "--set", "arch.width=16", "--set", "train.num_threads=2")
    assert r.exit_code == 0, r.output
    assert "have no lung mask and are left out" in (runs / "00000-unet" / "log.txt").read_text()
    out = tmp_path / "eval"
    r = cli("evaluate", runs / "00000-unet", "--data", data, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "metrics.json").read_text())
    assert res["n"] > 30 and res["overlap_with_training"]["same_pixels"] == 0
    assert res["summary"]["dice"]["mean"] > 0.85, res["summary"]["dice"]
    # three original X-rays of the test split, at their own sizes
    rows = [row for row in _csv.DictReader((data / "manifest.csv").open()) if row["split"] == "test" and row["mask"]]
    xrays = tmp_path / "xrays"
    xrays.mkdir()
    for row in rows[:: max(1, len(rows) // 3)][:3]:
        src = real_data_dir / row["source"]
        (xrays / src.name).write_bytes(src.read_bytes())
    r = cli("segment", runs / "00000-unet", xrays, tmp_path / "seg", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = list(_csv.DictReader((tmp_path / "seg" / "segment.csv").open()))
    assert len(table) == 3
    for row in table:
        with Image.open(xrays / row["file"]) as im:
            size = im.size
        with Image.open(tmp_path / "seg" / "masks" / (row["file"].rsplit(".", 1)[0] + ".png")) as mask:
            assert mask.size == size
        assert 0.1 < float(row["lung_fraction"]) < 0.7 and int(row["components"]) >= 1
