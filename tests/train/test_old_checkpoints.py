"""Checkpoints written by covidxray 0.1.0 (format 1, before the one-loop split) still resume and sample."""

import shutil
from pathlib import Path

import pytest
import torch

from covidxray.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from covidxray.config import config_from_dict
from covidxray.errors import CovidXrayError
from covidxray.infer.generate import load_generator
from covidxray.train.loop import resume_run, start_run

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ckpt_v1_cgan.pt"


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory):
    from covidxray.data.prepare import prepare_demo

    out = tmp_path_factory.mktemp("v1") / "data"
    prepare_demo(out, per_class=8, size=64, seed=0, workers=1, progress=False)  # as when the asset was written
    return out


def _v1_run(tmp_path) -> Path:
    run = tmp_path / "00000-cgan"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ASSET, run / "checkpoints" / "last.pt")
    return run


def test_the_asset_is_a_format_1_gan_checkpoint():
    ckpt = load_checkpoint(ASSET)
    assert ckpt["format_version"] == 1 < FORMAT_VERSION and ckpt["covidxray_version"] == "0.1.0"
    assert ckpt["family"] == "gan"  # filled in for format 1
    assert ckpt["config"]["model"] == "cgan" and ckpt["config"]["data"]["n_classes"] == 3
    assert ckpt["step"] == 5 and set(ckpt["models"]) == {"G", "D", "G_ema"}


def test_a_0_1_0_checkpoint_resumes_exactly(v1_data, tmp_path):
    # Resumed with this version, the 0.1.0 run must end where this version's uninterrupted run of the same
    # configuration ends: the state 0.1.0 saved after 5 steps is the state this version reaches after 5. The asset
    # was written on another CPU (an Intel Xeon), whose float kernels round differently from, say, an AMD EPYC's, so
    # the comparison allows float32 rounding (the bit-exact resume on one machine is tested per family elsewhere).
    run = _v1_run(tmp_path)
    resumed, finished = resume_run(run, data=str(v1_data))
    assert finished and resumed.step > 5
    cfg = config_from_dict(load_checkpoint(ASSET)["config"])
    cfg.data.path, cfg.out = str(v1_data), str(tmp_path / "fresh")
    cfg.train.amp = "off"  # as 0.1.0 trained GANs on every CPU, and as the resume keeps it (the checkpoint's time)
    ref, _ = start_run(cfg)
    assert ref.step == resumed.step
    for name in ("G", "D"):
        a, b = ref.task.models[name].state_dict(), resumed.task.models[name].state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=f"{name}.{key}")
    for key, value in ref.task.ema.state_dict().items():
        torch.testing.assert_close(value, resumed.task.ema.state_dict()[key], rtol=1e-4, atol=1e-6, msg=f"G_ema.{key}")
    new = load_checkpoint(run, resume=True)
    assert new["format_version"] == FORMAT_VERSION and new["family"] == "gan" and new["config"]["model"] == {"name": "cgan"}


def test_a_0_1_0_checkpoint_samples(tmp_path):
    gen = load_generator(ASSET)
    assert gen.conditional and gen.classes == ["covid", "normal", "viral_pneumonia"]
    images = gen.sample(3, seed=0, label=1)
    assert images.shape == (3, 1, 64, 64) and images.dtype == torch.uint8


def test_a_checkpoint_of_a_newer_format_names_the_version(tmp_path):
    blob = load_checkpoint(ASSET)
    path = tmp_path / "future.pt"
    save_checkpoint(path, {k: v for k, v in blob.items() if k not in ("format", "format_version", "path")})
    data = torch.load(path, weights_only=True)
    data["format_version"], data["covidxray_version"] = FORMAT_VERSION + 1, "9.9.9"
    torch.save(data, path)
    with pytest.raises(CovidXrayError, match=r"checkpoint format 3 \(written by covidxray 9.9.9\), newer than"):
        load_checkpoint(path)


def test_a_checkpoint_that_does_not_fit_says_which_version_wrote_it(v1_data, tmp_path):
    run = _v1_run(tmp_path)
    blob = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    del blob["optimizers"]["D"]  # e.g. written by a version whose GANs saved other state
    torch.save(blob, run / "checkpoints" / "last.pt")
    with pytest.raises(CovidXrayError, match=r"was written by covidxray 0.1.0 \(checkpoint format 1\) and does not fit"):
        resume_run(run, data=str(v1_data))
