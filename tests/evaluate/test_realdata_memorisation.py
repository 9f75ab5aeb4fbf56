"""The memorisation check on real chest X-rays (skipped with the reason when the data are absent).

A 'generator' that returns training X-rays must score ~100 % copies, one that returns held-out X-rays
about the 1 % the threshold is set at. The pixel space needs no network; the feature space uses the
stand-in network of test_generator_eval (the real FID Inception would take minutes on 2 CPU cores).
"""

import csv
import json
from pathlib import Path

import pytest

from covidxray.data.prepare import prepare
from covidxray.metrics import features as FE

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


def _copy_split(data: Path, split: str, dest: Path, limit: int | None = None) -> Path:
    with (data / "manifest.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split][:limit]
    for r in rows:
        (dest / r["class"]).mkdir(parents=True, exist_ok=True)
        (dest / r["class"] / Path(r["file"]).name).write_bytes((data / r["file"]).read_bytes())
    return dest


def test_copies_of_real_training_xrays_are_flagged_and_held_out_ones_are_not(real_data_dir, standin, tmp_path, cli,
                                                                          monkeypatch):
    monkeypatch.setenv(FE.ENV_WEIGHTS, str(standin))
    monkeypatch.setenv(FE.ENV_ALLOW_UNVERIFIED, "1")
    data = tmp_path / "cxr64"
    prepare(real_data_dir, data, size=64, workers=2, progress=False)
    out = {}
    for name, split in (("copies", "train"), ("held_out", "val")):
        fake = _copy_split(data, split, tmp_path / name)
        r = cli("evaluate", "--fake", fake, "--data", data, "--metrics", "memorization", "--repeats", "1",
                "--out", tmp_path / f"eval-{name}")
        assert r.exit_code == 0, r.output
        out[name] = json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text())["memorization"]
    assert out["copies"]["copies"] == 1.0 and out["copies"]["copies_pixel"] == 1.0
    assert out["held_out"]["copies"] < 0.06 and out["held_out"]["copies_pixel"] < 0.06, out["held_out"]
    assert out["copies"]["ct"]["ct"] < -3  # C_T: far closer to the training set than held-out data are
