"""``covidxray study`` with ``eval.segmentation``: a mask arm (pix2pix) gets its row of the segmentation table -
U-Nets on real pairs (shared by every mask arm), on real + its synthetic pairs and on its synthetic pairs alone,
scored on the same real test masks with paired deltas; a rerun retrains nothing; a changed U-Net protocol redoes
the segmentation stage alone, not the arm's training or scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures import ANSI

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = ["--set", "train.num_threads=1", "--device", "cpu"]
UNET = ["arch.width=8", "arch.depth=3", "train.batch_size=8"]


def _spec(path: Path, epochs: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "seg", "data": {"size": 64, "masks": True}, "checkpoints_at": [1.0],
        "eval": {"n": 8, "repeats": 1, "metrics": ["fid"], "segmentation": {"seeds": 2, "epochs": epochs,
                                                                             "sets": UNET}},
        "arms": [{"name": "p2p", "model": "pix2pix", "kimg": 0.05,
                  "sets": ["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2", "train.batch_size=8"]},
                 {"name": "vae", "model": "cvae", "kimg": 0.05, "sets": ["arch.channels=8"]}]}))
    return path


def _run(*args, standin, monkeypatch):
    from typer.testing import CliRunner

    from covidxray.cli import app
    from covidxray.metrics import features as FE

    for k, v in {"TERM": "dumb", "COLUMNS": "200", "NO_COLOR": "1", FE.ENV_WEIGHTS: str(standin),
                 FE.ENV_ALLOW_UNVERIFIED: "1"}.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, [str(a) for a in [*args, *RUN]])
    assert r.exit_code == 0, r.output
    return ANSI.sub("", r.stdout)


def _mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob(pattern)}


def test_a_mask_arm_gets_its_segmentation_row(demo_prepared, standin, tmp_path, monkeypatch):
    out = tmp_path / "s"
    spec = _spec(tmp_path / "seg.yaml", epochs=1)
    _run("study", spec, "--data", demo_prepared, "--out", out, standin=standin, monkeypatch=monkeypatch)
    m = json.loads((out / "study.json").read_text())
    real = m["segmentation_real"]["runs"]
    assert len(real) == 2 and all(0 <= r["dice"] <= 1 for r in real)
    seg = m["arms"]["p2p"]["segmentation"]
    assert seg["status"] == "done" and "segmentation" not in m["arms"]["vae"]  # only the mask arm has one
    runs = {a: seg["arms"][a]["runs"] for a in ("real", "real+synthetic", "synthetic")}
    assert runs["real"] == real  # arm (a) is the shared real-only U-Nets
    for s in range(2):
        a, b, c = (runs[k][s]["n_train"] for k in ("real", "real+synthetic", "synthetic"))
        assert b == 2 * a and c == a  # one synthetic pair per real mask
        assert len({runs[k][s]["n_test"] for k in runs}) == 1  # the same real test masks
    d = seg["delta_b"]
    assert d["n"] == 2 and d["ci95"] is not None
    assert d["mean"] == pytest.approx(sum(x["dice"] - y["dice"] for x, y in zip(runs["real+synthetic"], real)) / 2)
    md = (out / "study.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| p2p |") and "±" in ln and "[" in ln
               and ln.count("|") == 8)
    assert f"{seg['arms']['real']['dice']['mean']:.4f}" in row and f"{d['mean']:+.4f}" in row
    assert "## Segmentation" in md and "| vae |" not in md.split("## Segmentation")[1].split("##")[0]

    # a rerun trains nothing; a changed U-Net protocol redoes only the segmentation stage
    nets = _mtimes(out, "*.pt")
    evals = _mtimes(out / "arms", "metrics.json")
    _run("study", spec, "--data", demo_prepared, "--out", out, standin=standin, monkeypatch=monkeypatch)
    assert _mtimes(out, "*.pt") == nets
    _run("study", _spec(spec, epochs=2), "--data", demo_prepared, "--out", out, standin=standin,
         monkeypatch=monkeypatch)
    m2 = json.loads((out / "study.json").read_text())
    assert m2["arms"]["p2p"]["segmentation"]["key"] != seg["key"]
    assert m2["segmentation_real"]["runs"][0]["best_epoch"] is not None
    arm_runs = {k: v for k, v in _mtimes(out, "*.pt").items() if k.startswith("arms/") and "/segmentation/" not in k}
    assert arm_runs == {k: v for k, v in nets.items() if k.startswith("arms/") and "/segmentation/" not in k}
    kept = {k: v for k, v in _mtimes(out / "arms", "metrics.json").items() if "/segmentation/" not in k}
    assert kept == {k: v for k, v in evals.items() if "/segmentation/" not in k}
