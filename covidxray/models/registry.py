"""A plain dict registry of models (the segmentation_models.pytorch pattern).

Each model family registers a builder with :func:`register_model`; the CLI looks
models up by name with :func:`get_model`, whose error lists the valid names. A
builder is called as ``build(cfg, data)``: ``cfg`` the resolved configuration of its
family, ``data`` a :class:`DataSpec` saying what the training data are (number of
classes, image side, channels), so that no builder reads facts of the data from the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from covidxray.errors import CovidXrayError
from covidxray.utils import import_submodules

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from covidxray.config import Config


@dataclass(frozen=True)
class DataSpec:
    """What a builder needs to know of the data.

    Attributes:
        n_classes: number of classes in the training data (class-conditional GANs, classifiers).
        image_size: side of the (square) images the networks see.
        channels: image channels (1: grayscale X-rays).
        classes: the class names, in label order.
    """

    n_classes: int
    image_size: int
    channels: int = 1
    classes: tuple[str, ...] = ()

    @classmethod
    def example(cls, image_size: int, n_classes: int = 3) -> "DataSpec":
        """A spec for building a model without data (inspection, tests): classes ``class0``..."""
        return cls(n_classes, image_size, 1, tuple(f"class{i}" for i in range(n_classes)))


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    Attributes:
        name: registry key, used as ``--model NAME``.
        family: a declared family (``covidxray.config.FAMILIES``: ``gan``, ``classifier``,
            ``segmentation``); picks the
            configuration schema and the training task.
        paper: short citation of the paper the model follows.
        summary: one line for ``covidxray models``.
        build: ``build(cfg, data: DataSpec) -> dict[str, nn.Module]`` (GANs: ``{"G", "D"}``;
            classifiers and segmenters: ``{"net"}``).
        conditional: whether a generator takes class labels.
        features: optional training features the model supports, e.g. ``("uncertainty",)``
            (Monte-Carlo dropout in D) or ``("cutmix",)`` (per-pixel D output).
        min_image_size: the smallest input side the architecture accepts (0: no limit beyond the family's).
    """

    name: str
    family: str
    paper: str
    summary: str
    build: Callable[["Config", DataSpec], dict[str, "nn.Module"]]
    conditional: bool = False
    features: tuple[str, ...] = ()
    min_image_size: int = 0


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(CovidXrayError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def register_model(name: str, *, family: str, paper: str, summary: str, conditional: bool = False,
                   features: tuple[str, ...] = (), min_image_size: int = 0):
    """Decorator registering ``build(cfg, data)`` under ``name``.

    Registering a name twice is an error; a family that is not declared is one when the model's config is
    resolved (:func:`covidxray.config.family_of`).
    """

    def decorator(build):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, family, paper, summary, build, conditional, tuple(features), min_image_size)
        return build

    return decorator


def _load_families() -> None:
    # Importing the package's modules runs their @register_model decorators (a new family: a new file).
    import covidxray.models as package  # local: import cycle (covidxray.models' __init__ imports this module)

    import_submodules(package.__name__, package.__path__, skip=("registry", "common"))


def get_model(name: str) -> ModelSpec:
    """Look a model up by name; unknown names raise with the list of valid ones."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model '{name}'; valid models: {', '.join(sorted(_REGISTRY))} (see `covidxray models`)"
        ) from None


def list_models(family: str | None = None) -> list[ModelSpec]:
    """All registered models (of one family when given), sorted by name."""
    _load_families()
    return [_REGISTRY[k] for k in sorted(_REGISTRY) if family is None or _REGISTRY[k].family == family]
