import json
import shutil

import pytest
import torch

from covidxray.data.datasets import PreparedDataset, load_tensor_data, to_float, to_uint8
from covidxray.errors import CovidXrayError


def test_items_are_dicts_with_masks(demo_prepared):
    ds = PreparedDataset(demo_prepared, "train")
    assert ds.classes == ["covid", "normal", "viral_pneumonia"]
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 64, 64)
    assert item["mask"].shape == (1, 64, 64)
    assert set(item["mask"].unique().tolist()) <= {0, 255}
    assert item["class"] == ds.classes[item["label"]]
    assert isinstance(item["id"], str) and item["id"]
    f = PreparedDataset(demo_prepared, "train", as_float=True)[0]["image"]
    assert f.dtype == torch.float32 and -1 <= f.min() and f.max() <= 1


def test_paired_transform_moves_image_and_mask_together(demo_prepared):
    from torchvision.transforms import v2

    plain = PreparedDataset(demo_prepared, "train")[0]
    flipped = PreparedDataset(demo_prepared, "train", transform=v2.RandomHorizontalFlip(p=1.0))[0]
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.equal(flipped["mask"], plain["mask"].flip(-1))


def test_tensor_cache_is_used_and_invalidated(demo_prepared, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(demo_prepared, root, ignore=shutil.ignore_patterns(".cache"))
    notes = []
    first = load_tensor_data(root, "train", log=notes.append)
    assert first.images.dtype == torch.uint8 and first.images.shape[1:] == (1, 64, 64)
    assert "cached in" in notes[-1]
    again = load_tensor_data(root, "train", log=notes.append)
    assert "from cache" in notes[-1]
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    # Changing an image invalidates the cache.
    ds = PreparedDataset(root, "train")
    target = root / ds.records[0].file
    from PIL import Image

    Image.new("L", (64, 64), 7).save(target)
    changed = load_tensor_data(root, "train", log=notes.append)
    assert "cached in" in notes[-1]
    assert (changed.images == 7).all(dim=(1, 2, 3)).sum() == 1


def test_tensor_data_matches_the_dataset(demo_prepared):
    data = load_tensor_data(demo_prepared, "val", classes=["covid", "normal"], cache=False)
    ds = PreparedDataset(demo_prepared, "val", classes=["covid", "normal"])
    assert len(data) == len(ds) and data.classes == ["covid", "normal"]
    for i in (0, len(ds) - 1):
        assert torch.equal(data.images[i], ds[i]["image"]) and data.labels[i] == ds[i]["label"]


def test_float_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).min() == -1 and to_float(x).max() == 1


def test_clear_errors(demo_prepared, tmp_path):
    with pytest.raises(CovidXrayError, match="does not exist"):
        PreparedDataset(tmp_path / "missing")
    (tmp_path / "raw").mkdir()
    with pytest.raises(CovidXrayError, match="not a prepared data folder"):
        PreparedDataset(tmp_path / "raw")
    with pytest.raises(CovidXrayError, match="prepared at 64 px but 128 px"):
        load_tensor_data(demo_prepared, image_size=128)
    with pytest.raises(CovidXrayError, match="not in"):
        PreparedDataset(demo_prepared, classes=["lung_opacity"])
    broken = tmp_path / "broken"
    shutil.copytree(demo_prepared, broken)
    info = json.loads((broken / "prepare.json").read_text())
    info["complete"] = False
    (broken / "prepare.json").write_text(json.dumps(info))
    with pytest.raises(CovidXrayError, match="incomplete"):
        PreparedDataset(broken)
