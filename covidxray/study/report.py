"""The study's report, ``study.md``, written from the manifest (``study.json``) alone.

A study run with ``--scale`` says so first, in bold: by how much, and what the spec's budgets became. Then one
row per arm of the spec at its full budget - FID ± std (N) beside its real-vs-real floor, KID, precision /
recall, copies, the downstream Δ with its 95 % interval when the protocol has one, the kimg trained, the
training seconds and the sampling seconds per 1000 images - with the arms that have not finished marked as
such; the figures (:mod:`covidxray.study.figures`: quality-per-compute curves, the downstream forest plot, the
sample grids); per arm, its quality-per-compute points (kimg, training seconds, FID, floor); and the
environment the study ran in (device, versions, git commit, data fingerprint, the spec verbatim). The numbers
are those of each point's ``metrics.json`` (:func:`covidxray.study.run.summarize`); the formatting is
:mod:`covidxray.evaluate.report`'s.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from covidxray.evaluate.report import fmt, mean_std
from covidxray.study.figures import CURVES, FOREST, GRIDS, save_curves, save_forest, save_grids, scored_points
from covidxray.study.spec import StudySpec
from covidxray.utils import atomic_write_text

REPORT = "study.md"

COLUMNS = ("arm", "model", "{fd} ± std (N)", "floor", "KID × 10³", "precision / recall", "density / coverage",
           "copies", "GAN-test", "TSTR", "downstream Δ [95 % CI]", "kimg", "train s", "sample s/1k", "device")


def final_point(entry: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in entry.get("points", {}).values() if p.get("final")), None)


def arm_status(entry: dict[str, Any] | None, keys: dict[str, Any] | None = None) -> str:
    """``done``, or why the arm has no row: not run, training, trained but not scored, changed since its run."""
    if entry is None:
        return "not run"
    if keys is not None and entry.get("key") != keys["train"]:
        return "not run (changed since its run)"
    train = entry.get("train", {})
    if train.get("status") != "done":
        return f"not run (training {train.get('status', 'pending')})"
    final = final_point(entry) or {}
    ev = final.get("eval") or {}
    if ev.get("status") != "done" or (keys is not None and ev.get("key") != keys["points"].get(_label(final))):
        return "not run (trained, not scored)"
    return "done"


def _label(point: dict[str, Any]) -> str:
    return f"{point['fraction'] * 100:g}"


def _delta(down: dict[str, Any] | None) -> str:
    if not down:
        return "-"
    d = down.get("delta")
    if not d:
        return "n/a" if down.get("refused") else "-"
    ci = d.get("ci95")
    return f"{d['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (1 seed)")


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sig(value: Any) -> str:
    """Three significant digits (seconds per 1000 images span 0.01 to 1000s)."""
    return "-" if value is None else f"{value:.3g}"


def report_rows(spec: StudySpec, manifest: dict[str, Any], keys: dict[str, dict[str, Any]] | None = None
                ) -> list[dict[str, Any]]:
    """One row per arm of ``spec`` (the manifest's figures at the full budget, or its status)."""
    rows = []
    for arm in spec.arms:
        entry = manifest.get("arms", {}).get(arm.name)
        status = arm_status(entry, None if keys is None else keys.get(arm.name))
        row: dict[str, Any] = {"arm": arm.name, "model": arm.model, "status": status, "group": arm.group}
        if status == "done":
            final = final_point(entry)
            ev = final["eval"]
            row.update({k: ev.get(k) for k in ("fd_name", "fd", "fd_floor", "kd_name", "kd", "kd_floor", "precision",
                                               "recall", "density", "coverage", "copies", "n", "repeats",
                                               "sample_s_per_1k", "downstream")})
            row["segmentation"] = (entry.get("segmentation") or {}) if (entry.get("segmentation") or {}).get(
                "status") == "done" else None
            row.update(kimg=final.get("kimg"), train_s=entry["train"].get("seconds"),
                       device=entry["train"].get("device"), capped=entry["train"].get("capped", False),
                       eval=ev.get("out"))
        rows.append(row)
    return rows


def fd_label(rows: list[dict[str, Any]]) -> str:
    """What the report calls the Fréchet distance: FID, or FD when an unverified feature network gave it."""
    return "FD (unverified net)" if any(r.get("fd_name") == "fd_unverified" for r in rows) else "FID"


def _sampling_line(spec: StudySpec) -> str:
    takers = [a for a in spec.arms if a.sampling]
    if not takers:
        return ("- sampler options: " + (f"{_kv(spec.eval.sampling)} for the models that take them (none here)"
                                         if spec.eval.sampling else "each run's own"))
    return ("- sampler options (the models that take them; the others have none): "
            + "; ".join(f"{a.name}: {_kv(a.sampling)}" for a in takers))


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in d.items()) or "the run's own"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def scale_sentence(spec: StudySpec) -> str:
    """What ``--scale`` did to a study's budgets, in one sentence ("" for an unscaled study)."""
    if spec.scale == 1.0:
        return ""
    pairs = list(dict.fromkeys((a.spec_kimg if a.spec_kimg is not None else a.kimg, a.kimg) for a in spec.arms))
    return (f"budgets scaled by {spec.scale:g} (--scale {spec.scale:g}): {Path(spec.path).name}'s "
            f"{_and([f'{k:g}' for k, _ in pairs])} kimg became {_and([f'{k:g}' for _, k in pairs])} kimg "
            f"{'per arm' if len(pairs) == 1 else 'respectively'}, each max_minutes cap likewise: a scaled-down run "
            f"of the spec, not its budgets")


def environment_markdown(spec: StudySpec, manifest: dict[str, Any]) -> list[str]:
    """The environment section: where and with what the study ran, and the spec verbatim."""
    env = manifest.get("environment") or {}
    lines = ["## Environment", ""]
    if env:
        commit = env.get("git_commit")
        lines += [
            f"- device: `{env.get('device', '?')}` ({env.get('device_name') or '?'}; {env.get('cpu_count', '?')} CPU "
            f"cores); host `{env.get('host', '?')}`",
            f"- software: covidxray {env.get('covidxray', '?')}"
            + (f" (git `{commit[:12]}`{', with uncommitted changes' if env.get('git_dirty') else ''})" if commit
               else " (no git commit known)")
            + f", torch {env.get('torch', '?')}" + (f" (CUDA {env['cuda']})" if env.get("cuda") else "")
            + f", Python {env.get('python', '?')}",
            f"- data: `{env.get('data', '?')}`, fingerprint `{env.get('data_fingerprint') or '?'}` (a hash of its "
            f"`manifest.csv` and `prepare.json`)",
            f"- as of the latest run, {env.get('date', '?')}",
        ]
    else:
        lines.append("- not recorded (the study was run by an older covidxray)")
    trained = {a.name: (manifest.get("arms", {}).get(a.name) or {}).get("train", {}).get("software")
               for a in spec.arms}
    versions = {json.dumps(v, sort_keys=True) for v in trained.values() if v}
    if len(versions) > 1:
        lines.append("- **the arms were trained with different software**: "
                     + "; ".join(f"{a}: covidxray {v['covidxray']} `{(v.get('git_commit') or '?')[:12]}`, torch "
                                 f"{v['torch']}" for a, v in trained.items() if v))
    lines += ["", f"The spec (`{spec.path}`), verbatim:", "", "```yaml", (spec.text or env.get("spec") or "").rstrip(),
              "```", ""]
    return lines


def figures_markdown(figures: dict[str, str]) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for name, caption in figures.items():
        lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    return lines


def _dice(stats: dict[str, Any] | None) -> str:
    return "-" if not stats or stats.get("mean") is None else f"{stats['mean']:.4f} ± {stats.get('std') or 0:.4f}"


def _pdelta(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    ci = d.get("ci95")
    return f"{d['mean']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (1 seed)")


def seeds_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The arms run with several training seeds (``seeds:``): their full-budget scores as mean ± std over the
    seeds that have finished (the variation a rerun with another seed would show, beside the draws' std above)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    if not groups:
        return []
    lines = ["", "### Over training seeds", "",
             "Arms trained once per seed (`seeds:`): mean ± std over the seeds that finished, of each seed's "
             "full-budget score (a seed's FID is itself the mean of its draws).", "",
             "| arm | seeds done | FID | KID × 10³ | downstream Δ | kimg | train s |", "|---|---|---:|---:|---:|---:|---:|"]
    for group, members in groups.items():
        done = [r for r in members if r["status"] == "done"]
        if not done:
            lines.append(f"| {group} | 0 of {len(members)} | - | - | - | - | - |")
            continue
        fd = mean_std([(r.get("fd") or {}).get("mean") for r in done])
        kd = mean_std([(r.get("kd") or {}).get("mean") for r in done])
        deltas = [((r.get("downstream") or {}).get("delta") or {}).get("mean") for r in done]
        dd = mean_std([d for d in deltas if d is not None]) if any(d is not None for d in deltas) else None
        lines.append(f"| {group} | {len(done)} of {len(members)} | {fmt(fd)} | {fmt(kd, 2, 1e3)} | "
                     f"{fmt(dd, 3) if dd else '-'} | {_num(mean_std([r.get('kimg') for r in done])['mean'], 3)} | "
                     f"{_num(mean_std([r.get('train_s') for r in done])['mean'], 1)} |")
    return lines


def segmentation_markdown(spec: StudySpec, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The segmentation table (``eval.segmentation``): one row per mask-conditional arm that has one."""
    seg = spec.eval.segmentation
    done = [r for r in rows if r.get("segmentation")]
    if seg is None:
        return []
    lines = ["", "## Segmentation: do the synthetic pairs help a U-Net?", "",
             f"U-Net test Dice on the real test masks (mean ± std over {seg.seeds} seed(s), {seg.epochs} epochs, "
             f"`best.pt` on the real validation masks; U-Net sets: {', '.join(seg.sets) or 'its defaults'}), trained "
             f"on (a) the real training pairs, (b) those plus {seg.copies} synthetic pair(s) per mask drawn from "
             "deformed copies of the same masks by the arm's model at its full budget, (c) the synthetic pairs "
             "alone. Δ: paired over seeds, 95 % t-interval. Arm (a) is the same U-Nets for every row.", ""]
    if not done:
        return lines + ["No mask-conditional arm has finished its segmentation stage yet.", ""]
    lines += ["| arm | (a) real | (b) real + synthetic | (c) synthetic only | Δ (b − a) [95 % CI] | "
              "Δ (c − a) [95 % CI] | N train (a / b / c) |", "|---|---:|---:|---:|---|---|---|"]
    for r in done:
        s = r["segmentation"]
        arms = s.get("arms", {})
        n = " / ".join(str((arms.get(a, {}).get("runs") or [{}])[0].get("n_train", "-"))
                       for a in ("real", "real+synthetic", "synthetic"))
        lines.append(f"| {r['arm']} | {_dice(arms.get('real', {}).get('dice'))} | "
                     f"{_dice(arms.get('real+synthetic', {}).get('dice'))} | "
                     f"{_dice(arms.get('synthetic', {}).get('dice'))} | {_pdelta(s.get('delta_b'))} | "
                     f"{_pdelta(s.get('delta_c'))} | {n} |")
    return lines + [""]


def study_markdown(spec: StudySpec, manifest: dict[str, Any], rows: list[dict[str, Any]],
                   figures: dict[str, str] | None = None) -> str:
    e = spec.eval
    unverified = any(r.get("fd_name") == "fd_unverified" for r in rows)
    fd = fd_label(rows)
    lines = [f"# Study `{spec.name}`" + (f" (budgets scaled by {spec.scale:g})" if spec.scale != 1.0 else ""), ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    down = e.downstream
    if spec.scale != 1.0:  # first and in bold: every number below is of the scaled budgets
        lines.append(f"- **{scale_sentence(spec)}**")
    lines += [
        f"- spec: `{spec.path}`; data: `{manifest.get('data', '?')}`"
        + (f" (classes {', '.join(spec.data.classes)})" if spec.data.classes else ""),
        "- every arm got the same data split (`train`), reference set, seeds and evaluation settings"
        + (f" (training seed {spec.arms[0].seed})" if len({a.seed for a in spec.arms}) == 1 else
           " (training seeds: " + ", ".join(f"{a.name} {a.seed}" for a in spec.arms) + ")"),
        f"- every arm scored the same way: N = {e.n if e.n is not None else 'the real training images'} generated "
        f"images × {e.repeats} draw(s) (seed {e.seed}) against the `{e.split}` split, metrics "
        f"{', '.join(e.metrics)}; floor: as many real training images against the same reference",
        _sampling_line(spec),
        "- downstream: " + ("none" if down is None else
                            f"`{down.classifier}`, {down.seeds} seed(s), balanced accuracy of real + synthetic − real "
                            f"only, at the full budget"),
        "- kimg: thousands of training images shown (each budget rounded up to whole epochs); train s: wall-clock "
        "seconds of training (data loading, snapshots and in-training validation included); sample s/1k: seconds "
        "to draw 1000 images in the evaluation",
    ]
    if unverified:
        lines.append("- **FD and KD come from an unverified feature network**: not FID, comparable only with each "
                     "other")
    lines += ["", "| " + " | ".join(c.format(fd=fd) for c in COLUMNS) + " |",
              "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['arm']} | {r['model']} | {r['status']} |" + " |" * (len(COLUMNS) - 3))
            continue
        pr = ("-" if r.get("precision") is None
              else f"{fmt(r['precision'], 3)} / {fmt(r.get('recall'), 3)}")
        dc = ("-" if r.get("density") is None
              else f"{fmt(r['density'], 3)} / {fmt(r.get('coverage'), 3)}")
        dn = r.get("downstream") or {}
        kimg = _num(r["kimg"], 3) + (" (capped)" if r.get("capped") else "")
        lines.append(f"| {r['arm']} | {r['model']} | {fmt(r['fd'])} ({r['n']}×{r['repeats']}) | {fmt(r['fd_floor'])} | "
                     f"{fmt(r['kd'], 2, 1e3)} | {pr} | {dc} | "
                     f"{'-' if r.get('copies') is None else format(r['copies'] * 100, '.1f') + ' %'} | "
                     f"{fmt(dn.get('gan_test'), 3)} | {fmt(dn.get('tstr'), 3)} | "
                     f"{_delta(r.get('downstream'))} | {kimg} | {_num(r['train_s'], 1)} | "
                     f"{_sig(r.get('sample_s_per_1k'))} | {r.get('device') or '-'} |")
    lines += seeds_markdown(rows)
    lines += segmentation_markdown(spec, manifest, rows)
    lines += [""] + figures_markdown(figures or {})
    lines += ["## Quality per compute", "",
              "Each arm scored at points of its budget: the weights after that share of its training steps.", ""]
    for arm in spec.arms:
        entry = manifest.get("arms", {}).get(arm.name)
        lines += [f"### {arm.name}", ""]
        if entry is None:
            lines += ["not run", ""]
            continue
        lines += [f"| point | kimg | train s | {fd} | floor | KID × 10³ | scored |", "|---|---:|---:|---:|---:|---:|---|"]
        for p in sorted(entry.get("points", {}).values(), key=lambda p: p["fraction"]):
            ev = p.get("eval") or {}
            done = ev.get("status") == "done"
            capped = " (capped)" if p.get("final") and entry["train"].get("capped") else ""
            lines.append(f"| {_label(p)} %{capped} | {_num(p.get('kimg'), 3)} | {_num(p.get('seconds'), 1)} | "
                         f"{fmt(ev.get('fd')) if done else '-'} | {fmt(ev.get('fd_floor')) if done else '-'} | "
                         f"{fmt(ev.get('kd'), 2, 1e3) if done else '-'} | "
                         f"{('`' + ev['out'] + '`') if done else p.get('status', 'pending')} |")
        lines.append("")
    lines += environment_markdown(spec, manifest)
    lines.append(f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `study.json`.")
    return "\n".join(lines) + "\n"


def write_figures(out: Path, spec: StudySpec, manifest: dict[str, Any], rows: list[dict[str, Any]],
                  keys: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """The curves, the forest plot and ``grids.png`` (from the grids drawn already) into ``out``; returns the
    figures written, name -> caption. A figure with nothing to show is removed (an old one would mislead)."""
    out = Path(out)
    figures: dict[str, str] = {}
    fd = fd_label(rows)
    points = scored_points(spec, manifest, keys)
    e = spec.eval
    for x, name in CURVES.items():
        if save_curves(out / name, points, x, fd):
            figures[name] = (f"{fd} of each arm at the scored points of its budget against "
                             f"{'the kimg trained' if x == 'kimg' else 'its training seconds'} (mean ± std over "
                             f"{e.repeats} draw(s)); grey: the real-vs-real floor")
    if save_forest(out / FOREST, rows):
        figures[FOREST] = "downstream Δ balanced accuracy (real + synthetic − real only) per arm, 95 % interval"
    names = {a.name for a in spec.arms}
    grids = {a: g for a, g in (manifest.get("grids") or {}).items() if a in names and
             (keys is None or (manifest["arms"].get(a) or {}).get("key") == keys[a]["train"])}
    if save_grids(out / GRIDS, out, grids, [a.name for a in spec.arms]):
        figures[GRIDS] = (f"samples of each arm at its full budget (seed {e.seed}; one row per class for a "
                          f"conditional arm); each arm's alone: " + ", ".join(f"`{g['file']}`" for g in grids.values()))
    for name in (*CURVES.values(), FOREST, GRIDS):
        if name not in figures:
            (out / name).unlink(missing_ok=True)
    return figures


def write_report(out: Path, spec: StudySpec, manifest: dict[str, Any],
                 keys: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write ``OUT/study.md`` and its figures; returns its rows (the caller keeps them in the manifest)."""
    rows = report_rows(spec, manifest, keys)
    figures = write_figures(out, spec, manifest, rows, keys)
    atomic_write_text(Path(out) / REPORT, study_markdown(spec, manifest, rows, figures))
    return rows
