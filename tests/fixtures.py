"""Shared fixtures for GAN/dataset/CLI tests (loaded from conftest.py via pytest_plugins)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: A tiny, fast rawgan configuration for tests (same code paths as a real run).
TINY_SETS = ["arch.g_channels=8", "arch.d_channels=8", "train.batch_size=16", "train.log_every=2",
             "train.checkpoint_every=1", "train.grid_size=16", "train.num_threads=1"]


SMALL_ARCH = ["arch.g_channels=8", "arch.d_channels=8"]


def train_tiny_gan(model: str, data, out, extra=()) -> Path:
    """Train a tiny GAN (TINY_SETS) for one epoch on a prepared 64 px folder; returns its run folder."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    cfg = resolve_config(model, flags={"data": {"path": str(data), "image_size": 64},
                                       "train": {"epochs": 1, "device": "cpu"}}, sets=TINY_SETS + list(extra))
    cfg.out = str(out)
    trainer, finished = start_run(cfg)
    assert finished
    return trainer.run_dir


#: A tiny U-Net configuration for tests (same code paths as a real run).
TINY_UNET_SETS = ["arch.width=8", "arch.depth=3", "train.batch_size=8", "train.log_every=2", "train.num_threads=1"]


def train_tiny_unet(data, out, epochs: int = 1, model: str = "unet", extra=()) -> Path:
    """Train a tiny segmenter (TINY_UNET_SETS) on a prepared 64 px folder with masks; returns its run folder."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    cfg = resolve_config(model, flags={"data": {"path": str(data)}, "train": {"epochs": epochs, "device": "cpu"}},
                         sets=TINY_UNET_SETS + list(extra))
    cfg.out = str(out)
    trainer, finished = start_run(cfg)
    assert finished
    return trainer.run_dir


def build_small(name: str, size: int = 64, *sets: str, n_classes: int = 3):
    """Resolve a small config of a registered GAN and build its networks (seeded) for data of
    ``n_classes`` classes at ``size`` px."""
    import torch

    from covidxray.config import resolve_config
    from covidxray.models import DataSpec, get_model

    cfg = resolve_config(name, sets=[f"data.image_size={size}", *SMALL_ARCH, *sets])
    torch.manual_seed(0)
    return cfg, get_model(name).build(cfg, DataSpec.example(size, n_classes))


@pytest.fixture(scope="session")
def demo_prepared(tmp_path_factory) -> Path:
    """A prepared folder of demo phantoms: 3 classes x 24 images at 64 px."""
    from covidxray.data.prepare import prepare_demo

    out = tmp_path_factory.mktemp("demo") / "prepared"
    prepare_demo(out, per_class=24, size=64, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def demo_at_size(tmp_path_factory):
    """Factory: a small prepared demo folder at a given size (made once per size)."""
    from covidxray.data.prepare import prepare_demo

    made: dict[int, Path] = {}

    def get(size: int) -> Path:
        if size not in made:
            out = tmp_path_factory.mktemp(f"demo{size}") / "prepared"
            prepare_demo(out, per_class=6, size=size, seed=0, workers=1, progress=False)
            made[size] = out
        return made[size]

    return get


@pytest.fixture()
def tiny_cfg(demo_prepared, tmp_path):
    """Factory of tiny rawgan configs training on the demo data, runs under tmp_path/runs."""
    from covidxray.config import resolve_config

    def make(epochs: int = 2, extra: list[str] | None = None, model: str = "rawgan"):
        cfg = resolve_config(model, flags={"data": {"path": str(demo_prepared), "image_size": 64},
                                           "train": {"epochs": epochs, "device": "cpu"}},
                             sets=TINY_SETS + (extra or []))
        cfg.out = str(tmp_path / "runs")
        return cfg

    return make


@pytest.fixture()
def cli(monkeypatch):
    """Invoke the CLI like a user would, with plain (ANSI-free) wide output."""
    from typer.testing import CliRunner

    from covidxray.cli import app

    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    runner = CliRunner()

    def invoke(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        result.clean_stdout = ANSI.sub("", result.stdout)
        result.clean_stderr = ANSI.sub("", result.stderr)
        return result

    return invoke


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (its tiny nets gain nothing from more, and tests stay steady)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def dead_pid() -> int:
    """The pid of a process that has ended (for the temporaries of a killed writer)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def interrupt_after(monkeypatch, module, name: str, k: int) -> list[int]:
    """Make ``module.<name>`` raise KeyboardInterrupt on its k-th call (a Ctrl-C at that point of the work);
    returns the call counter."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


#: A tiny, fast classifier configuration for tests (same code paths as a real run).
TINY_CLF_SETS = ["train.batch_size=8", "train.log_every=2", "train.checkpoint_every=1", "train.num_threads=1"]


@pytest.fixture()
def clf_cfg(demo_prepared, tmp_path):
    """Factory of tiny classifier configs (default smallcnn) training on the demo data, runs under tmp_path/runs."""
    from covidxray.config import resolve_config

    def make(epochs: int = 2, extra: list[str] | None = None, model: str = "smallcnn"):
        cfg = resolve_config(model, flags={"data": {"path": str(demo_prepared)},
                                           "train": {"epochs": epochs, "device": "cpu"}},
                             sets=TINY_CLF_SETS + (extra or []))
        cfg.out = str(tmp_path / "runs")
        return cfg

    return make


# The FID network's stand-in: the real Inception is 87 MB and slow on a CPU; the code around it is the same.
class StandInInception(torch.nn.Module):
    """A deterministic 'Inception': 6 x 6 average pooling of the 299-px input, 108-d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 6).flatten(1)


@pytest.fixture(scope="session")
def standin(tmp_path_factory) -> Path:
    """The stand-in 'Inception' as a TorchScript file."""
    path = tmp_path_factory.mktemp("standin") / "standin.pt"
    torch.jit.script(StandInInception()).save(str(path))
    return path


@pytest.fixture()
def unverified(standin, monkeypatch):
    """The stand-in as the FID network, allowed though unverified (its scores are fd_unverified, never FID)."""
    from covidxray.metrics import features as FE

    monkeypatch.setenv(FE.ENV_WEIGHTS, str(standin))
    monkeypatch.setenv(FE.ENV_ALLOW_UNVERIFIED, "1")
    return standin
