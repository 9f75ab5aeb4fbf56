"""Model families (one file each), registered in :mod:`covidxray.models.registry`."""

from covidxray.models.registry import ModelSpec, get_model, list_models, register_model

__all__ = ["ModelSpec", "get_model", "list_models", "register_model"]
