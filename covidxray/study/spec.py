"""A study spec: its YAML, its dataclasses, and the plan of every arm, checked before anything trains.

A spec (``configs/studies/demo.yaml`` is one; docs/study.md describes every key)::

    name: demo                      # default output folder: studies/<name>
    data: {size: 64, masks: false, classes: []}   # what the prepared folder must offer
    seed: 0                         # train.seed of every arm without its own
    checkpoints_at: [0.25, 0.5, 1.0]  # points of each budget that are scored (fractions of it)
    sets: [train.grid_size=4]       # overrides of every arm (before the arm's own)
    eval: {n: 500, repeats: 3, split: test, metrics: [fid, kid], seed: 0, downstream: null,
           sampling: {steps: 18, sampler: heun}}   # sampler options of the arms whose model takes them
    arms:
      - {name: cgan-max, model: cgan, kimg: 200, sets: [loss.uncertainty=max], max_minutes: 120}
      - {name: edm-fast, model: edm, kimg: 200, sampling: {sampler: dpm2m, steps: 10}}
      - {name: vae, model: cvae, kimg: 100, seeds: [0, 1, 2]}   # arms vae-s0, vae-s1, vae-s2, and their mean ± std

:func:`load_spec` reads and checks the spec alone (unknown keys, types, budgets, names); :func:`plan_study`
checks it against the prepared data - every arm's configuration resolved by
:func:`covidxray.config.resolve_config`, masks where an arm trains on them - and turns each budget into
epochs and each scored point into a training step. Every refusal is one :class:`CovidXrayError` naming the
spec file and the arm.

**Budgets.** The loop counts training images shown (``images_seen``: ``batch_size`` a step, the last
incomplete batch of an epoch dropped), so an arm of ``kimg`` thousand images trains
``ceil(kimg * 1000 / images_per_epoch)`` whole epochs, ``images_per_epoch = (n // batch) * batch`` for its ``n``
training images: the budget rounds up to whole epochs (the kimg reached is recorded). A point at fraction
``f`` is the weights after ``ceil(f * total_steps)`` steps.

**Sampling.** ``eval.sampling`` (``steps``, ``sampler``, ``guidance``) reaches the evaluation of every arm whose
model takes sampler options (:func:`covidxray.infer.protocol.sampling_of`: the diffusion models); the others
ignore it. An arm's own ``sampling`` overrides it key by key, and is refused on a model that takes none. The
values are checked here, by the family's own check, before anything trains.

**TensorBoard.** Where the ``tensorboard`` package is installed, every arm also writes its ``stats.jsonl`` scalars
to TensorBoard (``train.tensorboard=true``: an execution setting, out of the keys; ``--set
train.tensorboard=false`` turns it off).

**Scale.** :func:`scale_spec` (``covidxray study --scale F``, 0 < F <= 1) multiplies every arm's ``kimg`` and
``max_minutes`` by F, so that a spec sized for a GPU runs scaled down; each arm keeps the spec's own budget
(``Arm.spec_kimg``) for the report. A scaled study is another study: F enters every training key.

**Keys.** Each arm's training stage is keyed by a hash of its resolved configuration (without the settings
that do not change the weights: :data:`EXECUTION` and the device), its budget, points, cap and scale (when it is
not 1); each scoring stage by the training key, the evaluation protocol (with the arm's own sampling options in
place of ``eval.sampling``) and the point. A rerun redoes the stages whose key changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from covidxray.config import Config, parse_set, resolve_config
from covidxray.data.datasets import read_prepared_info, read_records
from covidxray.errors import CovidXrayError
from covidxray.evaluate.downstream import check_downstream_args
from covidxray.evaluate.generator import parse_metrics
from covidxray.infer.protocol import Generator, MaskTranslator, having, sampling_of
from covidxray.models.registry import get_model
from covidxray.train import tensorboard
from covidxray.train.tasks import get_task

#: Config keys the study sets for every arm, which neither the spec's ``sets`` nor an arm's may: what keeps
#: the arms comparable (key -> where it comes from instead).
FIXED = {
    "out": "the study places each arm's run in OUT/arms/<arm>/",
    "data.path": "it is --data",
    "data.split": "every arm trains on the train split",
    "data.classes": "set the study's data.classes",
    "data.image_size": "every arm draws at the prepared size, the size the evaluation compares",
    "train.epochs": "the arm's kimg is its budget",
    "train.seed": "give the arm a seed: (or the study one)",
    "train.device": "it is --device",
}

#: Settings that do not change what an arm learns: the only keys ``covidxray study --set`` takes, and left out
#: of the stage keys (with ``train.device``), so that changing them reruns nothing.
EXECUTION = ("train.num_threads", "train.log_every", "train.checkpoint_every", "train.tensorboard", "data.cache",
             "data.on_device")

#: Points scored when neither the spec nor the arm names them (fractions of the budget; 1.0 is always added).
DEFAULT_POINTS = (0.1, 0.25, 0.5, 1.0)

#: The sampler options ``eval.sampling`` and an arm's ``sampling`` may name (each model takes those of its
#: family's :func:`~covidxray.infer.protocol.sampling_of`).
SAMPLING = ("steps", "sampler", "guidance")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class DataNeeds:
    """What the prepared folder must offer (checked by :func:`plan_study`)."""

    size: int | None = None             # prepared side in px; None = any
    masks: bool = False                 # lung masks required (arms that train on masks check it anyway)
    classes: tuple[str, ...] = ()       # the classes every arm trains and is scored on; () = all


@dataclass(frozen=True)
class Downstream:
    """The downstream classifier arms of the final point (:mod:`covidxray.evaluate.downstream`)."""

    classifier: str = "resnet18"        # a registered classifier
    seeds: int = 3                      # seeds per classifier arm
    epochs: int | None = None           # classifier epochs; None = its config
    synthetic_ratio: float = 0.5        # generated share of each batch of arm (b), in (0, 1)
    pool: int = 0                       # synthetic pool drawn once; 0 = the evaluation's default
    sets: tuple[str, ...] = ()          # classifier overrides key=value


@dataclass(frozen=True)
class Segmentation:
    """The segmentation table of every mask-conditional arm at its full budget (:mod:`covidxray.evaluate.pairs`):
    U-Nets trained on real pairs, real + the arm's synthetic pairs, and its synthetic pairs alone."""

    seeds: int = 3                      # U-Nets per arm (a, b, c); arm (a) is shared by every mask arm
    epochs: int = 30                    # U-Net epochs
    copies: int = 1                     # synthetic pairs per real mask (deformed masks)
    sets: tuple[str, ...] = ()          # U-Net overrides key=value (e.g. arch.width=16)


@dataclass(frozen=True)
class EvalProtocol:
    """The evaluation every point of every arm gets (:class:`covidxray.evaluate.generator.GeneratorEvaluation`)."""

    n: int | None = None                # generated images per draw; None = as many as the real training images
    repeats: int = 5                    # draws of n images (mean ± std)
    split: str = "test"                 # reference split: test | val | train
    metrics: tuple[str, ...] = ("fid", "kid", "pr", "dc", "memorization", "diversity")
    seed: int = 0                       # seed of the draws (draw r uses seed + r)
    batch_size: int = 64                # images per forward pass
    downstream: Downstream | None = None  # at the full budget only; None = no downstream arms
    sampling: dict[str, Any] = field(default_factory=dict)  # sampler options (steps, sampler, guidance) of the
                                        # arms whose model takes them; {} = each run's own
    segmentation: Segmentation | None = None  # mask-conditional arms, full budget; None = no segmentation table


@dataclass(frozen=True)
class Arm:
    """One arm: a model with its overrides, trained for ``kimg`` thousand images."""

    name: str                           # its folder OUT/arms/<name>/ and its row
    model: str                          # a registered generator (or mask -> X-ray model)
    kimg: float                         # budget: thousands of training images shown (> 0)
    sets: tuple[str, ...] = ()          # config overrides key=value (after the spec's sets)
    seed: int = 0                       # train.seed
    checkpoints_at: tuple[float, ...] = (1.0,)  # scored points, fractions of the budget in (0, 1]
    max_minutes: float | None = None    # wall-clock cap of its training (a safety); None = none
    sampling: dict[str, Any] = field(default_factory=dict)  # the sampler options its evaluations use: eval.sampling
                                        # with the arm's own on top, those its model takes ({} for the others)
    spec_kimg: float | None = None      # the spec's budget when kimg was scaled (scale_spec); None = kimg is it
    group: str | None = None            # the spec's arm name when this arm is one of its `seeds` (<group>-s<seed>)

    @property
    def images(self) -> int:
        """The budget in images (kimg given to the image)."""
        return max(1, round(self.kimg * 1000))


@dataclass(frozen=True)
class StudySpec:
    """A loaded, checked spec (:func:`load_spec`)."""

    path: Path
    name: str
    description: str
    data: DataNeeds
    seed: int
    sets: tuple[str, ...]
    eval: EvalProtocol
    arms: tuple[Arm, ...]
    text: str = ""                      # the spec file as read (the report quotes it verbatim)
    scale: float = 1.0                  # what every arm's kimg and max_minutes were multiplied by (scale_spec)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise CovidXrayError(f"{self.path} has no arm '{name}'; its arms: {', '.join(a.name for a in self.arms)}")


# ------------------------------------------------------------------------------------------- reading
class _Reader:
    """Typed reads of the spec's mappings, each error naming the spec file and where in it."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, where: str, message: str, hint: str | None = None) -> CovidXrayError:
        return CovidXrayError(f"{self.path}: {where + ': ' if where else ''}{message}", hint)

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"must be a mapping, got {value!r}")
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise self.error(where, f"unknown key '{unknown[0]}'; valid keys here: {', '.join(allowed)}")
        return value

    def integer(self, value: Any, where: str, key: str, lo: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise self.error(where, f"{key} must be a whole number >= {lo}, got {value!r}")
        return value

    def number(self, value: Any, where: str, key: str, what: str = "> 0") -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self.error(where, f"{key} must be a number {what}, got {value!r}")
        return float(value)

    def boolean(self, value: Any, where: str, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(where, f"{key} must be true or false, got {value!r}")
        return value

    def text(self, value: Any, where: str, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.error(where, f"{key} must be a non-empty string, got {value!r}")
        return value.strip()

    def texts(self, value: Any, where: str, key: str) -> tuple[str, ...]:
        if isinstance(value, str):
            value = value.split(",")
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(where, f"{key} must be a list, got {value!r}")
        return tuple(self.text(v, where, key) for v in value)

    def fractions(self, value: Any, where: str) -> tuple[float, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(where, f"checkpoints_at must be a non-empty list of fractions of the budget, got {value!r}")
        out = []
        for v in value:
            f = self.number(v, where, "each of checkpoints_at", "in (0, 1]")
            if f > 1:
                raise self.error(where, f"each of checkpoints_at must be a number in (0, 1], got {v!r}",
                                 "They are fractions of the budget: [0.25, 0.5, 1.0]")
            out.append(f)
        return tuple(sorted(set(out) | {1.0}))  # the full budget is always scored: it is the arm's row

    def sets(self, value: Any, where: str) -> tuple[str, ...]:
        """``[key=value, ...]`` or a mapping (nested or dotted keys), as ``key=value`` strings, checked for the
        keys the study sets itself (:data:`FIXED`)."""
        if value is None:
            return ()
        if isinstance(value, dict):
            items = [f"{k}={json.dumps(v)}" for k, v in _flatten(value).items()]  # JSON values read back as YAML
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = list(value)
        else:
            raise self.error(where, f"sets must be a list of key=value or a mapping, got {value!r}")
        try:
            keys = _flatten(parse_set(items))
        except CovidXrayError as exc:
            raise self.error(where, exc.message.replace("--set ", "sets: "), exc.hint) from None
        for key in keys:
            if key in FIXED:
                raise self.error(where, f"sets may not set '{key}': {FIXED[key]}")
        return tuple(items)


def _flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


TOP = ("name", "description", "data", "seed", "checkpoints_at", "sets", "eval", "arms")
ARM = ("name", "model", "kimg", "sets", "seed", "seeds", "checkpoints_at", "max_minutes", "sampling")
EVAL = ("n", "repeats", "split", "metrics", "seed", "batch_size", "downstream", "sampling", "segmentation")
DOWNSTREAM = ("classifier", "seeds", "epochs", "synthetic_ratio", "pool", "sets")
SEGMENTATION = ("seeds", "epochs", "copies", "sets")
DATA = ("size", "masks", "classes")


def load_spec(path: str | Path) -> StudySpec:
    """Read and check a study spec (its own rules; :func:`plan_study` checks it against the data)."""
    path = Path(path)
    if not path.is_file():
        raise CovidXrayError(f"study spec {path} does not exist", "Pass a YAML file such as configs/studies/demo.yaml")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise CovidXrayError(f"study spec {path} is unreadable ({exc})") from None
    except yaml.YAMLError as exc:
        raise CovidXrayError(f"study spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    r = _Reader(path)
    top = r.mapping(raw if raw is not None else {}, "", TOP)
    name = r.text(top.get("name", path.stem), "", "name")
    if not _NAME.fullmatch(name):
        raise r.error("", f"name '{name}' must be letters, digits, '_', '-' or '.' (it names the output folder)")
    d = r.mapping(top.get("data") or {}, "data", DATA)
    data = DataNeeds(size=None if d.get("size") is None else r.integer(d["size"], "data", "size", 1),
                     masks=r.boolean(d.get("masks", False), "data", "masks"),
                     classes=r.texts(d.get("classes"), "data", "classes"))
    seed = r.integer(top.get("seed", 0), "", "seed")
    points = r.fractions(top["checkpoints_at"], "") if "checkpoints_at" in top else DEFAULT_POINTS
    common = r.sets(top.get("sets"), "sets")
    protocol = _eval(r, top.get("eval") or {})
    arms_raw = top.get("arms")
    if not isinstance(arms_raw, list) or not arms_raw:
        raise r.error("", "arms must be a non-empty list of arms (name, model, kimg, ...)")
    arms: list[Arm] = []
    position: dict[str, int] = {}       # each arm's name (a seeded arm's too) -> its place in the spec
    for i, a in enumerate(arms_raw, 1):
        where = f"arm {i}"
        a = r.mapping(a, where, ARM)
        for key in ("name", "model", "kimg"):
            if key not in a:
                raise r.error(where, f"has no {key}", "Every arm needs name, model and kimg")
        arm_name = r.text(a["name"], where, "name")
        if not _NAME.fullmatch(arm_name):
            raise r.error(where, f"name '{arm_name}' must be letters, digits, '_', '-' or '.' (it names a folder)")
        where = f"arm '{arm_name}'"
        seeds = _seeds(r, where, a)
        names = [arm_name] if seeds is None else [f"{arm_name}-s{sd}" for sd in seeds]
        twin = next((n for n in names if n in position), None)
        if twin is not None:
            raise r.error("", f"arms {position[twin]} and {i} are both named '{twin}'", "Give every arm its own name")
        position.update((n, i) for n in names)
        model = r.text(a["model"], where, "model")
        try:
            get_model(model)
        except CovidXrayError as exc:
            raise r.error(where, exc.message, exc.hint) from None
        generators = having(Generator) + having(MaskTranslator)
        if model not in generators:
            raise r.error(where, f"model '{model}' is a {get_model(model).family} model; a study compares generators "
                          f"({', '.join(sorted(generators))})")
        kimg = r.number(a["kimg"], where, "kimg", "> 0 (the budget: thousands of training images shown)")
        one = Arm(
            name=arm_name, model=model, kimg=kimg, sets=r.sets(a.get("sets"), where),
            seed=r.integer(a.get("seed", seed), where, "seed"),
            checkpoints_at=r.fractions(a["checkpoints_at"], where) if "checkpoints_at" in a else points,
            max_minutes=None if a.get("max_minutes") is None else r.number(a["max_minutes"], where, "max_minutes"),
            sampling=_arm_sampling(r, where, model, protocol.sampling, a.get("sampling")))
        if seeds is None:
            arms.append(one)
        else:  # one arm per training seed, each its own folder and row; the report adds their mean ± std
            arms += [dataclasses.replace(one, name=n, seed=sd, group=arm_name) for n, sd in zip(names, seeds)]
    return StudySpec(path, name, str(top.get("description") or ""), data, seed, common, protocol, tuple(arms), text)


def _seeds(r: _Reader, where: str, a: dict[str, Any]) -> list[int] | None:
    """``seeds: [0, 1, 2]``: the arm trained once per training seed (None when absent); not with ``seed``."""
    if "seeds" not in a:
        return None
    if "seed" in a:
        raise r.error(where, "gives both seed and seeds", "Keep one: seed: S for one run, seeds: [S1, S2, ...] for several")
    raw = a["seeds"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise r.error(where, f"seeds must be a list of two or more training seeds, got {raw!r}",
                      "e.g. seeds: [0, 1, 2]; one seed is seed: S")
    seeds = [r.integer(v, where, "seeds") for v in raw]
    if len(set(seeds)) != len(seeds):
        raise r.error(where, f"seeds repeats a seed: {raw!r}", "Give each run its own seed")
    return seeds


def check_scale(scale: Any) -> float:
    """``--scale``: a number in (0, 1]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or not 0 < scale <= 1:
        raise CovidXrayError(f"--scale must be a number in (0, 1], got {scale!r}",
                             "It multiplies every arm's kimg, e.g. --scale 0.1 trains a tenth of each budget")
    return float(scale)


def scale_spec(spec: StudySpec, scale: float) -> StudySpec:
    """The spec with every arm's ``kimg`` and ``max_minutes`` multiplied by ``scale`` in (0, 1] (the spec's own
    budget kept as ``spec_kimg``); ``spec`` itself for 1."""
    scale = check_scale(scale)
    if scale == 1.0:
        return spec
    arms = tuple(dataclasses.replace(a, kimg=a.kimg * scale, spec_kimg=a.kimg,
                                     max_minutes=None if a.max_minutes is None else a.max_minutes * scale)
                 for a in spec.arms)
    return dataclasses.replace(spec, arms=arms, scale=scale)


def _sampling(r: _Reader, where: str, value: Any) -> dict[str, Any]:
    """``sampling:`` as a mapping of :data:`SAMPLING` keys (None values dropped)."""
    if value is None:
        return {}
    return {k: v for k, v in r.mapping(value, where, SAMPLING).items() if v is not None}


def _arm_sampling(r: _Reader, where: str, model: str, common: dict[str, Any], own: Any) -> dict[str, Any]:
    """The sampler options an arm's evaluations use: ``eval.sampling`` with the arm's own on top, checked by its
    model's family; {} for a model that takes none (which ignores ``eval.sampling`` and refuses its own)."""
    own = _sampling(r, f"{where}: sampling", own)
    kind = sampling_of(get_model(model).family)
    if own and not kind.options:
        takers = sorted(m for m in having(Generator) + having(MaskTranslator)
                        if sampling_of(get_model(m).family).options)
        raise r.error(where, f"sampling: the {model} model takes no sampler options (those are for "
                      f"{', '.join(takers)})", "Drop the arm's sampling:")
    merged = {k: v for k, v in {**common, **own}.items() if k in kind.options}
    try:
        return kind.check_options(**merged)
    except CovidXrayError as exc:
        raise r.error(f"{where}: sampling", exc.message.replace("--", ""), exc.hint) from None


def _eval(r: _Reader, e: Any) -> EvalProtocol:
    e = r.mapping(e, "eval", EVAL)
    default = EvalProtocol()
    try:
        metrics = tuple(parse_metrics(",".join(r.texts(e["metrics"], "eval", "metrics")))) if "metrics" in e \
            else default.metrics
    except CovidXrayError as exc:
        raise r.error("eval", exc.message.replace("--metrics: ", "metrics: "), exc.hint) from None
    split = e.get("split", default.split)
    if split not in ("train", "val", "test"):
        raise r.error("eval", f"split must be test, val or train, got {split!r}")
    down = None
    if e.get("downstream") is not None:
        ds = r.mapping(e["downstream"], "eval.downstream", DOWNSTREAM)
        base = Downstream()
        down = Downstream(
            classifier=r.text(ds.get("classifier", base.classifier), "eval.downstream", "classifier"),
            seeds=r.integer(ds.get("seeds", base.seeds), "eval.downstream", "seeds", 1),
            epochs=None if ds.get("epochs") is None else r.integer(ds["epochs"], "eval.downstream", "epochs", 1),
            synthetic_ratio=r.number(ds.get("synthetic_ratio", base.synthetic_ratio), "eval.downstream",
                                     "synthetic_ratio", "in (0, 1)"),
            pool=r.integer(ds.get("pool", base.pool), "eval.downstream", "pool"),
            sets=r.texts(ds.get("sets"), "eval.downstream", "sets"))
        try:
            check_downstream_args(down.classifier, down.seeds, down.synthetic_ratio, down.epochs)
        except CovidXrayError as exc:
            raise r.error("eval.downstream", exc.message.replace("--", ""), exc.hint) from None
    seg = None
    if e.get("segmentation") is not None:
        sg = r.mapping(e["segmentation"], "eval.segmentation", SEGMENTATION)
        base_seg = Segmentation()
        seg = Segmentation(seeds=r.integer(sg.get("seeds", base_seg.seeds), "eval.segmentation", "seeds", 1),
                           epochs=r.integer(sg.get("epochs", base_seg.epochs), "eval.segmentation", "epochs", 1),
                           copies=r.integer(sg.get("copies", base_seg.copies), "eval.segmentation", "copies", 1),
                           sets=r.texts(sg.get("sets"), "eval.segmentation", "sets"))
    return EvalProtocol(
        segmentation=seg,
        sampling=_sampling(r, "eval.sampling", e.get("sampling")),
        n=None if e.get("n") is None else r.integer(e["n"], "eval", "n", 2),
        repeats=r.integer(e.get("repeats", default.repeats), "eval", "repeats", 1),
        split=split, metrics=metrics, seed=r.integer(e.get("seed", default.seed), "eval", "seed"),
        batch_size=r.integer(e.get("batch_size", default.batch_size), "eval", "batch_size", 1), downstream=down)


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Point:
    """A scored point of an arm's budget."""

    fraction: float                     # of the trained steps
    step: int                           # the optimisation step its weights are taken after
    final: bool                         # the full budget (checkpoints/last.pt), the arm's row
    key: str = ""                       # the scoring stage's key

    @property
    def label(self) -> str:
        """Percent of the budget: ``25``, ``12.5``, ``100``."""
        return f"{self.fraction * 100:g}"

    @property
    def checkpoint(self) -> str:
        """Its checkpoint's name in the run's ``checkpoints/``."""
        return "last.pt" if self.final else f"point-{self.label}.pt"

    @property
    def eval_dir(self) -> str:
        return f"eval-{self.label}"


@dataclass
class ArmPlan:
    """An arm resolved against the data: its configuration, epochs, points and key."""

    arm: Arm
    cfg: Config                         # resolved; train.epochs from the budget; cfg.out set by the runner
    train_images: int                   # the images its training split holds (with masks, for mask models)
    batch_size: int                     # images a step (the loop's: at most train_images)
    epochs: int
    points: list[Point] = field(default_factory=list)
    key: str = ""                       # the training stage's key
    masks: bool = False                 # a mask -> X-ray model (trains on lung masks): gets the segmentation table

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def kimg(self) -> float:
        """The kimg it trains (the budget rounded up to whole epochs)."""
        return self.total_steps * self.batch_size / 1000


def segmentation_real_key(spec: "StudySpec", data_fingerprint: str = "") -> str:
    """The key of the real-only U-Nets (arm (a)) that every mask arm's segmentation table shares."""
    return digest({"segmentation": dataclasses.asdict(spec.eval.segmentation), "data": data_fingerprint})


def segmentation_key(plan: "ArmPlan", spec: "StudySpec") -> str:
    """The key of a mask arm's segmentation stage: its training, the U-Net protocol and its sampling."""
    return digest({"train": plan.key, "segmentation": dataclasses.asdict(spec.eval.segmentation),
                   "sampling": plan.arm.sampling})


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (the stage keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _config_for_key(cfg: Config) -> dict[str, Any]:
    d = cfg.to_dict()
    d.pop("out", None)
    for key in (*EXECUTION, "train.device"):
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return d


def check_execution_sets(sets: list[str] | None) -> list[str]:
    """``covidxray study --set``: execution settings only (:data:`EXECUTION`), for every arm."""
    items = list(sets or [])
    for key in _flatten(parse_set(items)):
        if key not in EXECUTION:
            raise CovidXrayError(f"--set {key}: `covidxray study --set` takes the settings that do not change what an "
                                 f"arm learns ({', '.join(EXECUTION)})",
                                 "Put model settings in the spec (its sets:, or an arm's), so that they are recorded")
    return items


def plan_study(spec: StudySpec, data: str | Path, device: str = "auto", sets: list[str] | None = None) -> list[ArmPlan]:
    """Check every arm against the prepared folder ``data`` and plan it (see the module docstring)."""
    data = Path(data)
    info = read_prepared_info(data)
    size = int(info["size"])
    if spec.data.size is not None and spec.data.size != size:
        raise CovidXrayError(f"{spec.path}: data.size is {spec.data.size} px but {data} was prepared at {size} px",
                             f"Pass data prepared at {spec.data.size} px (`covidxray prepare SRC OUT --size "
                             f"{spec.data.size}`)")
    classes = list(spec.data.classes) or None
    records, _ = read_records(data, "train", classes)
    if spec.data.masks and not any(r.mask for r in records):
        raise CovidXrayError(f"{spec.path}: data.masks is true but the train split of {data} has no lung mask",
                             "Prepare from a source with masks (or `covidxray prepare --demo`)")
    execution = check_execution_sets(sets)
    if "train.tensorboard" not in _flatten(parse_set(execution)) and tensorboard.available():
        execution = ["train.tensorboard=true", *execution]  # every arm's scalars in TensorBoard too, where it is
    flags = {"data": {"path": str(data.resolve()), "image_size": size, "classes": classes},
             "train": {"device": device}}
    plans = []
    for arm in spec.arms:
        where = f"{spec.path}: arm '{arm.name}'"
        try:
            cfg = resolve_config(arm.model, flags={**flags, "train": {**flags["train"], "seed": arm.seed}},
                                 sets=[*spec.sets, *arm.sets, *execution])
            model = get_model(arm.model)
            task = get_task(model.family)
            task.check_config(cfg, model)
            tensorboard.check(cfg)
        except CovidXrayError as exc:
            raise CovidXrayError(f"{where}: {exc.message.replace('--set: ', '')}", exc.hint) from None
        rows = records if cfg.data.split == "train" else read_records(data, cfg.data.split, classes)[0]
        if task.wants_masks(cfg):
            rows = [r for r in rows if r.mask]
            if not rows:
                raise CovidXrayError(f"{where}: {arm.model} trains on lung masks but the train split of {data} has none",
                                     "Prepare from a source with masks, or drop the arm")
        n = len(rows)
        if n == 0:
            raise CovidXrayError(f"{where}: the train split of {data} has no images")
        batch = min(cfg.train.batch_size, n)
        per_epoch = (n // batch) * batch
        cfg.train.epochs = -(-arm.images // per_epoch)
        plan = ArmPlan(arm, cfg, n, batch, cfg.train.epochs, masks=bool(task.wants_masks(cfg)))
        steps: dict[int, Point] = {}
        for f in arm.checkpoints_at:  # two fractions on one step: the larger names it
            step = plan.total_steps if f == 1.0 else max(1, math.ceil(f * plan.total_steps - 1e-9))
            steps[step] = Point(f, step, f == 1.0)
        if plan.total_steps in steps and not steps[plan.total_steps].final:
            steps[plan.total_steps] = Point(1.0, plan.total_steps, True)
        plan.points = [steps[s] for s in sorted(steps)]
        keyed = {"config": _config_for_key(cfg), "images": arm.images,
                 "points": [(p.label, p.step) for p in plan.points], "max_minutes": arm.max_minutes}
        if spec.scale != 1.0:  # a scaled study is another study, whatever budgets it ends with (unscaled keys hold)
            keyed["scale"] = spec.scale
        plan.key = digest(keyed)
        protocol = dataclasses.asdict(spec.eval)
        del protocol["sampling"]  # what this arm's scoring uses instead (absent when none: older keys hold)
        del protocol["segmentation"]  # a stage of its own (segmentation_key), which scoring does not depend on
        if arm.sampling:
            protocol["sampling"] = arm.sampling
        for p in plan.points:
            scored = {**protocol, "downstream": protocol["downstream"] if p.final else None}
            p.key = digest({"train": plan.key, "eval": scored, "point": p.label})
        plans.append(plan)
    seg = spec.eval.segmentation
    if seg is not None:
        try:
            resolve_config("unet", sets=[*seg.sets, *execution])
        except CovidXrayError as exc:
            raise CovidXrayError(f"{spec.path}: eval.segmentation: {exc.message.replace('--set: ', 'sets: ')}",
                                 exc.hint) from None
    down = spec.eval.downstream
    if down is not None:
        try:
            resolve_config(down.classifier, sets=[*down.sets, *execution])
        except CovidXrayError as exc:
            raise CovidXrayError(f"{spec.path}: eval.downstream: {exc.message.replace('--set: ', 'sets: ')}",
                                 exc.hint) from None
    return plans
