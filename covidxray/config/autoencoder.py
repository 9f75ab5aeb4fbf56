"""The ``autoencoder`` family's configuration (``autoencoder``, ``vae``, ``cvae``): the generic sections plus
``arch`` and ``loss``. Details: ``docs/autoencoders.md``.

The loss of one image is the reconstruction error summed over its pixels (``loss.recon``: squared or
absolute, images in [-1, 1]), plus ``loss.ssim_weight * (1 - SSIM) * pixels`` when asked, plus for the VAEs
``beta * KL(q(z|x) || N(0, I))`` with beta rising linearly from 0 to ``loss.beta`` over
``loss.kl_warmup_epochs`` (Bowman et al. 2016); the batch's loss is the mean over its images (the negative
ELBO of a Gaussian decoder, up to constants, when beta = 1 and recon = mse).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from covidxray.config.classifier import SUPERVISED_OPTIM_BOUNDS, SUPERVISED_OPTIM_CHOICES, ClassifierOptimConfig
from covidxray.config.core import (
    GENERIC_BOUNDS,
    GENERIC_CHOICES,
    Config,
    DataConfig,
    EvalConfig,
    Family,
    TrainConfig,
    check_image_size,
    register_family,
)

#: Input sides an autoencoder accepts (powers of two; resized on the device when the prepared size differs).
SIZES = (32, 64, 128, 256)


@dataclass
class AutoencoderArchConfig:
    latent_dim: int = 128               # length of the code z
    channels: int = 32                  # channels of the first encoder level (doubling per level)
    max_channels: int = 256             # cap of the channels per level


@dataclass
class AutoencoderDataConfig(DataConfig):
    image_size: int = 0                 # input side: 32 | 64 | 128 | 256; 0 = the prepared size (resized on the
                                        # device when it differs, bilinear)


@dataclass
class AutoencoderTrainConfig(TrainConfig):
    epochs: int = 60                    # total epochs
    batch_size: int = 64                # images per step
    log_every: int = 10                 # write a stats.jsonl line every N steps (and at each epoch end)
    grid_size: int = 64                 # images in the snapshot grid (VAEs: fixed prior draws; else reconstructions)


@dataclass
class AutoencoderOptimConfig(ClassifierOptimConfig):
    """The classifiers' optimizer keys (adamw | sgd, warm-up, cosine | step | none schedule per step)."""

    lr: float = 1e-3                    # peak learning rate
    weight_decay: float = 0.0           # decoupled weight decay (AdamW) / L2 (SGD)


@dataclass
class AutoencoderLossConfig:
    recon: str = "mse"                  # reconstruction error per pixel: mse (squared) | l1 (absolute)
    ssim_weight: float = 0.0            # weight of (1 - SSIM) x pixels added to the loss; 0 = off
    beta: float = 1.0                   # VAEs: weight of the KL term (beta-VAE, Higgins et al. 2017; 1 = the ELBO)
    kl_warmup_epochs: float = 10.0      # VAEs: beta rises linearly from 0 over this many epochs; 0 = at once


@dataclass
class AutoencoderEvalConfig(EvalConfig):
    every: int = 1                      # validate every N epochs (picks checkpoints/best.pt by eval.metric); 0 = never
    batch_size: int = 128               # images per forward pass when evaluating


@dataclass
class AutoencoderConfig(Config):
    """Configuration of an autoencoder run (the ``autoencoder`` family)."""

    data: AutoencoderDataConfig = field(default_factory=AutoencoderDataConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    optim: AutoencoderOptimConfig = field(default_factory=AutoencoderOptimConfig)
    eval: AutoencoderEvalConfig = field(default_factory=AutoencoderEvalConfig)
    arch: AutoencoderArchConfig = field(default_factory=AutoencoderArchConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)

    FAMILY: ClassVar[str] = "autoencoder"


#: Allowed ranges of the autoencoder family's numeric keys (every one has a bound; checked by ``validate``).
AUTOENCODER_BOUNDS = {
    **GENERIC_BOUNDS,
    **SUPERVISED_OPTIM_BOUNDS,
    "train.grid_size": "[1, inf)",
    "arch.latent_dim": "[1, inf)",
    "arch.channels": "[1, inf)",
    "arch.max_channels": "[1, inf)",
    "loss.ssim_weight": "[0, inf)",
    "loss.beta": "[0, inf)",
    "loss.kl_warmup_epochs": "[0, inf)",
}


def check_autoencoder(cfg: AutoencoderConfig) -> None:
    """The autoencoder family's cross-key checks (single-key ranges: ``AUTOENCODER_BOUNDS``)."""
    check_image_size(cfg, SIZES, "an autoencoder")


AUTOENCODER = register_family(Family(
    name="autoencoder",
    config=AutoencoderConfig,
    choices={**GENERIC_CHOICES,
             "loss.recon": ("mse", "l1"),
             **SUPERVISED_OPTIM_CHOICES},
    bounds=AUTOENCODER_BOUNDS,
    check=check_autoencoder,
    # Validation metrics of the reconstructions (images in [0, 1]) and their better direction; the first
    # picks best.pt.
    metrics={"mse": "min", "psnr": "max", "ssim": "max", "loss": "min"},
    summary="autoencoders and VAEs: reconstructions, and samples from a prior (vae, cvae)",
))
