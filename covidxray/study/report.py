"""The study's report, ``study.md``, written from the manifest (``study.json``) alone.

One row per arm of the spec at its full budget - FID ± std (N) beside its real-vs-real floor, KID, precision /
recall, copies, the downstream Δ with its 95 % interval when the protocol has one, the kimg trained, the
training seconds and the sampling seconds per 1000 images - with the arms that have not finished marked as
such; then, per arm, its quality-per-compute points (kimg, training seconds, FID, floor). The numbers are
those of each point's ``metrics.json`` (:func:`covidxray.study.run.summarize`); the formatting is
:mod:`covidxray.evaluate.report`'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from covidxray.evaluate.report import fmt
from covidxray.study.spec import StudySpec
from covidxray.utils import atomic_write_text

REPORT = "study.md"

COLUMNS = ("arm", "model", "{fd} ± std (N)", "floor", "KID × 10³", "precision / recall", "copies",
           "downstream Δ [95 % CI]", "kimg", "train s", "sample s/1k", "device")


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
        row: dict[str, Any] = {"arm": arm.name, "model": arm.model, "status": status}
        if status == "done":
            final = final_point(entry)
            ev = final["eval"]
            row.update({k: ev.get(k) for k in ("fd_name", "fd", "fd_floor", "kd_name", "kd", "kd_floor", "precision",
                                               "recall", "copies", "n", "repeats", "sample_s_per_1k", "downstream")})
            row.update(kimg=final.get("kimg"), train_s=entry["train"].get("seconds"),
                       device=entry["train"].get("device"), capped=entry["train"].get("capped", False),
                       eval=ev.get("out"))
        rows.append(row)
    return rows


def study_markdown(spec: StudySpec, manifest: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    e = spec.eval
    unverified = any(r.get("fd_name") == "fd_unverified" for r in rows)
    fd = "FD (unverified net)" if unverified else "FID"
    lines = [f"# Study `{spec.name}`", ""]
    if spec.description:
        lines += [spec.description.strip(), ""]
    down = e.downstream
    lines += [
        f"- spec: `{spec.path}`; data: `{manifest.get('data', '?')}`"
        + (f" (classes {', '.join(spec.data.classes)})" if spec.data.classes else ""),
        f"- every arm scored the same way: N = {e.n if e.n is not None else 'the real training images'} generated "
        f"images × {e.repeats} draw(s) (seed {e.seed}) against the `{e.split}` split, metrics "
        f"{', '.join(e.metrics)}; floor: as many real training images against the same reference",
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
        kimg = _num(r["kimg"], 3) + (" (capped)" if r.get("capped") else "")
        lines.append(f"| {r['arm']} | {r['model']} | {fmt(r['fd'])} ({r['n']}×{r['repeats']}) | {fmt(r['fd_floor'])} | "
                     f"{fmt(r['kd'], 2, 1e3)} | {pr} | "
                     f"{'-' if r.get('copies') is None else format(r['copies'] * 100, '.1f') + ' %'} | "
                     f"{_delta(r.get('downstream'))} | {kimg} | {_num(r['train_s'], 1)} | "
                     f"{_sig(r.get('sample_s_per_1k'))} | {r.get('device') or '-'} |")
    lines += ["", "## Quality per compute", "",
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
    lines.append(f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} from `study.json`.")
    return "\n".join(lines) + "\n"


def write_report(out: Path, spec: StudySpec, manifest: dict[str, Any],
                 keys: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write ``OUT/study.md``; returns its rows (the caller keeps them in the manifest)."""
    rows = report_rows(spec, manifest, keys)
    atomic_write_text(Path(out) / REPORT, study_markdown(spec, manifest, rows))
    return rows
