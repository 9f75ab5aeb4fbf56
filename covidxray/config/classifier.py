"""The ``classifier`` family's configuration: the generic sections (classifier keys in ``model``,
``data``, ``train``, ``optim`` and ``eval``) plus ``loss`` and ``aug``. Details: ``docs/classifiers.md``.

``data.synthetic`` / ``data.synthetic_ratio`` add generated images to every step (the downstream-classification
experiments: real only, real + synthetic, synthetic only): drawn on the device at every step from a trained
class-conditional latent generator (a GAN, the cVAE), or taken from a **pool** drawn once at the start of the run
from any other class-conditional generator (a diffusion model: dozens of network evaluations per image;
``data.synthetic_pool`` images), or read from a folder of generated PNGs with one sub-folder per class.
With a ratio ``r`` in (0, 1) each step keeps its ``train.batch_size`` B real images and
adds ``round(B * r / (1 - r))`` generated ones, so runs with and without synthetic data take the same
steps over the same real images and a fraction ``r`` of each batch is generated; ``r = 1`` trains on
generated images only (TSTR, "GAN-train": B generated images a step, no real ones), an epoch still
having the real data's number of steps. See :mod:`covidxray.train.tasks.classifier`.
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
    Interval,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    register_family,
)
from covidxray.errors import CovidXrayError

#: Input sides a classifier accepts (the data are resized on the device when the prepared size differs).
MIN_SIZE, MAX_SIZE = 64, 299


@dataclass
class ClassifierModelConfig(ModelConfig):
    pretrained: str = ""                # torchvision state_dict file to start from (docs/classifiers.md says how to
                                        # save ImageNet weights once); "" = random initialisation. Never downloaded.
    dropout: float = 0.0                # dropout before the classification head, in training only
    mc_dropout: float = 0.0             # > 0: Monte-Carlo dropout (Gal & Ghahramani 2016): dropout p before the head,
                                        # kept on at evaluation (eval.mc_samples passes); replaces model.dropout


@dataclass
class ClassifierDataConfig(DataConfig):
    """The generic data keys plus synthetic images from a trained conditional generator (module docstring): with
    ``synthetic_ratio`` r < 1 a step is B real + round(B r / (1 - r)) generated images; r = 1: B generated."""

    synthetic: str = ""                 # a class-conditional generator (checkpoint file or run folder, same classes)
                                        # or a folder of its PNGs (one sub-folder per class, `covidxray sample`'s OUT)
                                        # that adds generated images to every training batch; "" = off
    synthetic_pool: int = 0             # images drawn once at the start and reused (labels with the real training
                                        # split's class frequencies); 0 = on the fly at every step for a latent
                                        # generator (GANs, cVAE), else as many as the real training split
    synthetic_ratio: float = 0.5        # fraction r of each training batch that is generated, 0 < r <= 1: r < 1 keeps
                                        # the train.batch_size B real images and adds round(B*r/(1-r)) generated ones;
                                        # r = 1: B generated images a step, no real ones (TSTR), same epoch length


@dataclass
class ClassifierTrainConfig(TrainConfig):
    epochs: int = 30                    # total epochs (early stopping may end the run sooner: eval.patience)
    log_every: int = 10                 # write a stats.jsonl line every N steps (and at each epoch end)
    checkpoint_every: int = 1           # update checkpoints/last.pt every N epochs (also at the end and on Ctrl-C)


@dataclass
class ClassifierOptimConfig(OptimConfig):
    name: str = "adamw"                 # adamw (Loshchilov & Hutter 2019) | sgd (with momentum)
    lr: float = 1e-3                    # peak learning rate
    weight_decay: float = 5e-4          # decoupled weight decay (AdamW) / L2 (SGD)
    momentum: float = 0.9               # SGD momentum
    nesterov: bool = False              # SGD: Nesterov momentum
    schedule: str = "cosine"            # learning-rate schedule per step: cosine (to 0) | step | none
    warmup_epochs: float = 1.0          # linear warm-up from 0 over this many epochs; 0 = none
    step_epochs: int = 10               # schedule=step: multiply the rate by step_gamma every N epochs
    step_gamma: float = 0.1             # schedule=step: the factor


@dataclass
class ClassifierLossConfig:
    label_smoothing: float = 0.0        # cross-entropy label smoothing (Szegedy et al. 2016); 0 = off
    class_weights: str = "none"         # none | balanced (inverse class frequency of the training split) |
                                        # one weight per class in sorted class order, e.g. "1,2.5,1"


@dataclass
class ClassifierAugConfig:
    rotate: float = 10.0                # random rotation, uniform in +-degrees; 0 = off
    scale: float = 0.1                  # random zoom, uniform in 1 +- scale; 0 = off
    translate: float = 0.1              # random shift, uniform in +- this fraction of the side; 0 = off
    brightness: float = 0.1             # random brightness shift, uniform in +- this (images in [-1, 1]); 0 = off
    contrast: float = 0.1               # random contrast factor, uniform in 1 +- this; 0 = off
    hflip: bool = False                 # random horizontal flips (off: a flip swaps the patient's sides)


@dataclass
class ClassifierEvalConfig(EvalConfig):
    every: int = 1                      # validate every N epochs (picks checkpoints/best.pt); 0 = never
    patience: int = 10                  # early stopping: stop after this many validations without improvement; 0 = off
    mc_samples: int = 20                # model.mc_dropout > 0: stochastic passes averaged per image (K)


@dataclass
class ClassifierConfig(Config):
    """Configuration of a classifier run (the ``classifier`` family)."""

    model: ClassifierModelConfig = field(default_factory=ClassifierModelConfig)
    data: ClassifierDataConfig = field(default_factory=ClassifierDataConfig)
    train: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    optim: ClassifierOptimConfig = field(default_factory=ClassifierOptimConfig)
    eval: ClassifierEvalConfig = field(default_factory=ClassifierEvalConfig)
    loss: ClassifierLossConfig = field(default_factory=ClassifierLossConfig)
    aug: ClassifierAugConfig = field(default_factory=ClassifierAugConfig)

    FAMILY: ClassVar[str] = "classifier"


def parse_class_weights(value: str) -> str | list[float]:
    """``"none"``, ``"balanced"`` or a list of positive floats from ``loss.class_weights``."""
    value = value.strip()
    if value in ("none", "balanced"):
        return value
    try:
        weights = [float(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        weights = []
    if not weights or any(w <= 0 for w in weights):
        raise CovidXrayError(f"config key 'loss.class_weights' must be none, balanced or positive numbers such as "
                             f"1,2.5,1; got '{value}'")
    return weights


#: Ranges of the ``optim`` keys the classifiers, segmenters and autoencoders share.
#: Allowed values of the shared optimizer section's string keys.
SUPERVISED_OPTIM_CHOICES = {"optim.name": ("adamw", "sgd"), "optim.schedule": ("cosine", "step", "none")}

SUPERVISED_OPTIM_BOUNDS = {
    "optim.lr": "(0, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.momentum": "[0, 1)",
    "optim.warmup_epochs": "[0, inf)",
    "optim.step_epochs": "[1, inf)",
    "optim.step_gamma": "(0, 1]",
}

#: Allowed ranges of the classifier family's numeric keys (every one has a bound; checked by ``validate``).
CLASSIFIER_BOUNDS = {
    **GENERIC_BOUNDS,
    **SUPERVISED_OPTIM_BOUNDS,
    "model.dropout": "[0, 1)",
    "model.mc_dropout": "[0, 1)",
    "data.synthetic_pool": "[0, 1000000]",
    "data.synthetic_ratio": Interval.parse(
        "(0, 1]", hint="It is the generated fraction of each batch (1 = generated images only): use e.g. 0.5 "
                       "(as many generated as real images), or leave data.synthetic empty"),
    "loss.label_smoothing": "[0, 1)",
    "aug.rotate": "[0, 180]",
    "aug.scale": "[0, 0.5]",
    "aug.translate": "[0, 0.5]",
    "aug.brightness": "[0, 1)",
    "aug.contrast": "[0, 1)",
    "eval.mc_samples": "[1, inf)",
}


def check_classifier(cfg: ClassifierConfig) -> None:
    """The classifier family's cross-key checks (single-key ranges: ``CLASSIFIER_BOUNDS``)."""
    size = cfg.data.image_size
    if size and not MIN_SIZE <= size <= MAX_SIZE:
        raise CovidXrayError(f"config key 'data.image_size' must be {MIN_SIZE}-{MAX_SIZE} (or 0: the prepared size) "
                             f"for a classifier; got {size}")
    parse_class_weights(cfg.loss.class_weights)


CLASSIFIER = register_family(Family(
    name="classifier",
    config=ClassifierConfig,
    choices={**GENERIC_CHOICES,
             **SUPERVISED_OPTIM_CHOICES},
    bounds=CLASSIFIER_BOUNDS,
    check=check_classifier,
    # Validation metrics and their better direction; the first is eval.metric's default (the seed
    # stopped early on validation loss).
    metrics={"loss": "min", "balanced_accuracy": "max", "accuracy": "max", "macro_f1": "max", "auc": "max"},
    summary="image classifiers: one label per chest X-ray (covid, normal, viral_pneumonia, ...)",
))
