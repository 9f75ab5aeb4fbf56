"""``covidxray study``: train and score the arms of a study spec under one protocol, and report them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from covidxray.cli._common import console, user_errors
from covidxray.errors import CovidXrayError


@user_errors
def study_cmd(
    spec: Path = typer.Argument(..., metavar="SPEC", help="The study spec (YAML), e.g. configs/studies/demo.yaml."),
    data: Optional[Path] = typer.Option(None, "--data", help="Prepared folder every arm trains on and is scored "
                                        "against (`covidxray prepare`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The study folder (default: studies/<spec name>); "
                                       "rerun the same command to continue it."),
    arm: Optional[str] = typer.Option(None, "--arm", help="Run this arm alone (into the same study folder)."),
    report: bool = typer.Option(False, "--report", help="Only write OUT/study.md and its figures from the arms that "
                                "have finished (the others marked; every sample grid redrawn); trains nothing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the spec against --data, print the plan (epochs, "
                                 "steps, points, what is done) and exit."),
    probe: bool = typer.Option(False, "--probe", help="A dry run that also trains each arm for a few steps (in a "
                               "temporary folder, removed) and prints its img/s and projected training minutes."),
    scale: Optional[float] = typer.Option(None, "--scale", metavar="F", help="Multiply every arm's kimg (and "
                                          "max_minutes) by F in (0, 1]: a scaled-down run of the spec, another study "
                                          "(default 1; --report: the scale the study ran at)."),
    list_arms: bool = typer.Option(False, "--list-arms", help="Print the spec's arm names, one a line, and exit "
                                   "(e.g. for a SLURM job array: docs/distributed.md)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N (training and scoring)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Execution setting of every arm that does not change "
                                             "what it learns, e.g. train.num_threads=4 (repeatable)."),
) -> None:
    """Train every arm of SPEC through `train`, score it through `evaluate` at points of its budget, and write
    OUT/study.md: one row per arm, and each arm's quality per compute. A rerun skips what is done."""
    from covidxray.study.run import MANIFEST, StudyRunner, check_folder_scale, check_study_dir, recorded_scale
    from covidxray.study.spec import load_spec, plan_study, scale_spec

    con = console()
    log = lambda msg: con.print(msg, highlight=False, soft_wrap=True, markup=False)  # noqa: E731
    s = load_spec(spec)
    if list_arms:
        typer.echo("\n".join(a.name for a in s.arms))
        return
    if arm is not None:
        s.arm(arm)  # an unknown name fails here, listing the arms
    out = out if out is not None else Path("studies") / s.name
    if scale is None:  # --report reports the study at the scale it ran at
        scale = (recorded_scale(out) if report and out.is_dir() else None) or 1.0
    s = scale_spec(s, scale)
    if report:
        check_study_dir(out, data)
        if not (out / MANIFEST).is_file():  # absent, or a folder where no study has run (e.g. an empty one)
            raise CovidXrayError(f"--out {out} holds no study yet", f"Run `covidxray study {spec} --data PREPARED` first")
        check_folder_scale(out, s.scale)
        # With the data, arms whose run is of an older spec are marked so (and get no figures).
        plans = plan_study(s, data, device, set_) if data is not None else None
        rows = StudyRunner(s, plans, data, out, device=device, log=log).report(redraw=True)
        return _print(con, rows, out)
    if data is None:
        raise CovidXrayError("--data is required", "Pass the prepared folder, e.g. --data data/cxr64")
    plans = plan_study(s, data, device, set_)
    check_study_dir(out, data)
    check_folder_scale(out, s.scale)
    runner = StudyRunner(s, plans, data, out, device=device, sets=set_, console=con, log=log)
    if dry_run or probe:
        _plan(con, runner, arm)
        if probe:
            _probe(con, runner, arm)
        con.print("dry run: nothing was kept" if probe else "dry run: nothing was trained or written",
                  highlight=False)
        return
    rows = runner.run(arm)
    _print(con, rows, out)


def _plan(con, runner, only: str | None) -> None:
    from rich.table import Table

    from covidxray.study.report import arm_status, scale_sentence
    from covidxray.study.run import read_manifest

    manifest = read_manifest(runner.out) if runner.out.is_dir() else {"arms": {}}
    keys = runner.keys()
    spec = runner.spec
    scaled = f", budgets scaled by {spec.scale:g}" if spec.scale != 1.0 else ""
    table = Table(title=f"study {spec.name}: {spec.path} on {runner.data} -> {runner.out}{scaled}")
    for col in ("arm", "model", "train images", "batch", "epochs", "steps", "kimg", "points (step)", "now"):
        table.add_column(col, justify="left" if col in ("arm", "model", "points (step)", "now") else "right")
    for p in runner.plans:
        if only is not None and p.arm.name != only:
            continue
        entry = manifest["arms"].get(p.arm.name)
        status = arm_status(entry, keys[p.arm.name])
        now = ("done" if status == "done" else "to train" if entry is None or status.startswith("not run (changed")
               or entry["train"].get("status") != "done" else "to score")
        kimg = f"{p.kimg:g}" + (f" ({p.arm.spec_kimg:g} × {spec.scale:g})" if p.arm.spec_kimg is not None else "")
        table.add_row(p.arm.name, p.arm.model, str(p.train_images), str(p.batch_size), str(p.epochs),
                      str(p.total_steps), kimg, ", ".join(f"{q.label} % ({q.step})" for q in p.points), now)
    con.print(table)
    if spec.scale != 1.0:
        con.print(scale_sentence(spec), highlight=False, markup=False, soft_wrap=True)


def _probe(con, runner, only: str | None) -> None:
    from rich.table import Table

    from covidxray.study.run import probe

    rows = []
    for p in runner.plans:
        if only is None or p.arm.name == only:
            con.print(f"probing arm {p.arm.name} ({p.arm.model}): a warm-up step, then 3 timed steps", highlight=False,
                      markup=False)
            rows.append(probe(p, protocol=runner.spec.eval))
    table = Table(title="probe: training steps and scoring draws measured, the budget's minutes projected from them")
    for col in ("arm", "model", "device", "batch", "s/step", "img/s", "steps", "train min", "draw s/img",
                "FID net s/img", "scored img", "score min", "probe s"):
        table.add_column(col, justify="left" if col in ("arm", "model", "device") else "right")
    for r in rows:
        ok = r["step_s"] is not None
        enc = r.get("encode_s_per_image")
        table.add_row(r["arm"], r["model"], r["device"], str(r["batch_size"]), f"{r['step_s']:.3f}" if ok else "-",
                      f"{r['images_per_s']:.1f}" if ok else "-", str(r["total_steps"]),
                      _minutes(r["train_minutes"]) if ok else "-", f"{r['draw_s_per_image']:.4f}",
                      f"{enc:.4f}" if enc is not None else "not installed", str(r["scored_images"]),
                      _minutes(r["score_minutes"]), f"{r['probe_s']:.1f}")
    con.print(table)
    train = sum(r["train_minutes"] or 0.0 for r in rows)
    score = sum(r["score_minutes"] for r in rows)
    con.print(f"projected: {_minutes(train)} min of training steps + {_minutes(score)} min of scoring draws = "
              f"{_minutes(train + score)} min (start-up, per-epoch validation, snapshots, checkpoints, the reference "
              "features and the downstream classifiers come on top)", highlight=False)


def _minutes(m: float) -> str:
    return f"{m:.1f}" if m >= 10 else f"{m:.2g}"


def _print(con, rows, out: Path) -> None:
    from rich.table import Table

    from covidxray.evaluate.report import fmt

    table = Table()
    for col in ("arm", "model", "FD ± std", "floor", "kimg", "train s", "status"):
        table.add_column(col, justify="left" if col in ("arm", "model", "status") else "right")
    for r in rows:
        done = r["status"] == "done"
        table.add_row(r["arm"], r["model"], fmt(r.get("fd")) if done else "-", fmt(r.get("fd_floor")) if done else "-",
                      f"{r['kimg']:.3f}" if done else "-", f"{r['train_s']:.1f}" if done else "-", r["status"])
    con.print(table)
    con.print(f"wrote {out / 'study.md'}", highlight=False, soft_wrap=True, markup=False)
