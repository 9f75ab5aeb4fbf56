"""Classifiers trained on real + synthetic images (``data.synthetic``): a tiny conditional GAN trained for
one epoch generates labelled images on the device at every step (real + synthetic, and synthetic only)."""

import json
import types

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from covidxray.config import resolve_config
from covidxray.data.datasets import TensorData, resize_u8, to_float
from covidxray.errors import CovidXrayError
from covidxray.infer.generate import generate_images, load_generator
from covidxray.train.loop import Trainer, new_run_dir, resume_run, start_run
from covidxray.train.tasks import classifier as clf_task
from covidxray.train.tasks.classifier import ClassifierTask, class_cdf, sample_labels, synthetic_count
from tests.fixtures import train_tiny_gan


def _records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs]


@pytest.fixture(scope="module")
def cgan_run(demo_prepared, tmp_path_factory):
    """A tiny cgan trained for one epoch on the demo data (3 classes, 64 px)."""
    return train_tiny_gan("cgan", demo_prepared, tmp_path_factory.mktemp("cgan"))


def _syn_cfg(clf_cfg, run, ratio, epochs=1, extra=()):
    return clf_cfg(epochs=epochs, extra=[f"data.synthetic={run}", f"data.synthetic_ratio={ratio}", *extra])


def _spy(trainer, monkeypatch):
    """Record, per step, the real batch given to the task, the images that reach the augmentation and the
    labels that reach the loss."""
    rec = {"real": [], "real_labels": [], "augmented": [], "loss_labels": []}
    step = trainer.task.device_step

    def device_step(images, labels, *variant):
        rec["real"].append(images.clone())
        rec["real_labels"].append(labels.clone())
        return step(images, labels, *variant)

    trainer.task.device_step = device_step
    augment = clf_task.augment_batch

    def augment_batch(x, gen, **kw):
        rec["augmented"].append(x.clone())
        return augment(x, gen, **kw)

    monkeypatch.setattr(clf_task, "augment_batch", augment_batch)
    ce = clf_task.F.cross_entropy

    def cross_entropy(logits, labels, **kw):
        rec["loss_labels"].append(labels.clone())
        return ce(logits, labels, **kw)

    monkeypatch.setattr(clf_task, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    return rec


def _expected_synthetic(run, trainer, n, steps, size=None):
    """The generated images and labels of the first ``steps`` steps, rebuilt independently through the
    public generator API: labels from the real class frequencies, latents, both from seed + 5."""
    loaded = load_generator(run)
    gen = torch.Generator().manual_seed(trainer.cfg.train.seed + 5)
    cdf = torch.bincount(trainer.data.labels, minlength=3).double().cumsum(0)
    cdf = (cdf / cdf[-1]).float()
    out = []
    for _ in range(steps):
        y = torch.searchsorted(cdf, torch.rand(n, generator=gen), right=True).clamp(max=2)
        z = torch.randn(n, loaded.cfg.arch.latent_dim, generator=gen)
        images = generate_images(loaded.G, z, y, "cpu")
        out.append((resize_u8(images, size) if size else images, y))
    return out


def test_half_synthetic_adds_b_generated_images_to_every_step(clf_cfg, cgan_run, monkeypatch):
    cfg = _syn_cfg(clf_cfg, cgan_run, 0.5)
    trainer = Trainer(cfg, new_run_dir(cfg.out, cfg.model.name))
    B = trainer.batch_size
    assert B == 8 and trainer.task.n_synthetic == 8 and synthetic_count(8, 0.5) == 8
    G = trainer.task.G
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    assert set(trainer.task.models) == {"net"}
    rec = _spy(trainer, monkeypatch)
    assert trainer.fit()
    steps = trainer.step
    assert steps == trainer.batches_per_epoch == len(rec["augmented"])
    expected = _expected_synthetic(cgan_run, trainer, 8, steps)
    for i, (fake, y) in enumerate(expected):
        x = rec["augmented"][i]
        assert x.shape == (16, 1, 64, 64)                            # B real + B generated images
        assert torch.equal(x[:B], to_float(rec["real"][i]))          # the real batch, as it came
        assert torch.equal(x[B:], to_float(fake))                    # then the generated one
        assert torch.equal(rec["loss_labels"][i], torch.cat([rec["real_labels"][i], y]))
    assert len({int(c) for y in expected for c in y[1]}) == 3        # every class gets drawn

    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    gan = load_checkpoint(cgan_run, resume=True)
    assert set(ckpt["models"]) == {"net"} and "synthetic" in ckpt["rng"]  # G is not saved with the classifier
    assert ckpt["synthetic"] == {"path": str(gan["path"]), "model": "cgan", "weights": "G_ema",
                                 "step": gan["step"], "epoch": 1}
    assert ckpt["images_seen"] == steps * B                          # kimg counts the real images
    log = (trainer.run_dir / "log.txt").read_text()
    assert (f"synthetic: 8 generated images per step (ratio 0.5) from {gan['path']} (cgan, G_ema); "
            f"beside 8 real ones; the generator was trained {gan['step']} steps (1 epochs)") in log

    # Same seed, same real batches, without synthetic images: other weights.
    plain, _ = start_run(clf_cfg(epochs=1))
    assert plain.step == steps
    net, ref = trainer.task.net.state_dict(), plain.task.net.state_dict()
    assert any(not torch.equal(net[k], ref[k]) for k in net if net[k].is_floating_point())


def test_ratio_one_trains_on_generated_images_only(clf_cfg, cgan_run, monkeypatch):
    cfg = _syn_cfg(clf_cfg, cgan_run, 1)
    trainer = Trainer(cfg, new_run_dir(cfg.out, cfg.model.name))
    assert trainer.task.n_synthetic == trainer.batch_size == 8 and trainer.task.synthetic_only
    rec = _spy(trainer, monkeypatch)
    assert trainer.fit()
    expected = _expected_synthetic(cgan_run, trainer, 8, trainer.step)
    assert trainer.step == trainer.batches_per_epoch  # an epoch is as long as the real data's
    for i, (fake, y) in enumerate(expected):
        assert torch.equal(rec["augmented"][i], to_float(fake))
        assert torch.equal(rec["loss_labels"][i], y)
    assert "no real images" in (trainer.run_dir / "log.txt").read_text()

    # Real images and labels scrambled after the start (the class frequencies are read at the start):
    # the same weights, bit for bit, so nothing of the real batches is trained on.
    monkeypatch.undo()
    other_cfg = _syn_cfg(clf_cfg, cgan_run, 1)
    other = Trainer(other_cfg, new_run_dir(other_cfg.out, other_cfg.model.name))
    d = other.data
    other.data = TensorData(torch.zeros_like(d.images), d.labels.roll(5).flip(0), d.classes, d.ids)
    assert other.fit()
    for key, value in trainer.task.net.state_dict().items():
        assert torch.equal(value, other.task.net.state_dict()[key]), key


def test_generated_images_are_resized_to_the_classifier_side(clf_cfg, cgan_run, monkeypatch):
    cfg = _syn_cfg(clf_cfg, cgan_run, 0.5, extra=["data.image_size=96"])
    trainer = Trainer(cfg, new_run_dir(cfg.out, cfg.model.name), on_step=lambda t: t.request_stop())
    rec = _spy(trainer, monkeypatch)
    assert not trainer.fit() and trainer.step == 1
    (fake, _), = _expected_synthetic(cgan_run, trainer, 8, 1, size=96)
    x = rec["augmented"][0]
    assert x.shape == (16, 1, 96, 96) and torch.equal(x[8:], to_float(fake))
    assert "resized 64 -> 96 px" in (trainer.run_dir / "log.txt").read_text()


def test_an_unconditional_generator_is_refused(clf_cfg, demo_prepared, tmp_path):
    raw = train_tiny_gan("rawgan", demo_prepared, tmp_path / "gan")
    with pytest.raises(CovidXrayError) as err:
        start_run(_syn_cfg(clf_cfg, raw, 0.5))
    msg = str(err.value)
    assert "data.synthetic: unconditional generators cannot add labelled images" in msg
    assert "'rawgan', which is not class-conditional" in msg and "Train a class-conditional generator (" in msg
    assert "cgan" in msg.split("Train a class-conditional generator (")[1]
    assert not (tmp_path / "runs").exists()  # no run folder left behind, nor the runs/ folder made for it


def test_a_generator_of_other_classes_is_refused(clf_cfg, cgan_run):
    with pytest.raises(CovidXrayError, match="trained on the classes covid, normal, viral_pneumonia but the "
                                             "classifier's training data have covid, normal"):
        start_run(_syn_cfg(clf_cfg, cgan_run, 0.5, extra=["data.classes=covid,normal"]))


def test_a_missing_or_useless_synthetic_source_is_refused(clf_cfg, cgan_run, tmp_path):
    with pytest.raises(CovidXrayError, match="data.synthetic: checkpoint .*nowhere.pt does not exist"):
        start_run(_syn_cfg(clf_cfg, tmp_path / "nowhere.pt", 0.5))
    with pytest.raises(CovidXrayError, match="data.synthetic: .* holds a classifier model"):  # a classifier run is no generator
        plain, _ = start_run(clf_cfg(epochs=1))
        start_run(_syn_cfg(clf_cfg, plain.run_dir, 0.5))
    with pytest.raises(CovidXrayError, match=r"data.synthetic_ratio=0.01 with 8 real images a step adds .* = 0 "
                                             r"generated images"):
        start_run(_syn_cfg(clf_cfg, cgan_run, 0.01))


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5])
def test_the_ratio_must_be_in_0_1(ratio):
    with pytest.raises(CovidXrayError) as err:
        resolve_config("smallcnn", sets=[f"data.synthetic_ratio={ratio}"])
    assert "config key 'data.synthetic_ratio' must be in (0, 1]" in str(err.value)
    assert f"got {ratio:g}" in str(err.value)


def test_config_keys_defaults_and_other_families():
    cfg = resolve_config("smallcnn", sets=["data.synthetic_ratio=1"])
    assert cfg.data.synthetic == "" and cfg.data.synthetic_ratio == 1.0
    assert resolve_config("resnet18").data.synthetic_ratio == 0.5
    with pytest.raises(CovidXrayError, match="'data.synthetic' of the gan family .* it is a key of the classifier"):
        resolve_config("cgan", sets=["data.synthetic=x"])
    assert [synthetic_count(64, r) for r in (0.5, 0.25, 0.2, 0.75, 1.0)] == [64, 21, 16, 192, 64]


def test_cuda_graphs_are_refused_with_synthetic_data(clf_cfg, cgan_run):
    assert ClassifierTask.graphs_unsupported(clf_cfg(epochs=1)) == ""
    why = ClassifierTask.graphs_unsupported(_syn_cfg(clf_cfg, cgan_run, 0.5))
    assert why.startswith("data.synthetic: ")


@pytest.mark.parametrize("stop_at, ratio", [(5, 0.5), (7, 0.5), (3, 1.0)])  # mid-epoch, epoch boundary (7 steps)
def test_resume_with_synthetic_data_equals_uninterrupted(clf_cfg, cgan_run, stop_at, ratio):
    ref, _ = start_run(_syn_cfg(clf_cfg, cgan_run, ratio, epochs=2))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(_syn_cfg(clf_cfg, cgan_run, ratio, epochs=2), on_step=stop)
    assert not finished and load_checkpoint(part.run_dir, resume=True)["step"] == stop_at
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step == 14
    for key, value in ref.task.net.state_dict().items():
        assert torch.equal(value, resumed.task.net.state_dict()[key]), key
    assert torch.equal(ref.task.synthetic_gen.get_state(), resumed.task.synthetic_gen.get_state())
    assert _records(ref.run_dir) == _records(part.run_dir)
    assert "changed since" not in (part.run_dir / "log.txt").read_text()


def test_a_resume_whose_generator_changed_says_so(clf_cfg, cgan_run, tmp_path):
    gan = load_checkpoint(cgan_run, resume=True)
    path = tmp_path / "gan.pt"
    torch.save({k: v for k, v in gan.items() if k != "path"}, path)
    part, finished = start_run(_syn_cfg(clf_cfg, path, 0.5, epochs=2), on_step=lambda t: t.request_stop())
    assert not finished
    blob = torch.load(path, weights_only=True)
    blob["step"] += 100  # the GAN trained on
    torch.save(blob, path)
    with pytest.warns(UserWarning, match="the generator of data.synthetic changed since"):
        resumed, finished = resume_run(part.run_dir)
    assert finished
    assert f"step {gan['step']}, weights G_ema then; path {path.resolve()}, step {gan['step'] + 100}" in \
        (part.run_dir / "log.txt").read_text()


def test_drawn_labels_follow_the_real_class_frequencies(clf_cfg, cgan_run):
    counts = torch.tensor([10, 30, 60, 0, 25])
    cdf = class_cdf(counts)
    assert cdf[-1] == 1.0
    gen = torch.Generator().manual_seed(0)
    y = sample_labels(cdf, 200_000, gen)
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= 4
    freq = torch.bincount(y, minlength=5).double() / y.numel()
    expected = counts.double() / counts.sum()
    assert torch.allclose(freq, expected, atol=0.006)  # > 5 standard deviations of each frequency
    assert freq[3] == 0  # a class without images is never drawn
    # the same generator state, the same labels (the stream is resumable)
    again = sample_labels(cdf, 200_000, torch.Generator().manual_seed(0))
    assert torch.equal(y, again)
    # the task uses the real training split's frequencies
    trainer = Trainer(_syn_cfg(clf_cfg, cgan_run, 0.5), new_run_dir(clf_cfg().out, "smallcnn"))
    real = torch.bincount(trainer.data.labels, minlength=3)
    assert torch.allclose(trainer.task.synthetic_cdf, class_cdf(real))
    assert torch.allclose(trainer.task.synthetic_cdf, real.cumsum(0).float() / real.sum())
