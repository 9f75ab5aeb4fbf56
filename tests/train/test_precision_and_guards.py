"""Mixed precision on the CPU, the NaN/inf guard and the torch.compile fallback."""

import math

import pytest
import torch

from covidxray.errors import CovidXrayError
from covidxray.checkpoint import load_checkpoint
from covidxray.train.loop import Trainer, start_run


def test_bf16_autocast_trains_on_the_cpu(tiny_cfg):
    trainer, finished = start_run(tiny_cfg(epochs=1, extra=["train.amp=bf16"]))
    assert finished and trainer.amp_dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in trainer.task.G.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.task.G.parameters())  # weights stay fp32


def test_a_resumed_run_keeps_the_precision_it_trained_in(tiny_cfg, monkeypatch):
    """train.amp=auto resolves once per run: resumed on a CPU where auto now means bf16 (another machine, or a
    version whose default changed), a run that trained in fp32 goes on in fp32, and its checkpoint says so."""
    import covidxray.train.loop as loop
    from covidxray.train.loop import resume_run

    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    first, finished = start_run(tiny_cfg(epochs=1))
    assert finished and first.amp_dtype is None
    assert load_checkpoint(first.run_dir, resume=True)["precision"] == "off"
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    resumed, finished = resume_run(first.run_dir, epochs=2)
    assert finished and resumed.amp_dtype is None
    assert load_checkpoint(first.run_dir, resume=True)["precision"] == "off"
    fresh, _ = start_run(tiny_cfg(epochs=1))  # a new run takes today's default
    assert fresh.amp_dtype == torch.bfloat16
    assert load_checkpoint(fresh.run_dir, resume=True)["precision"] == "bf16"


def test_fp16_needs_cuda(tiny_cfg):
    with pytest.raises(CovidXrayError, match="fp16 needs a CUDA device"):
        start_run(tiny_cfg(extra=["train.amp=fp16"]))


def test_nan_losses_stop_with_a_hint_and_keep_the_last_checkpoint(tiny_cfg, monkeypatch):
    trainer, _ = start_run(tiny_cfg(epochs=1))
    good = load_checkpoint(trainer.run_dir, resume=True)
    real_step = Trainer.train_step

    def diverging(self, real, labels):
        out = real_step(self, real, labels)
        out["loss_d"] = out["loss_d"] * math.nan
        return out

    monkeypatch.setattr(Trainer, "train_step", diverging)
    from covidxray.train.loop import resume_run

    with pytest.raises(CovidXrayError, match=r"diverged at step \d+: loss_d became NaN/inf") as err:
        resume_run(trainer.run_dir, epochs=2)
    assert "learning rate" in str(err.value)
    assert load_checkpoint(trainer.run_dir, resume=True)["step"] == good["step"]  # no NaN checkpoint written


def test_compile_failure_falls_back_to_eager_with_a_warning(tiny_cfg, monkeypatch):
    def broken_compile(module, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler in this test")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        trainer, finished = start_run(tiny_cfg(epochs=1, extra=["train.compile=true"]))
    assert finished and trainer.task.G_train is trainer.task.G
    assert "torch.compile failed" in (trainer.run_dir / "log.txt").read_text()


def test_compile_mode_is_passed_to_torch_compile(tiny_cfg, monkeypatch):
    seen = []

    def recording_compile(module, *args, mode=None, **kwargs):
        seen.append(mode)
        return module  # eager: only the call is checked here

    monkeypatch.setattr(torch, "compile", recording_compile)
    trainer, finished = start_run(tiny_cfg(epochs=1, extra=["train.compile=true", "train.compile_mode=reduce-overhead"]))
    assert finished and seen == ["reduce-overhead", "reduce-overhead"]
