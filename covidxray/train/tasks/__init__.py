"""One task per model family: the arithmetic of a training step, for the one loop in :mod:`covidxray.train.loop`.

``TASKS`` maps each declared family (``covidxray.config.FAMILIES``) to its task class.
"""

from __future__ import annotations

from covidxray.errors import CovidXrayError
from covidxray.train.tasks.autoencoder import AutoencoderTask
from covidxray.train.tasks.base import Task
from covidxray.train.tasks.classifier import ClassifierTask
from covidxray.train.tasks.gan import GANTask
from covidxray.train.tasks.image2image import Image2ImageTask
from covidxray.train.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {"gan": GANTask, "classifier": ClassifierTask, "segmentation": SegmentationTask,
                               "autoencoder": AutoencoderTask, "image2image": Image2ImageTask}


def get_task(family: str) -> type[Task]:
    """The task class of ``family``; a family without one cannot be trained yet."""
    try:
        return TASKS[family]
    except KeyError:
        raise CovidXrayError(f"the {family} family has no training task yet; trainable families: "
                             f"{', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "GANTask", "ClassifierTask", "SegmentationTask", "AutoencoderTask", "Image2ImageTask", "get_task"]
