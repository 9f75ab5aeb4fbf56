"""A family is its own files plus a registration: a whole family defined in this test file alone, with no
edit under ``covidxray/``, is trained, sampled, evaluated and animated through the CLI.

The family, ``meanimage``, is the simplest generator there is: per class, a learned mean image plus Gaussian
noise of a fixed scale. Its four parts are what every family declares:

1. its configuration schema (:func:`covidxray.config.register_family`), numeric keys with their bounds;
2. its models (:func:`covidxray.models.register_model`);
3. its training task (a :class:`covidxray.train.tasks.Task` subclass naming the family);
4. how to load a trained model and what it can do (:func:`covidxray.infer.protocol.register_loader`, here a
   :class:`~covidxray.infer.protocol.Generator`).
"""


import json
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import nn


pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILY = "meanimage"


@pytest.fixture()
def meanimage_family():
    """Register the family for a test, and take every registration back afterwards."""
    from covidxray.config import FAMILIES, GENERIC_BOUNDS, GENERIC_CHOICES, Config, Family, OptimConfig, register_family
    from covidxray.data.datasets import to_float, to_uint8
    from covidxray.data.grids import save_grid
    from covidxray.infer import protocol
    from covidxray.infer.protocol import Generator, register_loader
    from covidxray.infer.load import build_from_checkpoint
    from covidxray.models import registry
    from covidxray.models.registry import register_model
    from covidxray.train.tasks import TASKS, Task

    # 1. the configuration schema
    @dataclass
    class MeanArch:
        noise: float = 0.3                  # std of the noise added to the class mean (images in [-1, 1])

    @dataclass
    class MeanOptim(OptimConfig):
        lr: float = 0.05                    # Adam learning rate of the mean images

    @dataclass
    class MeanConfig(Config):
        arch: MeanArch = field(default_factory=MeanArch)
        optim: MeanOptim = field(default_factory=MeanOptim)
        FAMILY: ClassVar[str] = FAMILY

    register_family(Family(name=FAMILY, config=MeanConfig, choices=GENERIC_CHOICES, check=lambda cfg: None,
                           summary="a class mean image plus noise (a test family)",
                           bounds={**GENERIC_BOUNDS, "arch.noise": "[0, 1]", "optim.lr": "(0, 1]"}))

    # 2. the model
    class MeanImage(nn.Module):
        def __init__(self, n_classes: int, size: int, noise: float):
            super().__init__()
            self.mean = nn.Parameter(torch.zeros(max(n_classes, 1), 1, size, size))
            self.noise, self.image_size, self.n_classes = noise, size, n_classes

        def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (self.mean[y] + self.noise * z).clamp(-1, 1)

    @register_model(FAMILY, family=FAMILY, paper="-", summary="class mean + noise", conditional=True)
    def build(cfg, data):
        return {"net": MeanImage(data.n_classes, data.image_size, cfg.arch.noise)}

    # 3. the training task: pull each class's mean towards its images; snapshots for the GIF
    class MeanTask(Task):
        family = FAMILY
        progress_keys = ("loss",)

        def __init__(self, trainer):
            super().__init__(trainer)
            self.net = trainer.spec.build(self.cfg, trainer.data_spec)["net"].to(self.device)
            self.models = {"net": self.net}
            self.opt = torch.optim.Adam(self.net.parameters(), lr=self.cfg.optim.lr)
            self.optimizers = {"net": self.opt}

        def device_step(self, images_u8, labels):
            loss = ((self.net.mean[labels] - to_float(images_u8)) ** 2).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return {"loss": loss.detach()}

        @torch.no_grad()
        def snapshot(self):
            y = torch.arange(self.net.n_classes).repeat_interleave(2)
            z = torch.randn(len(y), 1, self.net.image_size, self.net.image_size,
                            generator=torch.Generator().manual_seed(0))
            path = self.trainer.run_dir / "samples" / f"epoch_{self.trainer.state.epoch:04d}.png"
            return save_grid(to_uint8(self.net(z.to(self.device), y.to(self.device))).cpu(), path)

    # 4. loading a trained one, and what it can do: generate
    class LoadedMean(Generator):
        weights = "net"

        def __init__(self, net, cfg, checkpoint):
            self.net, self.cfg, self.checkpoint = net, cfg, checkpoint

        @property
        def conditional(self) -> bool:
            return True

        @torch.no_grad()
        def sample(self, n, seed=0, batch_size=256, device="cpu", label=None, temperature=1.0, only=None):
            size = self.net.image_size
            z = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * temperature
            if only is not None:
                z = z[list(only)]
            y = torch.full((len(z),), label, dtype=torch.long)
            return to_uint8(self.net.to(device)(z.to(device), y.to(device))).cpu()

    @register_loader(FAMILY, Generator)
    def load(ckpt):
        nets, cfg = build_from_checkpoint(ckpt, FAMILY)
        nets["net"].load_state_dict(ckpt["models"]["net"])
        return LoadedMean(nets["net"].eval(), cfg, ckpt)

    yield FAMILY
    for table in (FAMILIES, registry._REGISTRY, TASKS, protocol.LOADERS, protocol.CAPABILITIES):
        table.pop(FAMILY, None)


def test_a_family_defined_in_a_test_trains_samples_evaluates_and_animates_through_the_cli(
        meanimage_family, cli, demo_prepared, tmp_path, unverified):
    runs = tmp_path / "runs"
    r = cli("train", "--model", "meanimage", "--data", demo_prepared, "--epochs", "3", "--out", runs,
            "--device", "cpu", "--set", "train.batch_size=16")
    assert r.exit_code == 0, r.output
    run = runs / "00000-meanimage"
    assert (run / "checkpoints" / "last.pt").is_file() and len(list((run / "samples").glob("epoch_*.png"))) >= 3
    losses = [json.loads(ln)["loss"] for ln in (run / "stats.jsonl").read_text().splitlines() if '"loss"' in ln]
    assert losses[-1] < losses[0]  # the means moved towards the images

    r = cli("sample", run, tmp_path / "s", "-n", "5", "--seed", "3")
    assert r.exit_code == 0, r.output
    classes = json.loads((demo_prepared / "prepare.json").read_text())["classes"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir()) == sorted(classes)
    assert all(len(list((tmp_path / "s" / c).glob("sample_*.png"))) == 5 for c in classes)

    r = cli("evaluate", run, "--data", demo_prepared, "--out", tmp_path / "e", "--repeats", "2",
            "--metrics", "fid,memorization")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["model"] == "meanimage" and m["repeats"] == 2
    fd, floor = m["metrics"]["fd_unverified"], m["metrics"]["fd_unverified_floor"]  # the stand-in: never "FID"
    assert len(fd["values"]) == 2 and fd["mean"] > floor["mean"] >= 0 and m["floor_n"] > 0
    assert 0 <= m["memorization"]["copies"] <= 1
    assert "real-vs-real floor" in r.stdout

    r = cli("gif", run, "-o", tmp_path / "progress.gif")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "progress.gif").stat().st_size > 0

    # a capability it lacks is refused in one line naming the models that have it
    r = cli("segment", run, demo_prepared / "test", tmp_path / "seg")
    assert r.exit_code == 2 and "needs a segmenter (attention_unet, unet)" in r.stderr


def test_the_registrations_went_with_the_fixture():
    from covidxray.config import FAMILIES
    from covidxray.infer.protocol import LOADERS
    from covidxray.models import list_models
    from covidxray.train.tasks import TASKS

    assert FAMILY not in FAMILIES and FAMILY not in TASKS and FAMILY not in LOADERS
    assert FAMILY not in {m.name for m in list_models()}
