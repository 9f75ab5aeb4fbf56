"""bench/segmentation.py: a tiny CPU run times ours and the plain loops on the same images and network."""

import json

from tests.bench import load_bench


def _load():
    return load_bench("segmentation", "segmentation_bench")


def test_train_and_segment_are_timed_side_by_side(demo_prepared, tmp_path):
    out = tmp_path / "seg.json"
    rc = _load().main(["--quick", "--device", "cpu", "--data", str(demo_prepared), "--workers", "0",
                       "--parts", "train,segment", "--set", "train.num_threads=1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    train, seg = res["train"], res["segment"]
    assert "error" not in train and "error" not in seg, res
    ours, plain = train["ours"], train["plain"]
    assert ours["n_train"] == plain["n_train"] and ours["batch"] == plain["batch"] == 8  # the same masked images
    assert ours["steps"] == plain["steps"] and train["ratio"] == ours["images_per_s"] / plain["images_per_s"]
    assert seg["ours"]["images"] == seg["plain"]["images"] == 16
    assert seg["ratio"] == seg["ours"]["images_per_s"] / seg["plain"]["images_per_s"]
