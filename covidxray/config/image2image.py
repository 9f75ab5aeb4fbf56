"""The ``image2image`` family's configuration (``pix2pix``): the generic sections plus ``arch``, ``loss`` and
``aug``. Details: ``docs/image2image.md``.

``model.task`` says what is translated into what: ``mask2xray`` (the lung mask of a prepared image -> the
X-ray; trains on the images that have a mask) or ``colorize`` (the X-ray -> a 3-channel pseudo-colour
rendering of its anatomy, :func:`covidxray.train.tasks.image2image.colorize_target`). G's loss is ``loss.l1_weight * L1(G(c), x) + adversarial``;
D's is the mean of its losses on (c, x) and (c, G(c)) (the paper halves D's objective).
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
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_image_size,
    register_family,
)

SIZES = (32, 64, 128, 256)


@dataclass
class Image2ImageModelConfig(ModelConfig):
    task: str = "mask2xray"             # mask2xray: lung mask -> X-ray | colorize: X-ray -> pseudo-colour anatomy
                                        # (lungs / rest of the body / background, built from the masks); both train
                                        # on the images with a mask only
    class_maps: bool = True             # mask2xray on data of 2+ classes: the class joins the mask as one map per
                                        # class (G draws an X-ray of a chosen class); false: one model for all


@dataclass
class Image2ImageArchConfig:
    g_channels: int = 64                # channels of G's first level (doubling, capped at 8x)
    d_channels: int = 64                # channels of D's first level
    d_layers: int = 3                   # D's stride-2 levels: 3 = the 70x70 PatchGAN (256 px); 2 suits 128 px and less
    dropout: float = 0.5                # dropout on G's first three decoder levels (the paper's noise; on at sampling)


@dataclass
class Image2ImageDataConfig(DataConfig):
    image_size: int = 0                 # 32 | 64 | 128 | 256; 0 = the prepared size (resized on the device when it differs)


@dataclass
class Image2ImageTrainConfig(TrainConfig):
    epochs: int = 100                   # total epochs (over the images that have a mask)
    batch_size: int = 16                # images per step
    log_every: int = 10                 # write a stats.jsonl line every N steps (and at each epoch end)
    grid_size: int = 8                  # validation masks in the snapshot (rows: mask, generated, real)


@dataclass
class Image2ImageOptimConfig(OptimConfig):
    beta1: float = 0.5                  # Adam beta1 (the paper: 0.5)
    lr_g: float = 2e-4                  # Adam learning rate of G
    lr_d: float = 2e-4                  # Adam learning rate of D


@dataclass
class Image2ImageLossConfig:
    l1_weight: float = 100.0            # lambda of the L1 term (the paper: 100)
    gan: str = "bce"                    # adversarial loss: bce (the paper) | lsgan


@dataclass
class Image2ImageAugConfig:
    rotate: float = 5.0                 # one random warp shared by mask and X-ray: rotation in +- degrees; 0 = off
    scale: float = 0.05                 # zoom in 1 +- scale; 0 = off
    translate: float = 0.05             # shift in +- this fraction of the side; 0 = off


@dataclass
class Image2ImageEvalConfig(EvalConfig):
    every: int = 1                      # validate every N epochs (val L1 of G(mask) against the X-ray picks best.pt)
    batch_size: int = 64                # images per forward pass when evaluating


@dataclass
class Image2ImageConfig(Config):
    """Configuration of an image-to-image run (the ``image2image`` family)."""

    model: Image2ImageModelConfig = field(default_factory=Image2ImageModelConfig)
    data: Image2ImageDataConfig = field(default_factory=Image2ImageDataConfig)
    train: Image2ImageTrainConfig = field(default_factory=Image2ImageTrainConfig)
    optim: Image2ImageOptimConfig = field(default_factory=Image2ImageOptimConfig)
    eval: Image2ImageEvalConfig = field(default_factory=Image2ImageEvalConfig)
    arch: Image2ImageArchConfig = field(default_factory=Image2ImageArchConfig)
    loss: Image2ImageLossConfig = field(default_factory=Image2ImageLossConfig)
    aug: Image2ImageAugConfig = field(default_factory=Image2ImageAugConfig)

    FAMILY: ClassVar[str] = "image2image"


#: Allowed ranges of the image2image family's numeric keys (every one has a bound; checked by ``validate``).
IMAGE2IMAGE_BOUNDS = {
    **GENERIC_BOUNDS,
    "train.grid_size": "[1, inf)",
    "optim.lr_g": "(0, inf)",
    "optim.lr_d": "(0, inf)",
    "arch.g_channels": "[1, inf)",
    "arch.d_channels": "[1, inf)",
    "arch.d_layers": "[1, inf)",
    "arch.dropout": "[0, 1)",
    "loss.l1_weight": "[0, inf)",
    "aug.rotate": "[0, 180]",
    "aug.scale": "[0, 0.5]",
    "aug.translate": "[0, 0.5]",
}


def check_image2image(cfg: Image2ImageConfig) -> None:
    """The image2image family's cross-key checks (single-key ranges: ``IMAGE2IMAGE_BOUNDS``)."""
    check_image_size(cfg, SIZES, "pix2pix")


IMAGE2IMAGE = register_family(Family(
    name="image2image",
    config=Image2ImageConfig,
    choices={**GENERIC_CHOICES, "model.task": ("mask2xray", "colorize"), "loss.gan": ("bce", "lsgan")},
    bounds=IMAGE2IMAGE_BOUNDS,
    check=check_image2image,
    # Validation: the mean absolute error of G(condition) against the real image (images in [0, 1]).
    metrics={"l1": "min"},
    summary="image-to-image translation (pix2pix): lung mask -> X-ray, or X-ray -> pseudo-colour anatomy",
))
