"""A plain dict registry of models (the segmentation_models.pytorch pattern).

Each model family registers a builder with :func:`register_model`; the CLI looks
models up by name with :func:`get_model`, whose error lists the valid names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from covidxray.errors import CovidXrayError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from covidxray.config import Config


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one model.

    Attributes:
        name: registry key, used as ``--model NAME``.
        family: ``gan`` or ``segmentation`` (picks the training loop).
        paper: short citation of the paper the model follows.
        summary: one line for ``covidxray models``.
        build: ``build(cfg) -> dict[str, nn.Module]`` (for GANs: ``{"G": ..., "D": ...}``).
        conditional: whether the model takes class labels.
        features: optional training features the model supports, e.g. ``("uncertainty",)``
            (Monte-Carlo dropout in D) or ``("cutmix",)`` (per-pixel D output).
    """

    name: str
    family: str
    paper: str
    summary: str
    build: Callable[["Config"], dict[str, "nn.Module"]]
    conditional: bool = False
    features: tuple[str, ...] = ()


_REGISTRY: dict[str, ModelSpec] = {}


class UnknownModelError(CovidXrayError, KeyError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def register_model(name: str, *, family: str, paper: str, summary: str, conditional: bool = False,
                   features: tuple[str, ...] = ()):
    """Decorator registering ``build(cfg)`` under ``name``. Registering a name twice is an error."""

    def decorator(build):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, family, paper, summary, build, conditional, tuple(features))
        return build

    return decorator


def _load_families() -> None:
    # Importing the families runs their @register_model decorators.
    import covidxray.models.conditional  # noqa: F401
    import covidxray.models.dcgan  # noqa: F401
    import covidxray.models.unetgan  # noqa: F401


def get_model(name: str) -> ModelSpec:
    """Look a model up by name; unknown names raise with the list of valid ones."""
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model '{name}'; valid models: {', '.join(sorted(_REGISTRY))} (see `covidxray models`)"
        ) from None


def list_models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    _load_families()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
