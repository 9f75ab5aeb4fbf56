"""bench/classifier_throughput.py: a tiny CPU run that times ours and the plain loop on the same images."""

import json

from tests.bench import load_bench


def _load():
    return load_bench("classifier_throughput", "classifier_throughput")


def test_ours_and_the_plain_loop_are_timed_on_the_same_images(demo_prepared, tmp_path):
    out = tmp_path / "clf.json"
    rc = _load().main(["--quick", "--device", "cpu", "--data", str(demo_prepared), "--workers", "0",
                       "--batch", "8", "--set", "train.num_threads=1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    (case,) = res["cases"]
    assert case["model"] == "smallcnn" and case["size"] == 64
    ours, plain = case["ours"], case["plain"]
    assert "error" not in ours and "error" not in plain, case
    assert ours["n_train"] == plain["n_train"] == 57  # the same training images on both sides
    assert ours["batch"] == plain["batch"] == 8 and ours["window_images"] == plain["window_images"] == 48
    assert ours["images_per_s"] > 0 and plain["images_per_s"] > 0
    assert case["ours_over_plain"] == ours["images_per_s"] / plain["images_per_s"]
    assert res["env"]["cpu_count"] >= 1


def test_a_gan_is_refused(tmp_path, capsys):
    assert _load().main(["--cases", "rawgan@64", "--device", "cpu"]) == 2
    assert "rawgan is not a classifier" in capsys.readouterr().out


FAKE_IMAGENET = '''
import argparse, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("data"); ap.add_argument("-a"); ap.add_argument("-b", type=int); ap.add_argument("--epochs")
ap.add_argument("-p"); ap.add_argument("-j"); ap.add_argument("--seed"); ap.add_argument("--no-accel", action="store_true")
args = ap.parse_args()
import math, os
train = os.path.join(args.data, "train")
n = sum(len(os.listdir(os.path.join(train, c))) for c in os.listdir(train))  # the tree of symlinks it was given
nb = math.ceil(n / args.b)  # its DataLoader keeps the last, smaller batch
print("Using device: cpu")
for i in range(1, nb + 1):
    time.sleep(0.02)
    print(f"Epoch: [0][{i:{len(str(nb))}d}/{nb}]\\tTime  0.050 ( 0.050)\\tData 0.0\\tLoss 1.0e+00")
print("Test: [1/1]\\tTime 0.01")
'''


def test_the_peer_is_timed_from_its_training_batch_lines(demo_prepared, tmp_path):
    import argparse

    mod = _load()
    script = tmp_path / "imagenet_main.py"
    script.write_text(FAKE_IMAGENET)
    data = mod.gb.DataInfo(64, path=demo_prepared, kind="phantoms", n_train=57)
    args = argparse.Namespace(batch=8, workers=0, peer_timeout=60.0)
    row = mod.measure_peer(script, data, args, mod.torch.device("cpu"), tmp_path, lambda msg: None)
    assert "error" not in row, row
    assert row["n_train"] == 57 and "-a resnet18 -b 8 --epochs 1 -p 1 -j 0" in row["command"] and "--no-accel" in row["command"]
    # 57 images in 8 batches (7 of 8, the last of 1); the window runs from the first line to the last
    assert row["window_images"] == 6 * 8 + 1 and 0.1 < row["window_s"] < 5
    missing = mod.measure_peer(tmp_path / "nope.py", data, args, mod.torch.device("cpu"), tmp_path, lambda msg: None)
    assert "not found" in missing["error"]
