"""The autoencoder family through the one loop: losses, the KL warm-up, validation metrics, resume, sampling."""

import json

import pytest
import torch
from typer.testing import CliRunner

from covidxray.checkpoint import load_checkpoint
from covidxray.cli import app
from covidxray.config import resolve_config
from covidxray.errors import CovidXrayError
from covidxray.infer.generate import load_generator
from covidxray.train.loop import resume_run, start_run

TINY_AE = ["arch.channels=8", "arch.latent_dim=16", "train.batch_size=8", "train.log_every=2", "train.grid_size=9",
           "train.num_threads=1"]


def _records(run_dir, kind=None):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture
def ae_cfg(demo_prepared, tmp_path):
    def make(model="vae", epochs=2, extra=()):
        cfg = resolve_config(model, flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": epochs, "device": "cpu"}},
                             sets=TINY_AE + list(extra))
        cfg.out = str(tmp_path / "runs")
        return cfg
    return make


def test_a_vae_run_validates_reconstructions_and_warms_the_kl_up(ae_cfg):
    trainer, finished = start_run(ae_cfg("vae", epochs=4, extra=["loss.kl_warmup_epochs=2", "loss.beta=0.5"]))
    assert finished
    evals = _records(trainer.run_dir, "eval")
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    for r in evals:
        assert 0 < r["val_mse"] < 1 and 0 < r["val_ssim"] <= 1
        assert r["val_psnr"] == pytest.approx(r["val_psnr"]) and r["val_psnr"] > 0
    # beta rises linearly over 2 epochs to 0.5, then stays
    t = trainer
    t.state.step = t.batches_per_epoch  # one epoch
    assert t.task.current_beta() == pytest.approx(0.25)
    t.state.step = 5 * t.batches_per_epoch
    assert t.task.current_beta() == pytest.approx(0.5)
    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    assert ckpt["family"] == "autoencoder" and ckpt["eval_metric"] == "mse"
    assert ckpt["best_metric"] == pytest.approx(min(r["val_mse"] for r in evals), abs=1e-5)
    assert (trainer.run_dir / "samples" / "epoch_0004.png").is_file()
    epochs = _records(trainer.run_dir, "epoch")
    assert epochs[-1]["loss"] < epochs[0]["loss"]  # it learns


def test_the_loss_is_the_summed_error_plus_beta_kl(ae_cfg):
    trainer, _ = start_run(ae_cfg("vae", epochs=1, extra=["loss.recon=l1", "loss.ssim_weight=0.5"]))
    task = trainer.task
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    recon = (x + 0.1).clamp(-1, 1)
    mu, logvar = torch.ones(2, 16), torch.zeros(2, 16)
    terms = task.losses(recon, x, mu, logvar, beta=2.0)
    from covidxray.metrics.image import ssim
    l1 = (recon - x).abs().flatten(1).sum(1)
    s = ssim((recon + 1) / 2, (x + 1) / 2)
    torch.testing.assert_close(terms["recon"], l1)
    torch.testing.assert_close(terms["kl"], torch.full((2,), 8.0))  # 16 dims x mu^2 / 2
    torch.testing.assert_close(terms["loss"], l1 + 0.5 * (1 - s) * 64 * 64 + 2.0 * 8.0)


@pytest.mark.parametrize("stop_at", [3, 7])  # mid-epoch, and at the epoch boundary (7 steps per epoch)
def test_vae_resume_equals_uninterrupted(ae_cfg, stop_at):
    ref, _ = start_run(ae_cfg("cvae", epochs=2))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(ae_cfg("cvae", epochs=2), on_step=stop)
    assert not finished
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step
    for key, value in ref.task.net.state_dict().items():
        assert torch.equal(value, resumed.task.net.state_dict()[key]), key
    assert _records(ref.run_dir) == _records(part.run_dir)


def test_vaes_sample_from_their_prior_and_plain_autoencoders_refuse(ae_cfg, tmp_path):
    vae, _ = start_run(ae_cfg("cvae", epochs=1))
    g = load_generator(vae.run_dir)
    assert g.conditional and g.classes == ["covid", "normal", "viral_pneumonia"] and g.weights == "net"
    a = g.sample(4, seed=1, label=0)
    assert a.shape == (4, 1, 64, 64) and a.dtype == torch.uint8
    assert torch.equal(a, g.sample(4, seed=1, label=0)) and not torch.equal(a, g.sample(4, seed=1, label=2))
    cold = g.sample(4, seed=1, label=0, temperature=0.1)
    assert not torch.equal(a, cold)
    with pytest.raises(CovidXrayError, match="temperature"):
        g.sample(2, label=0, temperature=0)
    r = CliRunner().invoke(app, ["sample", str(vae.run_dir), str(tmp_path / "s"), "-n", "3", "--class", "normal",
                                 "--temperature", "0.8"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s" / "normal").glob("sample_*.png"))) == 3
    ae, _ = start_run(ae_cfg("autoencoder", epochs=1))
    r = CliRunner().invoke(app, ["sample", str(ae.run_dir), str(tmp_path / "t"), "-n", "2"])
    assert r.exit_code == 2 and "has no prior to sample from" in r.output
    assert (ae.run_dir / "samples" / "epoch_0001.png").is_file()  # reconstructions


def test_bad_autoencoder_settings(ae_cfg):
    with pytest.raises(CovidXrayError, match="data.image_size"):
        ae_cfg(extra=["data.image_size=100"])
    with pytest.raises(CovidXrayError, match="loss.recon"):
        ae_cfg(extra=["loss.recon=huber"])
    with pytest.raises(CovidXrayError, match="loss.beta"):
        ae_cfg(extra=["loss.beta=-1"])


def test_a_cvae_is_evaluated_like_a_gan(ae_cfg, demo_prepared, tmp_path, unverified):
    vae, _ = start_run(ae_cfg("cvae", epochs=1))
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["evaluate", str(vae.run_dir), "--data", str(demo_prepared), "-n", "12", "--repeats", "2",
                                 "--metrics", "fid,kid,pr", "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "cvae" and m["n"] == 12 and m["repeats"] == 2
    assert {"fd_unverified", "fd_unverified_floor", "precision"} <= set(m["metrics"])
    assert m["per_class"]  # conditional: intra-class scores too


def test_reconstruct_a_folder_writes_pairs_and_a_csv(ae_cfg, demo_prepared, tmp_path):
    import csv
    import math

    from PIL import Image

    ae, _ = start_run(ae_cfg("autoencoder", epochs=2))
    src = tmp_path / "xrays"
    (src / "sub").mkdir(parents=True)
    rows = [r for r in csv.DictReader((demo_prepared / "manifest.csv").open()) if r["split"] == "test"][:3]
    Image.open(demo_prepared / rows[0]["file"]).save(src / "a.png")
    Image.open(demo_prepared / rows[1]["file"]).resize((100, 80)).save(src / "sub" / "b.png")  # another size: fitted
    Image.open(demo_prepared / rows[2]["file"]).convert("RGB").save(src / "c.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "rec"
    r = CliRunner().invoke(app, ["sample", str(ae.run_dir), str(out), "--reconstruct", str(src)])
    assert r.exit_code == 0, r.output
    assert "reconstructed 3 images" in r.output and "broken.png" in r.output
    table = {row["file"]: row for row in csv.DictReader((out / "reconstruct.csv").open())}
    assert set(table) == {"a.png", "sub/b.png", "c.jpg", "broken.png"}
    assert table["broken.png"]["status"].startswith("unreadable")
    for name in ("a.png", "sub/b.png", "c.jpg"):
        row = table[name]
        assert row["status"] == "ok"
        assert float(row["psnr"]) == pytest.approx(10 * math.log10(1 / float(row["mse"])), abs=2e-3)
        assert 0 < float(row["ssim"]) <= 1
    with Image.open(out / "sub" / "b.png") as im:
        assert im.size == (64 * 2 + 2, 64)  # input | reconstruction
    with Image.open(out / "c.png") as im:
        assert im.mode == "L"
    # a cVAE needs the class; a segmenter is not an autoencoder
    vae, _ = start_run(ae_cfg("cvae", epochs=1))
    r = CliRunner().invoke(app, ["sample", str(vae.run_dir), str(tmp_path / "r2"), "--reconstruct", str(src)])
    assert r.exit_code == 2 and "needs the images' class" in r.output
    r = CliRunner().invoke(app, ["sample", str(vae.run_dir), str(tmp_path / "r2"), "--reconstruct", str(src),
                                 "--class", "covid"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["sample", str(ae.run_dir), str(tmp_path / "r3"), "--reconstruct", str(src), "--grid"])
    assert r.exit_code == 2 and "--grid" in r.output
