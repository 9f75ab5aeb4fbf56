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
        ("optim.beta1=1.5", "config key 'optim.beta1' must be in [0, 1); got 1.5"),
        ("optim.lr_g=nan", "config key 'optim.lr_g' must be a finite number; got nan"),
        ("optim.lr_d=-.inf", "config key 'optim.lr_d' must be a finite number; got -inf"),
        ("optim.lr_g=0", "config key 'optim.lr_g' must be > 0; got 0"),
        ("train.ema_kimg=-1", "config key 'train.ema_kimg' must be >= 0; got -1"),
        ("arch.d_dropout=1", "config key 'arch.d_dropout' must be in [0, 1); got 1"),
        ("train.epochs=inf", "config key 'train.epochs' must be a finite number; got inf"),
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


# --------------------------------------------------------------------------------------------
# Families: generic sections, family sections, per-family validation
# --------------------------------------------------------------------------------------------


def test_each_family_has_its_own_schema():
    from covidxray.config import ClassifierConfig, GANConfig

    gan, clf = resolve_config("cgan"), resolve_config("resnet18")
    assert isinstance(gan, GANConfig) and isinstance(clf, ClassifierConfig)
    assert gan.family == "gan" and clf.family == "classifier"
    assert gan.model.name == "cgan" and clf.model.name == "resnet18"
    assert gan.optim.beta1 == 0.5 and clf.optim.beta1 == 0.9   # a family may change a generic default
    assert {"arch", "loss", "aug"} <= set(gan.to_dict()) and "arch" not in clf.to_dict()
    assert clf.eval.every == 1 and gan.eval.every == 0


@pytest.mark.parametrize("model, item, fragment", [
    ("resnet18", "loss.r1_gamma=1", "unknown config key 'loss.r1_gamma' of the classifier family (model 'resnet18'); "
                                    "it is a key of the gan family"),
    ("resnet18", "arch.latent_dim=8", "unknown config key 'arch' of the classifier family"),
    ("resnet18", "train.ema_kimg=1", "'train.ema_kimg' of the classifier family (model 'resnet18'); it is a key of the "
                                     "diffusion, gan"),
    ("rawgan", "model.pretrained=x.pt", "unknown config key 'model.pretrained' of the gan family (model 'rawgan'); "
                                        "it is a key of the classifier family"),
    ("rawgan", "optim.lr=0.1", "'optim.lr' of the gan family"),
])
def test_keys_of_another_family_are_refused_naming_key_and_family(model, item, fragment):
    with pytest.raises(CovidXrayError) as err:
        resolve_config(model, sets=[item])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("item, fragment", [
    ("data.image_size=32", "'data.image_size' must be 64-299 (or 0: the prepared size) for a classifier"),
    ("data.image_size=300", "must be 64-299"),
    ("optim.name=adam", "'optim.name' must be one of adamw, sgd"),
    ("optim.schedule=linear", "'optim.schedule' must be one of cosine, step, none"),
    ("optim.lr=0", "'optim.lr' must be > 0"),
    ("model.mc_dropout=1", "'model.mc_dropout' must be in [0, 1)"),
    ("loss.label_smoothing=1.5", "'loss.label_smoothing' must be in [0, 1)"),
    ("loss.class_weights=heavy", "'loss.class_weights' must be none, balanced or positive numbers"),
    ("loss.class_weights=1,-2,1", "positive numbers"),
    ("aug.rotate=200", "'aug.rotate' must be in [0, 180]"),
    ("eval.metric=f2", "'eval.metric' must be one of loss, balanced_accuracy, accuracy, macro_f1, auc"),
    ("eval.mode=best", "'eval.mode' must be one of auto, min, max"),
    ("eval.mc_samples=0", "'eval.mc_samples' must be >= 1"),
])
def test_classifier_values_are_checked(item, fragment):
    with pytest.raises(CovidXrayError) as err:
        resolve_config("resnet18", sets=[item])
    assert fragment in str(err.value)


def test_eval_settings_need_a_family_with_metrics_and_patience_needs_evaluations():
    with pytest.raises(CovidXrayError, match="the gan family has no evaluation during training yet"):
        resolve_config("rawgan", sets=["eval.every=1"])
    with pytest.raises(CovidXrayError, match="eval.patience .early stopping. needs evaluations"):
        resolve_config("resnet18", sets=["eval.every=0", "eval.patience=3"])
    cfg = resolve_config("resnet18", sets=["loss.class_weights=1,2.5,1", "eval.metric=balanced_accuracy"])
    from covidxray.config import eval_metric

    assert eval_metric(cfg) == ("balanced_accuracy", "max")
    assert eval_metric(resolve_config("resnet18")) == ("loss", "min")
    assert eval_metric(resolve_config("resnet18", sets=["eval.mode=max"])) == ("loss", "max")


def test_classifier_round_trip_and_model_name_forms(tmp_path):
    cfg = resolve_config("densenet121", sets=["model.mc_dropout=0.2", "data.classes=covid,normal"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg and again.family == "classifier"
    f = tmp_path / "named.yaml"
    f.write_text("model:\n  name: densenet121\n  dropout: 0.1\n")
    assert resolve_config("densenet121", f).model.dropout == pytest.approx(0.1)
    f.write_text("model:\n  name: resnet18\n")
    with pytest.raises(CovidXrayError, match="is for model 'resnet18' but --model is 'densenet121'"):
        resolve_config("densenet121", f)
    with pytest.raises(CovidXrayError, match="is for model 'cgan' but --model is 'rawgan'"):
        resolve_config("rawgan", sets=["model.name=cgan"])


def test_stored_configs_of_version_0_1_0_still_load():
    # 0.1.0 wrote the model name as a string and the trainer's data.n_classes
    data = resolve_config("cgan").to_dict()
    data["model"] = "cgan"
    data["data"]["n_classes"] = 3
    cfg = config_from_dict(data)
    assert cfg.model.name == "cgan" and cfg.family == "gan" and cfg == resolve_config("cgan")
