"""The classifier family through the one loop: resume, best.pt, early stopping, pretrained weights, data checks."""

import json

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from covidxray.errors import CovidXrayError
from covidxray.infer.predict import load_classifier, predict_probs
from covidxray.train.loop import Trainer, resume_run, start_run


def _records(run_dir, kind=None):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if kind is None or r["kind"] == kind]


def test_a_classifier_run_trains_validates_and_checkpoints(clf_cfg):
    trainer, finished = start_run(clf_cfg(epochs=2))
    run = trainer.run_dir
    assert finished and run.name == "00000-smallcnn"
    for name in ("config.yaml", "log.txt", "stats.jsonl", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert not (run / "samples").exists()  # classifiers write no sample grids
    evals = _records(run, "eval")
    assert [r["epoch"] for r in evals] == [1, 2]
    for r in evals:
        assert {"val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auc"} <= set(r)
        assert 0 <= r["val_balanced_accuracy"] <= 1
    steps = _records(run, "interval")
    assert steps and all({"loss", "acc", "lr"} <= set(r) for r in steps)
    ckpt = load_checkpoint(run, resume=True)
    assert ckpt["family"] == "classifier" and ckpt["image_size"] == 64 and ckpt["eval_metric"] == "loss"
    assert set(ckpt["models"]) == {"net"} and set(ckpt["rng"]) >= {"shuffle", "aug", "torch_cpu"}
    assert "image_size: 64" in (run / "config.yaml").read_text()  # 0 (= prepared size) resolved


def test_training_changes_the_weights_and_learns_something(clf_cfg):
    # Four epochs on the demo phantoms (classes differ in their opacities): the training loss falls.
    trainer, _ = start_run(clf_cfg(epochs=6, extra=["optim.warmup_epochs=0"]))
    losses = [r["loss"] for r in _records(trainer.run_dir, "epoch")]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("stop_at", [5, 7])  # mid-epoch and at an epoch boundary (7 steps per epoch)
def test_classifier_resume_mid_epoch_equals_uninterrupted(clf_cfg, stop_at):
    extra = ["model.mc_dropout=0.2", "eval.mc_samples=3", "loss.class_weights=balanced", "loss.label_smoothing=0.1"]
    ref, _ = start_run(clf_cfg(epochs=2, extra=extra))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(clf_cfg(epochs=2, extra=extra), on_step=stop)
    assert not finished and load_checkpoint(part.run_dir, resume=True)["step"] == stop_at
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step == 14
    for key, value in ref.task.net.state_dict().items():
        assert torch.equal(value, resumed.task.net.state_dict()[key]), key
    assert _records(ref.run_dir) == _records(part.run_dir)
    a, b = load_checkpoint(ref.run_dir, resume=True), load_checkpoint(part.run_dir, resume=True)
    assert a["epoch"] == b["epoch"] and a["best_metric"] == b["best_metric"]


def test_best_pt_is_the_epoch_with_the_best_validation_metric(clf_cfg, demo_prepared):
    trainer, _ = start_run(clf_cfg(epochs=5, extra=["eval.metric=balanced_accuracy", "optim.lr=5e-3"]))
    evals = _records(trainer.run_dir, "eval")
    values = [r["val_balanced_accuracy"] for r in evals]
    best_epoch = evals[values.index(max(values))]["epoch"]  # the first of equal maxima: later ties are no gain
    best = load_checkpoint(trainer.run_dir / "checkpoints" / "best.pt")
    assert best["epoch"] == best_epoch and best["best_metric"] == pytest.approx(max(values), abs=1e-5)
    for i, r in enumerate(evals):  # each record names the best epoch so far (the first of equal maxima)
        so_far = values[: i + 1]
        assert r["best_epoch"] == evals[so_far.index(max(so_far))]["epoch"]
    # best.pt's weights give back the recorded validation score
    loaded = load_classifier(trainer.run_dir / "checkpoints" / "best.pt")
    from covidxray.data.datasets import load_tensor_data
    from covidxray.metrics.classification import balanced_accuracy

    val = load_tensor_data(demo_prepared, "val")
    probs = predict_probs(loaded.net, val.images, "cpu")["probs"]
    assert balanced_accuracy(val.labels, probs.argmax(1), 3) == pytest.approx(max(values), abs=1e-5)


def test_early_stopping_stops_and_a_resume_is_refused(clf_cfg):
    # min_delta larger than any change: only the first evaluation counts as an improvement
    trainer, finished = start_run(clf_cfg(epochs=10, extra=["eval.patience=2", "eval.min_delta=1e9"]))
    assert finished and trainer.epoch == 3
    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    assert ckpt["stopped_early"] and ckpt["best_epoch"] == 1 and ckpt["evals_since_best"] == 2
    assert load_checkpoint(trainer.run_dir / "checkpoints" / "best.pt")["epoch"] == 1
    assert "early stopping at epoch 3" in (trainer.run_dir / "log.txt").read_text()
    with pytest.raises(CovidXrayError, match="the run stopped early at epoch 3"):
        resume_run(trainer.run_dir, epochs=20)


def test_evaluation_does_not_change_what_is_trained(clf_cfg, tmp_path):
    # The evaluation draws from a forked RNG: a run with MC-dropout validation every epoch trains the same
    # weights as one without validation.
    a, _ = start_run(clf_cfg(epochs=2, extra=["model.mc_dropout=0.3", "eval.mc_samples=4"]))
    b, _ = start_run(clf_cfg(epochs=2, extra=["model.mc_dropout=0.3", "eval.every=0", "eval.patience=0"]))
    assert b.eval_data is None and not (b.run_dir / "checkpoints" / "best.pt").exists()
    for key, value in a.task.net.state_dict().items():
        assert torch.equal(value, b.task.net.state_dict()[key]), key


def test_images_are_resized_on_the_device_when_asked(clf_cfg):
    cfg = clf_cfg(epochs=1)
    cfg.data.image_size = 96
    trainer, finished = start_run(cfg)
    assert finished and trainer.data.images.shape[-1] == 96 and trainer.eval_data.images.shape[-1] == 96
    assert "resized to 96 px" in (trainer.run_dir / "log.txt").read_text()
    assert load_checkpoint(trainer.run_dir, resume=True)["image_size"] == 96
    assert load_classifier(trainer.run_dir).net(torch.zeros(1, 1, 96, 96)).shape == (1, 3)


def test_inception_refuses_images_smaller_than_75_px(clf_cfg):
    with pytest.raises(CovidXrayError, match="inception_v3 needs images of at least 75 px; the data are 64 px"):
        start_run(clf_cfg(epochs=1, model="inception_v3"))


def test_bad_data_for_a_classifier(clf_cfg, tmp_path):
    with pytest.raises(CovidXrayError, match="a classifier needs at least 2 classes"):
        start_run(clf_cfg(extra=["data.classes=covid"]))
    with pytest.raises(CovidXrayError, match="'loss.class_weights' has 2 weights but the data have 3 classes "
                                             r"\(covid, normal, viral_pneumonia, in this order\)"):
        start_run(clf_cfg(extra=["loss.class_weights=1,2"]))
    with pytest.raises(CovidXrayError, match="eval.split and data.split are both 'val'"):
        start_run(clf_cfg(extra=["data.split=val", "eval.split=val"]))
    from covidxray.data.prepare import prepare_demo

    no_val = tmp_path / "noval"
    prepare_demo(no_val, per_class=6, size=64, seed=0, val=0.0, test=0.2, workers=1, progress=False)
    cfg = clf_cfg()
    cfg.data.path = str(no_val)
    with pytest.raises(CovidXrayError, match=r"split 'val' .* has no images.*needed to evaluate during training.*"
                                             r"--set eval.every=0"):
        start_run(cfg)
    assert not (tmp_path / "runs").exists()  # no run folders left by runs that could not start, nor runs/


def test_sgd_with_a_step_schedule(clf_cfg):
    trainer, finished = start_run(clf_cfg(epochs=3, extra=["optim.name=sgd", "optim.schedule=step",
                                                           "optim.step_epochs=2", "optim.warmup_epochs=0",
                                                           "optim.lr=0.01"]))
    assert finished and isinstance(trainer.task.opt, torch.optim.SGD)
    lrs = {r["epoch"]: r["lr"] for r in _records(trainer.run_dir, "epoch")}
    assert lrs[1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.01) and lrs[3] == pytest.approx(0.001)


def test_nan_loss_stops_with_a_classifier_hint(clf_cfg, monkeypatch):
    real_step = Trainer.train_step

    def diverging(self, images, labels):
        out = real_step(self, images, labels)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", diverging)
    with pytest.raises(CovidXrayError, match="diverged at step 2: loss became NaN/inf") as err:
        start_run(clf_cfg(epochs=1))
    assert "optim.lr" in str(err.value) and "lr_g" not in str(err.value)


@pytest.mark.parametrize("native", [True, False])
def test_amp_auto_is_bf16_on_cpus_with_native_bf16_only(clf_cfg, tiny_cfg, tmp_path, monkeypatch, native):
    import covidxray.train.loop as loop

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    clf = Trainer(clf_cfg(epochs=1), tmp_path / "c")
    assert clf.amp_dtype == (torch.bfloat16 if native else None)
    assert Trainer(clf_cfg(epochs=1, extra=["train.amp=off"]), tmp_path / "o").amp_dtype is None
    # GANs too since configs/studies/precision.yaml measured bf16 1.65x faster at the same FID
    assert Trainer(tiny_cfg(epochs=1), tmp_path / "g").amp_dtype == (torch.bfloat16 if native else None)
    assert Trainer(tiny_cfg(epochs=1, extra=["train.amp=off"]), tmp_path / "h").amp_dtype is None
