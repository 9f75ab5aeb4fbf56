"""bench/distributed.py: one process against torchrun 2 processes on the same data, the rates read from the runs."""

import json
from pathlib import Path

from tests.bench import load_bench


def test_one_process_against_two_on_the_cpu(demo_prepared, tmp_path):
    mod = load_bench("distributed", "distributed_bench")
    out = tmp_path / "ddp.json"
    assert mod.main(["--data", str(demo_prepared), "--model", "smallcnn", "--epochs", "3", "--batch-size", "4",
                     "--log-every", "1", "--rounds", "1", "--threads", "2", "--json", str(out),
                     "--work", str(tmp_path / "work")]) == 0
    res = json.loads(out.read_text())
    assert res["procs"] == 2 and res["best_1"] > 0 and res["best_n"] > 0
    assert res["ratio"] == res["best_n"] / res["best_1"]
    one, two = res["rounds"]["plain"][0], res["rounds"]["torchrun"][0]
    assert one["intervals"] >= 2 and two["intervals"] >= 2
    # the torchrun arm really ran distributed (rank 0's log), the other did not
    assert "distributed: 2 ranks (gloo)" in (Path(two["run"]) / "log.txt").read_text()
    assert "distributed:" not in (Path(one["run"]) / "log.txt").read_text()
