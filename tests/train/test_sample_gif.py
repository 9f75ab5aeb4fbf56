import imageio.v3 as iio
import pytest
import torch
from PIL import Image

from covidxray.errors import CovidXrayError
from covidxray.generate import load_generator
from covidxray.gif import make_gif
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
