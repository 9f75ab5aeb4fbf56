"""Whole-step CUDA graphs: the graphed step computes what the eager step computes.

The GPU tests skip on machines without CUDA; the CPU tests cover the settings and the
optimizer-loading rule the graphs depend on.
"""

import pytest
import torch

from covidxray.errors import CovidXrayError
from covidxray.checkpoint import load_checkpoint
from covidxray.train.loop import Trainer, resume_run, start_run
from covidxray.train.optim import load_optimizer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_graphs_are_off_on_the_cpu_and_yes_says_why(tiny_cfg, tmp_path):
    assert Trainer(tiny_cfg(epochs=1, model="cgan"), tmp_path / "auto").graphs is None
    cfg = tiny_cfg(epochs=1, model="cgan", extra=["train.cuda_graphs=yes"])
    with pytest.raises(CovidXrayError, match="cuda_graphs=yes cannot be used here: it needs a CUDA device"):
        start_run(cfg)
    # the data had been loaded (and logged) before the refusal: no run folder is left behind
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_classifier_graphs_off_on_the_cpu_and_sgd_says_why(clf_cfg, tmp_path):
    from covidxray.train.tasks.classifier import ClassifierTask
    from covidxray.train.tasks.gan import GANTask

    assert Trainer(clf_cfg(epochs=1), tmp_path / "auto").graphs is None
    # asked before the task is built: an SGD update keeps its lr on the host and cannot be captured
    assert "optim.name=sgd keeps its learning rate on the host" in ClassifierTask.graphs_unsupported(
        clf_cfg(extra=["optim.name=sgd"]))
    assert ClassifierTask.graphs_unsupported(clf_cfg()) == "" and GANTask.graphs_unsupported(clf_cfg()) == ""
    with pytest.raises(CovidXrayError, match="cuda_graphs=yes cannot be used here: it needs a CUDA device"):
        start_run(clf_cfg(epochs=1, extra=["train.cuda_graphs=yes", "optim.name=sgd"]))


def test_bad_cuda_graphs_value_is_refused(tiny_cfg):
    with pytest.raises(CovidXrayError, match="train.cuda_graphs' must be one of auto, yes, no"):
        tiny_cfg(epochs=1, extra=["train.cuda_graphs=maybe"])


def test_load_optimizer_keeps_the_flags_of_the_optimizer_it_loads_into():
    # A saved optimizer's implementation flags must not override how this run built its own
    # (e.g. a GPU run's capturable/fused Adam resumed on a CPU).
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    saved = torch.optim.Adam(net.parameters(), lr=0.1, foreach=True)
    net(torch.randn(4, 3)).square().sum().backward()
    saved.step()
    state = saved.state_dict()
    state["param_groups"][0]["capturable"] = True  # as written by a graphed CUDA run
    fresh = torch.optim.Adam(net.parameters(), lr=0.5, foreach=False)
    load_optimizer(fresh, state)
    group = fresh.param_groups[0]
    assert group["foreach"] is False and group["capturable"] is False
    assert group["lr"] == 0.1  # hyper-parameters do come from the checkpoint
    for p in net.parameters():
        st = fresh.state[p]
        assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32 and float(st["step"]) == 1
        assert torch.equal(st["exp_avg"], saved.state[p]["exp_avg"])
    net.zero_grad()
    net(torch.randn(4, 3)).square().sum().backward()
    fresh.step()  # a CPU Adam with capturable=True would refuse to step
    assert float(fresh.state[next(net.parameters())]["step"]) == 2


def _own_cuda_rng_streams():
    """``run(name, trainer, x, y)``: a train step of ``trainer`` with its own default-CUDA-generator stream.

    Dropout draws from the default CUDA generator, which two trainers in one process share: each ``name``
    gets its own saved state, so that a graphed and an eager trainer draw the same numbers.
    """
    rng = {"a": torch.cuda.get_rng_state(), "b": torch.cuda.get_rng_state()}

    def run(name, trainer, x, y):
        torch.cuda.set_rng_state(rng[name])
        out = {k: v.clone() for k, v in trainer.train_step(x, y).items()}
        rng[name] = torch.cuda.get_rng_state()
        return out

    return run, rng


def _gpu_cfg(tiny_cfg, model, extra=()):
    cfg = tiny_cfg(epochs=2, model=model, extra=["train.amp=off", "train.deterministic=true", *extra])
    cfg.train.device = "cuda"
    return cfg


@cuda
@pytest.mark.parametrize("model,extra", [
    ("cgan", []),
    ("rawgan", []),  # BatchNorm in G and D: running statistics are updated inside the graph
    ("unetcgan", ["loss.cutmix_warmup_kimg=0", "loss.cutmix_prob=0.5", "loss.r1_gamma=1", "loss.r1_every=2"]),
    ("acgan", ["loss.uncertainty=min", "arch.d_dropout=0.3"]),  # dropout draws from the default generator
])
def test_graphed_steps_equal_eager_steps(tiny_cfg, tmp_path, model, extra):
    a = Trainer(_gpu_cfg(tiny_cfg, model, extra), tmp_path / "graphs")
    b = Trainer(_gpu_cfg(tiny_cfg, model, [*extra, "train.cuda_graphs=no"]), tmp_path / "eager")
    assert a.graphs is not None and b.graphs is None
    n = a.batch_size
    run, rng = _own_cuda_rng_streams()
    for step in range(12):
        idx = torch.arange(step * 3, step * 3 + n) % len(a.data)
        x, y = a.data.images[idx], a.data.labels[idx]
        sa, sb = run("a", a, x, y), run("b", b, x, y)
        a.state.step += 1
        b.state.step += 1
        a.state.images_seen += n
        b.state.images_seen += n
        assert set(sa) == set(sb), step
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5, msg=f"step {step}: {key}")
    assert not a.graphs.failed and len(a.graphs.graphs) >= 1  # really replayed graphs
    for (name, pa), pb in zip(a.task.G.state_dict().items(), b.task.G.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
    for (name, pa), pb in zip(a.task.ema.ema_model.state_dict().items(), b.task.ema.ema_model.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
    # the generators' states advance by what the replays drew, as in eager steps
    assert torch.equal(a.task.noise_gen.get_state(), b.task.noise_gen.get_state())
    assert torch.equal(a.task.aug_gen.get_state(), b.task.aug_gen.get_state())
    assert torch.equal(rng["a"], rng["b"])


@cuda
def test_resume_with_graphs_equals_uninterrupted(tiny_cfg):
    ref, _ = start_run(_gpu_cfg(tiny_cfg, "cgan"))
    assert ref.graphs is not None and not ref.graphs.failed and ref.graphs.graphs
    stop_at = ref.state.step // 2 + 1

    def stop(trainer):
        if trainer.state.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(_gpu_cfg(tiny_cfg, "cgan"), on_step=stop)
    assert not finished and load_checkpoint(part.run_dir, resume=True)["step"] == stop_at
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.state.step == ref.state.step
    for key, value in ref.task.G.state_dict().items():
        torch.testing.assert_close(resumed.task.G.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in ref.task.D.state_dict().items():
        torch.testing.assert_close(resumed.task.D.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@cuda
def test_classifier_graphed_steps_equal_eager_steps(clf_cfg, tmp_path):
    # The captured AdamW update reads the learning rate from a device tensor: the schedule (warm-up, then
    # cosine) must reach the replayed steps as it reaches eager ones.
    def cfg(extra):
        c = clf_cfg(epochs=2, extra=["train.amp=off", "train.deterministic=true", "optim.warmup_epochs=0.5",
                                     "model.dropout=0.2", *extra])
        c.train.device = "cuda"
        return c

    a = Trainer(cfg([]), tmp_path / "graphs")
    b = Trainer(cfg(["train.cuda_graphs=no"]), tmp_path / "eager")
    assert a.graphs is not None and b.graphs is None and a.task.use_tensor_lr
    run, _ = _own_cuda_rng_streams()
    n = a.batch_size
    for step in range(10):
        idx = torch.arange(step * 3, step * 3 + n) % len(a.data)
        x, y = a.data.images[idx], a.data.labels[idx]
        sa, sb = run("a", a, x, y), run("b", b, x, y)
        for t in (a, b):
            t.state.step += 1
            t.state.images_seen += n
        for key in sa:
            torch.testing.assert_close(sa[key].float().cpu(), sb[key].float().cpu(), rtol=1e-4, atol=1e-5,
                                       msg=f"step {step}: {key}")
    assert not a.graphs.failed and a.graphs.graphs
    for (name, pa), pb in zip(a.task.net.state_dict().items(), b.task.net.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.equal(a.task.aug_gen.get_state(), b.task.aug_gen.get_state())


@cuda
def test_classifier_resume_with_graphs_equals_uninterrupted(clf_cfg):
    def cfg():
        c = clf_cfg(epochs=2, extra=["train.amp=off", "train.deterministic=true"])
        c.train.device = "cuda"
        return c

    ref, _ = start_run(cfg())
    assert ref.cuda_graphs.startswith("replayed")

    def stop(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    part, finished = start_run(cfg(), on_step=stop)
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step
    for key, value in ref.task.net.state_dict().items():
        torch.testing.assert_close(resumed.task.net.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
