"""Layout detection: Kaggle v2/v3, Kaggle v4 (+ parent folder), generic, and the error cases."""

from __future__ import annotations

import pytest

from covidxray.data.layouts import canonical_class_name, detect_layout
from covidxray.errors import CovidXrayError
from tests.conftest import make_source_tree, noise_array, write_image


def test_kaggle_v2v3_with_metadata_beside(tmp_path):
    src = tmp_path / "COVID-19 Radiography Database"
    make_source_tree(src, {"COVID-19": 3, "NORMAL": 2, "Viral Pneumonia": 2},
                     name=lambda folder, i: f"{folder} ({i + 1}).png")
    (src / "COVID-19.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    (src / "NORMAL.metadata.csv").write_text("FILE NAME,FORMAT,SIZE,URL\nNORMAL (1),PNG,256*256,x\n")
    (src / "README.md.txt").write_text("readme")

    layout = detect_layout(src)

    assert layout.name == "kaggle-v2v3"
    assert list(layout.classes) == ["covid", "normal", "viral_pneumonia"]
    assert layout.classes["covid"].images == tuple(f"COVID-19/COVID-19 ({i}).png" for i in (1, 2, 3))
    assert layout.classes["covid"].folder == "COVID-19"
    assert layout.metadata == ("COVID-19.metadata.xlsx", "NORMAL.metadata.csv")
    assert layout.ignored == ("README.md.txt",)


def test_kaggle_v3_names_covid_normal(tmp_path):
    make_source_tree(tmp_path, {"COVID": 2, "Normal": 2, "Viral Pneumonia": 1})
    layout = detect_layout(tmp_path)
    assert layout.name == "kaggle-v2v3"
    assert sorted(layout.classes) == ["covid", "normal", "viral_pneumonia"]


def _v4_tree(root):
    """A v4-like tree: images 30x30 ("299"), masks 26x26 ("256", RGB) for some images."""
    make_source_tree(root, {"COVID": 3, "Normal": 2, "Viral Pneumonia": 2, "Lung_Opacity": 2},
                     size=(30, 30), subdir="images")
    for folder, n in (("COVID", 2), ("Viral Pneumonia", 2)):
        for i in range(n):
            mask = noise_array(f"m{folder}{i}", (26, 26, 3)) > 127
            write_image(root / folder / "masks" / f"{folder}-{i}.png", (mask * 255).astype("uint8"))
    write_image(root / "COVID" / "masks" / "COVID-99.png", noise_array("orphan", (26, 26)))
    (root / "COVID.metadata.xlsx").write_bytes(b"xlsx")
    return root


def test_kaggle_v4_pairs_masks_by_name(tmp_path):
    layout = detect_layout(_v4_tree(tmp_path / "COVID-19_Radiography_Dataset"))

    assert layout.name == "kaggle-v4"
    assert sorted(layout.classes) == ["covid", "lung_opacity", "normal", "viral_pneumonia"]
    covid = layout.classes["covid"]
    assert covid.images == ("COVID/images/COVID-0.png", "COVID/images/COVID-1.png", "COVID/images/COVID-2.png")
    assert covid.masks == {
        "COVID/images/COVID-0.png": "COVID/masks/COVID-0.png",
        "COVID/images/COVID-1.png": "COVID/masks/COVID-1.png",
    }
    assert covid.orphan_masks == ("COVID/masks/COVID-99.png",)
    assert layout.classes["normal"].masks == {}
    assert layout.metadata == ("COVID.metadata.xlsx",)


def test_kaggle_v4_parent_folder(tmp_path):
    _v4_tree(tmp_path / "archive" / "COVID-19_Radiography_Dataset")
    layout = detect_layout(tmp_path / "archive")
    assert layout.name == "kaggle-v4"
    assert layout.root == (tmp_path / "archive" / "COVID-19_Radiography_Dataset").resolve()
    assert "Kaggle" in layout.description and "COVID-19_Radiography_Dataset/" in layout.description
    # Paths stay relative to the folder the user gave.
    assert layout.classes["covid"].images[0] == "COVID-19_Radiography_Dataset/COVID/images/COVID-0.png"


def test_generic_layout_normalises_names_and_counts_ignored(tmp_path):
    make_source_tree(tmp_path, {"Class A": 2, "tb-positive": 1})
    write_image(tmp_path / "Class A" / "nested" / "deep.jpg", noise_array(1), quality=95)
    (tmp_path / "Class A" / "notes.txt").write_text("x")
    (tmp_path / "Class A" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / ".hidden" / "x.png", noise_array(2))

    layout = detect_layout(tmp_path)

    assert layout.name == "generic"
    assert list(layout.classes) == ["class_a", "tb_positive"]
    assert "Class A/nested/deep.jpg" in layout.classes["class_a"].images
    assert layout.ignored == ("Class A/.DS_Store", "Class A/notes.txt")


def test_lowercase_folders_are_generic(tmp_path):
    make_source_tree(tmp_path, {"covid": 1, "normal": 1})
    layout = detect_layout(tmp_path)
    assert layout.name == "generic" and list(layout.classes) == ["covid", "normal"]


def test_extension_case_and_all_formats(tmp_path):
    for i, ext in enumerate((".PNG", ".jpg", ".JPEG", ".bmp", ".tif", ".TIFF")):
        write_image(tmp_path / "a" / f"x{i}{ext}", noise_array(i))
    assert len(detect_layout(tmp_path).classes["a"].images) == 6


def test_exclude_skips_output_inside_source(tmp_path):
    make_source_tree(tmp_path, {"covid": 1, "prepared": 1})
    assert list(detect_layout(tmp_path, exclude=tmp_path / "prepared").classes) == ["covid"]


def test_canonical_names():
    assert canonical_class_name("COVID-19") == "covid"
    assert canonical_class_name("Viral Pneumonia") == "viral_pneumonia"
    assert canonical_class_name("Lung_Opacity") == "lung_opacity"
    assert canonical_class_name("Some-Thing Else") == "some_thing_else"


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a folder"),
    ("empty", "found 0 images"),
    ("loose", "no class folders"),
    ("no_images", "found 0 images"),
    ("clash", "both map to class"),
])
def test_unrecognisable_sources(tmp_path, case, message):
    src = tmp_path / "src"
    if case == "file":
        src.write_text("x")
    elif case == "empty":
        src.mkdir()
    elif case == "loose":
        write_image(src / "a.png", noise_array(0))
    elif case == "no_images":
        (src / "covid").mkdir(parents=True)
        (src / "covid" / "readme.txt").write_text("x")
    elif case == "clash":
        make_source_tree(src, {"COVID": 1, "COVID-19": 1})
    with pytest.raises(CovidXrayError, match=message):
        detect_layout(src)
