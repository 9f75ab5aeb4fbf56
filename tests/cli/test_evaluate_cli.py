"""`covidxray train --model <classifier>` and `covidxray evaluate` through the CLI, as a user runs them."""

import csv
import json

import pytest
from PIL import Image

from tests.fixtures import TINY_CLF_SETS, TINY_SETS


def _sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def clf_run(tmp_path_factory, demo_prepared):
    """A smallcnn run of 3 epochs with MC dropout, trained through the CLI."""
    from typer.testing import CliRunner

    from covidxray.cli import app

    runs = tmp_path_factory.mktemp("clf") / "runs"
    r = CliRunner().invoke(app, ["train", "--model", "smallcnn", "--data", str(demo_prepared), "--epochs", "3",
                                 "--out", str(runs), "--device", "cpu",
                                 *_sets(TINY_CLF_SETS + ["model.mc_dropout=0.3", "eval.mc_samples=4"])])
    assert r.exit_code == 0, r.output
    assert "run folder" in r.stdout
    return runs / "00000-smallcnn"


def test_evaluate_writes_metrics_predictions_and_a_confusion_matrix(cli, clf_run, demo_prepared, tmp_path):
    out = tmp_path / "eval"
    r = cli("evaluate", clf_run, "--data", demo_prepared, "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    text = r.clean_stdout
    assert "balanced accuracy" in text and "macro-F1" in text and "4 MC-dropout passes" in text
    assert "overlap with the training split: 0 same-pixel images, 0 same-patient images" in text
    res = json.loads((out / "metrics.json").read_text())
    assert res["split"] == "test" and res["model"] == "smallcnn" and res["mc_samples"] == 4
    assert res["checkpoint"].endswith("best.pt")  # a run folder means its best checkpoint
    assert res["classes"] == ["covid", "normal", "viral_pneumonia"]
    n = res["metrics"]["n"]
    assert n == sum(res["n_per_class"].values()) == 6
    assert {"torch", "torchvision", "scikit-learn", "covidxray"} <= set(res["versions"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == n and {"id", "true", "predicted", "p_covid", "entropy", "mutual_information"} <= set(rows[0])
    # the numbers of metrics.json follow from the predictions written beside them
    acc = sum(row["true"] == row["predicted"] for row in rows) / n
    assert res["metrics"]["accuracy"] == pytest.approx(acc)
    assert sum(map(sum, res["confusion"])) == n
    for row in rows:
        assert sum(float(row[f"p_{c}"]) for c in res["classes"]) == pytest.approx(1.0, abs=1e-4)
    with Image.open(out / "confusion.png") as im:
        assert im.format == "PNG" and im.width > 200
    # a second evaluation replaces the folder whole
    r = cli("evaluate", clf_run, "--data", demo_prepared, "--out", out, "--split", "val", "--mc-samples", "2")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "metrics.json").read_text())
    assert again["split"] == "val" and again["mc_samples"] == 2
    assert len(list(csv.DictReader((out / "predictions.csv").open()))) == again["metrics"]["n"] == 9
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_evaluate_default_folder_and_a_checkpoint_file(cli, clf_run, demo_prepared):
    r = cli("evaluate", clf_run / "checkpoints" / "last.pt", "--data", demo_prepared)
    assert r.exit_code == 0, r.output
    assert (clf_run / "eval-test-last" / "metrics.json").is_file()
    assert json.loads((clf_run / "eval-test-last" / "metrics.json").read_text())["checkpoint_epoch"] == 3


def test_evaluate_warns_when_scoring_the_training_images(cli, clf_run, demo_prepared, tmp_path):
    r = cli("evaluate", clf_run, "--data", demo_prepared, "--split", "train", "--out", tmp_path / "t")
    assert r.exit_code == 0, r.output
    assert "57 evaluated images have the same pixels as training images" in r.clean_stdout
    assert "is the model's training split: this is not a held-out score" in r.clean_stdout


@pytest.mark.parametrize("args, message", [
    ([], "--data is required"),
    (["--data", "/nonexistent/prepared"], "does not exist"),
    (["--data", "DEMO", "--split", "holdout"], "--split must be train, val or test"),
    (["--data", "DEMO", "--batch-size", "0"], "--batch-size': '0' is not a whole number >= 1"),
])
def test_evaluate_input_errors_are_one_line(cli, clf_run, demo_prepared, args, message):
    args = [str(demo_prepared) if a == "DEMO" else a for a in args]
    r = cli("evaluate", clf_run, *args)
    assert r.exit_code == 2, r.output
    assert message in r.clean_stderr and "Traceback" not in r.output
    assert len(r.clean_stderr.strip().splitlines()) == 1


def test_evaluate_on_data_without_the_models_classes(cli, clf_run, tmp_path):
    from covidxray.data.prepare import prepare

    from tests.conftest import make_source_tree

    make_source_tree(tmp_path / "src", {"covid": 4, "pneumothorax": 4}, size=(64, 64))
    prepare(tmp_path / "src", tmp_path / "other", size=64, val=0.25, test=0.25, workers=1, progress=False)
    r = cli("evaluate", clf_run, "--data", tmp_path / "other")
    assert r.exit_code == 2
    assert "has no class(es) normal, viral_pneumonia that the model predicts" in r.clean_stderr


def test_train_refuses_gan_keys_for_a_classifier_in_one_line(cli, demo_prepared):
    r = cli("train", "--model", "resnet18", "--data", demo_prepared, "--set", "loss.r1_gamma=1", "--dry-run")
    assert r.exit_code == 2
    assert ("unknown config key 'loss.r1_gamma' of the classifier family (model 'resnet18'); it is a key of the gan "
            "family") in r.clean_stderr
    assert len(r.clean_stderr.strip().splitlines()) == 1


def test_end_to_end_gan_commands_still_work_beside_classifiers(cli, demo_prepared, tmp_path):
    r = cli("train", "--model", "cgan", "--data", demo_prepared, "--epochs", "1", "--image-size", "64",
            "--out", tmp_path / "runs", "--device", "cpu", *_sets(TINY_SETS))
    assert r.exit_code == 0, r.output
    r = cli("sample", tmp_path / "runs" / "00000-cgan", tmp_path / "s", "-n", "2", "--class", "covid")
    assert r.exit_code == 0 and len(list((tmp_path / "s" / "covid").glob("sample_*.png"))) == 2
    r = cli("models")
    assert r.exit_code == 0 and "classifier" in r.clean_stdout and "resnet18" in r.clean_stdout


def test_gan_only_commands_on_a_classifier_run_say_so(cli, clf_run, tmp_path):
    r = cli("sample", clf_run, tmp_path / "s", "-n", "2")
    assert r.exit_code == 2 and "holds a classifier model ('smallcnn'); `sample` needs a generator" in r.clean_stderr
    r = cli("gif", clf_run, "-o", tmp_path / "x.gif")
    assert r.exit_code == 2 and "(smallcnn) has no snapshots" in r.clean_stderr
