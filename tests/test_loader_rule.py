"""The loader rule (covidxray.checkpoint.resolve_checkpoint_path), the same in every command: a run folder means
``best.pt`` when its family selected one, else ``last.pt``; ``train --resume`` continues ``last.pt``.

Each run here has a ``best.pt`` that differs from its ``last.pt`` (the last one's weights are perturbed), and every
command that reads the run must have read ``best.pt`` and say so in its output. These were three disagreements:
``sample`` decoded a VAE's ``last.pt`` but ``--reconstruct`` its ``best.pt``; ``evaluate`` scored generators'
``last.pt`` but reloaded a pix2pix run's ``best.pt``; ``load_classifier`` (the downstream arms) read ``last.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from covidxray.checkpoint import resolve_checkpoint_path
from covidxray.config import resolve_config
from covidxray.outdir import read_marker
from covidxray.train.loop import start_run
from tests.fixtures import TINY_CLF_SETS, TINY_UNET_SETS, train_tiny_gan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "smallcnn": TINY_CLF_SETS,
    "unet": TINY_UNET_SETS,
    "vae": ["arch.channels=8", "arch.latent_dim=16", "train.batch_size=8", "train.grid_size=9", "train.num_threads=1"],
    "pix2pix": ["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2", "train.batch_size=8",
                "train.grid_size=4", "train.num_threads=1"],
}


def _perturb_last(run: Path) -> None:
    """Make last.pt's weights differ from best.pt's, as after epochs that did not improve."""
    path = run / "checkpoints" / "last.pt"
    blob = torch.load(path, weights_only=True)
    for state in blob["models"].values():
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v + 0.5
    torch.save(blob, path)


@pytest.fixture(scope="module")
def runs(demo_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader-rule")
    made = {}
    for model, sets in TINY.items():
        cfg = resolve_config(model, flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 2, "device": "cpu"}},
                             sets=sets + ["eval.every=1", "train.checkpoint_every=1"])
        cfg.out = str(out)
        trainer, finished = start_run(cfg)
        assert finished and (trainer.run_dir / "checkpoints" / "best.pt").is_file()
        _perturb_last(trainer.run_dir)
        made[model] = trainer.run_dir
    made["cgan"] = train_tiny_gan("cgan", demo_prepared, out)
    return made


def _is_best(path: str) -> bool:
    return Path(path).name == "best.pt"


def test_the_rule_in_one_function(runs):
    for model in TINY:
        assert resolve_checkpoint_path(runs[model]).name == "best.pt"
        assert resolve_checkpoint_path(runs[model], resume=True).name == "last.pt"
    assert resolve_checkpoint_path(runs["cgan"]).name == "last.pt"  # GANs select no best.pt


def test_classifier_evaluate_and_the_downstream_loader_read_best(runs, demo_prepared, tmp_path, cli):
    from covidxray.infer.predict import load_classifier

    assert _is_best(load_classifier(runs["smallcnn"]).checkpoint["path"])  # what the downstream arms score
    r = cli("evaluate", runs["smallcnn"], "--data", demo_prepared, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert _is_best(json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoint"])
    assert "best.pt" in r.stdout


def test_segment_and_evaluate_of_a_segmenter_read_best(runs, demo_prepared, tmp_path, cli):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((demo_prepared / "test").glob("*/*.png"))[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    r = cli("segment", runs["unet"], src, tmp_path / "seg")
    assert r.exit_code == 0, r.output
    assert _is_best(json.loads((tmp_path / "seg" / "segment.json").read_text())["settings"]["checkpoint"])
    r = cli("evaluate", runs["unet"], "--data", demo_prepared, "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert _is_best(json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoint"])


def test_a_vae_samples_and_reconstructs_from_the_same_best(runs, demo_prepared, tmp_path, cli):
    r = cli("sample", runs["vae"], tmp_path / "s", "-n", "3")
    assert r.exit_code == 0, r.output
    assert _is_best(read_marker(tmp_path / "s")["settings"]["checkpoint"]) and "best.pt" in r.stdout
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((demo_prepared / "test").glob("*/*.png"))[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    r = cli("sample", runs["vae"], tmp_path / "r", "--reconstruct", src)
    assert r.exit_code == 0, r.output
    assert "best.pt" in r.stdout and "last.pt" not in r.stdout


def test_pix2pix_pairs_and_its_evaluation_read_the_same_best(runs, demo_prepared, tmp_path, cli, unverified):
    r = cli("sample", runs["pix2pix"], tmp_path / "pairs", "--from-data", demo_prepared)
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "pairs" / "prepare.json").read_text())
    assert _is_best(info["generator"]["checkpoint"])
    r = cli("evaluate", runs["pix2pix"], "--data", demo_prepared, "--out", tmp_path / "e", "--repeats", "1",
            "--metrics", "kid")
    assert r.exit_code == 0, r.output
    assert _is_best(json.loads((tmp_path / "e" / "metrics.json").read_text())["source"]["path"])


def test_a_gan_has_no_best_and_resume_continues_last(runs, tmp_path, cli):
    r = cli("sample", runs["cgan"], tmp_path / "s", "-n", "2")
    assert r.exit_code == 0, r.output
    assert Path(read_marker(tmp_path / "s")["settings"]["checkpoint"]).name == "last.pt"
    r = cli("train", "--resume", runs["smallcnn"], "--epochs", "3")
    assert r.exit_code == 0, r.output
    log = (runs["smallcnn"] / "log.txt").read_text()
    assert "resuming" in log and "at epoch 2" in log  # last.pt's epoch, not best.pt's

