"""torchrun-style training on the CPU (gloo, 2 processes): DDP around every trained network, the global batch
split over the ranks, rank 0 alone writing the run, stop and resume on every rank, a crashed rank ending the run."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest
import torch

from covidxray.config import resolve_config
from covidxray.train.loop import start_run
from tests.fixtures import TINY_CLF_SETS
from tests.fixtures import TINY_SETS as GAN_SETS
from tests.train.dist_worker import free_port, run_rank

TINY_SETS = GAN_SETS + ["data.image_size=64"]
UNET_SETS = ["arch.width=8", "arch.depth=3", "arch.norm=group", "train.batch_size=8", "train.log_every=2",
             "train.num_threads=1", "aug.rotate=0", "aug.scale=0", "aug.translate=0", "aug.brightness=0",
             "aug.contrast=0", "train.amp=off", "optim.name=sgd"]


def launch(job: dict, out, world: int = 2, timeout: float = 150.0) -> list[dict]:
    """Run ``job`` on ``world`` spawned ranks (as torchrun would start them); every rank's result, in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run_rank, args=(r, world, port, job, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - t0)))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"ranks {hung} still running after {timeout:.0f} s (a hang)"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _job(model, data, out, epochs, sets, **kw):
    return {"kind": "start", "model": model, "data": str(data), "out": str(out), "epochs": epochs, "sets": sets, **kw}


def _same_weights(a: dict, b: dict, exact: bool = True, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for net in a:
        for key, value in a[net].items():
            if exact or not value.is_floating_point():
                assert torch.equal(value, b[net][key]), f"{net}.{key}"
            else:
                diff = float((value - b[net][key]).abs().max())
                assert torch.allclose(value, b[net][key], rtol=rtol, atol=atol), f"{net}.{key}: max |diff| {diff:.3g}"


def _records(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model, sets", [("rawgan", TINY_SETS), ("smallcnn", TINY_CLF_SETS)])
def test_two_ranks_keep_identical_weights_and_rank_0_alone_writes(model, sets, demo_prepared, tmp_path):
    runs = tmp_path / "runs"
    r0, r1 = launch(_job(model, demo_prepared, runs, 2, sets), tmp_path)
    assert "error" not in r0 and "exception" not in r0, r0
    assert "error" not in r1 and "exception" not in r1, r1
    assert r0["finished"] and r1["finished"] and r0["step"] == r1["step"] > 0
    _same_weights(r0["weights"], r1["weights"])  # DDP: every rank holds the same networks
    B = int(next(s for s in sets if s.startswith("train.batch_size=")).split("=")[1])
    assert r0["rank_batch_size"] == r1["rank_batch_size"] == B // 2 and r0["images_seen"] == r0["step"] * B
    # one run folder, written by rank 0: one config, one log, stats without duplicated lines, one checkpoint
    assert [p.name for p in runs.iterdir()] == [f"00000-{model}"]
    run = runs / f"00000-{model}"
    log = (run / "log.txt").read_text()
    assert f"distributed: 2 ranks (gloo), DDP around" in log and f"global batch {B} = 2 x {B // 2} per rank" in log
    recs = _records(run)
    steps = [r["step"] for r in recs if r["kind"] == "interval"]
    assert steps == sorted(set(steps)) and recs[-1]["step"] == r0["step"]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.yaml").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rank_state"]) == 2


def test_two_ranks_of_half_the_batch_equal_one_of_the_whole(demo_prepared, tmp_path):
    """No BatchNorm (GroupNorm U-Net) and no random augmentation: DDP's mean of two half-batch gradients is the
    whole batch's gradient, so 2 ranks x B/2 train the same weights as 1 rank x B, to float rounding."""
    r0, r1 = launch(_job("unet", demo_prepared, tmp_path / "two", 2, UNET_SETS), tmp_path)
    assert r0.get("finished") and r1.get("finished"), (r0, r1)
    cfg = resolve_config("unet", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 2, "device": "cpu"}},
                         sets=UNET_SETS)
    cfg.out = str(tmp_path / "one")
    one, _ = start_run(cfg)
    assert one.step == r0["step"] and one.images_seen == r0["images_seen"]
    single = {k: m.state_dict() for k, m in one.task.models.items()}
    # SGD: float sums in another order stay differences of float rounding (Adam's normalised steps would blow
    # them up on near-zero gradients).
    _same_weights(single, r0["weights"], exact=False, rtol=1e-4, atol=1e-6)
    # the validation, scored half of the split per rank and reduced on rank 0, is the single process's
    from pathlib import Path
    evals = [[r for r in _records(Path(run)) if r["kind"] == "eval"] for run in (r0["run_dir"], one.run_dir)]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        for key in ("val_dice", "val_iou", "val_loss"):
            assert a[key] == pytest.approx(b[key], abs=2e-5), key


def test_a_stop_on_one_rank_stops_all_after_the_same_step_and_resume_equals_uninterrupted(demo_prepared, tmp_path):
    sets = TINY_SETS
    ref = launch(_job("rawgan", demo_prepared, tmp_path / "ref", 2, sets), tmp_path)[0]
    assert ref.get("finished"), ref
    (tmp_path / "b").mkdir()
    part = launch(_job("rawgan", demo_prepared, tmp_path / "part", 2, sets, stop_rank=1, stop_at=3), tmp_path / "b")
    assert [r.get("finished") for r in part] == [False, False] and [r["step"] for r in part] == [3, 3], part
    (tmp_path / "c").mkdir()
    res = launch({"kind": "resume", "run": part[0]["run_dir"]}, tmp_path / "c")
    assert all(r.get("finished") for r in res), res
    assert res[0]["step"] == ref["step"]
    _same_weights(ref["weights"], res[0]["weights"])  # bit-exact: every rank restored its own streams
    _same_weights(res[0]["weights"], res[1]["weights"])
    from pathlib import Path
    assert _records(Path(ref["run_dir"])) == _records(Path(part[0]["run_dir"]))


def test_a_two_rank_checkpoint_resumes_in_one_process_with_a_note(demo_prepared, tmp_path):
    from covidxray.train.loop import resume_run
    from pathlib import Path

    part = launch(_job("smallcnn", demo_prepared, tmp_path / "runs", 2, TINY_CLF_SETS, stop_rank=0, stop_at=2),
                  tmp_path)
    assert part[0]["step"] == 2 and not part[0]["finished"], part
    trainer, finished = resume_run(part[0]["run_dir"])
    assert finished and trainer.rank_batch_size == 8
    assert "was written by a run of 2 rank(s), this one has 1" in (Path(part[0]["run_dir"]) / "log.txt").read_text()


def test_a_crashed_rank_ends_the_run_with_a_clear_error_and_no_hang(demo_prepared, tmp_path):
    t0 = time.monotonic()
    sets = TINY_SETS + ["train.dist_timeout=30"]
    r0, r1 = launch(_job("rawgan", demo_prepared, tmp_path / "runs", 3, sets, raise_rank=1, raise_at=2), tmp_path,
                    timeout=120)
    assert "simulated crash" in r1.get("exception", ""), r1
    assert "distributed training stopped on rank 0 of 2" in r0.get("error", ""), r0
    assert time.monotonic() - t0 < 120


def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(demo_prepared, tmp_path):
    sets = [s for s in TINY_CLF_SETS if not s.startswith("train.batch_size")] + ["train.batch_size=7"]
    r0, r1 = launch(_job("smallcnn", demo_prepared, tmp_path / "runs", 1, sets), tmp_path)
    for r in (r0, r1):
        assert "train.batch_size=7 does not split over 2 ranks" in r.get("error", ""), r
    assert not list((tmp_path / "runs").glob("*"))  # no run folder left behind


def test_torchrun_runs_the_cli_unchanged(demo_prepared, tmp_path):
    """The README's command: `torchrun --nproc_per_node 2 -m covidxray train ...` (here on the CPU, gloo)."""
    import subprocess
    import sys

    sets = sum((["--set", s] for s in TINY_CLF_SETS), [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "covidxray", "train", "--model", "smallcnn", "--data", str(demo_prepared), "--epochs", "1",
           "--device", "cpu", "--out", str(tmp_path / "runs"), *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**__import__("os").environ,
                                                                            "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("run folder:") == 1  # rank 0 alone talks
    run = tmp_path / "runs" / "00000-smallcnn"
    assert "distributed: 2 ranks (gloo)" in (run / "log.txt").read_text()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["world_size"] == 2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, SyncBatchNorm)")
def test_sync_batchnorm_two_gpus_equal_one_gpu_of_the_whole_batch(demo_prepared, tmp_path):
    """With SyncBatchNorm a BatchNorm U-Net on 2 GPUs x B/2 trains what 1 GPU x B trains, to float rounding."""
    sets = [s for s in UNET_SETS if s != "arch.norm=group"] + ["arch.norm=batch", "train.sync_batchnorm=yes",
                                                                "train.deterministic=true"]
    job = _job("unet", demo_prepared, tmp_path / "two", 2, sets)
    job["device"] = "cuda"
    r0, r1 = launch(job, tmp_path)
    assert r0.get("finished") and r1.get("finished"), (r0, r1)
    cfg = resolve_config("unet", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 2, "device": "cuda"}},
                         sets=sets)
    cfg.out = str(tmp_path / "one")
    one, _ = start_run(cfg)
    single = {k: {n: v.cpu() for n, v in m.state_dict().items()} for k, m in one.task.models.items()}
    theirs = {k: {n: v.cpu() for n, v in m.items()} for k, m in r0["weights"].items()}
    _same_weights(single, theirs, exact=False, rtol=1e-3, atol=1e-5)


def test_torchrun_with_one_process_takes_the_ddp_path_and_trains_what_the_plain_path_trains(demo_prepared, tmp_path):
    """`torchrun --nproc_per_node 1` wraps in DDP (what the 1-GPU overhead benchmark times) and, with one rank,
    averages nothing: the weights are the plain single process's, bit for bit."""
    (r0,) = launch(_job("rawgan", demo_prepared, tmp_path / "ddp1", 1, TINY_SETS), tmp_path, world=1)
    assert r0.get("finished"), r0
    from pathlib import Path
    assert "distributed: 1 ranks (gloo), DDP around G, D" in (Path(r0["run_dir"]) / "log.txt").read_text()
    cfg = resolve_config("rawgan", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 1, "device": "cpu"}},
                         sets=TINY_SETS)
    cfg.out = str(tmp_path / "plain")
    plain, _ = start_run(cfg)
    assert plain.step == r0["step"]
    _same_weights({k: m.state_dict() for k, m in plain.task.models.items()}, r0["weights"])
