"""bench/diffusion.py: a tiny CPU run times edm and MONAI's DiffusionModelUNet side by side, and one scores MONAI's
U-Net trained for a tiny budget with the FID beside the real-vs-real floor."""

import json
import math

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


def test_the_fid_of_monai_from_a_budget_beside_the_floor(tmp_path, monkeypatch):
    pytest.importorskip("monai", reason="the FID mode trains MONAI's DiffusionModelUNet (monai is in the dev extra)")
    pytest.importorskip("einops", reason="MONAI's DiffusionModelUNet needs einops (in the dev extra)")
    from covidxray.data.prepare import prepare_demo
    from covidxray.errors import CovidXrayError
    from covidxray.metrics import features as FE

    monkeypatch.delenv(FE.ENV_WEIGHTS, raising=False)
    try:
        FE.find_inception_weights()
    except CovidXrayError as exc:
        pytest.skip(f"FID Inception not installed: {exc}")
    # 32 px phantoms: DDIM's 50 steps cost a quarter of 64 px; features are 299 px whatever the size
    data = tmp_path / "demo32"
    prepare_demo(data, per_class=24, size=32, seed=0, workers=1, progress=False)
    out = tmp_path / "fid.json"
    rc = load_bench("diffusion", "diffusion_bench").main(["--quick", "--device", "cpu", "--data", str(data),
                                                          "--fid-kimg", "0.05", "--fid-n", "8", "--json", str(out)])
    assert rc == 0
    fid = json.loads(out.read_text())["fid"]
    assert fid["metric"] == "fid" and fid["features"]["verified"] and fid["n"] == 8 and fid["size"] == 32
    monai = fid["rows"]["monai"]
    assert monai["conditional"] and monai["steps"] == 7 and monai["kimg"] == pytest.approx(0.056)  # 7 batches of 8
    assert math.isfinite(monai["fid"]) and math.isfinite(monai["fid_floor"]) and monai["fid_floor"] >= 0
    assert monai["floor_n"] == 8 and monai["train_s"] > 0 and monai["sample_s_per_image"] > 0
