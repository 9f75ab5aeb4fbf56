"""The ``diffusion`` family's configuration (``edm``): the generic sections plus ``arch``, ``edm`` (the
formulation: σ_data, the training noise, the sampler) and ``model.p_uncond``. Formulas: docs/diffusion.md."""

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
    ModelConfig,
    TrainConfig,
    check_image_size,
    register_family,
)
from covidxray.errors import CovidXrayError
from covidxray.models.diffusion import SAMPLERS

#: Sides the denoiser takes (powers of two; its U-Net halves the side arch.depth times).
SIZES = (32, 64, 128, 256)


@dataclass
class DiffusionModelConfig(ModelConfig):
    p_uncond: float = 0.1               # probability that a training image's class is dropped ("no class"), so that
                                        # sampling can use classifier-free guidance; 1 = an unconditional model


@dataclass
class DiffusionDataConfig(DataConfig):
    image_size: int = 0                 # side: 32 | 64 | 128 | 256; 0 = the prepared size (resized on the device)


@dataclass
class DiffusionTrainConfig(TrainConfig):
    epochs: int = 100                   # total epochs
    batch_size: int = 32                # images per step
    log_every: int = 10                 # write a stats.jsonl line every N steps (and at each epoch end)
    grid_size: int = 16                 # images in the fixed-noise snapshot grid (per epoch: the gif's frames)
    ema_kimg: float = 10.0              # half-life of the EMA of the denoiser's weights in kimg; 0 = no EMA
    ema_rampup: float = 0.05            # EMA half-life ramp-up as a fraction of images seen (StyleGAN2-ADA); 0 = off


@dataclass
class DiffusionOptimConfig(ClassifierOptimConfig):
    """The classifiers' optimizer keys (adamw | sgd, warm-up, cosine | step | none schedule per step)."""

    lr: float = 1e-3                    # peak learning rate
    weight_decay: float = 0.0           # decoupled weight decay (AdamW)
    schedule: str = "none"              # cosine | step | none (EDM trains at a constant rate)


@dataclass
class DiffusionArchConfig:
    channels: int = 32                  # channels of the first U-Net level
    depth: int = 3                      # down-sampling levels (channels x1, x2, x4, x4...)
    emb_dim: int = 128                  # width of the noise-level (and class) embedding
    dropout: float = 0.0                # dropout inside the residual blocks (training only)


@dataclass
class EDMConfig:
    sigma_data: float = 0.5             # σ_d: the data's standard deviation (images in [-1, 1])
    p_mean: float = -1.2                # training noise: ln σ ~ N(p_mean, p_std²) (the paper's values)
    p_std: float = 1.2
    sigma_min: float = 0.002            # the sampler's schedule: σ_max down to σ_min (Karras et al.'s ρ-schedule)
    sigma_max: float = 80.0
    rho: float = 7.0
    steps: int = 18                     # sampler steps (Heun: 2 x steps - 1 network evaluations; `sample --steps`)
    sampler: str = "heun"               # heun (2nd order, Algorithm 1) | euler | dpm2m (DPM-Solver++(2M): 1 evaluation a step)
    guidance: float = 1.0               # classifier-free guidance w of sampling (1 = the conditional model;
                                        # `sample --guidance`)
    eval_sigmas: int = 5                # validation: the loss at this many fixed σ (log-spaced), fixed noise
    eval_samples: int = 16              # validation: samples drawn from fixed noise for the copy ratio; 0 = off
    eval_steps: int = 8                 # validation: sampler steps of those samples (cheaper than edm.steps)


@dataclass
class DiffusionEvalConfig(EvalConfig):
    every: int = 1                      # validate every N epochs (picks checkpoints/best.pt by the fixed-σ loss)
    batch_size: int = 64                # images per forward pass when evaluating


@dataclass
class DiffusionConfig(Config):
    """Configuration of a diffusion run (the ``diffusion`` family)."""

    model: DiffusionModelConfig = field(default_factory=DiffusionModelConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    optim: DiffusionOptimConfig = field(default_factory=DiffusionOptimConfig)
    eval: DiffusionEvalConfig = field(default_factory=DiffusionEvalConfig)
    arch: DiffusionArchConfig = field(default_factory=DiffusionArchConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)

    FAMILY: ClassVar[str] = "diffusion"


#: Allowed ranges of the diffusion family's numeric keys (every one has a bound; checked by ``validate``).
DIFFUSION_BOUNDS = {
    **GENERIC_BOUNDS,
    **SUPERVISED_OPTIM_BOUNDS,
    "model.p_uncond": "[0, 1]",
    "train.grid_size": "[1, inf)",
    "train.ema_kimg": "[0, inf)",
    "train.ema_rampup": "[0, inf)",
    "arch.channels": "[4, inf)",
    "arch.depth": "[1, 6]",
    "arch.emb_dim": "[8, inf)",
    "arch.dropout": "[0, 1)",
    "edm.sigma_data": "(0, inf)",
    "edm.p_mean": "(-inf, inf)",
    "edm.p_std": "(0, inf)",
    "edm.sigma_min": "(0, inf)",
    "edm.sigma_max": "(0, inf)",
    "edm.rho": "(0, inf)",
    "edm.steps": "[1, 1000]",
    "edm.guidance": "[0, 20]",
    "edm.eval_sigmas": "[1, 100]",
    "edm.eval_samples": "[0, 10000]",
    "edm.eval_steps": "[1, 1000]",
}


def check_diffusion(cfg: DiffusionConfig) -> None:
    """The diffusion family's cross-key checks (single-key ranges: ``DIFFUSION_BOUNDS``)."""
    check_image_size(cfg, SIZES, "a diffusion model")
    size = cfg.data.image_size
    if size and size % (2 ** cfg.arch.depth):
        raise CovidXrayError(f"config key 'arch.depth' = {cfg.arch.depth} halves the side more often than "
                             f"data.image_size = {size} allows")
    if not cfg.edm.sigma_min < cfg.edm.sigma_max:
        raise CovidXrayError(f"config keys 'edm.sigma_min' ({cfg.edm.sigma_min:g}) must be below 'edm.sigma_max' "
                             f"({cfg.edm.sigma_max:g})")


DIFFUSION = register_family(Family(
    name="diffusion",
    config=DiffusionConfig,
    choices={**GENERIC_CHOICES,
             "edm.sampler": SAMPLERS,
             **SUPERVISED_OPTIM_CHOICES},
    bounds=DIFFUSION_BOUNDS,
    check=check_diffusion,
    # Validation: EDM's weighted loss at fixed noise levels with fixed noise (deterministic); it picks best.pt.
    # copy_ratio: how far the samples lie from their nearest training images, relative to held-out real images
    # (< 1: closer than real held-out images are, i.e. copying; eval.metric=copy_ratio selects on it).
    metrics={"loss": "min", "copy_ratio": "max"},
    summary="diffusion models (EDM): images denoised from noise, class-conditional with guidance",
))
