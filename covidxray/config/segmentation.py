"""The ``segmentation`` family's configuration: the generic sections (segmentation keys in ``data``,
``train``, ``optim`` and ``eval``) plus ``arch``, ``loss`` and ``aug``. Details: ``docs/segmentation.md``.

Training uses only images with a lung mask (the others of the split are left out and counted in the
log). The data are resized on the device when ``data.image_size`` differs from the prepared size
(images bilinear, masks bilinear then thresholded at one half).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from covidxray.config.core import (
    GENERIC_BOUNDS,
    GENERIC_CHOICES,
    Config,
    DataConfig,
    EvalConfig,
    Family,
    TrainConfig,
    register_family,
)
from covidxray.config.classifier import SUPERVISED_OPTIM_BOUNDS, SUPERVISED_OPTIM_CHOICES, ClassifierOptimConfig
from covidxray.errors import CovidXrayError

#: Input sides a segmenter accepts (multiples of 2 ** arch.depth; resized on the device when needed).
MIN_SIZE, MAX_SIZE = 64, 1024


@dataclass
class SegmentationArchConfig:
    width: int = 32                     # channels of the first level; level i has width * 2**i
    depth: int = 4                      # down-sampling levels (the side must be a multiple of 2**depth)
    norm: str = "batch"                 # batch | group (GroupNorm with 8 groups: for small batches)
    upsample: str = "bilinear"          # bilinear (+ 1x1 convolution) | transpose (2x2 transposed convolution)


@dataclass
class SegmentationDataConfig(DataConfig):
    image_size: int = 0                 # input side in px, 64-1024 and a multiple of 2**arch.depth; 0 = the prepared
                                        # size (resized on the device when it differs: images bilinear, masks
                                        # bilinear then > 0.5)


@dataclass
class SegmentationTrainConfig(TrainConfig):
    epochs: int = 40                    # total epochs (over the images that have a mask)
    batch_size: int = 16                # images per step
    log_every: int = 10                 # write a stats.jsonl line every N steps (and at each epoch end)
    checkpoint_every: int = 1           # update checkpoints/last.pt every N epochs (also at the end and on Ctrl-C)


@dataclass
class SegmentationOptimConfig(ClassifierOptimConfig):
    """The classifiers' optimizer keys (adamw | sgd, warm-up, cosine | step | none schedule per step)."""

    lr: float = 2e-3                    # peak learning rate
    weight_decay: float = 1e-4          # decoupled weight decay (AdamW) / L2 (SGD)


@dataclass
class SegmentationLossConfig:
    dice_weight: float = 1.0            # weight of the soft Dice loss (1 - Dice of the sigmoid, per image)
    bce_weight: float = 1.0             # weight of the binary cross-entropy on the logits (per pixel)


@dataclass
class SegmentationAugConfig:
    rotate: float = 10.0                # random rotation, uniform in +-degrees; 0 = off (image and mask together)
    scale: float = 0.1                  # random zoom, uniform in 1 +- scale; 0 = off
    translate: float = 0.05             # random shift, uniform in +- this fraction of the side; 0 = off
    brightness: float = 0.1             # random brightness shift of the image, uniform in +- this; 0 = off
    contrast: float = 0.1               # random contrast factor of the image, uniform in 1 +- this; 0 = off
    elastic: float = 0.0                # elastic deformation: displacement std as a fraction of the side (0.01 is
                                        # mild), smooth over a 4x4 control grid; 0 = off
    hflip: bool = False                 # random horizontal flips (off: a flip swaps the patient's sides)


@dataclass
class SegmentationEvalConfig(EvalConfig):
    every: int = 1                      # validate every N epochs (picks checkpoints/best.pt by eval.metric); 0 = never
    threshold: float = 0.5              # sigmoid probability above which a pixel is lung (validation and default of
                                        # `covidxray segment` / `evaluate`)
    batch_size: int = 64                # images per forward pass when evaluating


@dataclass
class SegmentationConfig(Config):
    """Configuration of a segmentation run (the ``segmentation`` family)."""

    data: SegmentationDataConfig = field(default_factory=SegmentationDataConfig)
    train: SegmentationTrainConfig = field(default_factory=SegmentationTrainConfig)
    optim: SegmentationOptimConfig = field(default_factory=SegmentationOptimConfig)
    eval: SegmentationEvalConfig = field(default_factory=SegmentationEvalConfig)
    arch: SegmentationArchConfig = field(default_factory=SegmentationArchConfig)
    loss: SegmentationLossConfig = field(default_factory=SegmentationLossConfig)
    aug: SegmentationAugConfig = field(default_factory=SegmentationAugConfig)

    FAMILY: ClassVar[str] = "segmentation"


#: Allowed ranges of the segmentation family's numeric keys (every one has a bound; checked by ``validate``).
SEGMENTATION_BOUNDS = {
    **GENERIC_BOUNDS,
    **SUPERVISED_OPTIM_BOUNDS,
    "arch.width": "[1, inf)",
    "arch.depth": "[1, 7]",
    "loss.dice_weight": "[0, inf)",         # not both 0 (check_segmentation)
    "loss.bce_weight": "[0, inf)",
    "aug.rotate": "[0, 180]",
    "aug.scale": "[0, 0.5]",
    "aug.translate": "[0, 0.5]",
    "aug.brightness": "[0, 0.99]",
    "aug.contrast": "[0, 0.99]",
    "aug.elastic": "[0, 0.1]",
    "eval.threshold": "(0, 1)",
}


def check_segmentation(cfg: SegmentationConfig) -> None:
    """The segmentation family's cross-key checks (single-key ranges: ``SEGMENTATION_BOUNDS``)."""
    size, side = cfg.data.image_size, 2 ** cfg.arch.depth
    if size and (not MIN_SIZE <= size <= MAX_SIZE or size % side):
        raise CovidXrayError(f"config key 'data.image_size' must be {MIN_SIZE}-{MAX_SIZE} and a multiple of "
                             f"2**arch.depth = {side} for a segmenter (or 0: the prepared size); got {size}")
    if cfg.loss.dice_weight + cfg.loss.bce_weight == 0:
        raise CovidXrayError("config keys 'loss.dice_weight' and 'loss.bce_weight' must not both be 0",
                             "Set one of them > 0 (e.g. --set loss.dice_weight=1)")


SEGMENTATION = register_family(Family(
    name="segmentation",
    config=SegmentationConfig,
    choices={**GENERIC_CHOICES,
             "arch.norm": ("batch", "group"),
             "arch.upsample": ("bilinear", "transpose"),
             **SUPERVISED_OPTIM_CHOICES},
    bounds=SEGMENTATION_BOUNDS,
    check=check_segmentation,
    # Validation metrics (per image, then averaged) and their better direction; the first picks best.pt.
    metrics={"dice": "max", "iou": "max", "loss": "min"},
    summary="lung segmenters: one lung mask per chest X-ray",
))
