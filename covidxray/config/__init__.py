"""Run configuration: one dataclass schema per model family, YAML overrides, dotted ``--set`` overrides.

* :mod:`covidxray.config.core` - the generic sections (``model``, ``data``, ``train``, ``optim``,
  ``eval``), the family declarations (with the ``choices`` of string keys and the ``bounds``,
  :class:`Interval` ranges, of every numeric key), override parsing, validation and resolution;
* :mod:`covidxray.config.gan`, :mod:`covidxray.config.classifier`, :mod:`covidxray.config.segmentation` -
  each family's schema (its own
  sections and the keys it adds to the generic ones) and its checks.

Every key is declared once, with its default and a comment on its allowed values;
``configs/<model>.yaml`` holds only the keys a model changes.
"""

from covidxray.config.core import (
    CONFIG_DIR,
    FAMILIES,
    GENERIC_BOUNDS,
    GENERIC_CHOICES,
    Config,
    DataConfig,
    EvalConfig,
    Family,
    Interval,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    eval_metric,
    family_of,
    get_family,
    load_yaml,
    model_config_path,
    new_config,
    parse_set,
    register_family,
    resolve_config,
    validate,
)
from covidxray.utils import import_submodules  # noqa: E402

# Every module of this package but core declares one family (register_family): importing them all registers
# them, so that a new family is its own file here, with no list to extend.
import_submodules(__name__, __path__, skip=("core",))
from covidxray.config.autoencoder import AutoencoderConfig  # noqa: E402  (exported names)
from covidxray.config.classifier import ClassifierConfig  # noqa: E402
from covidxray.config.gan import GANConfig  # noqa: E402
from covidxray.config.image2image import Image2ImageConfig  # noqa: E402
from covidxray.config.segmentation import SegmentationConfig  # noqa: E402

__all__ = [
    "CONFIG_DIR", "FAMILIES", "GENERIC_BOUNDS", "GENERIC_CHOICES", "Interval", "Config", "DataConfig", "EvalConfig", "Family", "ModelConfig", "OptimConfig",
    "TrainConfig", "GANConfig", "ClassifierConfig", "SegmentationConfig", "AutoencoderConfig", "Image2ImageConfig", "apply_overrides", "config_from_dict", "eval_metric",
    "family_of", "get_family", "load_yaml", "model_config_path", "new_config", "parse_set", "register_family",
    "resolve_config", "validate",
]
