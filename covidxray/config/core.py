"""The machinery of run configurations: generic sections, families, YAML and ``--set`` overrides.

A run's configuration is one dataclass tree. Every family of models (``gan``, ``classifier``, ...)
declares a :class:`Config` subclass: the **generic sections** every family has (``model``, ``data``,
``train``, ``optim``, ``eval``), which it may extend with keys of its own by subclassing the section
(the GANs' ``train`` adds ``ema_kimg``), plus **family sections** (the GANs' ``arch``, ``loss``,
``aug``). Every key is declared once, with its default and a comment on its allowed values (the
StudioGAN pattern); ``configs/<model>.yaml`` holds only the keys a model changes. Unknown keys and
wrong types are refused with the key and the family named.

Allowed values are declared beside the schema, in one place per family, and checked generically by
:func:`validate`: ``choices`` for string keys and ``bounds`` (an :class:`Interval` such as ``"[0, 1)"``)
for **every** numeric key; a family cannot be registered with a numeric key that has no bound. Numbers
must also be finite (``nan``/``inf`` are refused when read). Only genuinely cross-key rules live in a
family's ``check`` function.

Resolution order (later wins)::

    the family's schema defaults -> configs/<model>.yaml -> --config FILE -> CLI flags -> --set overrides
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import yaml

from covidxray.errors import CovidXrayError
from covidxray.models.registry import get_model

#: Folder holding one YAML of overrides per registered model.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


# --------------------------------------------------------------------------------------------
# Generic sections
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = ""                      # registered model name, set by --model (`covidxray models` lists them)


@dataclass
class DataConfig:
    path: str = ""                      # prepared folder (output of `covidxray prepare`); required to train
    image_size: int = 0                 # input side in px; 0 = the prepared size (GANs: 64 | 128 | 256, equal to the
                                        # prepared size; classifiers: 64-299, resized on the device when it differs)
    classes: list[str] = field(default_factory=list)  # subset of class names; [] = all classes
    split: str = "train"                # split to train on: train | val | test
    cache: bool = True                  # decode once to a uint8 tensor cached beside the prepared data
    on_device: str = "auto"             # keep the uint8 data set on the GPU: auto | yes | no


@dataclass
class TrainConfig:
    epochs: int = 100                   # total epochs (one epoch = every training image once)
    batch_size: int = 64                # images per step
    seed: int = 0                       # seeds every RNG; stored with the run
    deterministic: bool = False         # ask PyTorch for deterministic kernels (slower on GPU)
    device: str = "auto"                # auto (CUDA when present) | cpu | cuda | cuda:N
    num_threads: int = 0                # CPU threads for torch; 0 = leave PyTorch's default
    log_every: int = 20                 # write a stats.jsonl line every N steps (and at each epoch end)
    snapshot_every: int = 1             # write the family's snapshot (GANs: samples/epoch_XXXX.png) every N epochs
    checkpoint_every: int = 5           # update checkpoints/last.pt every N epochs (also at the end and on Ctrl-C)
    keep_every: int = 0                 # also keep checkpoints/epoch_XXXX.pt every N epochs; 0 = never
    tensorboard: bool = False           # also write every stats.jsonl record's numbers as TensorBoard scalars under
                                        # RUN/tensorboard/ (needs `pip install covidxray[tensorboard]`)
    amp: str = "auto"                   # mixed precision: auto (bf16 on CUDA and on CPUs with native bf16, AMX /
                                        # AVX512-BF16, measured in docs/benchmarks.md; else off) | bf16 | fp16 (CUDA) | off
    channels_last: bool = True          # channels_last memory format (faster convolutions on GPUs and CPUs)
    compile: bool = False               # torch.compile the trained networks (falls back to eager with a warning)
    compile_mode: str = "default"       # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune
    cuda_graphs: str = "auto"           # replay each training step as one CUDA graph: auto (on CUDA, unless compiled or fp16) | yes | no
    sync_batchnorm: str = "auto"        # torchrun runs: SyncBatchNorm over the ranks: auto (on for multi-GPU runs of models
                                        # with BatchNorm) | yes (CUDA only) | no; docs/distributed.md
    dist_timeout: float = 600.0         # torchrun runs: seconds a collective waits for the other ranks before the run stops


@dataclass
class OptimConfig:
    beta1: float = 0.9                  # Adam/AdamW beta1
    beta2: float = 0.999                # Adam/AdamW beta2


@dataclass
class EvalConfig:
    every: int = 0                      # evaluate on eval.split every N epochs (picks checkpoints/best.pt); 0 = never
    split: str = "val"                  # split evaluated during training: val | test (test only to reproduce a paper)
    metric: str = ""                    # metric that picks best.pt and drives early stopping; "" = the family's default
    mode: str = "auto"                  # auto (the metric's own direction) | min | max
    patience: int = 0                   # early stopping: stop after this many evaluations without improvement; 0 = off
    min_delta: float = 0.0              # an improvement smaller than this does not count (best.pt, patience)
    batch_size: int = 256               # images per forward pass when evaluating


@dataclass
class Config:
    """A resolved configuration: the generic sections; each family's subclass adds its own."""

    model: ModelConfig = field(default_factory=ModelConfig)
    out: str = "runs"                   # parent folder of run folders (runs/<id>-<model>/)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    #: The family this schema belongs to (set by each subclass).
    FAMILY: ClassVar[str] = ""

    @property
    def family(self) -> str:
        return self.FAMILY

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: Allowed values of the generic sections' string keys (families add theirs).
GENERIC_CHOICES: dict[str, tuple[str, ...]] = {
    "data.split": ("train", "val", "test"),
    "data.on_device": ("auto", "yes", "no"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune"),
    "train.cuda_graphs": ("auto", "yes", "no"),
    "train.sync_batchnorm": ("auto", "yes", "no"),
    "eval.split": ("val", "test"),
    "eval.mode": ("auto", "min", "max"),
}


# --------------------------------------------------------------------------------------------
# Bounds of numeric keys
# --------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """A bound or value as written in messages: whole numbers without a decimal point, else ``:g``."""
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return f"{x:g}"


def _bound_number(text: str) -> float:
    text = text.strip().lower()
    if text in ("inf", "+inf"):
        return math.inf
    if text == "-inf":
        return -math.inf
    value = float(text)
    return int(value) if value.is_integer() and abs(value) < 1e16 else value


@dataclass(frozen=True)
class Interval:
    """The allowed range of a numeric config key: ``lo``..``hi``, each end open or closed.

    Written compactly as ``"[0, 1)"``, ``"(0, inf)"``, ``"[1, 7]"`` (:meth:`parse`); an infinite end is
    always open. ``hint`` is an optional fix appended to the error.
    """

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    hint: str | None = None

    _TEXT: ClassVar[re.Pattern] = re.compile(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*")

    def __post_init__(self) -> None:
        if (math.isnan(self.lo) or math.isnan(self.hi) or self.lo > self.hi
                or (self.lo == self.hi and (self.lo_open or self.hi_open))):
            raise ValueError(f"empty interval {self}")
        if math.isinf(self.lo):
            object.__setattr__(self, "lo_open", True)
        if math.isinf(self.hi):
            object.__setattr__(self, "hi_open", True)

    @classmethod
    def parse(cls, text: "str | Interval", hint: str | None = None) -> "Interval":
        """``"[0, 1)"`` -> Interval(0, 1, hi_open=True); an Interval is returned as it is."""
        if isinstance(text, Interval):
            return text
        m = cls._TEXT.fullmatch(text)
        try:
            if m is None:
                raise ValueError
            lo, hi = _bound_number(m.group(2)), _bound_number(m.group(3))
        except ValueError:
            raise ValueError(f"bad interval {text!r}: write it like '[0, 1)' or '(0, inf)'") from None
        return cls(lo, hi, m.group(1) == "(", m.group(4) == ")", hint)

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_fmt(self.lo)}, {_fmt(self.hi)}{')' if self.hi_open else ']'}"

    def describe(self) -> str:
        """``"> 0"``, ``">= 1"``, ``"in [0, 1)"``: what a message says a value must be."""
        if math.isinf(self.lo) and math.isinf(self.hi):
            return "a finite number"
        if math.isinf(self.hi):
            return f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
        if math.isinf(self.lo):
            return f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
        return f"in {self}"

    def number_kwargs(self) -> dict[str, float]:
        """The interval as ``ge``/``gt``/``le``/``lt`` keywords (the CLI's ``Number`` parser)."""
        kw: dict[str, float] = {}
        if not math.isinf(self.lo):
            kw["gt" if self.lo_open else "ge"] = self.lo
        if not math.isinf(self.hi):
            kw["lt" if self.hi_open else "le"] = self.hi
        return kw

    def check(self, key: str, value: float) -> None:
        """Raise :class:`CovidXrayError` naming ``key``, the interval and ``value`` when it lies outside."""
        if value not in self:
            raise CovidXrayError(f"config key '{key}' must be {self.describe()}; got {_fmt(value)}", self.hint)


def bounds(spec: Mapping[str, "str | Interval"]) -> dict[str, Interval]:
    """Parse a mapping ``"section.key" -> "[lo, hi)" | Interval`` (what families declare)."""
    return {key: Interval.parse(value) for key, value in spec.items()}


#: Allowed ranges of the generic sections' numeric keys (families extend or narrow them).
GENERIC_BOUNDS: dict[str, Interval] = bounds({
    "data.image_size": "[0, inf)",          # 0 = the prepared size; each family checks its own sizes
    "train.epochs": "[1, inf)",
    "train.batch_size": "[1, inf)",
    "train.seed": "[0, 1e18)",              # torch takes seeds below 2**64 (~1.8e19); room for per-rank offsets
    "train.num_threads": "[0, inf)",
    "train.log_every": "[1, inf)",
    "train.snapshot_every": "[1, inf)",
    "train.checkpoint_every": "[1, inf)",
    "train.keep_every": "[0, inf)",
    "train.dist_timeout": Interval(0, math.inf, lo_open=True, hint="It is in seconds (default 600)"),
    "optim.beta1": "[0, 1)",
    "optim.beta2": "[0, 1)",
    "eval.every": "[0, inf)",
    "eval.patience": "[0, inf)",
    "eval.min_delta": "[0, inf)",
    "eval.batch_size": "[1, inf)",
})


def numeric_keys(cls: type, prefix: str = "") -> dict[str, type]:
    """Every numeric (int or float, not bool) leaf key of a config dataclass, with its type."""
    found: dict[str, type] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            found.update(numeric_keys(typ, f"{prefix}{f.name}."))
        elif typ in (int, float):
            found[f"{prefix}{f.name}"] = typ
    return found


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What a family of models declares about its configuration.

    Attributes:
        name: the family's name, as models register it (``register_model(..., family=name)``).
        config: its :class:`Config` subclass (generic sections, possibly extended, plus its own).
        choices: allowed values of its string keys, ``"section.key" -> values`` (generic ones included).
        check: cross-key validation of a resolved config; raises :class:`CovidXrayError`. Single-key
            ranges belong in ``bounds``, not here.
        metrics: evaluation metrics its task reports, ``name -> "min" | "max"`` (the better direction);
            the first is the default of ``eval.metric``. Empty: the family has no evaluation yet.
        summary: one line for documentation.
        bounds: the allowed range of **every** numeric key, ``"section.key" -> Interval`` or its compact
            text (``"[0, 1)"``, ``"(0, inf)"``), :data:`GENERIC_BOUNDS` included; checked by :func:`validate`.
    """

    name: str
    config: type
    choices: Mapping[str, tuple[str, ...]]
    check: Callable[[Any], None]
    metrics: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    bounds: Mapping[str, Interval] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bounds", bounds(self.bounds))


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Declare a family (done once by each ``covidxray/config/<family>.py``).

    Every numeric key of its schema must have a bound, and every bound must name a numeric key.
    """
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    if getattr(family.config, "FAMILY", None) != family.name:
        raise ValueError(f"{family.config.__name__}.FAMILY must be {family.name!r}")
    numeric = numeric_keys(family.config)
    stray = sorted(set(family.bounds) - set(numeric))
    if stray:
        raise ValueError(f"family {family.name!r} declares bounds of {', '.join(stray)}, "
                         f"not numeric keys of its schema")
    missing = sorted(set(numeric) - set(family.bounds))
    if missing:
        raise ValueError(f"family {family.name!r} declares no bounds for its numeric keys {', '.join(missing)}")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The declared family ``name``; unknown names raise with the list of valid ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise CovidXrayError(f"unknown model family '{name}'; known families: {', '.join(sorted(FAMILIES))}") from None


def family_of(model: str) -> Family:
    """The family of a registered model (looked up in the model registry)."""
    return get_family(get_model(model).family)


# --------------------------------------------------------------------------------------------
# Overrides
# --------------------------------------------------------------------------------------------


def _coerce(key: str, value: Any, typ: Any, choices: Mapping[str, tuple[str, ...]]) -> Any:
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
        return [_coerce(key, v, item, choices) for v in value]
    if typ in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; accept any number Python can parse.
        try:
            value = typ(value)
        except ValueError:
            try:  # "nan"/"inf" for an int key: say it must be finite, as for a float key
                as_float = float(value)
            except ValueError:
                pass
            else:
                if not math.isfinite(as_float):
                    value = as_float
    if typ in (int, float) and isinstance(value, float) and not math.isfinite(value):
        # nan / inf (also YAML's .nan / .inf) would pass every range check and fail deep inside torch
        raise CovidXrayError(f"config key '{key}' must be a finite number; got {value}")
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
        if isinstance(value, bool) and key in choices:
            # YAML 1.1 reads off/no/false (on/yes/true) as booleans: map them back to the key's word.
            words = ("off", "no", "false") if value is False else ("on", "yes", "true")
            for word in words:
                if word in choices[key]:
                    return word
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:  # pragma: no cover - schemas use only the types above
        raise TypeError(f"unsupported config type {typ} for {key}")
    raise CovidXrayError(
        f"config key '{key}' must be of type {typ.__name__}, got {value!r} ({type(value).__name__})"
    )


def _keys_of(cls: type, prefix: str = "") -> set[str]:
    """Every dotted key of a config dataclass (sections and leaves)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.add(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _keys_of(hints[f.name], f"{key}.")
    return keys


def _owners(key: str, family: str) -> list[str]:
    return [name for name, fam in sorted(FAMILIES.items()) if name != family and key in _keys_of(fam.config)]


def _unknown(source: str, key: str, prefix: str, names: list[str], cfg: Config) -> CovidXrayError:
    where = f"of the {cfg.family} family (model '{cfg.model.name}')" if cfg.family else ""
    others = _owners(key, cfg.family)
    note = f"; it is a key of the {', '.join(others)} family" if others else ""
    valid = ", ".join(prefix + n for n in names)
    return CovidXrayError(f"{source}: unknown config key '{key}' {where}{note}; valid keys here: {valid}")


def _apply(obj: Any, updates: Any, prefix: str, source: str, root: Config) -> None:
    if not isinstance(updates, dict):
        raise CovidXrayError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    choices = FAMILIES[root.family].choices if root.family in FAMILIES else GENERIC_CHOICES
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(source, key, prefix, names, root)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{key}.", source, root)
        else:
            setattr(obj, name, _coerce(key, value, hints[name], choices))


def apply_overrides(cfg: Config, updates: dict[str, Any], source: str = "config") -> Config:
    """Apply a nested mapping of overrides to ``cfg`` in place (unknown keys refused)."""
    _apply(cfg, updates or {}, "", source, cfg)
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


# --------------------------------------------------------------------------------------------
# Validation and resolution
# --------------------------------------------------------------------------------------------


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def check_image_size(cfg: Config, sizes: tuple[int, ...], what: str) -> None:
    """Refuse a ``data.image_size`` that is neither 0 (the prepared size) nor one of ``sizes`` (``what``: the
    model's kind in the message, e.g. "an autoencoder")."""
    size = cfg.data.image_size
    if size and size not in sizes:
        raise CovidXrayError(f"config key 'data.image_size' must be one of {', '.join(map(str, sizes))} (or 0: the "
                             f"prepared size) for {what}; got {size}")


def validate(cfg: Config) -> Config:
    """Check a resolved config with readable messages naming the key: the declared choices of string
    keys and bounds of numeric keys (the family's declaration, generic ones included), the generic
    cross-key rules, then the family's own ``check``."""
    family = get_family(cfg.family)
    for key, allowed in family.choices.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise CovidXrayError(f"config key '{key}' must be one of {', '.join(allowed)}; got '{value}'")
    for key, interval in family.bounds.items():
        interval.check(key, _get(cfg, key))
    if not (cfg.train.device in ("auto", "cpu", "cuda") or cfg.train.device.startswith("cuda:")):
        raise CovidXrayError(f"config key 'train.device' must be auto, cpu, cuda or cuda:N; got '{cfg.train.device}'")
    if cfg.eval.every > 0 or cfg.eval.patience > 0 or cfg.eval.metric:
        if not family.metrics:
            raise CovidXrayError(
                f"the {family.name} family has no evaluation during training yet (eval.every, eval.metric, "
                f"eval.patience)", "Leave the eval section at its defaults")
        if cfg.eval.metric and cfg.eval.metric not in family.metrics:
            raise CovidXrayError(f"config key 'eval.metric' must be one of {', '.join(family.metrics)} for the "
                                 f"{family.name} family; got '{cfg.eval.metric}'")
        if cfg.eval.patience > 0 and cfg.eval.every == 0:
            raise CovidXrayError("eval.patience (early stopping) needs evaluations", "Also set eval.every (e.g. 1)")
    family.check(cfg)
    return cfg


def eval_metric(cfg: Config) -> tuple[str, str]:
    """The metric that picks ``best.pt`` and its better direction (``min``/``max``)."""
    family = get_family(cfg.family)
    name = cfg.eval.metric or next(iter(family.metrics))
    mode = family.metrics[name] if cfg.eval.mode == "auto" else cfg.eval.mode
    return name, mode


def new_config(model: str, family: str | None = None) -> Config:
    """The schema defaults of ``model``'s family, with ``model.name`` set (no model YAML applied)."""
    fam = get_family(family) if family is not None else family_of(model)
    cfg = fam.config()
    cfg.model.name = model
    return cfg


def _pop_name(data: dict[str, Any], source: str, model: str) -> None:
    """Remove the model name from a mapping of overrides, refusing one that names another model.

    ``model: cgan`` (the form of version 0.1.0) and ``model: {name: cgan, ...}`` are both read.
    """
    value = data.get("model")
    if isinstance(value, dict):
        name = value.get("name")
        rest = {k: v for k, v in value.items() if k != "name"}
        if rest:
            data["model"] = rest
        else:
            data.pop("model")
    else:
        name = data.pop("model", None)
    if name is not None and name != model:
        raise CovidXrayError(f"{source} is for model '{name}' but --model is '{model}'",
                             "Drop the model name from the file or pass the matching --model")


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
    cfg = new_config(model)
    path = model_config_path(model)
    if path.is_file():
        data = load_yaml(path)
        _pop_name(data, str(path), model)
        apply_overrides(cfg, data, source=str(path))
    if config_file is not None:
        data = load_yaml(config_file)
        _pop_name(data, str(config_file), model)
        apply_overrides(cfg, data, source=str(config_file))
    if flags:
        clean = {s: {k: v for k, v in d.items() if v is not None} for s, d in flags.items()}
        apply_overrides(cfg, {s: d for s, d in clean.items() if d}, source="command-line flag")
    overrides = parse_set(sets)
    _pop_name(overrides, "--set model.name", model)
    apply_overrides(cfg, overrides, source="--set")
    return validate(cfg)


#: Migrations of stored configs (checkpoints, run folders) written by earlier versions, per family.
MIGRATIONS: dict[str, list[Callable[[dict[str, Any]], None]]] = {}


def config_from_dict(data: dict[str, Any], family: str | None = None) -> Config:
    """Rebuild a Config from ``to_dict()`` output (a checkpoint's or a run's ``config.yaml``).

    Stored configs of version 0.1.0 (``model: NAME`` as a string, ``data.n_classes``) are read too.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    model = data.get("model")
    name = model.get("name") if isinstance(model, dict) else model
    if not name:
        raise CovidXrayError("the stored configuration names no model")
    if isinstance(model, str):
        data["model"] = {"name": model}
    if isinstance(data.get("data"), dict):
        data["data"].pop("n_classes", None)  # 0.1.0: written by the trainer from the data, not a setting
    cfg = new_config(name, family)
    for migrate in MIGRATIONS.get(cfg.family, []):
        migrate(data)
    apply_overrides(cfg, data, source="stored config")
    return cfg
