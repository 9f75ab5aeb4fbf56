"""Model families (one file each), registered in :mod:`covidxray.models.registry`."""

from covidxray.models.registry import DataSpec, ModelSpec, get_model, list_models, register_model

__all__ = ["DataSpec", "ModelSpec", "get_model", "list_models", "register_model"]
