import json

import pytest
import torch
from PIL import Image

from covidxray.errors import CovidXrayError
from covidxray.checkpoint import load_checkpoint
from covidxray.train.loop import resume_run, start_run


def _stats(run_dir):
    # images/s depends on the machine's load; everything else must match exactly.
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def test_run_folder_contents(tiny_cfg):
    trainer, finished = start_run(tiny_cfg(epochs=2))
    run = trainer.run_dir
    assert finished and run.name == "00000-rawgan"
    for name in ("config.yaml", "log.txt", "stats.jsonl", "reals.png", "checkpoints/last.pt",
                 "samples/epoch_0000.png", "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (run / name).is_file(), name
    stats = _stats(run)
    assert {"step", "epoch", "kimg", "loss_d", "loss_g", "d_real", "d_fake"} <= set(stats[-1])
    assert stats[-1]["kind"] == "epoch" and stats[-1]["epoch"] == 2
    n_train = len(trainer.data)
    assert stats[-1]["step"] == 2 * (n_train // 16)
    with Image.open(run / "samples" / "epoch_0002.png") as im:
        assert im.mode == "L" and im.width == 4 * 64 + 5 * 2  # 16 images in a 4x4 grid, 2 px padding
    ckpt = load_checkpoint(run, resume=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == stats[-1]["step"]
    assert set(ckpt["models"]) == {"G", "D", "G_ema"} and set(ckpt["optimizers"]) == {"G", "D"}
    assert ckpt["config"]["train"]["seed"] == 0


def test_training_changes_the_generator(tiny_cfg):
    cfg = tiny_cfg(epochs=1)
    trainer, _ = start_run(cfg)
    from covidxray.models import DataSpec, get_model

    torch.manual_seed(cfg.train.seed)
    fresh = get_model("rawgan").build(cfg, DataSpec.example(64, 3))["G"]
    changed = [not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trainer.task.G.state_dict().values())]
    assert any(changed)
    assert all(torch.isfinite(p).all() for p in trainer.task.G.parameters())


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch and at an epoch boundary (3 steps per epoch)
def test_interrupted_then_resumed_equals_uninterrupted(tiny_cfg, stop_at):
    ref, _ = start_run(tiny_cfg(epochs=2))

    def stop(trainer):
        if trainer.state.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(tiny_cfg(epochs=2), on_step=stop)
    assert not finished
    assert load_checkpoint(part.run_dir, resume=True)["step"] == stop_at
    resumed, finished = resume_run(part.run_dir)
    assert finished
    for key, value in ref.task.G.state_dict().items():
        assert torch.equal(value, resumed.task.G.state_dict()[key]), key
    for key, value in ref.task.D.state_dict().items():
        assert torch.equal(value, resumed.task.D.state_dict()[key]), key
    assert _stats(ref.run_dir) == _stats(part.run_dir)
    for snap in ("epoch_0001.png", "epoch_0002.png"):
        assert (ref.run_dir / "samples" / snap).read_bytes() == (part.run_dir / "samples" / snap).read_bytes()


def test_resume_with_more_epochs_continues_the_run(tiny_cfg):
    ref, _ = start_run(tiny_cfg(epochs=3))
    part, _ = start_run(tiny_cfg(epochs=2))
    resumed, finished = resume_run(part.run_dir, epochs=3)
    assert finished and resumed.state.epoch == 3
    for key, value in ref.task.G.state_dict().items():
        assert torch.equal(value, resumed.task.G.state_dict()[key]), key
    assert "epochs: 3" in (part.run_dir / "config.yaml").read_text()


def test_resume_errors(tiny_cfg, tmp_path):
    run, _ = start_run(tiny_cfg(epochs=1))
    with pytest.raises(CovidXrayError, match="already trained to epoch 1"):
        resume_run(run.run_dir)
    with pytest.raises(CovidXrayError, match="does not exist"):
        resume_run(tmp_path / "nope")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(CovidXrayError, match="no checkpoints/last.pt"):
        resume_run(empty)
    (run.run_dir / "checkpoints" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CovidXrayError, match="not a readable covidxray checkpoint"):
        resume_run(run.run_dir, epochs=2)


def test_resume_refuses_changed_data(tiny_cfg, tmp_path):
    from covidxray.data.prepare import prepare_demo

    run, _ = start_run(tiny_cfg(epochs=1))
    other = tmp_path / "other"
    prepare_demo(other, per_class=12, size=64, seed=1, workers=1, progress=False)
    with pytest.raises(CovidXrayError, match="training data changed"):
        resume_run(run.run_dir, epochs=2, data=str(other))


def test_one_class_and_bad_data(tiny_cfg, tmp_path):
    trainer, _ = start_run(tiny_cfg(epochs=1, extra=["data.classes=covid"]))
    assert trainer.data.classes == ["covid"] and len(trainer.data) > 0
    with pytest.raises(CovidXrayError, match="not in"):
        start_run(tiny_cfg(extra=["data.classes=pneumothorax"]))
    cfg = tiny_cfg()
    cfg.data.image_size = 128
    with pytest.raises(CovidXrayError, match="prepared at 64 px but 128 px"):
        start_run(cfg)
    cfg = tiny_cfg()
    cfg.data.path = str(tmp_path / "missing")
    with pytest.raises(CovidXrayError, match="does not exist"):
        start_run(cfg)
    # No empty run folders are left behind by runs that could not start.
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["00000-rawgan"]
