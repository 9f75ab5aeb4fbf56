"""``covidxray study`` on phantoms: bad specs refused in one line before anything trains; the demo study end to
end (one row per arm, points of each budget scored, the figures and the environment written, the sampler options
in the diffusion arm's metrics.json); a rerun retrains and redraws nothing; a changed arm reruns alone; Ctrl-C in
training stops cleanly, the same command resumes it, and the resumed arm is the uninterrupted one; the shipped
specs plan on phantoms; ``--probe`` measures each arm and keeps nothing; ``--scale`` scales every budget, enters
the keys, the manifest and the report, and is not mixed in one folder; ``--list-arms`` lists the arms; ``--arm``
processes updating one manifest at once keep each other's arms; the arms write TensorBoard scalars where the
package is."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from tests.fixtures import ANSI

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "studies" / "demo.yaml"
FIGURES = ("curves_kimg.png", "curves_seconds.png", "grids.png", "grid_rawgan.png", "grid_cvae.png", "grid_edm.png")
PNG = b"\x89PNG\r\n\x1a\n"
RUN = ["--set", "train.num_threads=1", "--device", "cpu"]
ARMS = {"rawgan": "rawgan", "cvae": "cvae", "edm": "edm"}


def _invoke(*args):
    from typer.testing import CliRunner

    from covidxray.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    r.clean_stdout = ANSI.sub("", r.stdout)
    return r


@pytest.fixture(scope="module")
def demo_study(demo_prepared, standin, tmp_path_factory):
    """The demo spec run once into a study folder (the stand-in as the FID network)."""
    from covidxray.metrics import features as FE

    out = tmp_path_factory.mktemp("study") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"TERM": "dumb", "COLUMNS": "200", "NO_COLOR": "1", FE.ENV_WEIGHTS: str(standin),
                     FE.ENV_ALLOW_UNVERIFIED: "1"}.items():
            mp.setenv(k, v)
        r = _invoke("study", DEMO, "--data", demo_prepared, "--out", out, *RUN)
    assert r.exit_code == 0, r.output
    (out.parent / "study.log").write_text(r.output)  # what the user watched (test_the_progress_...)
    return out


def _mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob(pattern)}


def _table_rows(md: str) -> list[str]:
    """The rows of study.md's comparison table (the first table)."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| arm |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append(ln)
    return rows


# ------------------------------------------------------------------------------------------ bad specs
BASE = {"name": "bad", "eval": {"n": 12, "repeats": 1, "metrics": ["fid"]},
        "arms": [{"name": "a", "model": "cvae", "kimg": 0.05, "sets": ["arch.channels=8"]}]}


@pytest.fixture(scope="module")
def no_masks(demo_prepared, tmp_path_factory) -> Path:
    """The demo phantoms prepared without their lung masks (the manifest's mask column empty)."""
    out = tmp_path_factory.mktemp("nomasks") / "prepared"
    shutil.copytree(demo_prepared, out, ignore=shutil.ignore_patterns(".cache"))
    rows = list(csv.DictReader(io.StringIO((out / "manifest.csv").read_text(encoding="utf-8"))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows({**r, "mask": ""} for r in rows)
    (out / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    return out


def _arm(**kw):
    return [{**BASE["arms"][0], **kw}]


@pytest.mark.parametrize("case, change, must", [
    ("unknown-model", {"arms": _arm(model="stylegan9")}, ["arm 'a'", "unknown model 'stylegan9'"]),
    ("classifier", {"arms": _arm(model="resnet18")}, ["arm 'a'", "a study compares generators"]),
    ("unknown-top-key", {"budget": 3}, ["unknown key 'budget'"]),
    ("unknown-arm-key", {"arms": _arm(epochs=3)}, ["arm 1", "unknown key 'epochs'"]),
    ("unknown-config-key", {"arms": _arm(sets=["loss.nope=1"])}, ["arm 'a'", "unknown config key 'loss.nope'"]),
    ("bad-config-value", {"arms": _arm(sets={"arch.channels": -8})}, ["arm 'a'", "arch.channels"]),
    ("budget-zero", {"arms": _arm(kimg=0)}, ["arm 'a'", "kimg must be a number > 0"]),
    ("fixed-key", {"arms": _arm(sets=["train.epochs=3"])}, ["arm 'a'", "may not set 'train.epochs'"]),
    ("twins", {"arms": _arm() + _arm()}, ["arms 1 and 2 are both named 'a'"]),
    ("bad-point", {"arms": _arm(checkpoints_at=[0.5, 2])}, ["arm 'a'", "checkpoints_at"]),
    ("bad-metric", {"eval": {"metrics": ["fid", "is"]}}, ["eval", "unknown metric(s) is"]),
    ("mask-arm", {"arms": _arm(model="edm_mask", sets=[])}, ["arm 'a'", "edm_mask trains on lung masks"]),
    ("sampling-on-a-vae", {"arms": _arm(sampling={"steps": 4})}, ["arm 'a'", "takes no sampler options", "edm"]),
    ("bad-sampling-value", {"arms": _arm(model="edm", sets=[], sampling={"steps": 0})},
     ["arm 'a': sampling", "steps must be a whole number in [1, 1000]"]),
    ("bad-eval-sampling", {"eval": {"sampling": {"sampler": "ddim"}}, "arms": _arm(model="edm", sets=[])},
     ["arm 'a': sampling", "sampler must be one of heun, euler, dpm2m"]),
    ("unknown-sampling-key", {"eval": {"sampling": {"eta": 1}}}, ["eval.sampling", "unknown key 'eta'"]),
    ("unknown-segmentation-key", {"eval": {"segmentation": {"lr": 1}}}, ["eval.segmentation", "unknown key 'lr'"]),
    ("bad-segmentation-set", {"eval": {"segmentation": {"sets": ["arch.nope=1"]}}},
     ["eval.segmentation", "arch.nope"]),
    ("segmentation-seeds-zero", {"eval": {"segmentation": {"seeds": 0}}}, ["eval.segmentation", "seeds"]),
    ("seed-and-seeds", {"arms": _arm(seed=1, seeds=[0, 1])}, ["arm 'a'", "both seed and seeds"]),
    ("one-seed", {"arms": _arm(seeds=[3])}, ["arm 'a'", "two or more"]),
    ("repeated-seed", {"arms": _arm(seeds=[1, 1])}, ["arm 'a'", "repeats a seed"]),
    ("seeded-twin", {"arms": _arm(seeds=[0, 1]) + _arm(name="a-s1")}, ["arms 1 and 2 are both named 'a-s1'"]),
])
def test_a_bad_spec_is_refused_in_one_line_before_anything_trains(case, change, must, cli, tmp_path, demo_prepared,
                                                                 no_masks):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**BASE, **change}), encoding="utf-8")
    data = no_masks if case == "mask-arm" else demo_prepared
    r = cli("study", spec, "--data", data, "--out", tmp_path / "s", *RUN)
    lines = [ln for ln in r.clean_stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (r.exit_code, r.output)
    for text in [str(spec), *must]:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "s").exists()


def test_the_execution_set_and_the_arm_option_are_checked(cli, tmp_path, demo_prepared):
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--set", "arch.channels=4")
    assert r.exit_code == 2 and "takes the settings that do not change" in r.clean_stderr
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--arm", "nope")
    assert r.exit_code == 2 and "has no arm 'nope'" in r.clean_stderr and "rawgan, cvae, edm" in r.clean_stderr
    r = cli("study", DEMO, "--out", tmp_path / "s", "--report")
    assert r.exit_code == 2 and "holds no study yet" in r.clean_stderr
    assert not (tmp_path / "s").exists()


def test_a_dry_run_prints_the_plan_and_writes_nothing(cli, tmp_path, demo_prepared):
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--dry-run")
    assert r.exit_code == 0, r.output
    for arm in ARMS:  # 57 training phantoms in batches of 16: 48 images an epoch, 0.15 kimg -> 4 epochs, 12 steps
        line = next(ln for ln in r.clean_stdout.splitlines() if f" {arm} " in ln)
        assert "57" in line and " 4 " in line and "50 % (6), 100 % (12)" in line and "to train" in line
    assert not (tmp_path / "s").exists()


def test_the_arms_are_listed_one_a_line(cli):
    r = cli("study", DEMO, "--list-arms")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == list(ARMS)


# ------------------------------------------------------------------------------------------ --scale
def test_a_scaled_dry_run_shows_the_scale_and_the_scaled_budgets(cli, tmp_path, demo_prepared):
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--dry-run", "--scale", "0.5")
    assert r.exit_code == 0, r.output
    for arm in ARMS:  # 0.075 kimg: 2 epochs of 48 images, 6 steps, 0.096 kimg trained
        line = next(ln for ln in r.clean_stdout.splitlines() if f" {arm} " in ln)
        assert " 2 " in line and "0.096 (0.15 × 0.5)" in line and "50 % (3), 100 % (6)" in line, line
    assert "budgets scaled by 0.5" in r.clean_stdout
    assert "demo.yaml's 0.15 kimg became 0.075 kimg per arm" in r.clean_stdout
    assert not (tmp_path / "s").exists()
    for bad in ("0", "1.5", "-0.1", "nan"):
        r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--dry-run", "--scale", bad)
        lines = [ln for ln in r.clean_stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and "--scale must be a number in (0, 1]" in lines[0], r.output


def test_the_scale_enters_every_training_key(demo_prepared, tmp_path):
    from covidxray.study.spec import load_spec, plan_study, scale_spec

    spec = load_spec(DEMO)
    halved = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    for a in halved["arms"]:
        a["kimg"] = 0.075
    (tmp_path / "halved.yaml").write_text(yaml.safe_dump(halved), encoding="utf-8")
    scaled = plan_study(scale_spec(spec, 0.5), demo_prepared)
    same_budget = plan_study(load_spec(tmp_path / "halved.yaml"), demo_prepared)
    for a, b in zip(scaled, same_budget):  # the same training, another study
        assert (a.epochs, a.arm.kimg, a.arm.spec_kimg, b.arm.spec_kimg) == (b.epochs, 0.075, 0.15, None)
        assert a.key != b.key
    assert scale_spec(spec, 1.0) is spec  # an unscaled study keeps its keys


def test_a_scaled_study_says_so_and_is_not_mixed_with_another_scale(cli, tmp_path, demo_prepared, unverified):
    out = tmp_path / "s"
    r = cli("study", DEMO, "--data", demo_prepared, "--out", out, "--arm", "cvae", "--scale", "0.5", *RUN)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "study.json").read_text(encoding="utf-8"))
    entry = manifest["arms"]["cvae"]
    assert manifest["scale"] == 0.5 and (entry["scale"], entry["kimg_spec"], entry["kimg_budget"]) == (0.5, 0.15, 0.075)
    assert entry["train"]["kimg"] == pytest.approx(0.096) and entry["train"]["step"] == 6
    md = (out / "study.md").read_text(encoding="utf-8")
    assert md.startswith("# Study `demo` (budgets scaled by 0.5)")
    assert "- **budgets scaled by 0.5 (--scale 0.5): demo.yaml's 0.15 kimg became 0.075 kimg per arm" in md
    for args in ([], ["--scale", "1"], ["--scale", "0.25"]):  # the full spec, or another scale, in the same folder
        r = cli("study", DEMO, "--data", demo_prepared, "--out", out, "--arm", "rawgan", *args, *RUN)
        lines = [ln for ln in r.clean_stderr.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1, r.output
        assert "holds a study run at --scale 0.5 (arms cvae)" in lines[0] and "Pass --scale 0.5" in lines[0]
    assert json.loads((out / "study.json").read_text(encoding="utf-8"))["arms"].keys() == {"cvae"}
    r = cli("study", DEMO, "--data", demo_prepared, "--out", out, "--report", "--device", "cpu")  # at its own scale
    assert r.exit_code == 0, r.output
    rows = _table_rows((out / "study.md").read_text(encoding="utf-8"))
    assert "(12×1)" in rows[1] and "budgets scaled by 0.5" in (out / "study.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------ several --arm processes
def _update_arm(out: str, name: str, n: int) -> None:
    from covidxray.study.run import update_manifest

    for k in range(1, n + 1):
        update_manifest(Path(out), name, {"n": k})


@pytest.mark.skipif(sys.platform == "win32", reason="the manifest's lock is POSIX flock")
def test_processes_updating_one_manifest_at_once_keep_each_others_arms(tmp_path):
    from covidxray.study.run import LOCK, read_manifest

    out, n = tmp_path / "s", 40
    out.mkdir()
    ctx = multiprocessing.get_context("fork")  # the test's modules are loaded already: a fork starts at once
    procs = [ctx.Process(target=_update_arm, args=(str(out), f"arm{i}", n)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert {a: e["n"] for a, e in read_manifest(out)["arms"].items()} == {f"arm{i}": n for i in range(4)}
    assert (out / LOCK).is_file() and not list(out.glob("*.tmp"))


def test_a_file_system_without_locks_updates_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno

    from covidxray.study import run

    def refuse(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    if run.fcntl is None:
        pytest.skip("no fcntl here")
    monkeypatch.setattr(run.fcntl, "flock", refuse)
    (tmp_path / "s").mkdir()
    with pytest.warns(UserWarning, match="refuses locks .*one --arm process at a time"):
        run.update_manifest(tmp_path / "s", "a", {"n": 1})
    assert run.read_manifest(tmp_path / "s")["arms"] == {"a": {"n": 1}}


# ------------------------------------------------------------------------------------------ TensorBoard
def test_the_arms_write_tensorboard_scalars_where_the_package_is(cli, tmp_path, demo_prepared, monkeypatch):
    from covidxray.study.spec import load_spec, plan_study

    plain = plan_study(load_spec(DEMO), demo_prepared, sets=["train.tensorboard=false"])
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = object
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    on = plan_study(load_spec(DEMO), demo_prepared)
    assert all(p.cfg.train.tensorboard for p in on) and not any(p.cfg.train.tensorboard for p in plain)
    assert [p.key for p in on] == [p.key for p in plain]  # an execution setting: the keys do not change
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the package missing
    assert not any(p.cfg.train.tensorboard for p in plan_study(load_spec(DEMO), demo_prepared))
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--set", "train.tensorboard=true")
    lines = [ln for ln in r.clean_stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "pip install covidxray[tensorboard]" in lines[0], r.output
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------ the demo study
def test_the_demo_study_writes_one_row_per_arm_and_scores_each_point(demo_study):
    md = (demo_study / "study.md").read_text(encoding="utf-8")
    rows = _table_rows(md)
    assert [r.split("|")[1].strip() for r in rows] == list(ARMS)
    assert all("(12×1)" in r and "| cpu |" in r for r in rows), rows
    manifest = json.loads((demo_study / "study.json").read_text(encoding="utf-8"))
    for arm in ARMS:
        entry = manifest["arms"][arm]
        assert entry["train"]["status"] == "done" and entry["train"]["kimg"] == pytest.approx(0.192)
        half, full = entry["points"]["50"], entry["points"]["100"]
        assert (half["step"], half["kimg"], full["step"]) == (6, pytest.approx(0.096), 12)
        assert half["seconds"] <= full["seconds"] == entry["train"]["seconds"]
        assert (demo_study / half["checkpoint"]).is_file() and full["checkpoint"].endswith("checkpoints/last.pt")
        for p in (half, full):
            metrics = json.loads((demo_study / p["eval"]["out"] / "metrics.json").read_text(encoding="utf-8"))
            assert metrics["source"]["path"] == str(demo_study / p["checkpoint"])
            assert p["eval"]["fd"]["mean"] == metrics["metrics"]["fd_unverified"]["mean"]  # nothing recomputed
    assert manifest["report"][0]["status"] == "done" and len(manifest["report"]) == 3


def test_the_demo_study_draws_its_figures_and_links_them(demo_study):
    md = (demo_study / "study.md").read_text(encoding="utf-8")
    for name in FIGURES:
        data = (demo_study / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    for name in ("curves_kimg.png", "curves_seconds.png", "grids.png"):
        assert f"]({name})" in md, name
    assert not (demo_study / "forest_downstream.png").exists()  # no arm has a downstream result
    grids = json.loads((demo_study / "study.json").read_text(encoding="utf-8"))["grids"]
    assert grids["rawgan"]["rows"] == [] and grids["cvae"]["rows"] == ["covid", "normal", "viral_pneumonia"]
    assert grids["edm"]["checkpoint"].endswith("checkpoints/last.pt") and grids["edm"]["sampling"]["steps"] == 2
    assert not list(demo_study.glob(".*.tmp"))  # every figure written atomically, no temporaries left


def test_the_forest_plot_shows_each_arm_with_a_downstream_delta(tmp_path):
    from covidxray.study.figures import save_forest

    rows = [{"arm": "a", "status": "done", "downstream": {"delta": {"mean": 0.02, "ci95": [-0.01, 0.05], "n": 3}}},
            {"arm": "b", "status": "done", "downstream": {"delta": {"mean": -0.03, "ci95": None, "n": 1}}},
            {"arm": "c", "status": "done", "downstream": None}, {"arm": "d", "status": "not run"}]
    assert save_forest(tmp_path / "f.png", rows) == tmp_path / "f.png"
    assert (tmp_path / "f.png").read_bytes().startswith(PNG)
    assert save_forest(tmp_path / "g.png", rows[2:]) is None and not (tmp_path / "g.png").exists()


def test_the_report_records_the_environment_and_the_spec(demo_study, demo_prepared):
    md = (demo_study / "study.md").read_text(encoding="utf-8")
    env = json.loads((demo_study / "study.json").read_text(encoding="utf-8"))["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["covidxray"]
    assert env["data"] == str(demo_prepared.resolve()) and len(env["data_fingerprint"]) == 16
    assert env["spec"] == DEMO.read_text(encoding="utf-8")
    section = md[md.index("## Environment"):]
    assert f"torch {torch.__version__}" in section and env["data_fingerprint"] in section
    assert "every arm got the same data split" in md
    assert "```yaml\n" + DEMO.read_text(encoding="utf-8").rstrip() + "\n```" in section  # the spec verbatim


def test_the_sampler_options_reach_the_diffusion_arm_only(demo_study):
    manifest = json.loads((demo_study / "study.json").read_text(encoding="utf-8"))
    for arm in ARMS:
        for p in manifest["arms"][arm]["points"].values():
            source = json.loads((demo_study / p["eval"]["out"] / "metrics.json").read_text(encoding="utf-8"))["source"]
            if arm == "edm":  # eval.sampling {steps: 2} with the arm's own {sampler: euler} on top
                assert source["sampling"] == {"sampler": "euler", "steps": 2, "guidance": 1.0,
                                              "network_evaluations": 2}
            else:
                assert "sampling" not in source


def test_a_rerun_retrains_and_rescores_nothing(demo_study, cli, demo_prepared, unverified):
    before = {**_mtimes(demo_study, "*.pt"), **_mtimes(demo_study, "metrics.json")}
    grids = _mtimes(demo_study, "grid_*.png")
    r = cli("study", DEMO, "--data", demo_prepared, "--out", demo_study, *RUN)
    assert r.exit_code == 0, r.output
    assert r.clean_stdout.count("not retrained") == 3 and "scoring" not in r.clean_stdout
    assert {**_mtimes(demo_study, "*.pt"), **_mtimes(demo_study, "metrics.json")} == before
    assert _mtimes(demo_study, "grid_*.png") == grids and "drew" not in r.clean_stdout  # nor redraws a grid
    r = cli("study", DEMO, "--out", demo_study, "--report", "--device", "cpu")  # --report redraws every figure
    assert r.exit_code == 0, r.output
    after = _mtimes(demo_study, "grid_*.png")
    assert after.keys() == grids.keys() and all(after[k] != grids[k] for k in grids)


def test_a_changed_arm_reruns_alone(demo_study, cli, demo_prepared, unverified, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(demo_study, out)  # (mtimes kept)
    spec = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    spec["arms"][2]["seed"] = 1  # edm
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec), encoding="utf-8")
    before = _mtimes(out / "arms", "*.pt")
    old_key = json.loads((out / "study.json").read_text())["arms"]["edm"]["key"]
    r = cli("study", changed, "--data", demo_prepared, "--out", out, *RUN)
    assert r.exit_code == 0, r.output
    after = _mtimes(out / "arms", "*.pt")
    assert {k: v for k, v in after.items() if not k.startswith("edm/")} == \
           {k: v for k, v in before.items() if not k.startswith("edm/")}
    assert all(after[k] != before[k] for k in after if k.startswith("edm/"))
    assert (out / "replaced" / f"edm-{old_key[:8]}" / "eval-100" / "metrics.json").is_file()
    assert "arm edm: drew grid_edm.png" in r.clean_stdout and "drew grid_cvae" not in r.clean_stdout
    manifest = json.loads((out / "study.json").read_text())
    assert manifest["arms"]["edm"]["seed"] == 1 and manifest["arms"]["edm"]["key"] != old_key
    assert len(_table_rows((out / "study.md").read_text())) == 3


def test_ctrl_c_in_training_stops_cleanly_and_the_same_command_resumes_it(demo_study, cli, demo_prepared, unverified,
                                                                          tmp_path, monkeypatch):
    from covidxray.train.loop import Trainer

    out = tmp_path / "study"
    real, calls = Trainer.train_step, [0]

    def stop_at_the_fifth(self, *args):  # what Ctrl-C does: stop after the current step, with a checkpoint
        calls[0] += 1
        if calls[0] == 5:
            self.request_stop()
        return real(self, *args)

    monkeypatch.setattr(Trainer, "train_step", stop_at_the_fifth)
    args = ["study", DEMO, "--data", demo_prepared, "--out", out, "--arm", "cvae", *RUN]
    r = cli(*args)
    assert r.exit_code == 130, r.output
    entry = json.loads((out / "study.json").read_text())["arms"]["cvae"]
    assert entry["train"]["status"] == "interrupted" and entry["points"]["50"]["status"] == "pending"
    r = cli("study", DEMO, "--out", out, "--report")
    assert r.exit_code == 0, r.output
    rows = _table_rows((out / "study.md").read_text())
    assert [r.split("|")[3].strip() for r in rows] == ["not run", "not run (training interrupted)", "not run"]

    monkeypatch.setattr(Trainer, "train_step", real)
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert "resuming cvae" in r.clean_stdout
    rows = _table_rows((out / "study.md").read_text())
    assert [r.split("|")[1].strip() for r in rows] == list(ARMS) and "not run" in rows[0] and "not run" in rows[2]
    assert "(12×1)" in rows[1]
    entry = json.loads((out / "study.json").read_text())["arms"]["cvae"]
    assert entry["points"]["50"]["step"] == 6 and entry["train"]["step"] == 12
    # the resumed arm is the uninterrupted one of the demo study, weight for weight
    for rel in ("00000-cvae/checkpoints/point-50.pt", "00000-cvae/checkpoints/last.pt"):
        a = torch.load(out / "arms" / "cvae" / rel, map_location="cpu", weights_only=False)["models"]
        b = torch.load(demo_study / "arms" / "cvae" / rel, map_location="cpu", weights_only=False)["models"]
        for name in b:
            for k, v in b[name].items():
                assert torch.equal(a[name][k], v), (rel, name, k)


# ------------------------------------------------------------------------------------------ shipped specs, probe
@pytest.mark.parametrize("name, size, arms", [
    ("cpu", 64, ["cgan", "cvae", "pix2pix", "edm", "edm_mask"]),
    ("precision", 64, ["cgan_fp32", "cgan_bf16", "pix2pix_fp32", "pix2pix_bf16"]),
    ("seed", 128, ["rawgan", "cgan", "cgan-umax", "cgan-umin", "acgan", "unetcgan", "vae", "cvae", "pix2pix", "edm",
                   "edm_mask"]),
])
def test_the_shipped_specs_plan_on_phantoms(name, size, arms, cli, tmp_path, demo_at_size):
    spec = REPO / "configs" / "studies" / f"{name}.yaml"
    r = cli("study", spec, "--data", demo_at_size(size), "--out", tmp_path / "s", "--dry-run")
    assert r.exit_code == 0, r.output
    planned = [ln.split("│")[1].strip() for ln in r.clean_stdout.splitlines() if ln.count("│") > 5]
    assert planned == arms, r.clean_stdout
    assert all("to train" in ln for ln in r.clean_stdout.splitlines() if ln.count("│") > 5)
    assert not (tmp_path / "s").exists()


def test_a_probe_measures_each_arm_and_keeps_nothing(cli, tmp_path, demo_prepared, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    r = cli("study", DEMO, "--data", demo_prepared, "--out", tmp_path / "s", "--probe", *RUN)
    assert r.exit_code == 0, r.output
    lines = r.clean_stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if "probe: training steps and scoring draws measured" in ln)
    rows = [ln.split("│") for ln in lines[start:] if ln.count("│") > 5]
    assert [c[1].strip() for c in rows] == list(ARMS)
    for c in rows:  # batch 16, s/step, img/s, 12 steps, train minutes; draw and FID-net s/img, 2 points x 12 images
        assert c[4].strip() == "16" and float(c[5]) > 0 and float(c[6]) > 0 and c[7].strip() == "12"
        assert float(c[9]) > 0 and float(c[10]) > 0 and c[11].strip() == "24" and float(c[12]) > 0
    assert "min of scoring draws" in r.clean_stdout
    left = [p.name for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # torch's cache
    assert not (tmp_path / "s").exists() and not left


def test_the_progress_counts_the_stages_and_estimates_the_time_left(demo_study):
    """One line between stages: 3 arms x (training + 2 scored points) = 9 stages, counted from 0 to 9; an estimate
    of the time left once a training and a scoring stage have been measured, and none at the end."""
    lines = [ln for ln in (demo_study.parent / "study.log").read_text().splitlines() if ln.startswith("study demo: ")]
    counts = [ln.split(": ", 1)[1].split(" stages")[0] for ln in lines]
    assert counts == [f"{k} of 9" for k in range(10)], lines
    assert "no estimate until a stage of scoring, training has run" in lines[0]
    assert all("left" in ln and "no stage measured" not in ln for ln in lines[3:-1]), lines
    assert lines[-1].endswith("nothing left")

