"""pix2pix (mask2xray) through the one loop: L1 + PatchGAN, validation L1, snapshots, resume."""

import json

import pytest
import torch

from covidxray.checkpoint import load_checkpoint
from covidxray.config import resolve_config
from covidxray.errors import CovidXrayError
from covidxray.train.loop import resume_run, start_run

TINY = ["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2", "train.batch_size=8", "train.log_every=2",
        "train.grid_size=4", "train.num_threads=1"]


def _records(run_dir, kind=None):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture
def p2p_cfg(demo_prepared, tmp_path):
    def make(epochs=2, extra=()):
        cfg = resolve_config("pix2pix", flags={"data": {"path": str(demo_prepared)},
                                               "train": {"epochs": epochs, "device": "cpu"}}, sets=TINY + list(extra))
        cfg.out = str(tmp_path / "runs")
        return cfg
    return make


def test_pix2pix_learns_xrays_from_masks(p2p_cfg):
    trainer, finished = start_run(p2p_cfg(epochs=6))
    assert finished
    evals = _records(trainer.run_dir, "eval")
    assert [r["epoch"] for r in evals] == list(range(1, 7))
    assert all(0 < r["val_l1"] < 1 for r in evals)
    epochs = _records(trainer.run_dir, "epoch")
    assert epochs[-1]["l1"] < 0.85 * epochs[0]["l1"]  # G's X-rays move towards the real ones
    ckpt = load_checkpoint(trainer.run_dir, resume=True)
    assert ckpt["family"] == "image2image" and ckpt["eval_metric"] == "l1" and set(ckpt["models"]) == {"G", "D"}
    assert (trainer.run_dir / "samples" / "epoch_0006.png").is_file()
    # the phantoms' three classes join the mask as class maps (G's and D's condition: 1 + 3 channels)
    assert trainer.task.n_class_maps == 3 and trainer.task.G.in_channels == 4
    # sampling keeps the paper's dropout noise on: two translations of the same masks differ
    masks, labels = trainer.data.masks[:2], trainer.data.labels[:2]
    a, b = trainer.task.translate(masks, labels), trainer.task.translate(masks, labels)
    assert a.shape == (2, 1, 64, 64) and a.dtype == torch.uint8 and not torch.equal(a, b)
    with pytest.raises(ValueError, match="labels"):
        trainer.task.translate(masks)


def test_class_maps_are_the_condition_the_loop_feeds(p2p_cfg, monkeypatch):
    """The loop hands pix2pix the batch's masks and labels; G sees the mask plus one +-1 map per class."""
    from covidxray.models import pix2pix

    trainer, _ = start_run(p2p_cfg(epochs=1))
    seen = []
    real = pix2pix.condition

    def spy(masks, labels=None, n_classes=0):
        c = real(masks, labels, n_classes)
        seen.append((masks.clone(), None if labels is None else labels.clone(), c))
        return c

    monkeypatch.setattr("covidxray.train.tasks.image2image.condition", spy)
    x, m, y = trainer.data.images[:8], trainer.data.masks[:8], trainer.data.labels[:8]
    trainer.train_step(x, m, y)
    masks, labels, c = seen[0]
    assert torch.equal(labels, y) and c.shape == (8, 4, 64, 64)
    assert torch.equal(c[:, 1:].amax((2, 3)).argmax(1), y)          # the +1 map is the image's class
    assert torch.equal(c[:, 1:].amin((2, 3)), c[:, 1:].amax((2, 3)))  # constant maps
    assert set(c[:, 0].unique().tolist()) <= {-1.0, 1.0}              # the (warped) 0/1 mask in [-1, 1]
    # the class changes what G draws from the same mask (and the same dropout noise)
    G = trainer.task.G.eval()
    with torch.no_grad():
        outs = [G(real(m[:1], torch.tensor([k]), 3)) for k in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_without_class_maps_the_condition_is_the_mask_alone(p2p_cfg):
    trainer, _ = start_run(p2p_cfg(epochs=1, extra=["model.class_maps=false"]))
    assert trainer.task.n_class_maps == 0 and trainer.task.G.in_channels == 1
    out = trainer.task.translate(trainer.data.masks[:2])
    assert out.shape == (2, 1, 64, 64)


@pytest.mark.parametrize("stop_at", [3, 7])
def test_pix2pix_resume_equals_uninterrupted(p2p_cfg, stop_at):
    ref, _ = start_run(p2p_cfg(epochs=2))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(p2p_cfg(epochs=2), on_step=stop)
    assert not finished
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step
    for name in ("G", "D"):
        for key, value in ref.task.models[name].state_dict().items():
            assert torch.equal(value, resumed.task.models[name].state_dict()[key]), (name, key)
    assert _records(ref.run_dir) == _records(part.run_dir)


def test_bad_pix2pix_settings(p2p_cfg):
    with pytest.raises(CovidXrayError, match="model.task"):
        p2p_cfg(extra=["model.task=inpaint"])
    with pytest.raises(CovidXrayError, match="arch.dropout"):
        p2p_cfg(extra=["arch.dropout=1.0"])
    with pytest.raises(CovidXrayError, match="data.image_size"):
        p2p_cfg(extra=["data.image_size=96"])


def test_sample_from_data_writes_paired_synthetic_data_that_a_unet_trains_on(p2p_cfg, demo_prepared, tmp_path):
    from typer.testing import CliRunner

    from covidxray.cli import app
    from covidxray.data.datasets import load_tensor_data, read_prepared_info

    run, _ = start_run(p2p_cfg(epochs=1))
    out = tmp_path / "pairs"
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(out), "--from-data", str(demo_prepared), "--deform",
                                 "--copies", "2", "--seed", "3"])
    assert r.exit_code == 0, r.output
    info = read_prepared_info(out)
    assert info["synthetic"] and info["layout"] == "pix2pix-pairs" and info["generator"]["model"] == "pix2pix"
    real = load_tensor_data(demo_prepared, "train", masks=True)
    syn = load_tensor_data(out, "train", masks=True)
    assert len(syn) == 2 * len(real) and syn.classes == real.classes
    assert set(syn.masks.unique().tolist()) == {0, 1}
    assert len(load_tensor_data(out, "test", masks=True)) == len(load_tensor_data(demo_prepared, "test", masks=True))
    rows = (out / "manifest.csv").read_text().splitlines()
    assert all(line.endswith(",1") for line in rows[1:] if line.startswith("train,"))  # synthetic=1
    # the segmenter reads it as it is (and is validated on the copied real val split)
    cfg = resolve_config("unet", flags={"data": {"path": str(out)}, "train": {"epochs": 1, "device": "cpu"}},
                         sets=["arch.width=8", "arch.depth=3", "train.batch_size=8", "train.num_threads=1"])
    cfg.out = str(tmp_path / "seg")
    seg, finished = start_run(cfg)
    assert finished and len(seg.data) == len(syn)
    # --mix adds the real training pairs
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "mixed"), "--from-data", str(demo_prepared),
                                 "--mix"])
    assert r.exit_code == 0, r.output
    assert len(load_tensor_data(tmp_path / "mixed", "train", masks=True)) == 2 * len(real)
    # --class draws every mask's X-ray as that class (here: all of them as the first class)
    first = real.classes[0]
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "as1"), "--from-data", str(demo_prepared),
                                 "--class", first])
    assert r.exit_code == 0, r.output
    as1 = load_tensor_data(tmp_path / "as1", "train", masks=True)
    assert len(as1) == len(real) and {as1.classes[int(k)] for k in as1.labels} == {first}
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "bad"), "--from-data", str(demo_prepared),
                                 "--class", "martian"])
    assert r.exit_code == 2 and "not a class" in r.output and not (tmp_path / "bad").exists()
    # pix2pix has no latent to sample; an existing OUT is kept unless --overwrite
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "x"), "-n", "2"])
    assert r.exit_code == 2 and "--from-data" in r.output
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(out), "--from-data", str(demo_prepared)])
    assert r.exit_code == 2 and "already holds synthetic pairs" in r.output


def test_deformed_masks_stay_binary_with_about_the_same_area(demo_prepared):
    from covidxray.data.datasets import load_tensor_data
    from covidxray.data.transforms import deform_masks

    m = load_tensor_data(demo_prepared, "train", masks=True).masks[:16]
    d = deform_masks(m, torch.Generator().manual_seed(0))
    assert d.shape == m.shape and d.dtype == torch.uint8 and set(d.unique().tolist()) <= {0, 1}
    ratio = d.flatten(1).sum(1).float() / m.flatten(1).sum(1).float()
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio
    assert not torch.equal(d, m)


def test_sample_from_a_mask_folder_says_what_it_changed(p2p_cfg, demo_prepared, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from covidxray.cli import app
    from covidxray.data.datasets import load_tensor_data

    run, _ = start_run(p2p_cfg(epochs=1))
    folder = tmp_path / "masks"
    folder.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[10:50, 8:28] = 200
    mask[10:50, 36:56] = 255  # not binary
    Image.fromarray(mask).save(folder / "a.png")
    Image.fromarray(mask).resize((100, 100)).save(folder / "b.png")  # another size
    (folder / "c.png").write_bytes(b"nope")
    out = tmp_path / "pairs"
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(out), "--masks", str(folder)])
    assert r.exit_code == 0, r.output
    assert "thresholded" in r.output and "resized" in r.output and "c.png" in r.output
    # a class-conditional G draws every mask once per class by default ...
    syn = load_tensor_data(out, "train", masks=True)
    assert len(syn) == 6 and syn.classes == run.data.classes
    assert torch.bincount(syn.labels).tolist() == [2, 2, 2]
    # ... or as one chosen class
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "one"), "--masks", str(folder),
                                 "--class", run.data.classes[1]])
    assert r.exit_code == 0, r.output
    one = load_tensor_data(tmp_path / "one", "train", masks=True)
    assert one.classes == [run.data.classes[1]] and len(one) == 2
    # an unconditional run writes them as class "synthetic", and refuses --class
    plain, _ = start_run(p2p_cfg(epochs=1, extra=["model.class_maps=false"]))
    r = CliRunner().invoke(app, ["sample", str(plain.run_dir), str(tmp_path / "plain"), "--masks", str(folder)])
    assert r.exit_code == 0, r.output
    assert load_tensor_data(tmp_path / "plain", "train", masks=True).classes == ["synthetic"]
    r = CliRunner().invoke(app, ["sample", str(plain.run_dir), str(tmp_path / "p2"), "--masks", str(folder),
                                 "--class", "covid"])
    assert r.exit_code == 2 and "not class-conditional" in r.output


def test_evaluate_a_pix2pix_run_with_its_mask_consistency(p2p_cfg, demo_prepared, tmp_path, unverified):
    from typer.testing import CliRunner

    from covidxray.cli import app
    from tests.fixtures import train_tiny_unet

    run, _ = start_run(p2p_cfg(epochs=1))
    unet = train_tiny_unet(demo_prepared, tmp_path / "seg")
    out = tmp_path / "ev"
    r = CliRunner().invoke(app, ["evaluate", str(run.run_dir), "--data", str(demo_prepared), "-n", "12", "--repeats", "2",
                                 "--metrics", "fid,kid", "--segmenter", str(unet), "-o", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "pix2pix" and m["n"] == 12 and "fd_unverified" in m["metrics"]
    mc = m["mask_consistency"]
    assert mc["n"] == 12 and 0 <= mc["dice"]["mean"] <= 1 and mc["model"] == "unet"
    assert "Mask consistency" in (out / "report.md").read_text()
    # two draws with other seeds differ (new masks and new dropout noise)
    from covidxray.evaluate.sources import MaskSource
    from covidxray.infer.protocol import load
    src = MaskSource(load(run.run_dir))
    assert src.conditional and src.classes == run.data.classes  # class maps: a labelled source
    cpu = torch.device("cpu")
    a, ya = src.draw([2, 1, 1], 0, cpu)
    b, _ = src.draw([2, 1, 1], 0, cpu)
    c, _ = src.draw([2, 1, 1], 1, cpu)
    assert torch.equal(a, b) and not torch.equal(a, c) and ya.tolist() == [0, 0, 1, 2]
    # the masks of class k come from class-k training images
    own = [set(torch.nonzero(run.data.labels == k).flatten().tolist()) for k in range(3)]
    assert all(set(pool.tolist()) <= own[k] for k, pool in enumerate(src.pools))
    # --downstream: GAN-test on its labelled draws; arms (b)/(c) train on a pool of its X-rays drawn once from masks
    out2 = tmp_path / "ev-down"
    r = CliRunner().invoke(app, ["evaluate", str(run.run_dir), "--data", str(demo_prepared), "-n", "12", "--repeats",
                                 "1", "--metrics", "fid", "--downstream", "--classifier", "smallcnn", "--seeds", "1",
                                 "--epochs", "1", "--set", "train.num_threads=1", "-o", str(out2), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    down = json.loads((out2 / "metrics.json").read_text())["downstream"]
    assert list(down["arms"]) == ["real", "real+synthetic", "synthetic"] and down["gan_test"]["n"] > 0
    pool = down["synthetic"]  # as many as the real training split (all its images, masked or not)
    assert pool["drawn"] == "once, a pool" and pool["n"] == sum(pool["per_class"].values()) >= len(run.data)
    r = CliRunner().invoke(app, ["evaluate", "--compare", str(out2), "-o", str(tmp_path / "cmp.md")])
    assert r.exit_code == 0, r.output
    row = next(ln for ln in (tmp_path / "cmp.md").read_text().splitlines() if ln.startswith("| pix2pix"))
    assert "n/a" not in row and row.rstrip(" |").split("|")[-1].strip().startswith(("+", "-"))  # a Δ (1 seed)


def test_colorize_target_known_answer():
    from covidxray.train.tasks.image2image import BODY_RGB, LUNG_RGB, colorize_target

    x = torch.tensor([[[[1.0, 0.0, -1.0]]]])  # gray 1.0, 0.5, 0.0 in [0, 1]
    m = torch.tensor([[[[1, 0, 0]]]], dtype=torch.uint8)
    t = (colorize_target(x, m) + 1) / 2  # lung at full gray; body at half gray; background black
    assert t[0, :, 0, 0].tolist() == pytest.approx(list(LUNG_RGB))
    assert t[0, :, 0, 1].tolist() == pytest.approx([0.5 * c for c in BODY_RGB])
    assert t[0, :, 0, 2].tolist() == pytest.approx([0.0, 0.0, 0.0])


def test_colorize_trains_and_renders_a_folder(p2p_cfg, demo_prepared, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from covidxray.cli import app

    run, finished = start_run(p2p_cfg(epochs=1, extra=["model.task=colorize"]))
    assert finished and run.task.G(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)
    with Image.open(run.run_dir / "samples" / "epoch_0001.png") as im:
        assert im.mode == "RGB"
    src = tmp_path / "xrays"
    src.mkdir()
    rows = [r for r in (demo_prepared / "manifest.csv").read_text().splitlines()[1:] if r.startswith("test,")][:2]
    for i, r in enumerate(rows):
        Image.open(demo_prepared / r.split(",")[2]).resize((90, 70)).save(src / f"x{i}.png")
    (src / "bad.png").write_bytes(b"nope")
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "col"), "--images", str(src)])
    assert r.exit_code == 0, r.output
    assert "wrote 2 pseudo-colour renderings" in r.output and "bad.png" in r.output
    with Image.open(tmp_path / "col" / "x0.png") as im:
        assert im.mode == "RGB" and im.size == (64, 64) and np.asarray(im).std() > 0
    # a colorize run makes no X-rays: no pairs, no generator evaluation
    r = CliRunner().invoke(app, ["sample", str(run.run_dir), str(tmp_path / "p"), "--from-data", str(demo_prepared)])
    assert r.exit_code == 2 and "needs a mask -> X-ray model" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(run.run_dir), "--data", str(demo_prepared)])
    assert r.exit_code == 2 and "pseudo-colour" in r.output
