"""bench/synthetic_pairs.py: the three arms of both regimes run on the same real test masks (a tiny CPU run)."""

import json

from covidxray.evaluate.pairs import ARMS
from tests.bench import load_bench


def test_three_arms_two_regimes_with_paired_deltas(demo_prepared, tmp_path):
    mod = load_bench("synthetic_pairs")
    out = tmp_path / "pairs.json"
    assert mod.main(["--quick", "--device", "cpu", "--data", str(demo_prepared), "--set", "train.num_threads=1",
                     "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["regimes"]) == {"full", "low (25%)"}
    for regime in res["regimes"].values():
        runs = {a: regime["arms"][a]["runs"] for a in ARMS}
        assert all(len(r) == 2 for r in runs.values())  # two seeds
        for s in range(2):
            real, mixed, syn = (runs[a][s]["n_train"] for a in ARMS)
            assert mixed == 2 * real and syn == real  # one synthetic pair per real mask
            assert len({runs[a][s]["n_test"] for a in ARMS}) == 1  # the same real test masks
        assert regime["delta_b"]["n"] == 2 and regime["delta_b"]["ci95"] is not None
    full, low = (res["regimes"][k]["arms"]["real"]["runs"][0]["n_train"] for k in ("full", "low (25%)"))
    assert low == round(0.25 * full)
