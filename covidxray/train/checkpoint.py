"""Checkpoints: one ``torch.save`` of a dict of state_dicts plus the whole run state.

Format (``format_version`` 1)::

    {"format": "covidxray-checkpoint", "format_version": 1, "covidxray_version": str,
     "model": str, "config": dict, "epoch": int, "batch_in_epoch": int, "perm": Tensor | None,
     "step": int, "images_seen": int, "n_images": int, "classes": [str],
     "models": {"G": state_dict, "D": state_dict, ...}, "optimizers": {...},
     "rng": {...}, "fixed_z": Tensor, "best_metric": float | None}

Writes go to a temporary file that is renamed, so ``last.pt`` is always whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from covidxray import __version__
from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

FORMAT = "covidxray-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (format keys are added) to ``path``."""
    path = Path(path)
    blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "covidxray_version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Accept a checkpoint file or a run folder (then ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "checkpoints" / "last.pt"
        if not candidate.is_file():
            raise CovidXrayError(
                f"run folder {path} has no checkpoints/last.pt",
                "Train longer (a checkpoint is written every train.checkpoint_every epochs) or pass a .pt file",
            )
        return candidate
    if not path.is_file():
        raise CovidXrayError(f"checkpoint {path} does not exist", "Pass a run folder or a .pt file from its checkpoints/")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint (file or run folder); clear errors for anything else."""
    path = resolve_checkpoint_path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code...
        raise CovidXrayError(f"{path} is not a readable covidxray checkpoint ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CovidXrayError(f"{path} is not a covidxray checkpoint (no '{FORMAT}' marker)")
    if blob.get("format_version", 0) > FORMAT_VERSION:
        raise CovidXrayError(
            f"{path} has checkpoint format {blob['format_version']}, newer than this covidxray reads ({FORMAT_VERSION})",
            "Upgrade covidxray",
        )
    blob["path"] = str(path)
    return blob
