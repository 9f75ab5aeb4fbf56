"""Run configuration: one dataclass schema, YAML overrides, dotted ``--set`` overrides.

Every key is declared here with its default and a comment on its allowed values
(the StudioGAN pattern). ``configs/<model>.yaml`` holds only the keys a model
changes; a user's ``--config FILE`` and ``--set section.key=value`` come on top.
Unknown keys and wrong types are rejected with the key named.

Resolution order (later wins)::

    schema defaults -> configs/<model>.yaml -> --config FILE -> CLI flags -> --set overrides
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidxray.errors import CovidXrayError

#: Folder holding one YAML of overrides per registered model.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DataConfig:
    path: str = ""                      # prepared folder (output of `covidxray prepare`); required to train
    image_size: int = 128               # 64 | 128 | 256; must equal the prepared size
    classes: list[str] = field(default_factory=list)  # subset of class names; [] = all classes
    split: str = "train"                # split to train on: train | val | test
    cache: bool = True                  # decode once to a uint8 tensor cached beside the prepared data
    on_device: str = "auto"             # keep the uint8 data set on the GPU: auto | yes | no
    n_classes: int = 0                  # set by the trainer from the data (class-conditional models); not a user knob


@dataclass
class ArchConfig:
    latent_dim: int = 100               # length of the latent vector z
    g_channels: int = 64                # base width of G (channels of its last hidden layer)
    d_channels: int = 64                # base width of D (channels of its first layer)
    max_channels: int = 512             # cap on any layer's width (keeps 256 px models small)
    g_spectral_norm: bool = False       # spectral normalisation on G's layers (Miyato et al. 2018)
    d_spectral_norm: bool = False       # spectral normalisation on D's layers (replaces D's BatchNorm)
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
class OptimConfig:
    lr_g: float = 2e-4                  # Adam learning rate of G
    lr_d: float = 2e-4                  # Adam learning rate of D
    beta1: float = 0.5                  # Adam beta1 (DCGAN: 0.5)
    beta2: float = 0.999                # Adam beta2


@dataclass
class TrainConfig:
    epochs: int = 100                   # total epochs (one epoch = every training image once)
    batch_size: int = 64                # images per step
    seed: int = 0                       # seeds every RNG; stored with the run
    deterministic: bool = False         # ask PyTorch for deterministic kernels (slower on GPU)
    device: str = "auto"                # auto (CUDA when present) | cpu | cuda | cuda:N
    num_threads: int = 0                # CPU threads for torch; 0 = leave PyTorch's default
    log_every: int = 20                 # write a stats.jsonl line every N steps (and at each epoch end)
    snapshot_every: int = 1             # save samples/epoch_XXXX.png every N epochs
    checkpoint_every: int = 5           # update checkpoints/last.pt every N epochs (also at the end and on Ctrl-C)
    keep_every: int = 0                 # also keep checkpoints/epoch_XXXX.pt every N epochs; 0 = never
    grid_size: int = 64                 # images in the fixed-latent sample grid (a square number is nicest)
    ema_kimg: float = 10.0              # half-life of the EMA of G's weights in kimg; 0 = no G_ema
    ema_rampup: float = 0.05            # EMA half-life ramp-up as a fraction of images seen (StyleGAN2-ADA); 0 = off
    amp: str = "auto"                   # mixed precision: auto (bf16 on CUDA, off on CPU) | bf16 | fp16 (CUDA) | off
    channels_last: bool = True          # channels_last memory format (faster convolutions on GPUs and CPUs)
    compile: bool = False               # torch.compile G and D (falls back to eager with a warning)
    compile_mode: str = "default"       # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    cuda_graphs: str = "auto"           # replay each training step as one CUDA graph: auto (on CUDA, unless compiled or fp16) | yes | no


@dataclass
class Config:
    model: str = "rawgan"               # registered model name (`covidxray models` lists them)
    out: str = "runs"                   # parent folder of run folders (runs/<id>-<model>/)
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# Allowed values of string keys; checked in `validate`.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.split": ("train", "val", "test"),
    "data.on_device": ("auto", "yes", "no"),
    "loss.kind": ("bce", "hinge", "lsgan"),
    "loss.uncertainty": ("off", "min", "max"),
    "loss.aux_mode": ("acgan", "real", "tac"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "train.cuda_graphs": ("auto", "yes", "no"),
}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert ``value`` to the declared type ``typ`` of ``key``; raise with the key named."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise CovidXrayError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if typ in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; accept any number Python can parse.
        try:
            value = typ(value)
        except ValueError:
            pass
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, bool) and key in CHOICES:
            # YAML 1.1 reads off/no/false (on/yes/true) as booleans: map them back to the key's word.
            words = ("off", "no", "false") if value is False else ("on", "yes", "true")
            for word in words:
                if word in CHOICES[key]:
                    return word
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported config type {typ} for {key}")
    raise CovidXrayError(
        f"config key '{key}' must be of type {typ.__name__}, got {value!r} ({type(value).__name__})"
    )


def _apply(obj: Any, updates: dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(updates, dict):
        raise CovidXrayError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise CovidXrayError(
                f"{source}: unknown config key '{key}'; valid keys here: {', '.join(prefix + n for n in names)}"
            )
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def apply_overrides(cfg: Config, updates: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested mapping of overrides to ``cfg`` in place (unknown keys rejected)."""
    _apply(cfg, updates or {}, "", source)
    return cfg


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["train.batch_size=32", ...]`` into a nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CovidXrayError(f"--set '{item}' must look like section.key=value (e.g. train.batch_size=32)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise CovidXrayError(f"--set '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CovidXrayError(f"--set '{item}' conflicts with another --set of '{part}'")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with clear errors for a missing file or bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"config file {path} does not exist", "Check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CovidXrayError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CovidXrayError(f"config file {path} must hold a mapping of sections (data:, train:, ...)")
    return data


def model_config_path(model: str) -> Path:
    return CONFIG_DIR / f"{model}.yaml"


def validate(cfg: Config) -> Config:
    """Cross-key checks with readable messages (one compatibility check, StudioGAN-style)."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise CovidXrayError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    positive = {
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.log_every": cfg.train.log_every, "train.snapshot_every": cfg.train.snapshot_every,
        "train.checkpoint_every": cfg.train.checkpoint_every, "train.grid_size": cfg.train.grid_size,
        "arch.latent_dim": cfg.arch.latent_dim, "arch.g_channels": cfg.arch.g_channels,
        "arch.d_channels": cfg.arch.d_channels,
    }
    for key, value in positive.items():
        if value < 1:
            raise CovidXrayError(f"config key '{key}' must be >= 1; got {value}")
    if cfg.data.image_size not in (64, 128, 256):
        raise CovidXrayError(f"config key 'data.image_size' must be 64, 128 or 256; got {cfg.data.image_size}")
    if cfg.loss.r1_every < 1:
        raise CovidXrayError(f"config key 'loss.r1_every' must be >= 1; got {cfg.loss.r1_every}")
    if cfg.loss.uncertainty != "off" and cfg.loss.mc_samples < 2:
        raise CovidXrayError(f"config key 'loss.mc_samples' must be >= 2 with an uncertainty mode; got {cfg.loss.mc_samples}")
    if not 0.0 <= cfg.arch.d_dropout < 1.0:
        raise CovidXrayError(f"config key 'arch.d_dropout' must be in [0, 1); got {cfg.arch.d_dropout}")
    if cfg.loss.uncertainty != "off" and cfg.arch.d_dropout <= 0.0:
        raise CovidXrayError(
            f"loss.uncertainty={cfg.loss.uncertainty} needs Monte-Carlo dropout in D",
            "Also set arch.d_dropout (e.g. --set arch.d_dropout=0.3)",
        )
    if cfg.aug.diffaugment:
        from covidxray.train.augment import parse_policy

        try:
            parse_policy(cfg.aug.diffaugment)
        except ValueError as exc:
            raise CovidXrayError(f"config key 'aug.diffaugment': {exc}") from None
    if cfg.optim.lr_g <= 0 or cfg.optim.lr_d <= 0:
        raise CovidXrayError("config keys 'optim.lr_g' and 'optim.lr_d' must be > 0")
    if not (cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:")):
        raise CovidXrayError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N; got '{cfg.train.device}'")
    return cfg


def resolve_config(
    model: str,
    config_file: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> Config:
    """Build the resolved config of a run (see the module docstring for the order).

    Args:
        model: registered model name; its ``configs/<model>.yaml`` is applied when present.
        config_file: optional user YAML of overrides.
        flags: nested overrides from CLI flags such as ``--epochs`` (``None`` values skipped).
        sets: ``--set key=value`` strings.
    """
    cfg = Config(model=model)
    path = model_config_path(model)
    if path.is_file():
        data = load_yaml(path)
        data.pop("model", None)
        apply_overrides(cfg, data, source=str(path))
    if config_file is not None:
        data = load_yaml(config_file)
        if "model" in data and data["model"] != model:
            raise CovidXrayError(
                f"{config_file} is for model '{data['model']}' but --model is '{model}'",
                "Drop 'model:' from the file or pass the matching --model",
            )
        data.pop("model", None)
        apply_overrides(cfg, data, source=str(config_file))
    if flags:
        clean = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
        apply_overrides(cfg, {s: d for s, d in clean.items() if d}, source="command-line flag")
    apply_overrides(cfg, parse_set(sets), source="--set")
    return validate(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a checkpoint or a run's config.yaml)."""
    data = dict(data)
    loss = data.get("loss")
    if isinstance(loss, dict) and "aux_on_fakes" in loss:
        # Runs from before loss.aux_mode (version 0.1.0 stored a boolean): same meaning, new key.
        loss = dict(loss)
        loss.setdefault("aux_mode", "acgan" if loss.pop("aux_on_fakes") else "real")
        loss.pop("aux_on_fakes", None)
        data["loss"] = loss
    cfg = Config(model=data.pop("model", "rawgan"))
    apply_overrides(cfg, data, source="stored config")
    return cfg
