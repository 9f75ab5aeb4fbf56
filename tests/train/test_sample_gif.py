import imageio.v3 as iio
import pytest
import torch
from PIL import Image

from covidxray.errors import CovidXrayError
from covidxray.infer.generate import load_generator
from covidxray.infer.gif import make_gif
from covidxray.train.loop import start_run


@pytest.fixture()
def trained(tiny_cfg):
    trainer, _ = start_run(tiny_cfg(epochs=2))
    return trainer


def test_sampling_is_deterministic_and_uses_trained_weights(trained):
    gen = load_generator(trained.run_dir)
    a, b = gen.sample(5, seed=3), gen.sample(5, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (5, 1, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, gen.sample(5, seed=4))
    # Same images as the trained EMA generator in eval mode (what snapshots show too).
    z = torch.randn(5, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, trained.task.generate(z))
    assert gen.weights == "G_ema"


def test_without_ema_the_raw_generator_is_used(tiny_cfg):
    trainer, _ = start_run(tiny_cfg(epochs=1, extra=["train.ema_kimg=0"]))
    gen = load_generator(trainer.run_dir)
    assert gen.weights == "G"
    z = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gen.sample(3, seed=0), trainer.task.generate(z))


def test_gif_has_one_labelled_frame_per_snapshot(trained, tmp_path):
    out, n = make_gif(trained.run_dir, tmp_path / "p.gif", fps=4)
    assert n == 3  # epochs 0, 1, 2
    frames = iio.imread(out, index=None)
    assert frames.shape[0] == 3
    meta = iio.immeta(out, index=None)
    assert meta.get("loop") == 0
    # Frames differ (G changes) and the label strip holds text pixels.
    assert not (frames[0] == frames[-1]).all()
    strip = frames[0][: frames.shape[1] - Image.open(trained.run_dir / "samples/epoch_0000.png").height]
    assert strip.max() > 128
    _, n_every = make_gif(trained.run_dir, tmp_path / "q.gif", every=2)
    assert n_every == 2  # epochs 0 and 2 (the last one always kept)


def test_gif_errors(tmp_path):
    with pytest.raises(CovidXrayError, match="does not exist"):
        make_gif(tmp_path / "nope", tmp_path / "a.gif")
    (tmp_path / "run").mkdir()
    with pytest.raises(CovidXrayError, match="no snapshots"):
        make_gif(tmp_path / "run", tmp_path / "a.gif")


def test_gif_of_a_run_with_one_snapshot(trained, tmp_path):
    # A run stopped before its first epoch ended has only samples/epoch_0000.png.
    import shutil

    one = tmp_path / "one"
    (one / "samples").mkdir(parents=True)
    shutil.copy(trained.run_dir / "samples" / "epoch_0000.png", one / "samples")
    out, n = make_gif(one, tmp_path / "one.gif")
    assert n == 1 and iio.imread(out, index=None).shape[0] == 1


# --------------------------------------------------------------------------------------------
# gif: bad numbers and bad outputs are one line (exit 2), and no user file is lost
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def snap_run(tmp_path):
    """A run folder holding only three small snapshots (what `gif` reads), no training needed."""
    import numpy as np

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8)
        Image.fromarray(pixels).save(run / "samples" / f"epoch_{i:04d}.png")
    return run


def _one_line_error(r, fragment):
    assert r.exit_code == 2, r.output
    assert fragment in r.clean_stderr and "Traceback" not in r.output
    assert len(r.clean_stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, fragment", [
    (["--fps", "nan"], "'--fps': 'nan' is not a finite number > 0 and <= 100"),
    (["--fps", "inf"], "'--fps': 'inf' is not a finite number > 0 and <= 100"),
    (["--fps", "0"], "'--fps': '0' is not a finite number > 0"),
    (["--fps", "1000"], "'--fps': '1000' is not a finite number > 0 and <= 100"),
    (["--every", "0"], "'--every': '0' is not a whole number >= 1"),
    (["--every", "1.5"], "'--every': '1.5' is not a whole number >= 1"),
    (["--max-side", "0"], "'--max-side': '0' is not a whole number >= 16"),
    (["--max-side", "-5"], "'--max-side': '-5' is not a whole number >= 16"),
])
def test_gif_numbers_are_checked_in_one_line(cli, snap_run, args, fragment):
    r = cli("gif", snap_run, *args)
    _one_line_error(r, fragment)
    assert not (snap_run / "progress.gif").exists()


@pytest.mark.parametrize("kw, fragment", [
    ({"fps": float("nan")}, "--fps must be a finite number"),
    ({"fps": float("inf")}, "--fps must be a finite number"),
    ({"fps": 0}, "--fps must be a finite number"),
    ({"fps": 101}, "<= 100"),
    ({"every": 0}, "--every must be a whole number >= 1"),
    ({"max_side": 0}, "--max-side must be a whole number >= 16"),
    ({"hold_last": float("nan")}, "hold_last must be a finite number >= 0"),
])
def test_make_gif_checks_its_numbers(snap_run, tmp_path, kw, fragment):
    with pytest.raises(CovidXrayError, match=fragment.replace("(", r"\(")):
        make_gif(snap_run, tmp_path / "a.gif", **kw)
    assert not (tmp_path / "a.gif").exists()


def test_gif_at_the_top_fps_has_10_ms_frames(cli, snap_run):
    r = cli("gif", snap_run, "--fps", "100", "--max-side", "16")
    assert r.exit_code == 0, r.output
    out = snap_run / "progress.gif"
    durations = [iio.immeta(out, index=i)["duration"] for i in range(3)]
    assert durations[:2] == [10, 10] and durations[2] >= 10
    assert iio.imread(out, index=None).shape[2] == 16  # downscaled to --max-side


def test_gif_file_gets_the_umask_mode(snap_run, tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    out, _ = make_gif(snap_run, tmp_path / "a.gif")
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_gif_output_that_is_a_folder_is_refused(cli, snap_run, tmp_path):
    folder = tmp_path / "out.gif"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    for target in (folder, snap_run):
        r = cli("gif", snap_run, "-o", target)
        _one_line_error(r, f"output {target} is a folder")
    assert (folder / "keep.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["keep.txt"]


def test_gif_output_in_a_missing_folder_is_refused(cli, snap_run, tmp_path):
    r = cli("gif", snap_run, "-o", tmp_path / "nowhere" / "p.gif")
    _one_line_error(r, f"output folder {tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "nowhere").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("gif", snap_run, "-o", afile / "p.gif")
    _one_line_error(r, "is not a folder")


def test_gif_output_in_a_read_only_folder_is_refused(cli, snap_run, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = cli("gif", snap_run, "-o", ro / "p.gif")
        _one_line_error(r, f"output folder {ro} is not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_gif_output_folder_that_cannot_be_written_is_refused(cli, snap_run, tmp_path, monkeypatch):
    # The same check as above, where the tests run as root (which os.access answers for).
    import covidxray.infer.gif as gif_module

    real_access = gif_module.os.access
    monkeypatch.setattr(gif_module.os, "access",
                        lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    r = cli("gif", snap_run, "-o", tmp_path / "p.gif")
    _one_line_error(r, f"output folder {tmp_path} is not writable")
    assert not (tmp_path / "p.gif").exists()


def test_gif_replaces_a_gif_but_never_another_file(cli, snap_run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    r = cli("gif", snap_run, "-o", notes)
    _one_line_error(r, f"output {notes} exists and is not a .gif")
    assert notes.read_text() == "my notes"
    r = cli("gif", snap_run, "-o", tmp_path / "new.png")
    _one_line_error(r, "must end in .gif")
    assert not (tmp_path / "new.png").exists()
    old = tmp_path / "old.gif"
    old.write_bytes(b"GIF89a not really")
    r = cli("gif", snap_run, "-o", old)
    assert r.exit_code == 0, r.output
    assert iio.imread(old, index=None).shape[0] == 3  # the .gif was replaced by the animation
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_gif_of_a_missing_run_names_the_run(cli, tmp_path):
    r = cli("gif", tmp_path / "nope")
    _one_line_error(r, f"run folder {tmp_path / 'nope'} does not exist")
