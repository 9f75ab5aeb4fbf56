"""The CLI through CliRunner: exit codes, one-line errors, the end-to-end smoke test."""


import pytest
from PIL import Image

from tests.fixtures import TINY_SETS


def _sets():
    out = []
    for s in TINY_SETS:
        out += ["--set", s]
    return out


def test_models_lists_the_registry(cli):
    r = cli("models")
    assert r.exit_code == 0
    assert "rawgan" in r.clean_stdout and "Radford" in r.clean_stdout


def test_dry_run_prints_resolved_config(cli, demo_prepared, tmp_path):
    r = cli("train", "--model", "rawgan", "--data", demo_prepared, "--epochs", "3", "--batch-size", "8",
            "--image-size", "64", "--set", "optim.lr_g=1e-3", "--snapshot-every", "7", "--out", tmp_path / "runs",
            "--dry-run")
    assert r.exit_code == 0, r.output
    out = r.clean_stdout
    assert "epochs: 3" in out and "batch_size: 8" in out and "lr_g: 0.001" in out and "image_size: 64" in out
    assert "snapshot_every: 7" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model", "nosuch", "--data", "x"], "unknown model 'nosuch'; valid models: acgan, attention_unet, autoencoder, cgan, cvae, densenet121, edm, edm_mask, inception_v3, pix2pix, rawgan, resnet18, smallcnn, unet, unetcgan, unetgan, vae"),
        (["train", "--model", "rawgan", "--set", "train.bogus=1", "--dry-run"], "unknown config key 'train.bogus'"),
        (["train", "--model", "rawgan", "--data", "/nonexistent/prepared", "--image-size", "64"], "does not exist"),
        (["train"], "--model is required"),
        (["sample", "/nonexistent.pt", "out"], "checkpoint /nonexistent.pt does not exist"),
        (["gif", "/nonexistent-run"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert message in r.clean_stderr
    assert "Traceback" not in r.output
    assert len(r.clean_stderr.strip().splitlines()) == 1


def test_end_to_end_prepare_train_resume_sample_gif(cli, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    r = cli("prepare", "--demo", data, "--per-class", "16", "--size", "64", "--seed", "0")
    assert r.exit_code == 0, r.output
    r = cli("train", "--model", "rawgan", "--data", data, "--epochs", "1", "--image-size", "64",
            "--out", runs, "--device", "cpu", *_sets())
    assert r.exit_code == 0, r.output
    run = runs / "00000-rawgan"
    assert "run folder" in r.clean_stdout and (run / "checkpoints" / "last.pt").is_file()
    r = cli("train", "--resume", run, "--epochs", "2")
    assert r.exit_code == 0, r.output
    assert (run / "samples" / "epoch_0002.png").is_file()
    r = cli("train", "--resume", run, "--epochs", "3", "--batch-size", "4")
    assert r.exit_code == 2 and "cannot change a run being resumed" in r.clean_stderr
    r = cli("sample", run / "checkpoints" / "last.pt", tmp_path / "s", "-n", "5", "--grid", "--seed", "1")
    assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "s").glob("sample_*.png"))
    assert len(pngs) == 5 and (tmp_path / "s" / "grid.png").is_file()
    with Image.open(pngs[0]) as im:
        assert im.mode == "L" and im.size == (64, 64)
    r = cli("sample", run, tmp_path / "s", "-n", "2")
    assert r.exit_code == 2 and "--overwrite" in r.clean_stderr
    r = cli("sample", run, tmp_path / "s", "-n", "2", "--overwrite")
    assert r.exit_code == 0 and len(list((tmp_path / "s").glob("sample_*.png"))) == 2
    r = cli("gif", run, "-o", tmp_path / "progress.gif", "--fps", "5")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "progress.gif").stat().st_size > 0
    assert "3 frames" in r.clean_stdout


@pytest.mark.parametrize("command, text", [("gif", "RUN_DIR/progress.gif"), ("train", "(default: runs)")])
def test_help_shows_defaults_written_in_the_help_text(cli, command, text):
    # rich would swallow "[default: ...]" written inside a help string as a markup tag
    r = cli(command, "--help")
    assert r.exit_code == 0 and text in r.clean_stdout
