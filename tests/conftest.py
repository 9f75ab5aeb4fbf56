"""Shared test fixtures and helpers.

* ``real_data_dir``: the real developer set (``COVIDXRAY_TEST_DATA`` or ``<repo>/../shared/data/cxr-real``),
  skipping the test with the reason when it is absent.
* ``make_image`` / ``make_tree``: tiny image files and source trees (8-64 px) under ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Fixtures of the GAN/dataset/CLI tests (demo_prepared, demo_at_size, tiny_cfg, cli).
pytest_plugins = ["tests.fixtures"]


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def find_real_data() -> Path | None:
    """The real developer set, if present: ``$COVIDXRAY_TEST_DATA`` else ``<repo>/../shared/data/cxr-real``."""
    env = os.environ.get("COVIDXRAY_TEST_DATA")
    path = Path(env).expanduser() if env else REPO.parent / "shared" / "data" / "cxr-real"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Path of the real chest X-ray set (Kaggle v4 layout); skips when absent."""
    path = find_real_data()
    if path is None:
        pytest.skip("real data absent: set COVIDXRAY_TEST_DATA or place it at ../shared/data/cxr-real")
    return path


# --------------------------------------------------------------------------------------------
# Tiny synthetic files
# --------------------------------------------------------------------------------------------


def noise_array(seed: int | str, shape: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A distinct uint8 noise image (H x W) per ``seed`` (strings are hashed stably)."""
    if isinstance(seed, str):
        seed = int.from_bytes(seed.encode("utf-8"), "little") % (2**63)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_image(path: str | os.PathLike, data: np.ndarray | Image.Image, **save_kw) -> Path:
    """Save an array (uint8/uint16, 2-D or H x W x C) or a Pillow image; the format follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = data if isinstance(data, Image.Image) else Image.fromarray(data)
    img.save(path, **save_kw)
    return path


def make_source_tree(
    root: str | os.PathLike,
    counts: dict[str, int],
    *,
    size: tuple[int, int] = (16, 16),
    subdir: str = "",
    name: Callable[[str, int], str] = lambda folder, i: f"{folder}-{i}.png",
) -> dict[str, list[Path]]:
    """Write ``counts[folder]`` distinct noise images into ``root/<folder>/<subdir>/``.

    Args:
        root: source root.
        counts: class folder name -> number of images.
        size: (width, height) of every image.
        subdir: e.g. ``"images"`` for the Kaggle v4 layout.
        name: file name of image ``i`` of ``folder``.

    Returns:
        folder -> written paths.
    """
    root = Path(root)
    written: dict[str, list[Path]] = {}
    for folder, n in counts.items():
        written[folder] = [
            write_image(root / folder / subdir / name(folder, i), noise_array(f"{folder}/{i}", (size[1], size[0])))
            for i in range(n)
        ]
    return written


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, array_or_image, **save_kw) -> path``."""
    return write_image


@pytest.fixture
def make_tree(tmp_path) -> Callable[..., Path]:
    """``make_tree(counts, root="src", **kw) -> root``: a generic tree of tiny noise PNGs in ``tmp_path``."""

    def build(counts: dict[str, int], root: str = "src", **kw) -> Path:
        path = tmp_path / root
        make_source_tree(path, counts, **kw)
        return path

    return build
