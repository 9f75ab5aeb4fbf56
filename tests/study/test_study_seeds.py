"""``covidxray study`` with ``seeds:``: an arm trained once per training seed - each seed its own arm, folder and
row (``<arm>-s<seed>``), really trained from its seed - and the report's mean ± std over the seeds."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from tests.fixtures import ANSI

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_an_arm_with_seeds_is_one_arm_per_seed_and_a_mean_over_them(demo_prepared, standin, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from covidxray.cli import app
    from covidxray.metrics import features as FE

    for k, v in {"TERM": "dumb", "COLUMNS": "200", "NO_COLOR": "1", FE.ENV_WEIGHTS: str(standin),
                 FE.ENV_ALLOW_UNVERIFIED: "1"}.items():
        monkeypatch.setenv(k, v)
    spec = tmp_path / "seeds.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "seeds", "checkpoints_at": [1.0], "eval": {"n": 8, "repeats": 1, "metrics": ["fid", "kid"]},
        "arms": [{"name": "vae", "model": "cvae", "kimg": 0.05, "seeds": [3, 4], "sets": ["arch.channels=8"]}]}))
    out = tmp_path / "s"
    r = CliRunner().invoke(app, ["study", str(spec), "--list-arms"])
    assert r.exit_code == 0 and r.stdout.split() == ["vae-s3", "vae-s4"]
    r = CliRunner().invoke(app, ["study", str(spec), "--data", str(demo_prepared), "--out", str(out),
                                 "--set", "train.num_threads=1", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "study.json").read_text())
    runs = {a: m["arms"][a] for a in ("vae-s3", "vae-s4")}
    for seed, (name, entry) in zip((3, 4), runs.items()):
        cfg = yaml.safe_load((out / entry["run"] / "config.yaml").read_text())
        assert cfg["train"]["seed"] == seed
    w = [torch.load(out / e["run"] / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["models"]
         for e in runs.values()]
    first = next(iter(w[0]))
    assert any(not torch.equal(a, b) for a, b in zip(w[0][first].values(), w[1][first].values()))
    fids = [next(p for p in e["points"].values() if p["final"])["eval"]["fd"]["mean"] for e in runs.values()]
    md = ANSI.sub("", (out / "study.md").read_text())
    row = next(ln for ln in md.split("### Over training seeds")[1].splitlines() if ln.startswith("| vae |"))
    assert "2 of 2" in row
    mean, std = (float(x) for x in re.search(r"\| ([\d.]+) ± ([\d.]+) \|", row).groups())
    assert mean == pytest.approx(sum(fids) / 2, abs=0.006)
    assert std == pytest.approx(abs(fids[0] - fids[1]) / 2 ** 0.5, abs=0.006)
