"""The ``gan`` family's configuration: the generic sections (with GAN keys in ``train`` and
``optim``) plus ``arch``, ``loss`` and ``aug``. Formulas behind the keys: ``docs/training.md``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from covidxray.config.core import (
    GENERIC_BOUNDS,
    GENERIC_CHOICES,
    MIGRATIONS,
    Config,
    Family,
    OptimConfig,
    TrainConfig,
    register_family,
)
from covidxray.errors import CovidXrayError

GAN_IMAGE_SIZES = (64, 128, 256)


@dataclass
class GANTrainConfig(TrainConfig):
    grid_size: int = 64                 # images in the fixed-latent sample grid (a square number is nicest)
    ema_kimg: float = 10.0              # half-life of the EMA of G's weights in kimg; 0 = no G_ema
    ema_rampup: float = 0.05            # EMA half-life ramp-up as a fraction of images seen (StyleGAN2-ADA); 0 = off


@dataclass
class GANOptimConfig(OptimConfig):
    beta1: float = 0.5                  # Adam beta1 (DCGAN: 0.5)
    lr_g: float = 2e-4                  # Adam learning rate of G
    lr_d: float = 2e-4                  # Adam learning rate of D


@dataclass
class ArchConfig:
    latent_dim: int = 100               # length of the latent vector z
    g_channels: int = 64                # base width of G (channels of its last hidden layer)
    d_channels: int = 64                # base width of D (channels of its first layer)
    max_channels: int = 512             # cap on any layer's width (keeps 256 px models small)
    g_spectral_norm: bool = False       # spectral normalisation on G's layers (Miyato et al. 2018)
    d_spectral_norm: bool = False       # spectral normalisation on D's layers (replaces D's BatchNorm);
                                        # the conditional and U-Net models' configs/<model>.yaml turn it on
    d_dropout: float = 0.0              # dropout before D's head; > 0 enables Monte-Carlo dropout (uncertainty)


@dataclass
class LossConfig:
    kind: str = "bce"                   # GAN loss: bce (non-saturating) | hinge | lsgan
    r1_gamma: float = 0.0               # R1 penalty weight on reals (Mescheder et al. 2018); 0 = off
    r1_every: int = 16                  # lazy R1: apply every k D steps, weight multiplied by k (StyleGAN2)
    aux_weight: float = 1.0             # ACGAN: weight of the auxiliary classification loss
    aux_mode: str = "acgan"             # ACGAN classifier training: acgan (D classifies reals and fakes, the paper)
                                        # | real (reals only) | tac (twin classifier on fakes, Gong et al. 2019)
    cutmix: bool = True                 # U-Net GAN: CutMix consistency regularisation (Schönfeld et al. 2020)
    cutmix_prob: float = 0.5            # U-Net GAN: probability of a CutMix D step once warmed up
    cutmix_warmup_kimg: float = 200.0   # U-Net GAN: CutMix probability ramps linearly from 0 over this many kimg
    consistency_weight: float = 1.0     # U-Net GAN: weight of the CutMix consistency term
    uncertainty: str = "off"            # MC-dropout uncertainty regulariser (cgan, acgan): off | min | max
    uncertainty_weight: float = 0.1     # weight lambda of the uncertainty term
    mc_samples: int = 8                 # K stochastic dropout passes used to estimate D's uncertainty


@dataclass
class AugConfig:
    diffaugment: str = "translation,cutout,brightness,contrast"  # DiffAugment policy (Zhao et al. 2020) applied
                                        # to every D input; subset of translation,cutout,brightness,contrast[,flip];
                                        # "" = off. No flip by default: it swaps anatomical sides.


@dataclass
class GANConfig(Config):
    """Configuration of a GAN run (the ``gan`` family)."""

    train: GANTrainConfig = field(default_factory=GANTrainConfig)
    optim: GANOptimConfig = field(default_factory=GANOptimConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)

    FAMILY: ClassVar[str] = "gan"


#: Allowed ranges of the GAN family's numeric keys (every one has a bound; checked by ``validate``).
GAN_BOUNDS = {
    **GENERIC_BOUNDS,
    "train.grid_size": "[1, inf)",
    "train.ema_kimg": "[0, inf)",
    "train.ema_rampup": "[0, inf)",
    "optim.lr_g": "(0, inf)",
    "optim.lr_d": "(0, inf)",
    "arch.latent_dim": "[1, inf)",
    "arch.g_channels": "[1, inf)",
    "arch.d_channels": "[1, inf)",
    "arch.max_channels": "[1, inf)",
    "arch.d_dropout": "[0, 1)",
    "loss.r1_gamma": "[0, inf)",
    "loss.r1_every": "[1, inf)",
    "loss.aux_weight": "[0, inf)",
    "loss.cutmix_prob": "[0, 1]",
    "loss.cutmix_warmup_kimg": "[0, inf)",
    "loss.consistency_weight": "[0, inf)",
    "loss.uncertainty_weight": "[0, inf)",
    "loss.mc_samples": "[1, inf)",          # >= 2 with an uncertainty mode (check_gan)
}


def check_gan(cfg: GANConfig) -> None:
    """The GAN family's cross-key checks (single-key ranges: ``GAN_BOUNDS``)."""
    if cfg.data.image_size not in (0, *GAN_IMAGE_SIZES):
        raise CovidXrayError(f"config key 'data.image_size' must be 64, 128 or 256 (or 0: the prepared size); "
                             f"got {cfg.data.image_size}")
    if cfg.loss.uncertainty != "off" and cfg.loss.mc_samples < 2:
        raise CovidXrayError(f"config key 'loss.mc_samples' must be >= 2 with an uncertainty mode; got {cfg.loss.mc_samples}")
    if cfg.loss.uncertainty != "off" and cfg.arch.d_dropout <= 0.0:
        raise CovidXrayError(
            f"loss.uncertainty={cfg.loss.uncertainty} needs Monte-Carlo dropout in D",
            "Also set arch.d_dropout (e.g. --set arch.d_dropout=0.3)",
        )
    if cfg.aug.diffaugment:
        from covidxray.data.diffaugment import parse_policy  # local: diffaugment imports torch; config stays torch-free

        try:
            parse_policy(cfg.aug.diffaugment)
        except ValueError as exc:
            raise CovidXrayError(f"config key 'aug.diffaugment': {exc}") from None


def _aux_mode_from_0_1_0(data: dict[str, Any]) -> None:
    # Runs from before loss.aux_mode (version 0.1.0 stored a boolean): same meaning, new key.
    loss = data.get("loss")
    if isinstance(loss, dict) and "aux_on_fakes" in loss:
        loss = dict(loss)
        loss.setdefault("aux_mode", "acgan" if loss.pop("aux_on_fakes") else "real")
        loss.pop("aux_on_fakes", None)
        data["loss"] = loss


GAN = register_family(Family(
    name="gan",
    config=GANConfig,
    choices={**GENERIC_CHOICES,
             "loss.kind": ("bce", "hinge", "lsgan"),
             "loss.uncertainty": ("off", "min", "max"),
             "loss.aux_mode": ("acgan", "real", "tac")},
    bounds=GAN_BOUNDS,
    check=check_gan,
    metrics={},  # FID during training comes with the evaluate issue
    summary="generative adversarial networks: G and D trained against each other",
))
MIGRATIONS["gan"] = [_aux_mode_from_0_1_0]
