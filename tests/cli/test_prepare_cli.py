"""``covidxray prepare`` through the CLI: exit codes, one-line errors, tables, --demo."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import make_source_tree

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def invoke(monkeypatch):
    """Run ``covidxray <args>`` with plain, wide output; returns (result, stdout, stderr) ANSI-free."""
    from typer.testing import CliRunner

    from covidxray.cli import app

    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    runner = CliRunner()

    def call(*args):
        result = runner.invoke(app, [str(a) for a in args])
        return result, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr)

    return call


def test_prepare_success_prints_layout_and_table(invoke, tmp_path):
    make_source_tree(tmp_path / "src", {"COVID": 10, "Normal": 10, "Viral Pneumonia": 10}, size=(20, 20))
    (tmp_path / "src" / "notes.txt").write_text("x")
    result, out, err = invoke("prepare", tmp_path / "src", tmp_path / "out", "--size", "16", "--workers", "1",
                              "--classes", "covid,normal", "--fit", "pad", "--seed", "3")
    assert result.exit_code == 0, err
    assert "layout: kaggle-v2v3" in out
    assert re.search(r"covid\s+│\s+8\s+│\s+1\s+│\s+1\s+│\s+10\s+│\s+0", out)
    assert "ignored non-image files" in out and "rejected files" in out
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert (info["size"], info["fit"], info["seed"], info["classes"]) == (16, "pad", 3, ["covid", "normal"])


def test_demo_smoke(invoke, tmp_path):
    result, out, err = invoke("prepare", "--demo", tmp_path / "demo", "--per-class", "3", "--size", "32")
    assert result.exit_code == 0, err
    assert "demo-phantoms" in out
    info = json.loads((tmp_path / "demo" / "prepare.json").read_text())
    assert info["layout"] == "demo-phantoms" and info["synthetic"] is True and info["size"] == 32
    assert sum(sum(c.values()) for c in info["counts"].values()) == 9


def test_demo_default_size_is_128(invoke, tmp_path):
    result, _, err = invoke("prepare", "--demo", tmp_path / "demo", "--per-class", "1", "--val", "0", "--test", "0")
    assert result.exit_code == 0, err
    assert json.loads((tmp_path / "demo" / "prepare.json").read_text())["size"] == 128


@pytest.mark.parametrize("args, message", [
    (["SRC"], "missing OUT"),
    ([], "missing SRC and OUT"),
    (["--demo", "OUT", "EXTRA"], "--demo takes one positional"),
    (["--demo"], "missing OUT"),
    (["--demo", "OUT", "--classes", "covid"], "--classes do(es) not apply to --demo"),
    (["SRC", "OUT", "--per-class", "3"], "--per-class only applies with --demo"),
    (["SRC", "OUT", "--classes", "covid,tb"],
     "unknown class 'tb' in --classes. Classes found in the source: covid, normal"),
    (["SRC", "OUT", "--val", "0.6", "--test", "0.5"], "leaves nothing for training"),
    (["SRC", "OUT", "--workers", "0"], "Invalid value for '--workers': '0' is not a whole number >= 1"),
    (["SRC", "OUT", "--size", "4"], "Invalid value for '--size': '4' is not a whole number >= 8 and <= 8192"),
    (["SRC", "OUT", "--val", "1.5"], "Invalid value for '--val': '1.5' is not a finite number >= 0 and < 1"),
    (["--demo", "OUT", "--per-class", "0"], "Invalid value for '--per-class': '0' is not a whole number >= 1"),
    (["SRC", "SRC/OUT"], "lies inside the input folder"),
    (["MISSING", "OUT"], "does not exist"),
    (["EMPTY", "OUT"], "found 0 images"),
])
def test_user_errors_are_one_line_exit_2(invoke, tmp_path, args, message):
    make_source_tree(tmp_path / "src", {"covid": 3, "normal": 3})
    (tmp_path / "empty").mkdir()
    names = {"SRC": tmp_path / "src", "OUT": tmp_path / "out", "MISSING": tmp_path / "missing",
             "EMPTY": tmp_path / "empty", "EXTRA": tmp_path / "extra", "SRC/OUT": tmp_path / "src" / "out"}
    result, out, err = invoke("prepare", *[names.get(a, a) for a in args])
    assert result.exit_code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in out + err


def test_out_holding_a_different_preparation(invoke, tmp_path):
    make_source_tree(tmp_path / "src", {"covid": 3, "normal": 3})
    ok, _, err = invoke("prepare", tmp_path / "src", tmp_path / "out", "--size", "16", "--workers", "1")
    assert ok.exit_code == 0, err
    again, out, _ = invoke("prepare", tmp_path / "src", tmp_path / "out", "--size", "16", "--workers", "1")
    assert again.exit_code == 0 and "nothing to do" in out
    result, _, err = invoke("prepare", tmp_path / "src", tmp_path / "out", "--size", "32", "--workers", "1")
    assert result.exit_code == 2
    assert err.strip() == (f"error: OUT {tmp_path / 'out'} already holds a preparation with different options "
                           "(size). Choose another OUT or delete it")


def test_bad_choice_is_a_usage_error(invoke, tmp_path):
    result, _, err = invoke("prepare", tmp_path, tmp_path / "out", "--fit", "zoom")
    assert result.exit_code == 2 and "zoom" in err and "Traceback" not in err
