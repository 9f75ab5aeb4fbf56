"""``train.tensorboard``: refused in one line without the tensorboard package; with a ``SummaryWriter`` (a fake one
here: the package is optional and the tests do not need it), every numeric value of every ``stats.jsonl`` record
is written as a scalar ``<kind>/<key>`` at its step into ``RUN/tensorboard/``, and a resumed run drops the events
past its checkpoint."""

from __future__ import annotations

import json
import sys
import types

import pytest

from covidxray.train.loop import resume_run, start_run
from covidxray.train.tensorboard import AXES, FOLDER


class FakeWriter:
    """Records what torch.utils.tensorboard.SummaryWriter would be asked to write."""

    made: list["FakeWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        assert not self.closed
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeWriter.made = []
    return FakeWriter


def _expected(run_dir, skip: int = 0) -> list[tuple[str, float, int]]:
    """The scalars of stats.jsonl's records after its first ``skip`` lines, in order."""
    out = []
    for line in (run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines()[skip:]:
        rec = json.loads(line)
        out += [(f"{rec['kind']}/{k}", v, rec["step"]) for k, v in rec.items()
                if k not in AXES and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return out


def test_without_the_package_the_key_is_refused_in_one_line(cli, demo_prepared, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` fails as without the package
    r = cli("train", "--model", "rawgan", "--data", demo_prepared, "--epochs", "1", "--device", "cpu",
            "--out", tmp_path / "runs", "--set", "train.tensorboard=true", "--set", "train.num_threads=1")
    lines = [ln for ln in r.clean_stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert "train.tensorboard=true needs the tensorboard package" in lines[0]
    assert "pip install covidxray[tensorboard]" in lines[0]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run folder left


def test_every_stats_record_is_written_as_scalars(tiny_cfg, fake_tensorboard):
    trainer, finished = start_run(tiny_cfg(epochs=1, extra=["train.tensorboard=true"]))
    assert finished and len(fake_tensorboard.made) == 1
    w = fake_tensorboard.made[0]
    assert w.log_dir == str(trainer.run_dir / FOLDER) and w.purge_step is None and w.closed
    assert w.scalars == _expected(trainer.run_dir)
    tags = {t for t, _, _ in w.scalars}
    assert {"interval/loss_d", "interval/images_per_s", "epoch/loss_g"} <= tags and not any(
        t.endswith(("/step", "/epoch", "/kimg")) for t in tags)


def test_off_by_default(tiny_cfg, fake_tensorboard):
    trainer, finished = start_run(tiny_cfg(epochs=1))
    assert finished and fake_tensorboard.made == [] and not (trainer.run_dir / FOLDER).exists()


def test_a_resumed_run_drops_the_events_past_its_checkpoint(tiny_cfg, fake_tensorboard):
    def stop_at_3(t):
        if t.step == 3:
            t.request_stop()

    trainer, finished = start_run(tiny_cfg(epochs=2, extra=["train.tensorboard=true"]), on_step=stop_at_3)
    assert not finished and fake_tensorboard.made[0].closed
    before = len((trainer.run_dir / "stats.jsonl").read_text(encoding="utf-8").splitlines())
    trainer, finished = resume_run(trainer.run_dir)
    w = fake_tensorboard.made[1]  # events of steps >= 4 that the stopped run left would be dropped
    assert finished and w.purge_step == 4 and w.scalars == _expected(trainer.run_dir, skip=before)
    assert fake_tensorboard.made[0].scalars + w.scalars == _expected(trainer.run_dir)
