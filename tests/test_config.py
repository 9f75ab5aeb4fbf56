import pytest
import yaml

from covidxray.config import Config, config_from_dict, parse_set, resolve_config
from covidxray.errors import CovidXrayError


def test_model_yaml_overrides_then_file_then_flags_then_set(tmp_path):
    user = tmp_path / "my.yaml"
    user.write_text("train:\n  batch_size: 16\n  epochs: 7\noptim:\n  lr_g: 0.001\n")
    cfg = resolve_config("rawgan", user, flags={"train": {"epochs": 9, "seed": None}}, sets=["train.batch_size=32"])
    assert cfg.train.batch_size == 32          # --set beats the file
    assert cfg.train.epochs == 9               # a flag beats the file
    assert cfg.optim.lr_g == pytest.approx(1e-3)
    assert cfg.train.seed == 0                 # None flags are ignored
    assert cfg.data.image_size == 128          # from configs/rawgan.yaml


def test_set_parses_yaml_scalars_and_lists():
    nested = parse_set(["train.batch_size=32", "optim.lr_d=1e-4", "data.cache=false", "data.classes=[covid, normal]"])
    assert nested["train"] == {"batch_size": 32}
    assert nested["data"] == {"cache": False, "classes": ["covid", "normal"]}
    # YAML 1.1 leaves "1e-4" a string; the schema still reads it as a float.
    assert resolve_config("rawgan", sets=["optim.lr_d=1e-4"]).optim.lr_d == pytest.approx(1e-4)
    cfg = resolve_config("rawgan", sets=["data.classes=covid,normal", "optim.lr_g=1"])
    assert cfg.data.classes == ["covid", "normal"]
    assert isinstance(cfg.optim.lr_g, float)


@pytest.mark.parametrize(
    "item, fragment",
    [
        ("train.batchsize=3", "unknown config key 'train.batchsize'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("train.batch_size=abc", "'train.batch_size' must be of type int"),
        ("train.batch_size=true", "'train.batch_size' must be of type int"),
        ("data.cache=3", "'data.cache' must be of type bool"),
        ("train.batch_size", "must look like section.key=value"),
        ("train.epochs=0", "'train.epochs' must be >= 1"),
        ("data.image_size=100", "'data.image_size' must be 64, 128 or 256"),
        ("data.split=holdout", "'data.split' must be one of train, val, test"),
        ("train=3", "'train' must be a mapping"),
        ("loss.r1_every=0", "'loss.r1_every' must be >= 1"),
        ("loss.kind=wasserstein", "'loss.kind' must be one of bce, hinge, lsgan"),
        ("aug.diffaugment=translation,color", "'aug.diffaugment'"),
    ],
)
def test_bad_overrides_name_the_key(item, fragment):
    with pytest.raises(CovidXrayError) as err:
        resolve_config("rawgan", sets=[item])
    assert fragment in str(err.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(CovidXrayError, match="does not exist"):
        resolve_config("rawgan", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(CovidXrayError, match="not valid YAML"):
        resolve_config("rawgan", bad)
    other = tmp_path / "other.yaml"
    other.write_text("model: cgan\n")
    with pytest.raises(CovidXrayError, match="is for model 'cgan'"):
        resolve_config("rawgan", other)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 3\n")
    with pytest.raises(CovidXrayError, match=r"unknown.yaml: unknown config key 'train.lr'"):
        resolve_config("rawgan", unknown)


def test_round_trip_through_yaml():
    cfg = resolve_config("rawgan", sets=["train.seed=5", "data.classes=covid"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    assert isinstance(again, Config)


def test_uncertainty_needs_mc_dropout_and_two_passes():
    with pytest.raises(CovidXrayError, match="needs Monte-Carlo dropout"):
        resolve_config("cgan", sets=["loss.uncertainty=min"])
    with pytest.raises(CovidXrayError, match="'loss.mc_samples' must be >= 2"):
        resolve_config("cgan", sets=["loss.uncertainty=max", "arch.d_dropout=0.3", "loss.mc_samples=1"])
    cfg = resolve_config("cgan", sets=["loss.uncertainty=min", "arch.d_dropout=0.3"])
    assert cfg.loss.uncertainty == "min"


@pytest.mark.parametrize("old, new", [(True, "acgan"), (False, "real")])
def test_stored_configs_with_the_old_aux_key_still_load(old, new):
    # checkpoints written before loss.aux_mode stored loss.aux_on_fakes (a boolean)
    data = resolve_config("acgan").to_dict()
    del data["loss"]["aux_mode"]
    data["loss"]["aux_on_fakes"] = old
    assert config_from_dict(data).loss.aux_mode == new


@pytest.mark.parametrize("item, key, expected", [
    ("train.amp=off", ("train", "amp"), "off"),      # YAML 1.1 reads "off" as False
    ("train.amp=false", ("train", "amp"), "off"),
    ("loss.uncertainty=off", ("loss", "uncertainty"), "off"),
    ("data.on_device=no", ("data", "on_device"), "no"),
    ("data.on_device=yes", ("data", "on_device"), "yes"),
])
def test_choice_words_that_yaml_reads_as_booleans(item, key, expected):
    cfg = resolve_config("rawgan", sets=[item])
    assert getattr(getattr(cfg, key[0]), key[1]) == expected


def test_choice_words_in_a_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: off\ndata:\n  on_device: no\n")
    cfg = resolve_config("rawgan", config_file=f)
    assert cfg.train.amp == "off" and cfg.data.on_device == "no"


def test_a_boolean_for_a_string_key_without_such_a_word_is_refused():
    with pytest.raises(CovidXrayError, match="loss.kind"):
        resolve_config("rawgan", sets=["loss.kind=off"])
