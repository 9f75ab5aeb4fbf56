"""One task per model family: the arithmetic of a training step, for the one loop in :mod:`covidxray.train.loop`.

``TASKS`` maps each declared family (``covidxray.config.FAMILIES``) to its task class: every module of this
package is imported, and a :class:`Task` subclass that names its ``family`` registers itself.
"""

from __future__ import annotations

from covidxray.errors import CovidXrayError
from covidxray.train.tasks.base import TASKS, Task
from covidxray.utils import import_submodules

import_submodules(__name__, __path__)


def get_task(family: str) -> type[Task]:
    """The task class of ``family``; a family without one cannot be trained yet."""
    try:
        return TASKS[family]
    except KeyError:
        raise CovidXrayError(f"the {family} family has no training task yet; trainable families: "
                             f"{', '.join(sorted(TASKS))}") from None


__all__ = ["TASKS", "Task", "get_task"]
