"""The segmentation family through the one loop: masks beside the images, paired augmentation, learning on
the phantoms, resume, bad data."""

import csv
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from covidxray.checkpoint import load_checkpoint
from covidxray.cli import app
from covidxray.config import resolve_config
from covidxray.data.datasets import load_tensor_data
from covidxray.errors import CovidXrayError
from covidxray.data.transforms import augment_pair
from covidxray.train.loop import resume_run, start_run
from covidxray.train.tasks.segmentation import hard_scores, soft_dice_loss

from tests.fixtures import TINY_UNET_SETS


def _records(run_dir, kind=None):
    recs = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in recs if kind is None or r["kind"] == kind]


@pytest.fixture
def seg_cfg(demo_prepared, tmp_path):
    def make(epochs=2, extra=(), model="unet", data=None):
        cfg = resolve_config(model, flags={"data": {"path": str(data or demo_prepared)},
                                           "train": {"epochs": epochs, "device": "cpu"}},
                             sets=TINY_UNET_SETS + list(extra))
        cfg.out = str(tmp_path / "runs")
        return cfg
    return make


def _drop_masks(src, dst, keep_every: int):
    """Copy a prepared folder, keeping the mask of every ``keep_every``-th image only (0: none)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    path = dst / "manifest.csv"
    rows = list(csv.DictReader(path.open()))
    for i, row in enumerate(rows):
        if keep_every == 0 or i % keep_every:
            row["mask"] = ""
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return dst


def test_paired_augmentation_keeps_a_shape_aligned_with_its_mask():
    # A bright rectangle and its mask: after one shared warp (rotation, zoom, shift, elastic) the mask is
    # still exactly where the image is bright.
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(8, 1, 64, 64)
    x[:, :, 16:40, 20:48] = 1.0
    m = (x > 0).to(torch.uint8)
    xa, ma = augment_pair(x, m, g, rotate=20, scale=0.15, translate=0.1, elastic=0.02)
    assert ma.shape == m.shape and set(ma.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(ma, m.float())  # it did move
    dice, _ = hard_scores(xa > 0, ma)
    assert dice.min() > 0.97
    # jitter changes the image only
    xb, mb = augment_pair(x, m, g, brightness=0.2, contrast=0.2)
    assert torch.equal(mb, m.float()) and not torch.equal(xb, x)


def test_hard_scores_and_soft_dice_known_answers():
    t = torch.zeros(3, 1, 4, 4, dtype=torch.bool)
    t[0, 0, :2] = True          # 8 pixels
    t[1, 0, 0, 0] = True        # one pixel
    p = torch.zeros_like(t)
    p[0, 0, :1] = True          # 4 of them
    dice, iou = hard_scores(p, t)
    assert dice.tolist() == pytest.approx([2 * 4 / 12, 0.0, 1.0])  # one empty: 0; both empty: 1
    assert iou.tolist() == pytest.approx([0.5, 0.0, 1.0])
    logits = torch.where(t, 20.0, -20.0).float()
    assert float(soft_dice_loss(logits, t.float())) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(-logits, t.float())) > 0.6


def test_masks_are_loaded_beside_the_images_and_unmasked_images_left_out(demo_prepared, tmp_path):
    full = load_tensor_data(demo_prepared, "train", masks=True)
    assert full.masks.shape == full.images.shape and full.masks.dtype == torch.uint8
    assert set(full.masks.unique().tolist()) == {0, 1}
    part = _drop_masks(demo_prepared, tmp_path / "part", keep_every=2)
    notes = []
    data = load_tensor_data(part, "train", masks=True, log=notes.append)
    assert len(data) == (len(full) + 1) // 2 or len(data) < len(full)
    assert any("have no lung mask and are left out" in n for n in notes)
    again = load_tensor_data(part, "train", masks=True)  # from the cache, same tensors
    assert torch.equal(again.masks, data.masks) and again.ids == data.ids
    plain = load_tensor_data(part, "train")  # the classifiers' cache is another file
    assert plain.masks is None and len(plain) == len(full)


def test_a_run_learns_the_lungs_of_the_phantoms_well_above_both_baselines(seg_cfg, demo_prepared):
    trainer, finished = start_run(seg_cfg(epochs=8))
    assert finished
    run = trainer.run_dir
    evals = _records(run, "eval")
    assert [r["epoch"] for r in evals] == list(range(1, 9))
    val = load_tensor_data(demo_prepared, "val", masks=True)
    f = val.masks.float().flatten(1).mean(1)
    all_lung = float((2 * f / (1 + f)).mean())  # Dice of predicting lung everywhere; no lung scores 0
    best = max(r["val_dice"] for r in evals)
    assert best > all_lung + 0.25 and best > 0.7, (best, all_lung)
    ckpt = load_checkpoint(run, resume=True)
    assert ckpt["family"] == "segmentation" and ckpt["eval_metric"] == "dice" and ckpt["fit"] == "stretch"
    assert ckpt["best_metric"] == pytest.approx(best, abs=1e-4)
    for r in evals:
        assert 0 <= r["val_iou"] <= r["val_dice"] <= 1
    assert (run / "samples" / "epoch_0008.png").is_file()  # outlines of validation images, for `gif`


@pytest.mark.parametrize("stop_at", [3, 5])  # mid-epoch, and at the epoch boundary (5 steps per epoch)
def test_segmentation_resume_equals_uninterrupted(seg_cfg, stop_at):
    extra = ["aug.elastic=0.01"]
    ref, _ = start_run(seg_cfg(epochs=2, extra=extra))

    def stop(trainer):
        if trainer.step == stop_at:
            trainer.request_stop()

    part, finished = start_run(seg_cfg(epochs=2, extra=extra), on_step=stop)
    assert not finished and load_checkpoint(part.run_dir, resume=True)["step"] == stop_at
    resumed, finished = resume_run(part.run_dir)
    assert finished and resumed.step == ref.step
    for key, value in ref.task.net.state_dict().items():
        assert torch.equal(value, resumed.task.net.state_dict()[key]), key
    assert _records(ref.run_dir) == _records(part.run_dir)


def test_attention_unet_and_group_norm_transpose_variants_train(seg_cfg):
    trainer, finished = start_run(seg_cfg(epochs=1, model="attention_unet",
                                          extra=["arch.norm=group", "arch.upsample=transpose"]))
    assert finished and trainer.task.net.gates is not None
    assert any(isinstance(m, torch.nn.GroupNorm) for m in trainer.task.net.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in trainer.task.net.modules())


def test_data_are_resized_on_the_device_with_their_masks(seg_cfg):
    trainer, finished = start_run(seg_cfg(epochs=1, extra=["data.image_size=96", "arch.depth=2"]))
    assert finished
    assert trainer.data.images.shape[-1] == 96 and trainer.data.masks.shape[-1] == 96
    assert set(trainer.data.masks.unique().tolist()) == {0, 1}
    assert load_checkpoint(trainer.run_dir, resume=True)["image_size"] == 96


def test_bad_settings_and_data_for_a_segmenter(seg_cfg, demo_prepared, tmp_path):
    with pytest.raises(CovidXrayError, match="multiple of 2\\*\\*arch.depth = 8"):
        seg_cfg(extra=["data.image_size=100"])
    with pytest.raises(CovidXrayError, match="loss.dice_weight"):
        seg_cfg(extra=["loss.dice_weight=0", "loss.bce_weight=0"])
    with pytest.raises(CovidXrayError, match="eval.threshold"):
        seg_cfg(extra=["eval.threshold=1.5"])
    with pytest.raises(CovidXrayError, match="multiple of 128 .* Pass --image-size 128"):  # 64 px data
        start_run(seg_cfg(extra=["arch.depth=7"]))


def test_train_without_any_mask_is_one_line_and_exit_2(demo_prepared, tmp_path):
    bare = _drop_masks(demo_prepared, tmp_path / "bare", keep_every=0)
    res = CliRunner().invoke(app, ["train", "--model", "unet", "--data", str(bare), "--epochs", "1",
                                   "--out", str(tmp_path / "runs"), "--set", "arch.width=8"])
    assert res.exit_code == 2
    assert "has a lung mask" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_evaluate_a_unet_run_on_prepared_masks(seg_cfg, demo_prepared, tmp_path):
    trainer, _ = start_run(seg_cfg(epochs=3))
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["evaluate", str(trainer.run_dir), "--data", str(demo_prepared), "--split", "test",
                                   "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    test = load_tensor_data(demo_prepared, "test", masks=True)
    assert m["kind"] == "segmentation" and m["n"] == len(test)
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert len(rows) == len(test) and {r["class"] for r in rows} == set(test.classes)
    dice = [float(r["dice"]) for r in rows]
    assert m["summary"]["dice"]["mean"] == pytest.approx(sum(dice) / len(dice), abs=1e-4)
    assert set(m["per_class"]) == set(test.classes)
    assert (out / "worst.png").is_file() and "Dice" in (out / "report.md").read_text()
    assert m["overlap_with_training"]["checked"] and m["overlap_with_training"]["same_pixels"] == 0
    # the same scores from the library without post-processing are computed on the raw threshold
    from covidxray.evaluate.segmentation import evaluate_segmenter
    raw = evaluate_segmenter(trainer.run_dir, demo_prepared, "test", out=tmp_path / "raw", device="cpu",
                             postprocess=False)
    assert raw["postprocess"] == "none" and raw["n"] == m["n"]
    # --compare tabulates segmenter outputs too
    r = CliRunner().invoke(app, ["evaluate", "--compare", str(out), str(tmp_path / "raw")])
    assert r.exit_code == 0, r.output
    assert "| segmenter |" in r.output and f"{m['summary']['dice']['mean']:.4f}" in r.output


def test_evaluate_segmenter_refuses_bad_requests(seg_cfg, demo_prepared, tmp_path):
    trainer, _ = start_run(seg_cfg(epochs=1))
    run = CliRunner().invoke
    r = run(app, ["evaluate", str(trainer.run_dir), "--images", str(tmp_path)])
    assert r.exit_code == 2 and "--images and --masks go together" in r.output
    r = run(app, ["evaluate", str(trainer.run_dir), "--data", str(demo_prepared), "--threshold", "1.5"])
    assert r.exit_code == 2 and "--threshold" in r.output
    assert "Traceback" not in r.output


def test_evaluate_a_unet_run_against_a_mask_folder(seg_cfg, demo_prepared, tmp_path):
    from PIL import Image

    trainer, _ = start_run(seg_cfg(epochs=2))
    images, masks = tmp_path / "images", tmp_path / "masks"
    (images / "sub").mkdir(parents=True)
    masks.mkdir()
    (masks / "sub").mkdir()
    rows = [r for r in csv.DictReader((demo_prepared / "manifest.csv").open()) if r["split"] == "test"][:4]
    for i, r in enumerate(rows):
        sub = "sub/" if i == 0 else ""
        Image.open(demo_prepared / r["file"]).save(images / f"{sub}x{i}.png")
        m = Image.open(demo_prepared / r["mask"])
        if i == 1:  # a mask at another size is resized to its image (nearest neighbour)
            m = m.resize((128, 128), Image.Resampling.NEAREST)
        m.save(masks / f"{sub}x{i}_mask.png")
    Image.open(demo_prepared / rows[0]["file"]).save(images / "alone.png")   # no mask
    Image.open(demo_prepared / rows[0]["mask"]).save(masks / "orphan.png")   # no image
    (images / "broken.png").write_bytes(b"not a png")
    (masks / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "ev"
    res = CliRunner().invoke(app, ["evaluate", str(trainer.run_dir), "--images", str(images), "--masks", str(masks),
                                   "-o", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4 and m["unpaired_images"] == ["alone.png"] and m["unpaired_masks"] == ["orphan.png"]
    assert [u[0] for u in m["unreadable"]] == ["broken.png"]
    per = list(csv.DictReader((out / "per_image.csv").open()))
    assert sorted(r["file"] for r in per) == ["sub/x0.png", "x1.png", "x2.png", "x3.png"]
    assert all(r["width"] == "64" for r in per)
    assert "alone.png" in res.output and "broken.png" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_segmentation_steps_equal_eager_steps(seg_cfg, tmp_path):
    from covidxray.train.loop import Trainer

    def make(extra):
        cfg = seg_cfg(epochs=2, extra=["train.amp=off", "train.deterministic=true", "aug.elastic=0.01", *extra])
        cfg.train.device = "cuda"
        return cfg

    a = Trainer(make([]), tmp_path / "graphs")
    b = Trainer(make(["train.cuda_graphs=no"]), tmp_path / "eager")
    assert a.graphs is not None and b.graphs is None
    n = a.batch_size
    for step in range(8):
        idx = torch.arange(step * 3, step * 3 + n) % len(a.data)
        x, m = a.data.images[idx], a.data.masks[idx]
        sa, sb = a.train_step(x, m), b.train_step(x, m)
        for t in (a, b):
            t.state.step += 1
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5, msg=f"step {step}: {key}")
    assert not a.graphs.failed and a.graphs.graphs
    for (name, pa), pb in zip(a.task.net.state_dict().items(), b.task.net.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4, msg=name)
    assert torch.equal(a.task.aug_gen.get_state(), b.task.aug_gen.get_state())


def test_evaluate_refuses_options_of_other_kinds_of_model(seg_cfg, demo_prepared):
    trainer, _ = start_run(seg_cfg(epochs=1))
    r = CliRunner().invoke(app, ["evaluate", str(trainer.run_dir), "--data", str(demo_prepared), "--downstream"])
    assert r.exit_code == 2 and "--downstream do(es) not apply to the segmentation model" in r.output
