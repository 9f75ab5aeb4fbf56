"""``prepare`` (and the readers of a prepared folder) under bad input: names that are not UTF-8, folders
that cannot be read, a killed parent, an OUT that is not OUT's to take, files deleted after prepare, a
damaged manifest, bad numbers. Each: one line, exit 2, nothing of the user's touched, never silent."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import covidxray.data.prepare as P
from covidxray.data.datasets import PreparedDataset, load_tensor_data, read_records
from covidxray.errors import CovidXrayError
from tests.conftest import REPO, make_source_tree, noise_array, write_image
from tests.fixtures import dead_pid, interrupt_after

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run(src, out, **kw):
    kw.setdefault("size", 16)
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return P.prepare(src, out, **kw)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:  # strict UTF-8: the CSVs must be valid text
        return list(csv.DictReader(fh))


def snapshot(out) -> dict[str, bytes]:
    out = Path(out)
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def invoke(monkeypatch):
    """Run ``covidxray <args>`` with plain, wide output; returns (exit code, stdout, stderr) ANSI-free."""
    from typer.testing import CliRunner

    from covidxray.cli import app

    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")

    def call(*args):
        result = CliRunner().invoke(app, [a if isinstance(a, str) else os.fspath(a) for a in args])
        return result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr)

    return call


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in out + err
    return lines[0]


# --------------------------------------------------------------------------------------------
# 1. File names that are not valid UTF-8
# --------------------------------------------------------------------------------------------


def _bytes_name(folder: Path, name: bytes) -> Path:
    """``folder/name`` with a raw (undecodable) name; skips where the file system refuses such names."""
    path = os.path.join(os.fsencode(folder), name)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb"):
            pass
        os.remove(path)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not valid UTF-8")
    return Path(os.fsdecode(path))


def test_undecodable_names_are_prepared_and_shown_escaped(make_tree, tmp_path, invoke):
    src = make_tree({"covid": 4, "normal": 4})
    cafe = _bytes_name(src / "covid", b"caf\xe9.png")
    write_image(cafe, noise_array("cafe"))
    broken = _bytes_name(src / "covid", b"bad\xff.png")
    broken.write_bytes(b"not a png")
    sub = _bytes_name(src / "normal", b"sub\xe4/x.png")  # a nested folder name, too
    write_image(sub, noise_array("sub"))
    out = tmp_path / "out"

    code, stdout, err = invoke("prepare", src, out, "--size", "16", "--workers", "1")

    assert code == 0, err
    assert "not valid UTF-8" in stdout and "Traceback" not in stdout + err
    manifest = {r["source"]: r for r in rows(out / "manifest.csv")}
    assert {"covid/caf\\xe9.png", "normal/sub\\xe4/x.png"} <= set(manifest)
    for row in manifest.values():
        assert row["file"].isascii() and (out / row["file"]).is_file()
    assert manifest["covid/caf\\xe9.png"]["file"].endswith("/caf_xe9.png")
    rejected = {r["path"]: r["reason"] for r in rows(out / "rejected.csv")}
    assert set(rejected) == {"covid/bad\\xff.png"}
    info = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
    assert info["images_kept"] == 10 and info["rejected"] == 1


def test_undecodable_class_folder_gets_a_plain_class_name(make_tree, tmp_path):
    src = make_tree({"covid": 3})
    write_image(_bytes_name(src, b"caf\xe9/a.png"), noise_array("a"))
    write_image(_bytes_name(src, b"caf\xe9/b.png"), noise_array("b"))
    info = run(src, tmp_path / "out")
    assert info["classes"] == ["caf_xe9", "covid"]
    assert any("not valid UTF-8" in n for n in info["notes"])
    assert all(r["class"] in ("caf_xe9", "covid") for r in rows(tmp_path / "out" / "manifest.csv"))


def test_undecodable_names_resume_bit_exactly(make_tree, tmp_path, monkeypatch):
    src = make_tree({"covid": 5, "normal": 4})
    for i in range(3):
        write_image(_bytes_name(src / "covid", b"x\xe9%d.png" % i), noise_array(f"x{i}"))
    run(src, tmp_path / "clean")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, P, "process_task", 5)
        with pytest.raises(KeyboardInterrupt):
            run(src, out)
    run(src, out)
    assert snapshot(out) == snapshot(tmp_path / "clean")


# --------------------------------------------------------------------------------------------
# 2. Folders of SRC that cannot be read
# --------------------------------------------------------------------------------------------


def _deny(monkeypatch, *folders: Path) -> None:
    """Listing any of ``folders`` raises PermissionError, as a folder without read permission does
    (chmod 000 does not stop root, who runs the tests): os.scandir (os.walk, covidxray.data.layouts._list_dir)
    and os.listdir (Path.iterdir) are patched, whatever the layout code lists with."""
    denied = {os.path.realpath(f) for f in folders}
    real_scandir, real_listdir = os.scandir, os.listdir

    def check(path):
        if path not in (None, ".") and not isinstance(path, int) and os.path.realpath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))

    def scandir(path="."):
        check(path)
        return real_scandir(path)

    def listdir(path="."):
        check(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)


def test_unreadable_sub_folder_is_reported_not_skipped(make_tree, tmp_path, monkeypatch, invoke):
    src = make_tree({"covid": 4, "normal": 4})
    make_source_tree(src / "covid" / "batch2", {"deep": 3})
    make_source_tree(src / "normal", {"more": 2})
    _deny(monkeypatch, src / "covid" / "batch2", src / "normal" / "more")

    code, stdout, err = invoke("prepare", src, tmp_path / "out", "--size", "16", "--workers", "1")

    assert code == 0, err
    out = tmp_path / "out"
    rejected = {r["path"]: r["reason"] for r in rows(out / "rejected.csv")}
    assert set(rejected) == {"covid/batch2/", "normal/more/"}
    assert all("cannot read folder (permission denied)" in r for r in rejected.values())
    info = json.loads((out / "prepare.json").read_text())
    assert info["rejected"] == 2 and info["unreadable_folders"] == 2 and info["images_kept"] == 8
    assert "2 folder(s) of SRC could not be read" in stdout
    assert re.search(r"unreadable folders \(rejected\)\s+2", stdout)


def test_unreadable_masks_folder_is_reported(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_source_tree(src, {"COVID": 3, "Normal": 3}, size=(20, 20), subdir="images")
    (src / "COVID" / "masks").mkdir()
    _deny(monkeypatch, src / "COVID" / "masks")
    info = run(src, tmp_path / "out")
    assert {r["path"] for r in rows(tmp_path / "out" / "rejected.csv")} == {"COVID/masks/"}
    assert info["unreadable_folders"] == 1


def test_unreadable_class_folder_is_refused_in_one_line(make_tree, tmp_path, monkeypatch, invoke):
    src = make_tree({"covid": 4, "normal": 4})
    (src / "lost+found").mkdir()
    _deny(monkeypatch, src / "lost+found")
    out = tmp_path / "out"
    line = one_error_line(*invoke("prepare", src, out, "--size", "16", "--workers", "1"))
    assert "cannot read class folder 'lost+found'" in line and "permission denied" in line
    assert "--classes covid,normal" in line
    assert not out.exists()
    # Left out with --classes, the rest is prepared.
    code, _, err = invoke("prepare", src, out, "--size", "16", "--workers", "1", "--classes", "covid,normal")
    assert code == 0, err


def test_unreadable_source_folder_is_refused_in_one_line(make_tree, tmp_path, monkeypatch, invoke):
    src = make_tree({"covid": 4})
    _deny(monkeypatch, src)
    line = one_error_line(*invoke("prepare", src, tmp_path / "out"))
    assert "cannot read the source folder" in line and "permission denied" in line


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="runs as root, whom chmod 000 does not keep from reading a folder "
                           "(test_unreadable_sub_folder_is_reported_not_skipped simulates it instead)")
def test_chmod_000_sub_folder_is_reported(make_tree, tmp_path):
    src = make_tree({"covid": 4, "normal": 4})
    locked = src / "covid" / "locked"
    make_source_tree(locked, {"x": 2})
    locked.chmod(0)
    try:
        info = run(src, tmp_path / "out")
    finally:
        locked.chmod(0o755)
    assert {r["path"] for r in rows(tmp_path / "out" / "rejected.csv")} == {"covid/locked/"}
    assert info["unreadable_folders"] == 1


# --------------------------------------------------------------------------------------------
# 3. A killed parent takes its workers with it
# --------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """Child pid -> its start time (from /proc/*/stat; /proc/<pid>/task/*/children needs a kernel option)."""
    kids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[1] == pid:
                kids[int(entry)] = st[2]
    return kids


def _alive(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[0] not in ("Z", "X")  # a zombie has ended


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_parent_ends_the_pool_workers(tmp_path):
    cmd = [sys.executable, "-m", "covidxray", "prepare", "--demo", str(tmp_path / "demo"), "--workers", "2",
           "--per-class", "3000", "--size", "96"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            if len(kids) >= 2:
                break
            time.sleep(0.02)
        assert len(kids) >= 2, "the pool did not start"
        assert proc.poll() is None, "prepare finished before it could be killed: give it more work"
        time.sleep(0.5)  # the workers are busy now
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in kids.items()):
            time.sleep(0.05)
        left = [p for p, s in kids.items() if _alive(p, s)]
        assert not left, f"worker process(es) {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in kids.items():  # the processes this test started, if the fix failed
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("call", ["_die_with_parent(wrong)", "_watch_parent(wrong, 0.01)"])
def test_worker_exits_when_its_parent_is_already_gone(call):
    """A worker whose parent died before it armed the death signal (or, the fallback, is polling) exits
    at once. In a subprocess: arming it here would tie pytest itself to its parent."""
    script = ("import os, covidxray.data.prepare as P\n"
              "wrong = os.getppid() + 100000  # not its parent: as if reparented after the parent died\n"
              f"P.{call}\n"
              "print('survived')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", "")


# --------------------------------------------------------------------------------------------
# 4. OUT: never inside SRC, never the user's folder; resume and stale temporaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inside", "same", "holds"])
def test_out_inside_or_holding_src_is_refused_before_any_work(make_tree, tmp_path, where, invoke):
    src = make_tree({"covid": 4, "normal": 4})
    out = {"inside": src / "prepared", "same": src, "holds": tmp_path}[where]
    before = snapshot(tmp_path)
    line = one_error_line(*invoke("prepare", src, out, "--size", "16", "--workers", "1"))
    assert {"inside": "lies inside", "same": "is the input folder", "holds": "holds the input folder"}[where] in line
    assert snapshot(tmp_path) == before and not (src / "prepared").exists()


def test_out_inside_src_no_longer_becomes_a_class(make_tree, tmp_path):
    # The old defect: OUT inside SRC was accepted, and the next prepare of SRC read it as a class.
    src = make_tree({"covid": 4, "normal": 4})
    with pytest.raises(CovidXrayError, match="lies inside the input folder"):
        run(src, src / "out")
    assert sorted(p.name for p in src.iterdir()) == ["covid", "normal"]


@pytest.mark.parametrize("demo", [False, True])
def test_foreign_out_is_refused_and_left_alone(make_tree, tmp_path, demo, invoke):
    src = make_tree({"covid": 4, "normal": 4})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("keep me")
    args = ("--demo", out, "--per-class", "2") if demo else (src, out)
    line = one_error_line(*invoke("prepare", *args, "--size", "16"))
    assert "holds files covidxray did not write there (e.g. thesis.docx)" in line
    assert [p.name for p in out.iterdir()] == ["thesis.docx"]


def test_older_unmarked_preparation_still_resumes(make_tree, tmp_path, monkeypatch):
    src = make_tree({"covid": 6, "normal": 5})
    run(src, tmp_path / "clean")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, P, "_place", 4)
        with pytest.raises(KeyboardInterrupt):
            run(src, out)
    (out / ".covidxray-output.json").unlink()  # as an older covidxray left it
    run(src, out)
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_temporaries_of_a_killed_run_are_swept(make_tree, tmp_path, monkeypatch):
    src = make_tree({"covid": 6, "normal": 5})
    run(src, tmp_path / "clean")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_after(m, P, "process_task", 6)
        with pytest.raises(KeyboardInterrupt):
            run(src, out)
    pid = dead_pid()
    leftovers = [out / f".manifest.csv.{pid}.abcd1234.tmp", out / P.STAGING_DIR / f".x.png.{pid}.zz99zz99.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    run(src, out)
    assert not any(p.exists() for p in leftovers)
    assert snapshot(out) == snapshot(tmp_path / "clean")


def test_marker_alone_is_a_fresh_out(make_tree, tmp_path):
    """Killed right after claiming OUT (before its state file): the rerun starts it afresh."""
    src = make_tree({"covid": 4, "normal": 4})
    run(src, tmp_path / "clean")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tmp_path / "clean" / ".covidxray-output.json", out)
    run(src, out)
    assert snapshot(out) == snapshot(tmp_path / "clean")


# --------------------------------------------------------------------------------------------
# 5. A prepared folder changed after prepare
# --------------------------------------------------------------------------------------------


@pytest.fixture
def prepared_copy(demo_prepared, tmp_path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(demo_prepared, root, ignore=shutil.ignore_patterns(".cache"))
    return root


@pytest.mark.parametrize("what", ["image", "mask"])
@pytest.mark.parametrize("reader", ["dataset", "tensors", "tensors-cached", "tensors-masks"])
def test_deleted_file_is_one_clear_error(prepared_copy, what, reader):
    root = prepared_copy
    first = rows(root / "manifest.csv")[0]
    assert first["split"] == "train" and first["mask"]
    if reader == "tensors-cached":
        load_tensor_data(root, "train", masks=True)
        load_tensor_data(root, "train")
    victim = root / first["file" if what == "image" else "mask"]
    victim.unlink()
    with pytest.raises(CovidXrayError) as err:
        if reader == "dataset":
            PreparedDataset(root, "train")
        else:
            load_tensor_data(root, "train", masks=reader != "tensors" or what == "mask")
    message = str(err.value)
    assert str(victim) in message and "listed in manifest.csv but missing" in message
    assert "covidxray prepare` again into a new folder" in message


def test_deleted_file_through_the_cli(prepared_copy, tmp_path, invoke):
    """`covidxray train` on a prepared folder with an image deleted: one line naming it, exit 2."""
    first = rows(prepared_copy / "manifest.csv")[0]
    (prepared_copy / first["file"]).unlink()
    line = one_error_line(*invoke("train", "--model", "rawgan", "--data", prepared_copy, "--epochs", "1",
                                  "--device", "cpu", "--image-size", "64", "--out", tmp_path / "runs",
                                  "--set", "arch.g_channels=8", "--set", "arch.d_channels=8"))
    assert f"{prepared_copy / first['file']} is listed in manifest.csv but missing" in line
    assert "covidxray prepare` again into a new folder" in line


@pytest.mark.parametrize("damage, message", [
    ("cut_mid_line", "is cut short"),
    ("cut_at_line", "rows for the"),
    ("binary", "not UTF-8"),
    ("no_header", "no split, class, file column"),
    ("extra_field", "fields instead of 12"),
    ("outside_path", "is not a valid row"),
    ("empty", "no split, class, file column"),
])
def test_damaged_manifest_is_one_clear_error(prepared_copy, damage, message):
    path = prepared_copy / "manifest.csv"
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if damage == "cut_mid_line":
        path.write_text(text[: len(text) - len(lines[-1]) // 2], encoding="utf-8")
    elif damage == "cut_at_line":
        path.write_text("".join(lines[:-5]), encoding="utf-8")
    elif damage == "binary":
        path.write_bytes(text.encode()[:300] + b"\xff\xfe\x00garbage")
    elif damage == "no_header":
        path.write_text("".join(lines[1:]), encoding="utf-8")
    elif damage == "extra_field":
        path.write_text("".join(lines[:3]) + lines[3].rstrip("\n") + ",x\n" + "".join(lines[4:]), encoding="utf-8")
    elif damage == "outside_path":
        cells = lines[2].split(",")
        cells[2] = "../../etc/passwd"
        path.write_text("".join(lines[:2]) + ",".join(cells) + "".join(lines[3:]), encoding="utf-8")
    elif damage == "empty":
        path.write_text("", encoding="utf-8")
    for split in ("train", "test"):
        with pytest.raises(CovidXrayError, match=message) as err:
            read_records(prepared_copy, split)
        assert "manifest.csv is damaged" in str(err.value) and "into a new folder" in str(err.value)


def test_damaged_prepare_json_is_one_clear_error(prepared_copy):
    (prepared_copy / "prepare.json").write_text("[1, 2]")
    with pytest.raises(CovidXrayError, match="prepare.json is damaged"):
        PreparedDataset(prepared_copy)
    (prepared_copy / "prepare.json").write_bytes(b'{"complete": true, "size": \xff}')
    with pytest.raises(CovidXrayError, match="prepare.json is unreadable"):
        PreparedDataset(prepared_copy)


# --------------------------------------------------------------------------------------------
# 6. Numeric options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, option", [
    (["--size", "7"], "--size"),
    (["--size", "9000"], "--size"),
    (["--size", "abc"], "--size"),
    (["--size", "16.5"], "--size"),
    (["--val", "1"], "--val"),
    (["--val", "-0.1"], "--val"),
    (["--val", "nan"], "--val"),
    (["--test", "inf"], "--test"),
    (["--workers", "0"], "--workers"),
    (["--workers", "-3"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--demo-per-class", "0"], "--per-class"),
    (["--demo-per-class", "1e9x"], "--per-class"),
])
def test_bad_numbers_are_one_line_usage_errors(make_tree, tmp_path, invoke, args, option):
    src = make_tree({"covid": 3, "normal": 3})
    out = tmp_path / "out"
    if args[0] == "--demo-per-class":
        argv = ["prepare", "--demo", out, "--per-class", args[1]]
    else:
        argv = ["prepare", src, out, *args]
    line = one_error_line(*invoke(*argv))
    assert option in line and ("is not a whole number" in line or "is not a finite number" in line)
    assert not out.exists()


def test_val_plus_test_is_checked_where_it_was(make_tree, tmp_path, invoke):
    src = make_tree({"covid": 3, "normal": 3})
    line = one_error_line(*invoke("prepare", src, tmp_path / "out", "--val", "0.5", "--test", "0.5"))
    assert "leaves nothing for training" in line


def test_cli_size_range_matches_the_engine():
    from covidxray.cli import prepare as cli

    assert (cli.MIN_SIZE, cli.MAX_SIZE) == (P.MIN_SIZE, P.MAX_SIZE)
