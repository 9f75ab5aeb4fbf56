"""bench/diffusion.py: a tiny CPU run times edm and MONAI's DiffusionModelUNet side by side."""

import json

import pytest

from tests.bench import load_bench


def test_edm_and_monai_are_timed_side_by_side(demo_prepared, tmp_path):
    pytest.importorskip("einops", reason="MONAI's DiffusionModelUNet needs einops (in the dev extra)")
    out = tmp_path / "diffusion.json"
    rc = load_bench("diffusion", "diffusion_bench").main(["--quick", "--device", "cpu", "--data", str(demo_prepared),
                                                          "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    train, sample = res["train"], res["sample"]
    assert train["ratio"] == pytest.approx(train["ours_img_per_s"] / train["monai_img_per_s"])
    assert train["ours_params"] > 0 and train["monai_params"] > 0 and len(train["rounds"]["ours"]) == 1
    assert sample["ours_evaluations"] == 35 and sample["monai_evaluations"] == 50 and sample["n"] == 2
    assert sample["ours_s_per_image"] > 0 and sample["monai_s_per_image"] > 0
