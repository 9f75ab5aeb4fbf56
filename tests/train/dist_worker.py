"""One rank of a multi-process test run (gloo, CPU): what `torchrun` starts, spawned by tests/train/test_distributed.py.

Each rank gets torchrun's environment variables, trains or resumes a run through the public entry points and
writes what it ended with (its weights, counters, or its error) to ``OUT/rank<R>.pt``.
"""

from __future__ import annotations

import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, world: int, port: int, job: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    from covidxray.config import resolve_config
    from covidxray.errors import CovidXrayError
    from covidxray.train.loop import resume_run, start_run

    torch.set_num_threads(1)

    def on_step(trainer):
        if trainer.dist.rank == job.get("stop_rank") and trainer.step == job.get("stop_at"):
            trainer.request_stop()
        if trainer.dist.rank == job.get("raise_rank") and trainer.step == job.get("raise_at"):
            raise RuntimeError("a simulated crash of this rank")

    result: dict = {"rank": rank}
    try:
        if job["kind"] == "start":
            cfg = resolve_config(job["model"], flags={"data": {"path": job["data"]},
                                                      "train": {"epochs": job["epochs"], "device": job.get("device", "cpu")}},
                                 sets=job["sets"])
            cfg.out = job["out"]
            trainer, finished = start_run(cfg, on_step=on_step)
        else:
            trainer, finished = resume_run(job["run"], on_step=on_step)
        result.update(finished=finished, run_dir=str(trainer.run_dir), step=trainer.step,
                      images_seen=trainer.images_seen, rank_batch_size=trainer.rank_batch_size,
                      weights={k: {n: v.clone() for n, v in m.state_dict().items()}
                               for k, m in trainer.task.models.items()})
    except CovidXrayError as exc:
        result["error"] = exc.message
    except BaseException as exc:  # noqa: BLE001 - the test reads it
        result["exception"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
