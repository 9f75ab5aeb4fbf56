"""The diffusion family (``edm``) through the CLI on phantoms: train, sample (per class, --steps, --guidance),
gif, evaluate with copies; exact resume; bad input in one line."""

from __future__ import annotations

import json

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from tests.fixtures import train_tiny_gan

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "arch.channels=8", "--set", "arch.depth=2", "--set", "train.grid_size=4", "--set", "edm.steps=2",
        "--set", "train.batch_size=16", "--set", "train.num_threads=1"]


@pytest.fixture(scope="module")
def edm_run(demo_prepared, tmp_path_factory):
    from typer.testing import CliRunner

    from covidxray.cli import app

    runs = tmp_path_factory.mktemp("edm") / "runs"
    r = CliRunner().invoke(app, ["train", "--model", "edm", "--data", str(demo_prepared), "--epochs", "2",
                                 "--out", str(runs), "--device", "cpu", *TINY])
    assert r.exit_code == 0, r.output
    return runs / "00000-edm"


def test_a_tiny_edm_trains_with_validation_snapshots_and_ema(edm_run):
    assert sorted(p.name for p in (edm_run / "samples").glob("epoch_*.png")) == ["epoch_0001.png", "epoch_0002.png"]
    ckpt = load_checkpoint(edm_run, resume=True)
    assert {"net", "net_ema"} <= set(ckpt["models"]) and ckpt["fixed_noise"].shape == (4, 1, 64, 64)
    stats = [json.loads(line) for line in (edm_run / "stats.jsonl").read_text().splitlines()]
    assert any("val_loss" in s for s in stats) and all(torch.isfinite(torch.tensor(s["loss"])) for s in stats
                                                       if "loss" in s)
    assert (edm_run / "checkpoints" / "best.pt").is_file()


def test_the_copy_ratio_is_recorded_and_means_what_it_says(edm_run, demo_prepared, tmp_path):
    """val_copy_ratio is in stats.jsonl; with the training images as 'samples' it is 0, with the held-out
    images themselves 1 (the same distances as the reference)."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    stats = [json.loads(line) for line in (edm_run / "stats.jsonl").read_text().splitlines()]
    ratios = [s["val_copy_ratio"] for s in stats if "val_copy_ratio" in s]
    assert ratios and all(r > 0 for r in ratios)
    cfg = resolve_config("edm", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 1, "device": "cpu"}},
                         sets=[s for s in TINY if s != "--set"] + ["edm.eval_samples=8"])
    cfg.out = str(tmp_path / "runs")
    trainer, _ = start_run(cfg)
    task, held_out = trainer.task, trainer.eval_data
    task.draw = lambda noise, labels, steps=None, masks=None: trainer.data.images[:8].cpu()
    assert task.copy_ratio(held_out) == 0.0
    task.draw = lambda noise, labels, steps=None, masks=None: held_out.images.cpu()
    assert task.copy_ratio(held_out) == pytest.approx(1.0)


def test_sampling_per_class_with_steps_and_guidance_is_seeded(edm_run, cli, tmp_path):
    args = ["sample", edm_run, None, "-n", "3", "--steps", "3", "--guidance", "2", "--seed", "5"]
    for out in ("a", "b"):
        r = cli(*[a if a is not None else tmp_path / out for a in args])
        assert r.exit_code == 0, r.output
    classes = sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir())
    assert classes == ["covid", "normal", "viral_pneumonia"]
    for c in classes:  # the same seed on the same device: the same draws
        for i in range(3):
            a, b = (tmp_path / d / c / f"sample_{i:05d}.png" for d in ("a", "b"))
            assert a.read_bytes() == b.read_bytes()
    r = cli("sample", edm_run, tmp_path / "w0", "-n", "3", "--steps", "3", "--guidance", "0", "--seed", "5")
    assert r.exit_code == 0, r.output
    differs = [(tmp_path / "w0" / "covid" / f"sample_{i:05d}.png").read_bytes()
               != (tmp_path / "a" / "covid" / f"sample_{i:05d}.png").read_bytes() for i in range(3)]
    assert any(differs)  # guidance changes the draws


def test_gif_and_evaluate_with_copies(edm_run, cli, demo_prepared, tmp_path, unverified):
    r = cli("gif", edm_run, "-o", tmp_path / "p.gif")
    assert r.exit_code == 0 and (tmp_path / "p.gif").stat().st_size > 0, r.output
    r = cli("evaluate", edm_run, "--data", demo_prepared, "--out", tmp_path / "e", "--repeats", "1",
            "--metrics", "fid,memorization", "-n", "12")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["model"] == "edm" and m["conditional"] and "fd_unverified" in m["metrics"]
    assert "fd_unverified_floor" in m["metrics"] and 0 <= m["memorization"]["copies"] <= 1
    assert m["source"]["path"].endswith("best.pt")


def test_downstream_arms_read_a_pool_drawn_once_with_the_sampler_asked(edm_run, cli, demo_prepared, tmp_path,
                                                                        unverified):
    """--downstream on a diffusion model: the pool of synthetic images is drawn once (here with dpm2m), written
    as PNGs per class, and both arms (b) and (c) train on it; the sampler settings are recorded."""
    r = cli("evaluate", edm_run, "--data", demo_prepared, "--out", tmp_path / "e", "--repeats", "1", "--metrics",
            "fid", "-n", "6", "--sampler", "dpm2m", "--steps", "3", "--downstream", "--classifier", "smallcnn",
            "--seeds", "1", "--epochs", "1", "--synthetic-pool", "9", "--set", "train.num_threads=1",
            "--device", "cpu")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["source"]["sampling"] == {"sampler": "dpm2m", "steps": 3, "guidance": 1.0, "network_evaluations": 3}
    down = m["downstream"]
    assert list(down["arms"]) == ["real", "real+synthetic", "synthetic"] and down["delta"]["n"] == 1
    pool = down["synthetic"]
    assert pool["drawn"] == "once, a pool" and pool["n"] == 9 and sum(pool["per_class"].values()) == 9
    pngs = sorted((tmp_path / "e" / pool["folder"]).glob("*/sample_*.png"))
    assert len(pngs) == 9 and {p.parent.name for p in pngs} <= set(pool["per_class"])
    assert r.output.count("drawing a pool of 9") == 1


def test_a_classifier_takes_a_diffusion_pool_or_a_folder_of_its_samples(edm_run, cli, demo_prepared, tmp_path):
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    def run(synthetic, *sets):
        cfg = resolve_config("smallcnn", flags={"data": {"path": str(demo_prepared)}, "train": {
            "epochs": 1, "device": "cpu"}}, sets=[f"data.synthetic={synthetic}", "train.num_threads=1", *sets])
        cfg.out = str(tmp_path / "runs")
        trainer, finished = start_run(cfg)
        assert finished
        return trainer, load_checkpoint(trainer.run_dir, resume=True)

    trainer, ckpt = run(edm_run, "data.synthetic_pool=7")
    assert trainer.task.pool.shape == (7, 1, 64, 64) and trainer.task.pool.dtype == torch.uint8
    assert ckpt["synthetic"]["pool"] == 7 and ckpt["synthetic"]["model"] == "edm"
    r = cli("sample", edm_run, tmp_path / "s", "-n", "2", "--steps", "2", "--sampler", "euler")
    assert r.exit_code == 0, r.output
    trainer, ckpt = run(tmp_path / "s")
    assert len(trainer.task.pool) == 6 and sorted(trainer.task.pool_labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert ckpt["synthetic"]["model"] == "folder" and ckpt["synthetic"]["weights"].startswith("sha1 ")
    (tmp_path / "s" / "other").mkdir()
    r = cli("train", "--model", "smallcnn", "--data", demo_prepared, "--epochs", "1", "--out", tmp_path / "r2",
            "--set", f"data.synthetic={tmp_path / 's'}")
    assert r.exit_code == 2 and "sub-folders that are not classes of the data (other)" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1


def test_resume_continues_exactly(demo_prepared, tmp_path):
    from covidxray.config import resolve_config
    from covidxray.train.loop import resume_run, start_run

    sets = [s for s in TINY if s != "--set"]

    def cfg(epochs, out):
        c = resolve_config("edm", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": epochs,
                                                                                         "device": "cpu"}}, sets=sets)
        c.out = str(tmp_path / out)
        return c

    full, _ = start_run(cfg(2, "full"))
    part, _ = start_run(cfg(1, "part"))
    resume_run(part.run_dir, epochs=2)
    a = load_checkpoint(full.run_dir, resume=True)["models"]
    b = load_checkpoint(part.run_dir, resume=True)["models"]
    for name in ("net", "net_ema"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)


def test_bad_input_is_one_line(edm_run, demo_prepared, cli, tmp_path):
    for args, text in ((["--guidance", "-1"], "--guidance"), (["--steps", "0"], "--steps"),
                       (["--sampler", "ddim"], "'ddim' is not one of heun, euler, dpm2m"),
                       (["--from-data", str(demo_prepared)], "needs a mask -> X-ray model")):
        r = cli("sample", edm_run, tmp_path / "o", *args)
        assert r.exit_code == 2 and text in r.stderr and "Traceback" not in r.output, r.output
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    gan = train_tiny_gan("rawgan", demo_prepared, tmp_path / "gan")
    r = cli("sample", gan, tmp_path / "g", "-n", "2", "--steps", "4")
    assert r.exit_code == 2 and "--steps do(es) not apply to the gan model" in r.stderr
    r = cli("train", "--model", "edm", "--data", demo_prepared, "--set", "edm.sigma_min=100")
    assert r.exit_code == 2 and "edm.sigma_min" in r.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


def test_edm_mask_draws_pairs_a_unet_trains_on_and_is_evaluated_from_masks(demo_prepared, cli, tmp_path, unverified):
    runs = tmp_path / "runs"
    r = cli("train", "--model", "edm_mask", "--data", demo_prepared, "--epochs", "2", "--out", runs, "--device", "cpu",
            *TINY, "--set", "edm.eval_samples=4")
    assert r.exit_code == 0, r.output
    run = runs / "00000-edm_mask"
    assert load_checkpoint(run, resume=True)["fixed_masks"].shape == (4, 1, 64, 64)
    r = cli("sample", run, tmp_path / "pairs", "--from-data", demo_prepared, "--deform", "--seed", "3")
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "pairs" / "prepare.json").read_text())
    assert info["pairs"] > 0 and info["generator"]["model"] == "edm_mask"
    r = cli("train", "--model", "unet", "--data", tmp_path / "pairs", "--epochs", "1", "--out", runs, "--device", "cpu",
            "--set", "arch.width=8", "--set", "arch.depth=3", "--set", "train.batch_size=8")
    assert r.exit_code == 0, r.output  # the synthetic pairs are a prepared folder a segmenter trains on
    r = cli("evaluate", run, "--data", demo_prepared, "--out", tmp_path / "e", "--repeats", "1", "--metrics", "kid",
            "--segmenter", runs / "00001-unet")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["model"] == "edm_mask" and "mask_consistency" in m and 0 <= m["mask_consistency"]["dice"]["mean"] <= 1
    r = cli("sample", run, tmp_path / "x", "-n", "2")  # no latent to sample: one line naming the way
    assert r.exit_code == 2 and "--from-data" in r.stderr


def test_a_class_without_masked_images_is_said_to_stay_untrained(demo_prepared, tmp_path):
    """The developer set has lung masks for covid and viral pneumonia X-rays only: edm_mask keeps a class entry for
    normal that no image trains, and the log says so, with the --classes that avoid it."""
    import csv
    import shutil

    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    data = tmp_path / "data"
    shutil.copytree(demo_prepared, data, ignore=shutil.ignore_patterns(".cache"))
    rows = list(csv.DictReader((data / "manifest.csv").open(newline="")))
    for r in rows:
        if r["class"] == "normal":
            r["mask"] = ""
    with (data / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    cfg = resolve_config("edm_mask", flags={"data": {"path": str(data)}, "train": {"epochs": 1, "device": "cpu"}},
                         sets=[s for s in TINY if s != "--set"] + ["edm.eval_samples=0"])
    cfg.out = str(tmp_path / "runs")
    trainer, finished = start_run(cfg)
    assert finished
    log = (trainer.run_dir / "log.txt").read_text()
    assert "warning: no masked training images of class normal" in log and "--classes covid,viral_pneumonia" in log
