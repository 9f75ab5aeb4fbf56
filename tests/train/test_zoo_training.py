"""Every registered GAN trains through the one loop: one step at each size, resume, sampling."""

import json

import pytest
import torch

from covidxray.config import resolve_config
from covidxray.infer.generate import load_generator
from covidxray.models import DataSpec, get_model, list_models
from covidxray.outdir import MARKER
from covidxray.checkpoint import load_checkpoint
from covidxray.train.loop import resume_run, start_run
from tests.fixtures import TINY_SETS

GANS = [s.name for s in list_models() if s.family == "gan"]
CONDITIONAL = [s.name for s in list_models() if s.family == "gan" and s.conditional]


@pytest.mark.parametrize("size", [64, 128, 256])
@pytest.mark.parametrize("name", GANS)
def test_one_training_step_at_each_size(name, size, demo_at_size, tmp_path):
    cfg = resolve_config(name, flags={"data": {"path": str(demo_at_size(size)), "image_size": size},
                                      "train": {"epochs": 1, "device": "cpu", "batch_size": 8}},
                         sets=TINY_SETS + ["train.batch_size=8", "train.grid_size=4", "loss.r1_every=1",
                                           "loss.r1_gamma=1", "aug.diffaugment=translation,cutout,brightness,contrast",
                                           "loss.cutmix_warmup_kimg=0", "loss.cutmix_prob=1"])
    cfg.out = str(tmp_path / "runs")
    torch.manual_seed(0)
    before = get_model(name).build(cfg, DataSpec.example(size, 3))
    trainer, finished = start_run(cfg)
    assert finished and trainer.state.step >= 1
    stats = trainer.run_dir.joinpath("stats.jsonl").read_text()
    assert "NaN" not in stats and "Infinity" not in stats
    assert "r1" in stats
    spec = get_model(name)
    if "cutmix" in spec.features:
        assert "cutmix_cons" in stats
    if name == "acgan":
        assert "acc_real" in stats and "acc_fake" in stats
    changed = [not torch.equal(a, b) for a, b in zip(before["G"].state_dict().values(), trainer.task.G.state_dict().values())]
    assert any(changed)
    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    assert {"G", "D", "G_ema"} <= set(ckpt["models"])
    with torch.no_grad():
        img = trainer.task.generate(torch.randn(2, cfg.arch.latent_dim),
                               torch.tensor([0, 1]) if spec.conditional else None)
    assert img.shape == (2, 1, size, size) and img.dtype == torch.uint8


@pytest.mark.parametrize("name", ["cgan", "acgan"])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_uncertainty_regulariser_trains(name, mode, tiny_cfg):
    trainer, finished = start_run(tiny_cfg(epochs=1, model=name, extra=[
        f"loss.uncertainty={mode}", "arch.d_dropout=0.3", "loss.mc_samples=4"]))
    assert finished
    assert "uncertainty_fake" in trainer.run_dir.joinpath("stats.jsonl").read_text()


def test_uncertainty_is_refused_for_models_without_mc_dropout(tiny_cfg):
    from covidxray.errors import CovidXrayError

    with pytest.raises(CovidXrayError, match="not available for model 'rawgan'"):
        start_run(tiny_cfg(extra=["loss.uncertainty=min", "arch.d_dropout=0.3"]))


@pytest.mark.parametrize("model, more", [
    ("cgan", []),
    # CutMix at p = 0.5 from the first step: its coin and masks must continue exactly too
    ("unetcgan", ["loss.cutmix_warmup_kimg=0"]),
])
def test_resume_with_ema_and_diffaugment_equals_uninterrupted(tiny_cfg, model, more):
    extra = ["aug.diffaugment=translation,cutout,brightness,contrast", "train.ema_kimg=0.05", "loss.r1_gamma=0.5",
             "loss.r1_every=2"] + more
    ref, _ = start_run(tiny_cfg(epochs=2, model=model, extra=extra))

    def stop(trainer):
        if trainer.state.step == 4:  # in the middle of the second epoch
            trainer.request_stop()

    part, finished = start_run(tiny_cfg(epochs=2, model=model, extra=extra), on_step=stop)
    assert not finished
    resumed, finished = resume_run(part.run_dir)
    assert finished
    for name, a, b in (("G", ref.task.G, resumed.task.G), ("D", ref.task.D, resumed.task.D), ("G_ema", ref.task.ema.ema_model, resumed.task.ema.ema_model)):
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), f"{name}.{key}"
    assert (ref.run_dir / "samples" / "epoch_0002.png").read_bytes() == \
        (part.run_dir / "samples" / "epoch_0002.png").read_bytes()
    if more:
        assert "cutmix_cons" in (ref.run_dir / "stats.jsonl").read_text()  # CutMix steps did happen


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_sampling_per_class(name, tiny_cfg, cli, tmp_path):
    trainer, _ = start_run(tiny_cfg(epochs=1, model=name))
    gen = load_generator(trainer.run_dir)
    assert gen.conditional and gen.classes == ["covid", "normal", "viral_pneumonia"]
    out = tmp_path / "s"
    r = cli("sample", trainer.run_dir, out, "-n", "3", "--class", "all", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == ["covid", "normal", "viral_pneumonia"]
    assert all(len(list((out / c).glob("sample_*.png"))) == 3 for c in gen.classes)
    one = tmp_path / "one"
    r = cli("sample", trainer.run_dir, one, "-n", "2", "--class", "covid")
    assert r.exit_code == 0 and [p.name for p in one.iterdir() if p.name != MARKER] == ["covid"]
    # Different classes give different images from the same latents.
    assert not torch.equal(gen.sample(2, seed=0, label=0), gen.sample(2, seed=0, label=2))
    r = cli("sample", trainer.run_dir, tmp_path / "bad", "-n", "2", "--class", "pneumothorax")
    assert r.exit_code == 2 and "unknown class 'pneumothorax'" in r.clean_stderr


def test_class_option_is_refused_for_unconditional_models(tiny_cfg, cli, tmp_path):
    trainer, _ = start_run(tiny_cfg(epochs=1))
    r = cli("sample", trainer.run_dir, tmp_path / "s", "-n", "2", "--class", "covid")
    assert r.exit_code == 2 and "not class-conditional" in r.clean_stderr


def test_acgan_aux_loss_on_reals_only(tiny_cfg):
    trainer, finished = start_run(tiny_cfg(epochs=1, model="acgan", extra=["loss.aux_mode=real"]))
    assert finished
    stats = trainer.run_dir.joinpath("stats.jsonl").read_text()
    assert "acc_real" in stats and "NaN" not in stats


def test_acgan_tac_mode_trains_a_twin_classifier(tiny_cfg):
    trainer, finished = start_run(tiny_cfg(epochs=1, model="acgan", extra=["loss.aux_mode=tac"]))
    assert finished
    assert trainer.task.D.twin is not None and trainer.task.D.twin.weight.shape[0] == trainer.task.D.classifier.weight.shape[0]
    records = [json.loads(line) for line in trainer.run_dir.joinpath("stats.jsonl").read_text().splitlines()]
    steps = [r for r in records if "acc_twin" in r]
    assert steps and all(0.0 <= r["acc_twin"] <= 1.0 for r in steps)
    # the default (the paper's mode) builds no twin head
    plain, _ = start_run(tiny_cfg(epochs=1, model="acgan"))
    assert plain.task.D.twin is None


def test_unknown_aux_mode_is_refused(cli, demo_prepared, tmp_path):
    r = cli("train", "--model", "acgan", "--data", demo_prepared, "--set", "loss.aux_mode=twin", "--dry-run")
    assert r.exit_code == 2 and "loss.aux_mode" in r.clean_stderr and "tac" in r.clean_stderr


@pytest.mark.parametrize("model, extra", [("cgan", []), ("acgan", ["loss.aux_mode=tac"]), ("unetcgan", []),
                                          ("acgan", ["loss.r1_gamma=1", "loss.r1_every=1"]),
                                          # CutMix images ride in the same pass (p = 0.5 from the start)
                                          ("unetcgan", ["loss.cutmix_warmup_kimg=0", "loss.cutmix_prob=1"])])
# (not with MC dropout: one pass draws its dropout masks differently from two)
def test_joint_real_fake_pass_of_d_equals_two_passes(tiny_cfg, tmp_path, model, extra):
    # Discriminators without BatchNorm see reals and fakes in one pass; the step must not change.
    from covidxray.train.loop import Trainer

    # DiffAugment off: the joint step augments reals and fakes in one call (other random draws). fp32: the
    # equality is of the arithmetic; in bf16 (the default on CPUs with native bf16) a batch of 16 and two of 8
    # round differently, by bf16's 3 digits, which the tolerance below is not about.
    cfg = tiny_cfg(epochs=1, model=model, extra=extra + ["aug.diffaugment=", "train.amp=off"])
    a = Trainer(cfg, tmp_path / "a")
    b = Trainer(cfg, tmp_path / "b")
    assert a.task.d_joint and b.task.d_joint
    b.task.d_joint = False
    x, y = a.data.images[:8], a.data.labels[:8]
    # Spectral norm runs one power iteration per forward pass in train mode, so two passes use two
    # slightly different estimates of sigma: converge them first (the same way in both trainers).
    with torch.no_grad():
        probe = torch.zeros(8, 1, 64, 64)
        for t in (a, b):
            for _ in range(200):
                t.task.D(probe, y)
    calls = {"a": 0, "b": 0}
    a.task.D.register_forward_hook(lambda *_: calls.__setitem__("a", calls["a"] + 1))
    b.task.D.register_forward_hook(lambda *_: calls.__setitem__("b", calls["b"] + 1))
    for _ in range(2):
        sa, sb = a.train_step(x, y), b.train_step(x, y)
        assert set(sa) == set(sb)
        for key in sa:
            assert torch.allclose(sa[key], sb[key], rtol=1e-3, atol=1e-4), key
    mixing = "loss.cutmix_prob=1" in extra
    assert ("cutmix_cons" in sa) == mixing
    # per step: one D pass in D's update and one in G's; two or three D passes without the joint pass
    assert calls == {"a": 4, "b": 2 * (4 if mixing else 3)}
    # Adam turns float-rounding-sized gradient differences of near-zero gradients into up to
    # 2 x lr per step, so parameters can only be compared to that bound (the second step's equal
    # losses above already show that the updated networks agree).
    bound = 2 * 2 * max(cfg.optim.lr_d, cfg.optim.lr_g)
    for (name, pa), pb in zip(list(a.task.D.named_parameters()) + list(a.task.G.named_parameters()),
                              list(b.task.D.parameters()) + list(b.task.G.parameters())):
        assert (pa - pb).abs().max().item() <= bound, name


def test_a_batchnorm_discriminator_keeps_separate_passes(tiny_cfg, tmp_path):
    from covidxray.train.loop import Trainer

    assert not Trainer(tiny_cfg(epochs=1), tmp_path / "r").task.d_joint  # DCGAN D: BatchNorm mixes the batch


@pytest.mark.parametrize("model", ["cgan", "acgan"])
def test_uncertainty_shares_the_trunk_pass(tiny_cfg, tmp_path, model):
    # With MC dropout the K dropout passes ride on the step's own trunk pass: one trunk pass in D's
    # update (reals and fakes together) and one in G's, as without the regulariser.
    from covidxray.train.loop import Trainer

    counts = {}
    for mode in ("off", "min"):
        cfg = tiny_cfg(epochs=1, model=model, extra=[f"loss.uncertainty={mode}", "arch.d_dropout=0.3"])
        tr = Trainer(cfg, tmp_path / mode)
        calls = []
        tr.task.D.trunk.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
        stats = tr.train_step(tr.data.images[:8], tr.data.labels[:8])
        counts[mode] = calls
        if mode == "min":
            assert 0.0 <= stats["uncertainty_fake"].item() <= 0.25  # variance of probabilities
    assert counts["off"] == counts["min"] == [16, 8]
