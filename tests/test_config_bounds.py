"""Every numeric config key: finite, and inside the interval its family declares (one place: the schema)."""

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from covidxray.config import FAMILIES, Config, resolve_config
from covidxray.config.core import GENERIC_BOUNDS, Family, Interval, TrainConfig, register_family
from covidxray.errors import CovidXrayError
from covidxray.models.registry import list_models


def _numeric_keys(cls: type, prefix: str = "") -> dict[str, type]:
    """The int/float leaf keys of a schema, found independently of the code under test."""
    found = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            found.update(_numeric_keys(typ, f"{prefix}{f.name}."))
        elif typ in (int, float):
            found[f"{prefix}{f.name}"] = typ
    return found


def _model_of(family: str) -> str:
    models = [m.name for m in list_models(family)]
    assert models, f"no registered model of the {family} family"
    return models[0]


FAMILY_NAMES = sorted(FAMILIES)


def test_the_loops_below_see_every_family():
    assert {"gan", "classifier", "segmentation", "autoencoder", "image2image"} <= set(FAMILY_NAMES)
    assert {m.family for m in list_models()} == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_numeric_key_has_a_declared_bound(family):
    fam = FAMILIES[family]
    keys = _numeric_keys(fam.config)
    assert keys, family
    missing = sorted(set(keys) - set(fam.bounds))
    assert not missing, f"the {family} family declares no bound for {missing}: add them to its bounds"
    stray = sorted(set(fam.bounds) - set(keys))
    assert not stray, f"the {family} family declares bounds of keys it does not have: {stray}"
    for key, interval in fam.bounds.items():
        assert isinstance(interval, Interval), key
    for key, interval in GENERIC_BOUNDS.items():  # the generic sections are bounded in every family
        assert key in fam.bounds, key


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_schema_default_and_model_yaml_is_inside_its_bounds(family):
    fam = FAMILIES[family]
    for model in list_models(family):
        cfg = resolve_config(model.name)  # validates, configs/<model>.yaml applied
        for key, interval in fam.bounds.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) in interval, (model.name, key)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_nan_and_inf_are_refused_for_every_numeric_key(family):
    model = _model_of(family)
    failures = []
    for key in _numeric_keys(FAMILIES[family].config):
        for raw in ("nan", "inf", "-inf", ".nan", ".inf", "-.inf", "NaN"):
            try:
                resolve_config(model, sets=[f"{key}={raw}"])
            except CovidXrayError as exc:
                msg = str(exc)
                if f"config key '{key}' must be a finite number; got" not in msg or "\n" in msg:
                    failures.append(f"{key}={raw}: {msg}")
            else:
                failures.append(f"{key}={raw} was accepted")
    assert not failures, "\n".join(failures)


def _outside(interval: Interval, typ: type) -> list:
    """Values just outside each finite end of ``interval`` (of the key's type)."""
    step = 1 if typ is int else 0.5
    values = []
    if not math.isinf(interval.lo):
        values.append(interval.lo if interval.lo_open else interval.lo - step)
    if not math.isinf(interval.hi):
        values.append(interval.hi if interval.hi_open else interval.hi + step)
    return [typ(v) for v in values]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_values_outside_a_bound_are_refused_naming_key_interval_and_value(family):
    fam = FAMILIES[family]
    model = _model_of(family)
    types = _numeric_keys(fam.config)
    failures = []
    for key, interval in fam.bounds.items():
        for value in _outside(interval, types[key]):
            try:
                resolve_config(model, sets=[f"{key}={value!r}"])
            except CovidXrayError as exc:
                msg = str(exc)
                want = f"config key '{key}' must be {interval.describe()}; got "
                if want not in msg or "\n" in msg:
                    failures.append(f"{key}={value}: {msg!r} lacks {want!r}")
            else:
                failures.append(f"{key}={value} was accepted (bound {interval})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("item, message", [
    ("optim.lr=nan", "config key 'optim.lr' must be a finite number; got nan"),
    ("optim.beta1=1.5", "config key 'optim.beta1' must be in [0, 1); got 1.5"),
    ("optim.beta2=-0.1", "config key 'optim.beta2' must be in [0, 1); got -0.1"),
    ("optim.lr=0", "config key 'optim.lr' must be > 0; got 0"),
    ("optim.momentum=1", "config key 'optim.momentum' must be in [0, 1); got 1"),
    ("eval.min_delta=-1", "config key 'eval.min_delta' must be >= 0; got -1"),
    ("train.dist_timeout=0", "config key 'train.dist_timeout' must be > 0; got 0. It is in seconds"),
    ("train.seed=-1", "config key 'train.seed' must be in [0, 1e+18); got -1"),
    ("model.dropout=1", "config key 'model.dropout' must be in [0, 1); got 1"),
    ("data.synthetic_ratio=1.5", "config key 'data.synthetic_ratio' must be in (0, 1]; got 1.5. It is the generated"),
])
def test_classifier_bound_messages(item, message):
    with pytest.raises(CovidXrayError) as err:
        resolve_config("smallcnn", sets=[item])
    assert message in str(err.value)


@pytest.mark.parametrize("model, item, message", [
    ("rawgan", "train.ema_kimg=-1", "config key 'train.ema_kimg' must be >= 0; got -1"),
    ("rawgan", "optim.lr_d=0", "config key 'optim.lr_d' must be > 0; got 0"),
    ("unetgan", "loss.cutmix_prob=1.5", "config key 'loss.cutmix_prob' must be in [0, 1]; got 1.5"),
    ("unet", "arch.depth=8", "config key 'arch.depth' must be in [1, 7]; got 8"),
    ("unet", "eval.threshold=1", "config key 'eval.threshold' must be in (0, 1); got 1"),
    ("vae", "loss.beta=-1", "config key 'loss.beta' must be >= 0; got -1"),
    ("pix2pix", "aug.scale=2", "config key 'aug.scale' must be in [0, 0.5]; got 2"),
])
def test_other_families_bound_messages(model, item, message):
    with pytest.raises(CovidXrayError) as err:
        resolve_config(model, sets=[item])
    assert message in str(err.value)


def test_cross_key_checks_still_apply():
    with pytest.raises(CovidXrayError, match="'loss.mc_samples' must be >= 2 with an uncertainty mode"):
        resolve_config("cgan", sets=["loss.uncertainty=max", "arch.d_dropout=0.3", "loss.mc_samples=1"])
    with pytest.raises(CovidXrayError, match="must not both be 0"):
        resolve_config("unet", sets=["loss.dice_weight=0", "loss.bce_weight=0"])


def test_non_finite_numbers_in_a_yaml_file_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: .nan\n")
    with pytest.raises(CovidXrayError, match="config key 'optim.lr' must be a finite number; got nan"):
        resolve_config("smallcnn", f)
    f.write_text("train:\n  epochs: .inf\n")
    with pytest.raises(CovidXrayError, match="config key 'train.epochs' must be a finite number; got inf"):
        resolve_config("smallcnn", f)


def test_a_huge_integer_is_refused_in_one_line():
    with pytest.raises(CovidXrayError, match="config key 'train.seed' must be in"):
        resolve_config("smallcnn", sets=["train.seed=" + "9" * 400])


# --------------------------------------------------------------------------------------------
# Interval and the family declaration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, inside, outside, shown, describe", [
    ("[0, 1)", [0, 0.5, 0.999], [-0.1, 1, 2, float("nan"), float("inf")], "[0, 1)", "in [0, 1)"),
    ("(0, inf)", [1e-9, 5, 1e300], [0, -1, float("inf"), float("nan")], "(0, inf)", "> 0"),
    ("[1, inf]", [1, 10**30], [0, float("inf")], "[1, inf)", ">= 1"),
    ("(0, 1]", [1, 0.5], [0, 1.01], "(0, 1]", "in (0, 1]"),
    ("(-inf, 0.5]", [-3, 0.5], [0.6, float("-inf")], "(-inf, 0.5]", "<= 0.5"),
])
def test_interval(text, inside, outside, shown, describe):
    iv = Interval.parse(text)
    assert all(v in iv for v in inside)
    assert not any(v in iv for v in outside)
    assert str(iv) == shown and iv.describe() == describe


@pytest.mark.parametrize("text", ["0, 1", "[1, 0]", "[a, 1)", "[0 1)", "[nan, 1]"])
def test_bad_interval_declarations(text):
    with pytest.raises(ValueError):
        Interval.parse(text)


def test_a_family_with_an_unbounded_numeric_key_cannot_register():
    @dataclass
    class _Train(TrainConfig):
        warp_factor: float = 1.0

    @dataclass
    class _Config(Config):
        train: _Train = field(default_factory=_Train)
        FAMILY: ClassVar[str] = "_bounds_test"

    with pytest.raises(ValueError, match="no bounds for its numeric keys train.warp_factor"):
        register_family(Family(name="_bounds_test", config=_Config, choices={}, check=lambda cfg: None,
                               bounds=GENERIC_BOUNDS))
    with pytest.raises(ValueError, match="bounds of train.nope, not numeric keys"):
        register_family(Family(name="_bounds_test", config=_Config, choices={}, check=lambda cfg: None,
                               bounds={**GENERIC_BOUNDS, "train.warp_factor": "[0, 9]", "train.nope": "[0, 1]"}))
    assert "_bounds_test" not in FAMILIES


# --------------------------------------------------------------------------------------------
# Through the CLI: exit 2, one line, no run folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item, message", [
    ("optim.lr=nan", "config key 'optim.lr' must be a finite number; got nan"),
    ("optim.beta1=1.5", "config key 'optim.beta1' must be in [0, 1); got 1.5"),
    ("optim.lr=.inf", "config key 'optim.lr' must be a finite number; got inf"),
])
def test_train_refuses_bad_numbers_in_one_line_without_a_run_folder(cli, demo_prepared, tmp_path, item, message):
    runs = tmp_path / "runs"
    r = cli("train", "--model", "smallcnn", "--data", demo_prepared, "--out", runs, "--device", "cpu", "--set", item)
    assert r.exit_code == 2, r.output
    assert message in r.clean_stderr and "Traceback" not in r.output
    assert len(r.clean_stderr.strip().splitlines()) == 1
    assert not runs.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--epochs", "0"], "'--epochs': '0' is not a whole number >= 1"),
    (["--epochs", "nan"], "'--epochs': 'nan' is not a whole number >= 1"),
    (["--batch-size", "-4"], "'--batch-size': '-4' is not a whole number >= 1"),
    (["--image-size", "-1"], "'--image-size': '-1' is not a whole number >= 0"),
    (["--seed", "-1"], "'--seed': '-1' is not a whole number >= 0"),
    (["--snapshot-every", "0"], "'--snapshot-every': '0' is not a whole number >= 1"),
])
def test_train_numeric_flags_are_checked_in_one_line(cli, demo_prepared, tmp_path, args, fragment):
    runs = tmp_path / "runs"
    r = cli("train", "--model", "smallcnn", "--data", demo_prepared, "--out", runs, *args)
    assert r.exit_code == 2, r.output
    assert fragment in r.clean_stderr and "Traceback" not in r.output
    assert len(r.clean_stderr.strip().splitlines()) == 1
    assert not runs.exists()
