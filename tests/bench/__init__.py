"""Tests of the scripts in bench/ (tiny CPU runs); :func:`load_bench` imports one of them as a module."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_bench(script: str, name: str | None = None):
    """``bench/<script>.py`` as a module (bench/ is not a package), registered as ``name`` (default: the script)."""
    spec = importlib.util.spec_from_file_location(name or script, ROOT / "bench" / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
