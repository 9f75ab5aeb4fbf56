"""The output-folder policy (covidxray/outdir.py) and the atomic writes under it (covidxray/utils.py)."""

from __future__ import annotations

import os
import stat

import pytest

from covidxray.errors import CovidXrayError
from covidxray.outdir import MARKER, OutputDir, check_output_dir, read_marker
from covidxray.utils import atomic_write_text, sweep_stale_temps
from tests.fixtures import dead_pid

LEGACY = ("metrics.json", "report.md", "*.png")


def _publish(out, files: dict[str, str], kind: str = "evaluate-x") -> OutputDir:
    od = OutputDir(out, kind, legacy=LEGACY)
    with od.writing() as tmp:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return od


def test_new_and_empty_folders_are_taken_and_get_a_marker(tmp_path):
    _publish(tmp_path / "new", {"metrics.json": "{}", "a.png": "png"})
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER, "a.png", "metrics.json"]
    marker = read_marker(tmp_path / "new")
    assert marker["kind"] == "evaluate-x" and marker["files"] == ["a.png", "metrics.json"]
    (tmp_path / "empty").mkdir()
    _publish(tmp_path / "empty", {"metrics.json": "{}"})
    assert (tmp_path / "empty" / "metrics.json").is_file()


def test_a_rerun_replaces_only_its_own_files(tmp_path):
    out = tmp_path / "o"
    _publish(out, {"metrics.json": "1", "old_figure.png": "x", "sub/deep.png": "y"})
    (out / "my_notes.md").write_text("mine")
    _publish(out, {"metrics.json": "2"})
    assert (out / "metrics.json").read_text() == "2"
    assert (out / "my_notes.md").read_text() == "mine"  # the user's file stays
    assert not (out / "old_figure.png").exists() and not (out / "sub" / "deep.png").exists()  # ours, stale: gone


def test_an_older_unmarked_output_of_the_same_kind_is_taken(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.json").write_text("old")
    (out / "report.md").write_text("old")
    _publish(out, {"metrics.json": "new"})
    assert (out / "metrics.json").read_text() == "new" and (out / "report.md").read_text() == "old"


@pytest.mark.parametrize("what", ["foreign", "other-kind", "file", "input", "inside-input", "holds-input"])
def test_what_is_refused_before_any_work(tmp_path, what):
    out, inputs = tmp_path / "o", []
    if what == "foreign":
        out.mkdir()
        (out / "chapter1.tex").write_text("x")
    elif what == "other-kind":
        _publish(out, {"metrics.json": "{}"}, kind="segment")
    elif what == "file":
        out.write_text("x")
    elif what == "input":
        out.mkdir()
        inputs = [out]
    elif what == "inside-input":
        (tmp_path / "src").mkdir()
        out, inputs = tmp_path / "src" / "o", [tmp_path / "src"]
    else:
        (out / "src").mkdir(parents=True)
        inputs = [out / "src"]
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CovidXrayError) as err:
        OutputDir(out, "evaluate-x", legacy=LEGACY, inputs=inputs)
    assert str(out.name) in str(err.value)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_failed_first_write_leaves_no_folder(tmp_path):
    od = OutputDir(tmp_path / "o", "evaluate-x")
    with pytest.raises(RuntimeError), od.writing() as tmp:
        (tmp / "metrics.json").write_text("half")
        raise RuntimeError("the work failed")
    assert not (tmp_path / "o").exists()


def test_stale_temporaries_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / f".last.pt.{dead}.abcd1234.tmp", tmp_path / "sub" / f".x.png.{dead}.ABCD_123.tmp"]
    stale_dir = tmp_path / f".t.{dead}.zzzz9999.tmp"
    stale_dir.mkdir()
    (stale_dir / "metrics.json").write_text("half")
    live = tmp_path / f".last.pt.{os.getpid()}.abcd1234.tmp"
    users = [tmp_path / ".last.pt.tmp", tmp_path / "notes.1234.tmp", tmp_path / f".x.{dead}.short.tmp"]
    for p in stale + [live] + users:
        p.write_bytes(b"x")
    assert sweep_stale_temps(tmp_path) and not stale[0].exists() and not stale_dir.exists()
    assert stale[1].exists()  # not recursive unless asked
    sweep_stale_temps(tmp_path, recursive=True)
    assert not stale[1].exists()
    assert live.exists() and all(p.exists() for p in users)


def test_atomic_writes_get_the_umask_modes(tmp_path):
    old = os.umask(0o027)
    try:
        import covidxray.utils as U

        U._UMASK = None  # read again under this umask
        atomic_write_text(tmp_path / "a.txt", "x")
        _publish(tmp_path / "o", {"metrics.json": "{}"})
    finally:
        os.umask(old)
        U._UMASK = None
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "o" / "metrics.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o750


def test_check_output_dir_creates_nothing(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", "sample") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()
