"""pix2pix (mask2xray) through the one loop: L1 + PatchGAN, validation L1, snapshots, resume."""

import json

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from covidxray.config import resolve_config
from covidxray.errors import CovidXrayError
from covidxray.train.loop import resume_run, start_run

TINY = ["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2", "train.batch_size=8", "train.log_every=2",
        "train.grid_size=4", "train.num_threads=1"]


def _records(run_dir, kind=None):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture
def p2p_cfg(demo_prepared, tmp_path):
    def make(epochs=2, extra=()):
        cfg = resolve_config("pix2pix", flags={"data": {"path": str(demo_prepared)},
                                               "train": {"epochs": epochs, "device": "cpu"}}, sets=TINY + list(extra))
        cfg.out = str(tmp_path / "runs")
        return cfg
    return make


def test_pix2pix_learns_xrays_from_masks(p2p_cfg):
    trainer, finished = start_run(p2p_cfg(epochs=6))
    assert finished
    evals = _records(trainer.run_dir, "eval")
    assert [r["epoch"] for r in evals] == list(range(1, 7))
    assert all(0 < r["val_l1"] < 1 for r in evals)
    epochs = _records(trainer.run_dir, "epoch")
    assert epochs[-1]["l1"] < 0.85 * epochs[0]["l1"]  # G's X-rays move towards the real ones
    ckpt = load_checkpoint(trainer.run_dir, prefer_best=True)
    assert ckpt["family"] == "image2image" and ckpt["eval_metric"] == "l1" and set(ckpt["models"]) == {"G", "D"}
    assert (trainer.run_dir / "samples" / "epoch_0006.png").is_file()
    # sampling keeps the paper's dropout noise on: two translations of the same masks differ
    masks = trainer.data.masks[:2]
    a, b = trainer.task.translate(masks), trainer.task.translate(masks)
    assert a.shape == (2, 1, 64, 64) and a.dtype == torch.uint8 and not torch.equal(a, b)


@pytest.mark.parametrize("stop_at", [3, 7])
def test_pix2pix_resume_equals_uninterrupted(p2p_cfg, stop_at):
    ref, _ = start_run(p2p_cfg(epochs=2))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(p2p_cfg(epochs=2), on_step=stop)
    assert not finished
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step
    for name in ("G", "D"):
        for key, value in ref.task.models[name].state_dict().items():
            assert torch.equal(value, resumed.task.models[name].state_dict()[key]), (name, key)
    assert _records(ref.run_dir) == _records(part.run_dir)


def test_bad_pix2pix_settings(p2p_cfg):
    with pytest.raises(CovidXrayError, match="model.task"):
        p2p_cfg(extra=["model.task=colorize"])
    with pytest.raises(CovidXrayError, match="arch.dropout"):
        p2p_cfg(extra=["arch.dropout=1.0"])
    with pytest.raises(CovidXrayError, match="data.image_size"):
        p2p_cfg(extra=["data.image_size=96"])
