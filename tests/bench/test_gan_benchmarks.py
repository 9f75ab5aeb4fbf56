"""bench/gan_throughput.py, gan_vs_example.py and gan_schedule.py: tiny CPU runs that write their JSON."""

import json
import os
import signal
import sys
import textwrap

import pytest

from tests.bench import load_bench

TINY = ["--device", "cpu", "--quick", "--set", "arch.g_channels=8", "arch.d_channels=8", "train.num_threads=1"]


def _load(name: str):
    return load_bench(name)


@pytest.fixture(scope="module")
def scripts():
    return {n: _load(n) for n in ("gan_throughput", "gan_vs_example", "gan_schedule")}


def test_throughput_writes_model_and_reference_rows(scripts, demo_prepared, tmp_path):
    out = tmp_path / "bench.json"
    rc = scripts["gan_throughput"].main([*TINY, "--models", "rawgan", "--data64", str(demo_prepared),
                                         "--ref-width", "8", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    (row,) = res["models"]
    assert "error" not in row, row
    assert row["model"] == "rawgan" and row["size"] == 64 and row["cuda_graphs"] == "off"
    assert row["step_images_per_s"] > 0 and row["epoch_images_per_s"] > 0 and row["fit_finished"]
    # train_step() alone moves no counter: images_seen is the one fit() epoch of --quick
    assert row["fit_images_seen"] == row["batch"] * row["batches_per_epoch"]
    (ref,) = res["reference"]
    assert ref["variant"] == "fp32" and ref["images_per_s"] > 0
    assert res["data"]["64"]["kind"] == "phantoms" and set(res["sections_s"]) == {"data", "models"}


FAKE_PEER = textwrap.dedent("""
    import argparse, math, os, time
    ap = argparse.ArgumentParser()
    for a in ("--dataset", "--dataroot", "--imageSize", "--batchSize", "--niter", "--workers", "--outf", "--manualSeed"):
        ap.add_argument(a)
    a = ap.parse_args()
    n = sum(len(f) for _, _, f in os.walk(a.dataroot))
    nb = math.ceil(n / int(a.batchSize))
    for e in range(int(a.niter)):
        for i in range(nb):
            time.sleep(0.01)
            print(f"[{e}/{a.niter}][{i}/{nb}] Loss_D: 1.0 Loss_G: 1.0 D(x): 0.5 D(G(z)): 0.5 / 0.5", flush=True)
""")


def test_vs_example_times_the_peer_lines_and_reports_a_missing_script(scripts, demo_prepared, tmp_path):
    peer = tmp_path / "main.py"
    peer.write_text(FAKE_PEER)
    out = tmp_path / "peer.json"
    common = [*TINY, "--data64", str(demo_prepared), "--peer-batch", "16", "--peer-niter", "2"]
    assert scripts["gan_vs_example"].main([*common, "--peer", str(peer), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    p = res["peer"]
    assert "error" not in p, p
    assert p["returncode"] == 0 and p["images_per_s"] > 0 and p["steady_images_per_s"] > 0
    assert p["window_images"] == 2 * p["n_images"] - 16  # every batch line but the first one
    assert res["peer_ours"]["epoch_images_per_s"] > 0 and res["peer_ratio"] > 0

    assert scripts["gan_vs_example"].main([*common, "--peer", str(tmp_path / "absent.py"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert "not found" in res["peer"]["error"] and "peer_ratio" not in res


def test_schedule_projects_from_a_json_and_runs_a_tiny_schedule(scripts, demo_at_size, tmp_path, capsys):
    rates = tmp_path / "bench.json"
    rates.write_text(json.dumps({"models": [{"model": "cgan", "size": 128, "epoch_images_per_s": 1000.0},
                                            {"model": "cgan", "size": 64, "epoch_images_per_s": 9999.0}],
                                 "data": {"128": {"n_train": 900, "kind": "real"}}}))
    out = tmp_path / "schedule.json"
    args = [*TINY, "--skip-models", "--rates-from", str(rates), "--schedule-images", "100",
            "--run-schedule", "rawgan", "--data128", str(demo_at_size(128)), "--json", str(out)]
    assert scripts["gan_schedule"].main(args) == 0
    sched = json.loads(out.read_text())["schedule"]
    (est,) = sched["estimates"]
    assert est["model"] == "cgan" and est["projected_s"] == pytest.approx(0.1)
    run = sched["run"]
    assert "error" not in run, run
    assert run["finished"] and run["images_done"] == run["images_trained"] >= 100
    assert run["epochs"] == -(-100 // run["n_train"])
    assert "schedule run rawgan: wall" in capsys.readouterr().out


def test_schedule_with_nothing_to_do_is_a_usage_error(scripts):
    with pytest.raises(SystemExit) as exc:
        scripts["gan_schedule"].main(["--skip-models"])
    assert exc.value.code == 2


def test_sigterm_still_writes_the_json_and_the_tables(scripts, tmp_path, capsys):
    gb = sys.modules["_bench"]
    out = tmp_path / "r.json"
    args = scripts["gan_schedule"].parse_args(["--rates-from", "x.json", "--json", str(out)])
    seen, before = [], signal.getsignal(signal.SIGTERM)

    def section(b):
        b.res["models"].append({"model": "cgan", "size": 128})
        os.kill(os.getpid(), signal.SIGTERM)  # what `timeout` sends
        seen.append("not reached")

    rc = gb.run_bench("t", args, gans=[], sizes=[], sections=[("s", section)], header="",
                      tables=lambda console, res, args: console.print("TABLE"), results={"models": []})
    assert rc == 130 and not seen
    assert json.loads(out.read_text())["models"] == [{"model": "cgan", "size": 128}]
    text = capsys.readouterr().out
    assert "interrupted" in text and text.rstrip().splitlines()[-2] == "TABLE"
    assert signal.getsignal(signal.SIGTERM) is before  # restored
