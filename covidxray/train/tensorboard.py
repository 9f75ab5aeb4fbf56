"""Optional TensorBoard scalars beside ``stats.jsonl`` (``train.tensorboard``).

With ``train.tensorboard`` true, every record the loop writes to ``stats.jsonl`` also goes to TensorBoard under
``RUN/tensorboard/``: each numeric value as the scalar ``<kind>/<key>`` (``interval/loss_d``, ``epoch/loss_g``,
``eval/val_fid``...) at the record's step; the counters (step, epoch, kimg) are the axes, not scalars.
``stats.jsonl`` stays the record of the run; TensorBoard is a view of it, written through PyTorch's own
``torch.utils.tensorboard.SummaryWriter``. The ``tensorboard`` package is optional
(``pip install covidxray[tensorboard]``): without it the key is refused before anything trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from covidxray.errors import CovidXrayError

#: The run's TensorBoard folder (``RUN/tensorboard/``).
FOLDER = "tensorboard"

#: Record keys that are axes or labels, not scalars.
AXES = ("kind", "step", "epoch", "kimg")


def summary_writer_class():
    """PyTorch's ``SummaryWriter``, or None when the ``tensorboard`` package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package, which is optional
        return None
    return SummaryWriter


def available() -> bool:
    """Whether TensorBoard scalars can be written here."""
    return summary_writer_class() is not None


def check(cfg) -> None:
    """Refuse ``train.tensorboard=true`` where the ``tensorboard`` package is missing (one line, with the fix)."""
    if cfg.train.tensorboard and not available():
        raise CovidXrayError("train.tensorboard=true needs the tensorboard package, which is not installed",
                             "pip install covidxray[tensorboard] (or pip install tensorboard), or drop "
                             "train.tensorboard")


class ScalarWriter:
    """Writes the numeric values of ``stats.jsonl`` records as TensorBoard scalars into ``run_dir/tensorboard/``.

    Args:
        run_dir: the run folder.
        purge_step: on a resume, the first step that is trained again: events the killed run logged from this
            step on are dropped by TensorBoard (as the loop drops those lines of ``stats.jsonl``); None = none.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        cls = summary_writer_class()
        if cls is None:
            raise CovidXrayError("train.tensorboard=true needs the tensorboard package, which is not installed",
                                 "pip install covidxray[tensorboard]")
        self.writer = cls(log_dir=str(Path(run_dir) / FOLDER), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """One ``stats.jsonl`` record: its numeric values as ``<kind>/<key>`` at its step."""
        kind, step = record.get("kind", "interval"), int(record.get("step", 0))
        for key, value in record.items():
            if key in AXES or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
