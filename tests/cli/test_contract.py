"""The CLI's reliability contract, held for every command over a corpus of bad inputs and faults.

The contract (README "Exit codes", docs/reliability.md):

* **bad input** -> exit 2, exactly one line on stderr (``error: ...``) naming the file or value and the fix,
  no traceback, and nothing written, deleted or replaced;
* **nothing of the user's deleted or replaced**: an output folder is new, or one covidxray wrote for the same
  kind of result, and even then only covidxray's own files in it change;
* **interrupted work** (Ctrl-C, SIGTERM, SIGKILL) leaves nothing half-written and resumes exactly on the same
  command; Ctrl-C exits 130;
* files are written with the modes a plain ``open()`` gives under the umask.

The in-process cases run through typer's CliRunner (fast); the cases about what reaches a terminal (warnings
of libraries, signals, exit codes of the real process) run ``python -m covidxray`` in a subprocess.
Each case snapshots the whole work folder before and after: a refused command must leave it byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import ANSI, TINY_CLF_SETS, dead_pid, train_tiny_gan, train_tiny_unet

REPO = Path(__file__).resolve().parents[2]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------ the checks
def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (names as bytes, so undecodable names count too): kind, mode, size, content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    digest = hashlib.sha256(fh.read()).hexdigest()
                out[p] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest)
            elif stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            else:
                out[p] = ("dir", stat.S_IMODE(st.st_mode))
    return out


def assert_one_line_error(exit_code: int, stderr: str, output: str = "", *must: str) -> str:
    """Exit 2, exactly one line on stderr starting with ``error:``, no traceback; returns the line."""
    lines = [ln for ln in ANSI.sub("", stderr).splitlines() if ln.strip()]
    assert exit_code == 2, f"exit {exit_code}, stderr: {stderr!r} output: {output[-2000:]!r}"
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("error: "), lines
    assert "Traceback" not in stderr + output
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, TERM="dumb", COLUMNS="200", NO_COLOR="1", PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real command in a process of its own (``python -m covidxray``)."""
    return subprocess.run([sys.executable, "-m", "covidxray", *map(os.fsencode, map(str, args))],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(demo_prepared, tmp_path_factory):
    """Tiny trained runs of the three kinds of model (1-2 epochs each, seconds)."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    out = tmp_path_factory.mktemp("contract-runs")
    cfg = resolve_config("smallcnn", flags={"data": {"path": str(demo_prepared)}, "train": {"epochs": 2, "device": "cpu"}},
                         sets=TINY_CLF_SETS + ["eval.every=1"])
    cfg.out = str(out)
    clf, finished = start_run(cfg)
    assert finished
    return {"gan": train_tiny_gan("cgan", demo_prepared, out), "classifier": clf.run_dir,
            "unet": train_tiny_unet(demo_prepared, out)}


@pytest.fixture()
def work(tmp_path, monkeypatch):
    """The user's working folder (the current directory), with a thesis folder that must survive everything."""
    w = tmp_path / "work"
    (w / "mythesis").mkdir(parents=True)
    (w / "mythesis" / "chapter1.tex").write_text("x\n")
    (w / "notes.txt").write_text("my notes\n")
    monkeypatch.chdir(w)
    return w


def junk_folder(root: Path) -> Path:
    """One file of every kind of bad image, plus good ones (phantom-like noise), in two class folders."""
    rng = np.random.default_rng(0)
    for cls in ("covid", "normal"):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(d / f"ok{i}.png")
    bad = root / "covid"
    (bad / "empty.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes((root / "normal" / "ok0.png").read_bytes()[:60])
    (bad / "text.png").write_text("not an image\n")
    (bad / "html.jpg").write_text("<html>404</html>")
    Image.new("L", (1, 40)).save(bad / "onepixelwide.png")
    Image.new("L", (40, 1)).save(bad / "onepixelhigh.png")
    Image.new("L", (1, 1)).save(bad / "onepixel.png")
    Image.fromarray(np.zeros((40, 40), np.uint16)).save(bad / "black16.png")
    Image.new("CMYK", (40, 40), (0, 0, 0, 255)).save(bad / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(bad / "transparent.png")
    (bad / "notes.txt").write_text("a non-image file")
    os.symlink(bad / "absent.png", bad / "broken_link.png")
    os.symlink(bad / "loop_b.png", bad / "loop_a.png")
    os.symlink(bad / "loop_a.png", bad / "loop_b.png")
    name = os.fsencode(bad) + b"/caf\xe9.png"  # a Latin-1 name from another system's archive
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(name.decode("utf-8", "surrogateescape"))
    return root


# ------------------------------------------------------------------------------------------ the corpus
@dataclass
class Bad:
    """A bad-input case: the command line (``{gan}``, ``{clf}``, ``{unet}``, ``{data}`` filled in) after ``setup``."""

    id: str
    args: list[str]
    must: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None


def _damaged_prepared(w: Path, data: Path) -> None:
    import shutil

    shutil.copytree(data, w / "prep")
    victim = sorted((w / "prep" / "train").rglob("*.png"))[0]
    victim.unlink()


def _cut_manifest(w: Path, data: Path) -> None:
    import shutil

    shutil.copytree(data, w / "prep")
    text = (w / "prep" / "manifest.csv").read_bytes()
    (w / "prep" / "manifest.csv").write_bytes(text[: len(text) // 2])


def _checkpoints(w: Path) -> None:
    (w / "ckpt").mkdir()
    (w / "ckpt" / "random.pt").write_bytes(os.urandom(4096))
    (w / "ckpt" / "empty.pt").write_bytes(b"")
    torch.save({"format": "covidxray-checkpoint", "format_version": 2, "model": "cgan", "models": {}},
               w / "ckpt" / "noconfig.pt")
    torch.save({"weights": torch.zeros(3)}, w / "ckpt" / "foreign.pt")
    (w / "config.yaml").write_text("train: [unclosed\n")
    (w / "afile").write_text("a file\n")
    (w / "emptydir").mkdir()


def _study_spec(w: Path) -> None:
    """A valid one-arm study spec (spec.yaml) and the unreadable config.yaml of :func:`_checkpoints`."""
    _checkpoints(w)
    (w / "spec.yaml").write_text("name: s\neval: {n: 8, repeats: 1, metrics: [fid]}\n"
                                 "arms:\n  - {name: a, model: cvae, kimg: 0.05, sets: [arch.channels=8]}\n")
    (w / "spec-nosuch.yaml").write_text("name: s\narms:\n  - {name: a, model: nosuch, kimg: 1}\n")


BAD = [
    # prepare
    Bad("prepare-missing-src", ["prepare", "absent", "out"], ("absent",)),
    Bad("prepare-src-is-file", ["prepare", "notes.txt", "out"], ("notes.txt",)),
    Bad("prepare-empty-src", ["prepare", "emptydir", "out"], ("emptydir",), _checkpoints),
    Bad("prepare-out-is-file", ["prepare", "{data}", "notes.txt"], ("notes.txt",)),
    Bad("prepare-out-foreign", ["prepare", "{data}", "mythesis"], ("mythesis",)),
    Bad("prepare-out-inside-src", ["prepare", "src", "src/out"], ("input folder",),
        lambda w: junk_folder(w / "src")),
    Bad("prepare-size-nan", ["prepare", "{data}", "out", "--size", "nan"], ("--size",)),
    Bad("prepare-size-zero", ["prepare", "{data}", "out", "--size", "0"], ("--size",)),
    Bad("prepare-val-inf", ["prepare", "{data}", "out", "--val", "inf"], ("--val",)),
    Bad("prepare-val-test-sum", ["prepare", "{data}", "out", "--val", "0.6", "--test", "0.6"], ("--val",)),
    Bad("prepare-workers-zero", ["prepare", "{data}", "out", "--workers", "0"], ("--workers",)),
    Bad("prepare-unknown-class", ["prepare", "src", "out", "--classes", "flu"], ("flu",),
        lambda w: junk_folder(w / "src")),
    Bad("prepare-no-such-option", ["prepare", "--bogus"], ("--bogus",)),
    # train
    Bad("train-unknown-model", ["train", "--model", "nosuch", "--data", "{data}"], ("nosuch",)),
    Bad("train-missing-data", ["train", "--model", "smallcnn", "--data", "absent"], ("absent",)),
    Bad("train-unprepared-data", ["train", "--model", "smallcnn", "--data", "mythesis"], ("mythesis",)),
    Bad("train-lr-nan", ["train", "--model", "smallcnn", "--data", "{data}", "--set", "optim.lr=nan"], ("optim.lr",)),
    Bad("train-beta1-1.5", ["train", "--model", "cgan", "--data", "{data}", "--set", "optim.beta1=1.5"],
        ("optim.beta1",)),
    Bad("train-lr-inf", ["train", "--model", "cgan", "--data", "{data}", "--set", "optim.lr_g=.inf"], ("optim.lr_g",)),
    Bad("train-unknown-key", ["train", "--model", "smallcnn", "--data", "{data}", "--set", "optim.nosuch=1"],
        ("optim.nosuch",)),
    Bad("train-wrong-type", ["train", "--model", "smallcnn", "--data", "{data}", "--set", "train.batch_size=many"],
        ("train.batch_size",)),
    Bad("train-bad-yaml", ["train", "--model", "smallcnn", "--data", "{data}", "--config", "config.yaml"],
        ("config.yaml",), _checkpoints),
    Bad("train-epochs-nan", ["train", "--model", "smallcnn", "--data", "{data}", "--epochs", "nan"], ("--epochs",)),
    Bad("train-damaged-prepared", ["train", "--model", "smallcnn", "--data", "prep", "--set", "data.cache=false"],
        ("prep",)),
    Bad("train-cut-manifest", ["train", "--model", "smallcnn", "--data", "prep"], ("manifest.csv",)),
    Bad("train-resume-missing", ["train", "--resume", "absent"], ("absent",)),
    # sample
    Bad("sample-missing-ckpt", ["sample", "absent.pt", "out"], ("absent.pt",)),
    Bad("sample-random-bytes", ["sample", "ckpt/random.pt", "out"], ("random.pt",), _checkpoints),
    Bad("sample-empty-file", ["sample", "ckpt/empty.pt", "out"], ("empty.pt",), _checkpoints),
    Bad("sample-no-config", ["sample", "ckpt/noconfig.pt", "out"], ("noconfig.pt", "config"), _checkpoints),
    Bad("sample-foreign-torch-file", ["sample", "ckpt/foreign.pt", "out"], ("foreign.pt",), _checkpoints),
    Bad("sample-classifier", ["sample", "{clf}", "out"], ("classifier",)),
    Bad("sample-n-zero", ["sample", "{gan}", "out", "-n", "0"], ("-n",)),
    Bad("sample-temperature-nan", ["sample", "{gan}", "out", "--temperature", "nan"], ("--temperature",)),
    Bad("sample-temperature-inf", ["sample", "{gan}", "out", "--temperature", "inf"], ("--temperature",)),
    Bad("sample-out-is-file", ["sample", "{gan}", "notes.txt", "-n", "2"], ("notes.txt",)),
    Bad("sample-out-foreign", ["sample", "{gan}", "mythesis", "-n", "2"], ("mythesis",)),
    Bad("sample-unknown-class", ["sample", "{gan}", "out", "--class", "flu"], ("flu",)),
    # segment
    Bad("segment-missing-input", ["segment", "{unet}", "absent", "out"], ("absent",)),
    Bad("segment-one-unreadable-file", ["segment", "{unet}", "notes.txt", "out"], ("notes.txt",)),
    Bad("segment-out-inside-input", ["segment", "{unet}", "src", "src/masks"], ("input folder",),
        lambda w: junk_folder(w / "src")),
    Bad("segment-out-foreign", ["segment", "{unet}", "src", "mythesis"], ("mythesis",), lambda w: junk_folder(w / "src")),
    Bad("segment-threshold-nan", ["segment", "{unet}", "src", "out", "--threshold", "nan"], ("--threshold",),
        lambda w: junk_folder(w / "src")),
    Bad("segment-threshold-one", ["segment", "{unet}", "src", "out", "--threshold", "1"], ("--threshold",),
        lambda w: junk_folder(w / "src")),
    Bad("segment-not-a-segmenter", ["segment", "{gan}", "src", "out"], ("gan",), lambda w: junk_folder(w / "src")),
    # gif
    Bad("gif-missing-run", ["gif", "absent"], ("absent",)),
    Bad("gif-no-snapshots", ["gif", "emptydir"], ("emptydir",), _checkpoints),
    Bad("gif-fps-nan", ["gif", "{gan}", "-o", "g.gif", "--fps", "nan"], ("--fps",)),
    Bad("gif-fps-inf", ["gif", "{gan}", "-o", "g.gif", "--fps", "inf"], ("--fps",)),
    Bad("gif-fps-zero", ["gif", "{gan}", "-o", "g.gif", "--fps", "0"], ("--fps",)),
    Bad("gif-max-side-zero", ["gif", "{gan}", "-o", "g.gif", "--max-side", "0"], ("--max-side",)),
    Bad("gif-every-zero", ["gif", "{gan}", "-o", "g.gif", "--every", "0"], ("--every",)),
    Bad("gif-output-is-dir", ["gif", "{gan}", "-o", "mythesis"], ("mythesis",)),
    Bad("gif-output-is-users-file", ["gif", "{gan}", "-o", "notes.txt"], ("notes.txt",)),
    # demo
    Bad("demo-out-foreign", ["demo", "mythesis"], ("mythesis",)),
    Bad("demo-out-file", ["demo", "notes.txt"], ("notes.txt",)),
    Bad("demo-epochs-zero", ["demo", "d", "--epochs", "0"], ("--epochs",)),
    # evaluate
    Bad("evaluate-out-foreign", ["evaluate", "{clf}", "--data", "{data}", "--out", "mythesis"], ("mythesis",)),
    Bad("evaluate-out-file", ["evaluate", "{clf}", "--data", "{data}", "--out", "notes.txt"], ("notes.txt",)),
    Bad("evaluate-out-cwd", ["evaluate", "{clf}", "--data", "{data}", "--out", "."], ("--out",)),
    Bad("evaluate-out-data", ["evaluate", "{clf}", "--data", "{data}", "--out", "{data}"], ("input folder",)),
    Bad("evaluate-gen-out-foreign", ["evaluate", "{gan}", "--data", "{data}", "--out", "mythesis"], ("mythesis",)),
    Bad("evaluate-seg-out-foreign", ["evaluate", "{unet}", "--data", "{data}", "--out", "mythesis"], ("mythesis",)),
    Bad("evaluate-classifier-downstream", ["evaluate", "{clf}", "--data", "{data}", "--downstream"],
        ("--downstream", "classifier")),
    Bad("evaluate-classifier-repeats", ["evaluate", "{clf}", "--data", "{data}", "--repeats", "2"], ("--repeats",)),
    Bad("evaluate-gen-mc", ["evaluate", "{gan}", "--data", "{data}", "--mc-samples", "3"], ("--mc-samples",)),
    Bad("evaluate-missing-data", ["evaluate", "{clf}", "--data", "absent"], ("absent",)),
    Bad("evaluate-damaged-ckpt", ["evaluate", "ckpt/random.pt", "--data", "{data}"], ("random.pt",), _checkpoints),
    Bad("evaluate-ratio-nan", ["evaluate", "{gan}", "--data", "{data}", "--downstream", "--synthetic-ratio", "nan"],
        ("--synthetic-ratio",)),
    # study
    Bad("study-missing-spec", ["study", "absent.yaml", "--data", "{data}"], ("absent.yaml",)),
    Bad("study-spec-is-dir", ["study", "emptydir", "--data", "{data}"], ("emptydir",), _study_spec),
    Bad("study-spec-bad-yaml", ["study", "config.yaml", "--data", "{data}"], ("config.yaml",), _study_spec),
    Bad("study-spec-not-a-mapping", ["study", "notes.txt", "--data", "{data}"], ("notes.txt",)),
    Bad("study-unknown-model", ["study", "spec-nosuch.yaml", "--data", "{data}"], ("nosuch",), _study_spec),
    Bad("study-missing-data", ["study", "spec.yaml", "--data", "absent"], ("absent",), _study_spec),
    Bad("study-unprepared-data", ["study", "spec.yaml", "--data", "mythesis"], ("mythesis",), _study_spec),
    Bad("study-out-foreign", ["study", "spec.yaml", "--data", "{data}", "--out", "mythesis"], ("mythesis",),
        _study_spec),
    Bad("study-out-file", ["study", "spec.yaml", "--data", "{data}", "--out", "notes.txt"], ("notes.txt",),
        _study_spec),
    Bad("study-out-data", ["study", "spec.yaml", "--data", "{data}", "--out", "{data}"], ("{data}",), _study_spec),
    Bad("study-scale-nan", ["study", "spec.yaml", "--data", "{data}", "--scale", "nan"], ("--scale",), _study_spec),
    Bad("study-scale-zero", ["study", "spec.yaml", "--data", "{data}", "--scale", "0"], ("--scale",), _study_spec),
    Bad("study-unknown-arm", ["study", "spec.yaml", "--data", "{data}", "--arm", "zz"], ("zz",), _study_spec),
    Bad("study-set-changes-arms", ["study", "spec.yaml", "--data", "{data}", "--set", "arch.channels=4"],
        ("arch.channels",), _study_spec),
    Bad("study-report-nothing", ["study", "spec.yaml", "--report", "--out", "emptydir"], ("emptydir",), _study_spec),
    Bad("study-no-data", ["study", "spec.yaml"], ("--data",), _study_spec),
    Bad("evaluate-batch-zero", ["evaluate", "{clf}", "--data", "{data}", "--batch-size", "0"], ("--batch-size",)),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_is_one_line_and_changes_nothing(case, cli, work, runs, demo_prepared):
    if case.setup is not None:
        case.setup(work)
    if case.id in ("train-damaged-prepared",):
        _damaged_prepared(work, demo_prepared)
    if case.id == "train-cut-manifest":
        _cut_manifest(work, demo_prepared)
    fill = {"gan": str(runs["gan"]), "clf": str(runs["classifier"]), "unet": str(runs["unet"]),
            "data": str(demo_prepared)}
    args = [a.format(**fill) for a in case.args]
    watched = [work, demo_prepared, *runs.values()]
    before = [snapshot(p) for p in watched]
    r = cli(*args)
    assert_one_line_error(r.exit_code, r.stderr, r.output, *(m.format(**fill) for m in case.must))
    after = [snapshot(p) for p in watched]
    for path, b, a in zip(watched, before, after):
        assert a == b, f"{case.id} changed {path}: " + repr(sorted(set(a.items()) ^ set(b.items()))[:6])


def test_raw_pickle_is_refused_in_one_line_without_a_warning(tmp_path):
    """A pickle that would run code is never loaded, and no library warning rides along the error."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "covidxray-checkpoint", "x": Evil()}, protocol=4))
    r = run_cli("sample", "evil.pt", "out", cwd=tmp_path)
    assert_one_line_error(r.returncode, r.stderr, r.stdout, "evil.pt")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_truncated_last_pt_says_best_pt_is_intact(runs, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["classifier"], run)
    last = run / "checkpoints" / "last.pt"
    assert (run / "checkpoints" / "best.pt").is_file()
    last.write_bytes(last.read_bytes()[:5000])
    r = cli("sample", last, tmp_path / "o")
    line = assert_one_line_error(r.exit_code, r.stderr, r.output, "last.pt")
    assert "best.pt" in line and "intact" in line
    r = cli("train", "--resume", run, "--epochs", "4")
    line = assert_one_line_error(r.exit_code, r.stderr, r.output, "last.pt")
    assert "best.pt" in line


# ------------------------------------------------------------------------------------------ outputs
def test_evaluate_never_deletes_or_replaces_the_users_files(cli, work, runs, demo_prepared):
    clf = runs["classifier"]
    before = snapshot(clf / "checkpoints")
    r = cli("evaluate", clf, "--data", demo_prepared, "--out", clf)  # the run folder itself
    assert_one_line_error(r.exit_code, r.stderr, r.output, str(clf))
    assert snapshot(clf / "checkpoints") == before
    # a folder of its own kind: rewritten, and a file the user put in it stays
    out = work / "eval"
    r = cli("evaluate", clf, "--data", demo_prepared, "--out", out)
    assert r.exit_code == 0, r.output
    (out / "my_comments.md").write_text("keep me\n")
    first = json.loads((out / "metrics.json").read_text())
    r = cli("evaluate", clf, "--data", demo_prepared, "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "my_comments.md").read_text() == "keep me\n"
    assert json.loads((out / "metrics.json").read_text())["metrics"] == first["metrics"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.endswith(".old")]
    # another kind's output folder is not this one's
    r = cli("evaluate", runs["unet"], "--data", demo_prepared, "--out", out)
    assert_one_line_error(r.exit_code, r.stderr, r.output, "evaluate-classifier")


def test_files_get_the_modes_of_a_plain_open(runs, tmp_path):
    """Not mkstemp's 0600 / mkdtemp's 0700: a lab's shared folders stay readable to colleagues."""
    old = os.umask(0o022)
    try:
        from typer.testing import CliRunner

        from covidxray.cli import app

        r = CliRunner().invoke(app, ["sample", str(runs["gan"]), str(tmp_path / "s"), "-n", "2", "--grid"])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["gif", str(runs["gan"]), "-o", str(tmp_path / "g.gif")])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()] + [tmp_path / "g.gif"]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), \
        {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    dirs = [p for p in (tmp_path / "s").rglob("*") if p.is_dir()] + [tmp_path / "s"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in dirs)
    ckpt = runs["gan"] / "checkpoints" / "last.pt"
    assert stat.S_IMODE(ckpt.stat().st_mode) & 0o044, oct(ckpt.stat().st_mode)


def test_prepare_reports_every_bad_file_and_crashes_on_none(work, cli):
    """Junk of every kind: exit 0, and every file is either prepared or listed with its reason."""
    import csv

    src = junk_folder(work / "src")
    r = cli("prepare", src, work / "prep", "--size", "32", "--workers", "1")
    assert r.exit_code == 0, r.output
    manifest = list(csv.DictReader((work / "prep" / "manifest.csv").open(encoding="utf-8")))
    rejected = list(csv.DictReader((work / "prep" / "rejected.csv").open(encoding="utf-8")))
    files = [p for p in os.listdir(os.fsencode(src / "covid")) + os.listdir(os.fsencode(src / "normal"))]
    assert len(manifest) + len(rejected) + _ignored(r.stdout) == len(files), (manifest, rejected)
    assert any("caf" in (row.get("source") or row.get("path") or "") for row in manifest + rejected)


def _ignored(stdout: str) -> int:
    for line in ANSI.sub("", stdout).splitlines():
        if "ignored non-image files" in line:
            return int(line.split()[-1])
    return 0


def test_segment_gives_every_input_a_row(work, runs, cli):
    import csv

    src = junk_folder(work / "src")
    r = cli("segment", runs["unet"], src, work / "seg")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((work / "seg" / "segment.csv").open(encoding="utf-8")))
    listed = [n for d in ("covid", "normal") for n in os.listdir(os.fsencode(src / d))]
    images = [n for n in listed if not n.endswith(b".txt")]
    assert len(rows) >= len(images), (len(rows), len(images))
    status = {Path(r_["file"]).name: r_["status"] for r_ in rows}
    for name in ("onepixelwide.png", "onepixelhigh.png", "broken_link.png", "loop_a.png", "empty.png"):
        assert name in status and status[name] != "ok", (name, status.get(name))


# ------------------------------------------------------------------------------------------ interrupts
def _wait_for(predicate, timeout: float = 120.0, proc=None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the command ended before the interrupt: {proc.returncode}, "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting for the command to start writing")
        time.sleep(0.05)


def _start(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "covidxray", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pngs(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*.png")}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_sample_resumes_exactly(sig, runs, tmp_path):
    args = ["sample", runs["gan"], None, "-n", "400", "--batch-size", "8", "--device", "cpu"]
    ref = tmp_path / "ref"
    r = run_cli(*[a if a is not None else ref for a in args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    proc = _start([a if a is not None else out for a in args], tmp_path)
    _wait_for(lambda: len(list(out.rglob("sample_*.png"))) >= 20, proc=proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "Traceback" not in err and "resume" in err
    done = len(list(out.rglob("sample_*.png")))
    assert 0 < done < 3 * 400
    r = run_cli(*[a if a is not None else out for a in args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "already there" in r.stdout
    assert _pngs(out) == _pngs(ref)
    assert not [p for p in out.rglob("*.tmp")]


def test_ctrl_c_while_the_cli_starts_is_a_quiet_exit_130(tmp_path):
    """Ctrl-C during the CLI's imports (a second or two on a busy machine): exit 130, one line, no traceback.
    The SIGINT is sent by an import hook the moment ``typer`` is imported, so it lands inside that window."""
    code = ("import os, signal, sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'typer':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Hook())\n"
            "from covidxray.cli import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--help"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["interrupted: nothing was started"]


@pytest.mark.slow
def test_ctrl_c_during_evaluate_leaves_no_output(runs, demo_prepared, tmp_path):
    out = tmp_path / "eval"
    proc = _start(["evaluate", runs["gan"], "--data", demo_prepared, "--out", out, "--metrics", "kid",
                   "--repeats", "50", "--device", "cpu"], tmp_path)
    _wait_for(lambda: time.sleep(4) or True, proc=proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_a_killed_checkpoint_write_leaves_no_temporary_behind(runs, tmp_path, cli):
    """SIGKILL during torch.save leaves `.last.pt.<pid>.<random>.tmp`; the next start of the run removes it
    (the pid is gone), while a live writer's temporary would stay."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["classifier"], run)
    stale = run / "checkpoints" / f".last.pt.{dead_pid()}.abcd1234.tmp"
    stale.write_bytes(b"\0" * 1000)
    live = run / "checkpoints" / f".last.pt.{os.getpid()}.abcd1234.tmp"
    live.write_bytes(b"\0" * 10)
    r = cli("train", "--resume", run, "--epochs", "3")
    assert r.exit_code == 0, r.output
    assert not stale.exists() and live.exists()


@pytest.mark.skipif(ROOT, reason="root reads and writes any folder: permissions cannot be tested as root")
def test_an_unwritable_output_folder_is_one_line(runs, tmp_path, cli):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        r = cli("sample", runs["gan"], locked / "out", "-n", "2")
        assert_one_line_error(r.exit_code, r.stderr, r.output, "not writable")
    finally:
        locked.chmod(0o755)


def test_an_unwritable_output_folder_is_one_line_simulated(runs, demo_prepared, tmp_path, cli, monkeypatch):
    """The same as root would see it where permissions hold (os.access is what the check asks)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if "locked" in str(p) else real(p, mode, **kw))
    (tmp_path / "locked").mkdir()
    for args in (["sample", runs["gan"], tmp_path / "locked" / "out", "-n", "2"],
                 ["evaluate", runs["classifier"], "--data", demo_prepared, "--out", tmp_path / "locked" / "e"]):
        r = cli(*args)
        assert_one_line_error(r.exit_code, r.stderr, r.output, "not writable")
    assert not list((tmp_path / "locked").iterdir())
