"""A short rawgan run on real chest X-rays (skipped with the reason when the data are absent)."""

import json

import pytest
import torch

from covidxray.config import resolve_config
from covidxray.data.prepare import prepare
from covidxray.generate import load_generator
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
