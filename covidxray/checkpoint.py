"""Checkpoints: one ``torch.save`` of a dict of state_dicts plus the whole run state.

Format (``format_version`` 2)::

    {"format": "covidxray-checkpoint", "format_version": 2, "covidxray_version": str,
     "model": str, "family": str, "config": dict, "epoch": int, "batch_in_epoch": int,
     "perm": Tensor | None, "step": int, "images_seen": int, "n_images": int, "classes": [str],
     "image_size": int, "best_metric": float | None, "best_epoch": int, "evals_since_best": int,
     "stopped_early": bool, "eval_metric": str,
     "models": {name: state_dict}, "optimizers": {name: state_dict}, "scalers": {name: state_dict},
     "rng": {"shuffle", "torch_cpu", ["torch_cuda"], and the task's generators},
     "epoch_meter": dict, "interval_meter": dict, ...the task's extra entries}

The task's names: GANs ``models`` G, D, G_ema, ``rng`` noise, aug, coin, plus ``augment``,
``fixed_z``, ``fixed_y``; classifiers ``models`` net, ``rng`` aug (and ``synthetic`` with
``data.synthetic``), plus ``class_weights`` (and ``synthetic``: the generator's file, step, weights).

Format 1 (covidxray 0.1.0, GANs only) is the same without ``family`` (read as ``gan``), the
evaluation counters and ``image_size``, and with ``config["model"]`` the model's name and
``config["data"]["n_classes"]``: such checkpoints still resume and sample.

Writes go to a temporary file that is renamed, so ``last.pt`` is always whole.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from covidxray import __version__
from covidxray.errors import CovidXrayError
from covidxray.utils import atomic_path

FORMAT = "covidxray-checkpoint"
FORMAT_VERSION = 2


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (format keys are added) to ``path``."""
    path = Path(path)
    blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "covidxray_version": __version__, **state}
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def resolve_checkpoint_path(path: str | os.PathLike, resume: bool = False) -> Path:
    """**The loader rule**, the same for every command: which file a run folder means.

    * Every use of a trained model (``sample``, ``evaluate``, ``segment``, ``gif``'s model, the downstream
      classifiers, ``data.synthetic``, ``--cxr-features``...) reads ``checkpoints/best.pt`` when the run
      has one (its family selected it on the validation metric, ``eval.metric``), else ``checkpoints/last.pt``
      (families without a validation metric, such as the GANs, write no ``best.pt``).
    * Resuming a run (``train --resume``, ``resume=True``) continues ``checkpoints/last.pt``.
    * A ``.pt`` file is read as given.

    Every output names the file it used (``checkpoint`` in ``metrics.json``, ``segment.json``, the sample
    folder's marker).
    """
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.pt"
        if not resume and best.is_file():
            return best
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


#: What every checkpoint holds (format 1 and 2), checked on loading: a file with the marker but without
#: these is damaged, and says so instead of failing later on a missing key.
REQUIRED = {"config": dict, "models": dict}


def _sibling_hint(path: Path) -> str:
    """The fix for an unreadable checkpoint: the other of last.pt/best.pt when it is intact."""
    other = {"last.pt": "best.pt", "best.pt": "last.pt"}.get(path.name)
    if other and (path.parent / other).is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                blob = torch.load(path.parent / other, map_location="cpu", weights_only=True)
            if isinstance(blob, dict) and blob.get("format") == FORMAT and isinstance(blob.get("config"), dict):
                return (f"{path.parent / other} beside it is intact (epoch {blob.get('epoch', '?')}, step "
                        f"{blob.get('step', '?')}): evaluate or sample that file, or copy it over {path.name} to resume "
                        f"from it")
        except Exception:
            pass
    return "Pass a checkpoint written by `covidxray train` (checkpoints/last.pt or best.pt of a run folder)"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    resume: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint (file, or run folder by :func:`resolve_checkpoint_path`'s rule); clear
    errors for anything else.

    A format-1 checkpoint (covidxray 0.1.0) gets ``family = "gan"``; ``path`` is set to the file read.
    """
    path = resolve_checkpoint_path(path, resume)
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code...
        raise CovidXrayError(f"{path} is not a readable covidxray checkpoint ({type(exc).__name__}: damaged, "
                             f"truncated or not written by covidxray)", _sibling_hint(path)) from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CovidXrayError(f"{path} is not a covidxray checkpoint (no '{FORMAT}' marker)", _sibling_hint(path))
    missing = [k for k, typ in REQUIRED.items() if not isinstance(blob.get(k), typ)]
    if missing:
        raise CovidXrayError(f"{path} is a damaged covidxray checkpoint: it has no valid {', '.join(missing)}",
                             _sibling_hint(path))
    if blob.get("format_version", 0) > FORMAT_VERSION:
        raise CovidXrayError(
            f"{path} has checkpoint format {blob['format_version']} (written by covidxray "
            f"{blob.get('covidxray_version', '?')}), newer than this covidxray {__version__} reads ({FORMAT_VERSION})",
            "Upgrade covidxray",
        )
    blob.setdefault("family", "gan")  # format 1: the GANs of covidxray 0.1.0
    blob["path"] = str(path)
    return blob
