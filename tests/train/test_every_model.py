"""One training step of every registered model of every family, through the one loop and the CLI's code path
(a new model is covered by being registered)."""

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from covidxray.config import resolve_config
from covidxray.models import list_models
from covidxray.train.loop import Trainer, new_run_dir

#: Small settings per family (the same code paths as a real run).
TINY = {
    "gan": ["arch.g_channels=8", "arch.d_channels=8", "train.grid_size=4"],
    "classifier": [],
    "segmentation": ["arch.width=8", "arch.depth=3"],
    "autoencoder": ["arch.channels=8", "train.grid_size=4"],
    "image2image": ["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2", "train.grid_size=4"],
    "diffusion": ["arch.channels=8", "arch.depth=2", "train.grid_size=4", "edm.steps=2"],
}
MODELS = [(s.name, s.family) for s in list_models()]


def test_every_family_has_tiny_settings():
    assert {f for _, f in MODELS} == set(TINY)


@pytest.mark.parametrize("name, family", MODELS)
def test_one_training_step_of_every_model(name, family, demo_at_size, tmp_path):
    from covidxray.models import get_model

    spec = get_model(name)
    size = max(64, spec.min_image_size)  # prepared at 64 px; a larger input is resized on the device
    cfg = resolve_config(name, flags={"data": {"path": str(demo_at_size(64)), "image_size": size if family != "gan" else 64},
                                      "train": {"epochs": 1, "device": "cpu", "batch_size": 4}},
                         sets=TINY[family] + ["train.num_threads=1", "train.log_every=1"])
    cfg.out = str(tmp_path / "runs")
    trainer = Trainer(cfg, new_run_dir(cfg.out, name))
    before = {k: {n: t.clone() for n, t in net.state_dict().items()} for k, net in trainer.task.models.items()}
    assert trainer.fit() and trainer.step >= 1
    for key, net in trainer.task.models.items():
        changed = [not torch.equal(t, before[key][n]) for n, t in net.state_dict().items()]
        assert any(changed), f"{key} did not change"
    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    assert ckpt["family"] == family and ckpt["model"] == name and ckpt["image_size"] == size
    assert set(ckpt["models"]) >= set(trainer.task.models)
    stats = (trainer.run_dir / "stats.jsonl").read_text()
    assert "NaN" not in stats and "Infinity" not in stats
    for net in trainer.task.models.values():
        assert all(torch.isfinite(p).all() for p in net.parameters())
