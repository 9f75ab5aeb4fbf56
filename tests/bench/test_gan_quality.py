"""bench/gan_quality.py: the class-fidelity/diversity measure used to compare the GANs in docs/models.md."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from covidxray.train.loop import start_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("gan_quality", ROOT / "bench" / "gan_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_diversity_and_balanced_accuracy_known_answers(quality):
    same = torch.full((4, 1, 8, 8), 100, dtype=torch.uint8)
    assert quality.diversity(same) == 0.0
    two = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 10.0)]).to(torch.uint8)
    assert quality.diversity(two) == pytest.approx(10 / 2**0.5)  # sample std of {0, 10}
    pred, true = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 0, 0, 1, 1, 2])
    # per class recall: 2/3, 1, 1 -> mean 8/9 (plain accuracy would be 5/6)
    assert quality.balanced_accuracy(pred, true, 3) == pytest.approx(8 / 9)


def test_resize_keeps_range_and_size(quality):
    x = torch.randint(0, 256, (2, 1, 128, 128), dtype=torch.uint8)
    y = quality.resize_u8(x, 64)
    assert y.shape == (2, 1, 64, 64) and y.min() >= -1 and y.max() <= 1
    # area resampling of a constant image keeps the value
    assert torch.allclose(quality.resize_u8(torch.full((1, 1, 128, 128), 255, dtype=torch.uint8), 64),
                          torch.ones(1, 1, 64, 64))


def test_scores_a_conditional_and_an_unconditional_run(quality, tiny_cfg, demo_prepared, tmp_path):
    cgan, _ = start_run(tiny_cfg(epochs=1, model="cgan"))
    raw, _ = start_run(tiny_cfg(epochs=1))
    out = tmp_path / "q.json"
    args = ["--data", str(demo_prepared), str(cgan.run_dir), str(raw.run_dir), "-n", "8",
            "--clf-epochs", "2", "--clf-seeds", "2", "--device", "cpu", "--json", str(out)]
    assert quality.main(args) == 0
    res = json.loads(out.read_text())
    classes = res["classes"]
    assert set(res["real"]["test_per_class"]) == set(classes)
    cond, uncond = res["runs"]
    assert cond["model"] == "cgan" and set(cond["per_class"]) == set(classes)
    for v in cond["per_class"].values():
        assert 0.0 <= v["gan_test"][0] <= 1.0 and v["diversity"] >= 0.0
    assert 0.0 <= cond["gan_train"][0] <= 1.0
    assert uncond["model"] == "rawgan" and sum(m for m, _ in uncond["mix"].values()) == pytest.approx(1.0)
    # the trained classifiers were cached: a second call trains none and gives the same real scores
    cache = list((demo_prepared / ".cache").glob("gan_quality-clf-*.pt"))
    assert len(cache) == 2
    assert quality.main(args[:2] + args[4:]) == 0  # the real part only, no runs
    again = json.loads(out.read_text())
    assert again["real"] == res["real"] and again["runs"] == []
