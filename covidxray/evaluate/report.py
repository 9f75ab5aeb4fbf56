"""The written side of generator evaluation: ``metrics.json``, ``report.md`` and its PNG figures, and
``--compare`` (one markdown table across earlier outputs).

Figures (matplotlib, Agg): ``real_vs_generated.png`` (a grid per class, real above generated),
``losses.png`` (the run's ``stats.jsonl``), ``precision_recall.png`` (P/R/density/coverage against the
floor), ``closest_pairs.png`` (the 16 samples nearest to a training image, each beside it) and, with
``--downstream``, ``downstream_confusion_<arm>.png``. Everything is written into a temporary folder
that replaces ``OUT`` only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from covidxray.data.grids import make_grid_u8, save_grid
from covidxray.errors import CovidXrayError
from covidxray.outdir import OutputDir
from covidxray.utils import atomic_path, atomic_write_text


def _plt():
    import matplotlib  # local: matplotlib (~0.5 s) only when a figure is drawn

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # local: matplotlib (~0.5 s) only when a figure is drawn

    return plt


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """``{mean, std (ddof=1; 0 for one value), values}`` of the values that are not None (means None if none)."""
    a = np.asarray([v for v in values if v is not None], dtype=float)
    if a.size == 0:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "values": a.tolist()}


def fmt(stat: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` of an aggregated metric ("-" when absent)."""
    if not stat or stat.get("mean") is None:
        return "-"
    m, s = stat["mean"] * scale, (stat.get("std") or 0.0) * scale
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(stat.get("values", [])) > 1 else f"{m:.{digits}f}"


# ------------------------------------------------------------------------------------------- figures
def save_real_vs_generated(path: Path, classes: Sequence[str], real: torch.Tensor, real_labels: torch.Tensor,
                           fake: torch.Tensor, fake_labels: torch.Tensor | None, per: int = 16) -> Path:
    plt = _plt()
    groups = list(enumerate(classes)) if fake_labels is not None else [(None, "all classes")]
    fig, axes = plt.subplots(len(groups), 2, figsize=(8, 4 * len(groups)), dpi=120, squeeze=False)
    try:
        for row, (k, name) in enumerate(groups):
            r = real if k is None else real[real_labels == k]
            f = fake if k is None else fake[fake_labels == k]
            for col, (imgs, what) in enumerate(((r, "real (training)"), (f, "generated"))):
                ax = axes[row][col]
                ax.axis("off")
                if len(imgs):
                    ax.imshow(make_grid_u8(imgs[:per], nrow=4).numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set_title(f"{name.replace('_', ' ')}: {what}", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def save_losses(path: Path, stats_file: Path) -> Path | None:
    by_kind: dict[str, list[dict]] = {"interval": [], "epoch": []}
    for line in stats_file.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_kind.get(rec.get("kind"), []).append(rec)
    # The log-interval lines when the run wrote them (finer), else the per-epoch lines; one curve per key.
    rows = by_kind["interval"] or by_kind["epoch"]
    keys = [k for k in ("loss_d", "loss_g", "loss", "d_real", "d_fake") if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    try:
        for k in keys:
            pts = [(r.get("kimg", r.get("step", 0)), r[k]) for r in rows if k in r]
            x, y = zip(*pts)
            ax.plot(x, y, "-" if len(pts) > 1 else "o", ms=3, lw=1, label=k)
        ax.set_xlabel("kimg (thousands of real images shown)")
        ax.set_ylabel("value")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def save_pr_bars(path: Path, metrics: dict[str, Any]) -> Path | None:
    names = [k for k in ("precision", "recall", "density", "coverage") if k in metrics]
    if not names:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    try:
        x = np.arange(len(names))
        for off, (suffix, label) in zip((-0.2, 0.2), (("", "generated"), ("_floor", "real-vs-real floor"))):
            m = [metrics.get(n + suffix, {}).get("mean") or 0.0 for n in names]
            s = [metrics.get(n + suffix, {}).get("std") or 0.0 for n in names]
            ax.bar(x + off, m, 0.4, yerr=s, capsize=3, label=label)
        ax.set_xticks(x, names)
        ax.set_ylim(0, max(1.05, ax.get_ylim()[1]))
        ax.legend(fontsize=8)
        ax.set_title("improved precision/recall (k=3), density/coverage (k=5)", fontsize=10)
        fig.tight_layout()
        return _save(fig, path)
    finally:
        plt.close(fig)


def save_closest_pairs(path: Path, closest: list[dict], gen: torch.Tensor, train: torch.Tensor) -> Path:
    """Each sample beside its nearest training image (pixel space), 4 pairs per row."""

    tiles = []
    for c in closest:
        tiles += [gen[c["sample"]], train[c["train"]]]
    return save_grid(torch.stack(tiles), path, nrow=8)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# ------------------------------------------------------------------------------------------ report.md
def metric_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    m = result["metrics"]
    rows = []
    for key, label, digits, scale in (("fid", "FID", 2, 1), ("kid", "KID × 10³", 2, 1e3), ("fd_cxr", "FD_cxr", 3, 1),
                                      ("kd_cxr", "KD_cxr × 10³", 2, 1e3), ("fd_unverified", "FD (unverified net)", 2, 1),
                                      ("kd_unverified", "KD (unverified net) × 10³", 2, 1e3),
                                      ("precision", "precision", 3, 1), ("recall", "recall", 3, 1),
                                      ("density", "density", 3, 1), ("coverage", "coverage", 3, 1)):
        if key in m:
            rows.append((label, fmt(m[key], digits, scale), fmt(m.get(key + "_floor"), digits, scale)))
    return rows


def generator_markdown(result: dict[str, Any], figures: dict[str, str]) -> str:
    src = result["source"]
    feats = result["features"]
    lines = [f"# Evaluation of `{result['model']}`", ""]
    what = (f"checkpoint `{src['path']}` (epoch {src.get('epoch')}, {src.get('weights')} weights)"
            if src["kind"] == "checkpoint" else f"folder `{src['path']}` ({src.get('files')} images)")
    lines += [f"- generated images: {what}; {'class-conditional' if result['conditional'] else 'unconditional'}",
              f"- N = {result['n']} generated images per draw, {result['repeats']} draws (seeds {result['seed']}…"
              f"{result['seed'] + result['repeats'] - 1}); mean ± std over draws",
              f"- reference: the `{result['split']}` split of `{result['data']}` (N = {result['reference_n']}); "
              f"floor: {result['floor_n']} real training images (of {result['train_n']}) against the same reference",
              f"- classes: {', '.join(result['classes'])}; {result['image_size']} px"]
    for name, rec in feats.items():
        lines.append(f"- features `{name}`: {rec['description']}; SHA-1 `{rec['sha1']}`; filter: {rec['filter']}")
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}; device {result['device']}; "
                 f"{result['date']}")
    for w in result["warnings"]:
        lines.append(f"- **warning**: {w}")
    lines += ["", "## Scores", "", "| metric | generated | real-vs-real floor |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in metric_rows(result)]
    if result["per_class"]:
        verified = "fid" in result["metrics"] or "kid" in result["metrics"]
        fd, kd = ("fid", "kid") if verified else ("fd_unverified", "kd_unverified")
        fd_label, kd_label = ("FID", "KID × 10³") if verified else ("FD (unverified net)", "KD × 10³ (unverified net)")
        lines += ["", "### Per class (intra-class)", "",
                  f"| class | N | ref N | {fd_label} | floor | {kd_label} | floor | precision | recall |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c, e in result["per_class"].items():
            if "skipped" in e:
                lines.append(f"| {c} | | | skipped: {e['skipped']} | | | | | |")
                continue
            lines.append(f"| {c} | {e['n']} | {e['reference_n']} | {fmt(e.get(fd))} | {fmt(e.get(fd + '_floor'))} | "
                         f"{fmt(e.get(kd), 2, 1e3)} | {fmt(e.get(kd + '_floor'), 2, 1e3)} | {fmt(e.get('precision'), 3)} | "
                         f"{fmt(e.get('recall'), 3)} |")
    div = result.get("diversity")
    if div:
        g, r = div["generated"], div["real_train"]
        lines += ["", "## Diversity", "",
                  f"MS-SSIM of {g['n_pairs']} random pairs ({g['scales']} scales; higher = more alike): generated "
                  f"{g['mean']:.3f} ± {g['std']:.3f}, real training images {r['mean']:.3f} ± {r['std']:.3f}."]
    memo = result.get("memorization")
    if memo:
        inc, pix, ct = memo["inception"], memo["pixel"], memo["ct"]
        lines += ["", "## Memorisation", "",
                  f"A sample is a *copy* when its nearest training image is closer than the {memo['quantile'] * 100:g}st "
                  f"percentile of the real `{result['split']}` images' nearest-training distances (held-out real images "
                  f"score ≈ {memo['quantile'] * 100:g} % by construction).", "",
                  "| space | copies | median NN distance, samples | median NN distance, real held-out |",
                  "|---|---:|---:|---:|",
                  f"| Inception | {inc['copies'] * 100:.1f} % | {inc['median_nn_distance']:.3f} | {inc['median_nn_distance_real']:.3f} |",
                  f"| pixels (32×32, standardised) | {pix['copies'] * 100:.1f} % | {pix['median_nn_distance']:.3f} | "
                  f"{pix['median_nn_distance_real']:.3f} |", "",
                  "Data-copying statistic C_T (Meehan et al. 2020; ≪ 0 means copying, ≫ 0 underfitting): "
                  + (f"{ct['ct']:.2f} over {ct['cells_used']} of {ct['cells']} cells." if ct.get("ct") is not None
                     else f"not computed ({ct.get('reason')}).")]
    mc = result.get("mask_consistency")
    if mc:
        d = mc["dice"]
        lines += ["", "## Mask consistency", "",
                  f"Dice between the masks pix2pix was given and the masks `{mc['model']}` (`{mc['segmenter']}`) finds "
                  f"in the X-rays it drew from them: {d['mean']:.3f} ± {d['std']:.3f} (median {d['median']:.3f}, "
                  f"N = {mc['n']}, the first draw)."]
    down = result.get("downstream")
    if down:
        lines += ["", "## Downstream classification", "", *downstream_markdown(down)]
    if figures:
        lines += ["", "## Figures", ""]
        for name, caption in figures.items():
            lines += [f"![{caption}]({name})", f"*{caption}*", ""]
    return "\n".join(lines) + "\n"


def _pool_sentence(pool: dict[str, Any]) -> str:
    if pool.get("drawn") != "once, a pool":
        return f" Synthetic images: {pool['drawn']}." if pool.get("drawn") else ""
    return (f" Synthetic images: a pool of {pool['n']} drawn once (seed {pool['seed']}; "
            f"{', '.join(f'{c} {k}' for c, k in pool['per_class'].items())}; {pool['seconds_per_image']:.3f} s per "
            f"image) and shared by arms (b) and (c) of every seed, each step picking from it at random.")


def downstream_markdown(down: dict[str, Any]) -> list[str]:
    lines = [f"Classifier `{down['classifier']}`, {down['epochs']} epochs, {len(down['seeds'])} seed(s) "
             f"({', '.join(map(str, down['seeds']))}), synthetic ratio {down['synthetic_ratio']}; selected on the real "
             f"`val` split, tested on the real `test` split (N = {down['test_n']}). Mean ± std over seeds."
             + _pool_sentence(down.get("synthetic") or {}), "",
             "| training data | accuracy | balanced accuracy | macro-F1 | ROC-AUC |", "|---|---:|---:|---:|---:|"]
    for arm, label in (("real", "(a) real only"), ("real+synthetic", "(b) real + synthetic"),
                       ("synthetic", "(c) synthetic only (TSTR)")):
        a = down["arms"].get(arm)
        if a:
            lines.append(f"| {label} | {fmt(a['accuracy'], 3)} | {fmt(a['balanced_accuracy'], 3)} | "
                         f"{fmt(a['macro_f1'], 3)} | {fmt(a['auc'], 3)} |")
    d = down.get("delta")
    if d:
        ci = d.get("ci95")
        lines += ["", f"(b) − (a), balanced accuracy, paired over seeds: **{d['mean']:+.3f}** ± {d['std']:.3f}"
                  + (f", 95 % interval [{ci[0]:+.3f}, {ci[1]:+.3f}] (t, {d['n'] - 1} d.f.)" if ci else
                     " (one seed: no interval)")]
    if down.get("refused"):
        lines += ["", f"Not run: {down['refused']}"]
    gt = down.get("gan_test")
    if gt:
        lines += ["", f"GAN-test (real-trained classifiers on {gt['n']} generated images): accuracy "
                  f"{fmt(gt['accuracy'], 3)}, balanced accuracy {fmt(gt['balanced_accuracy'], 3)}"]
    return lines


def write_generator_report(od: OutputDir, result: dict[str, Any], *, draws, train,
                           before_write: Callable[[Path], None] | None = None) -> Path:
    """Write metrics.json, report.md and the figures into the output folder ``od`` (each file whole; the
    folder's other files untouched)."""
    with od.writing() as tmp:
        if before_write is not None:
            before_write(tmp)
        figures: dict[str, str] = {}
        fake, fake_labels = draws[0]
        save_real_vs_generated(tmp / "real_vs_generated.png", result["classes"], train.images, train.labels,
                               fake, fake_labels)
        figures["real_vs_generated.png"] = "real training images (left) and generated images (right)" + (
            ", per class" if fake_labels is not None else "")
        src = result["source"]
        if src["kind"] == "checkpoint":
            p = Path(src["path"])
            stats = (p.parent.parent if p.parent.name == "checkpoints" else p.parent) / "stats.jsonl"
            if stats.is_file() and save_losses(tmp / "losses.png", stats):
                figures["losses.png"] = f"training curves of the run ({stats})"
        if save_pr_bars(tmp / "precision_recall.png", result["metrics"]):
            figures["precision_recall.png"] = "precision, recall, density, coverage: generated vs the real-vs-real floor"
        memo = result.get("memorization")
        if memo and memo.get("closest"):
            save_closest_pairs(tmp / "closest_pairs.png", memo["closest"], fake, train.images)
            figures["closest_pairs.png"] = ("the 16 samples closest to a training image (pixel space), each followed "
                                            "by that training image")
        down = result.get("downstream")
        if down:
            for name in down.get("figures", []):
                figures[name] = name.replace("_", " ").removesuffix(".png")
        result["figures"] = list(figures)
        (tmp / "report.md").write_text(generator_markdown(result, figures), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return od.path


# ------------------------------------------------------------------------------------------- compare
def compare_markdown(dirs: Sequence[str | Path]) -> str:
    """One table across ``evaluate`` outputs (generator, classifier and segmenter ones), like the seed's README tables."""
    rows_gen, rows_clf, rows_seg = [], [], []
    for d in dirs:
        path = Path(d) / "metrics.json"
        if not path.is_file():
            raise CovidXrayError(f"{d} holds no metrics.json", "Pass folders written by `covidxray evaluate`")
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CovidXrayError(f"{path} is unreadable ({exc})", "Run that `covidxray evaluate` again") from None
        kind = r.get("kind")
        (rows_gen if kind == "generator" else rows_seg if kind == "segmentation" else rows_clf).append((Path(d), r))
    out = []
    if rows_gen:
        out += ["| model | FID ± std (N) | floor | KID × 10³ | floor | precision | recall | copies | downstream Δ ± std |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for d, r in rows_gen:
            m = r["metrics"]
            fd = next((k for k in ("fid", "fd_unverified") if k in m), None)
            kd = next((k for k in ("kid", "kd_unverified") if k in m), None)
            mem = r.get("memorization")
            down = r.get("downstream") or {}
            delta = down.get("delta")
            ci = (delta or {}).get("ci95")
            dtxt = ("-" if not delta else f"{delta['mean']:+.3f} ± {delta['std']:.3f}"
                    + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
            if not delta and down.get("refused"):  # unconditional, or a conditional source no classifier draws from
                dtxt = "n/a (unconditional)" if not r.get("conditional") else "n/a (no on-the-fly draws)"
            name = r["model"] + ("" if fd != "fd_unverified" else " (unverified net)")
            smp = (r.get("source") or {}).get("sampling")
            if smp:  # a diffusion model: its sampler settings tell its rows apart
                name += f" (w {smp['guidance']:g}, {smp['sampler']} {smp['steps']})"
            out.append(f"| {name} | {fmt(m.get(fd))} ({r['n']}×{r['repeats']}) | {fmt(m.get(fd + '_floor')) if fd else '-'} | "
                       f"{fmt(m.get(kd), 2, 1e3)} | {fmt(m.get(kd + '_floor'), 2, 1e3) if kd else '-'} | "
                       f"{fmt(m.get('precision'), 3)} | {fmt(m.get('recall'), 3)} | "
                       f"{'-' if not mem else format(mem['copies'] * 100, '.1f') + ' %'} | {dtxt} |")
        first = rows_gen[0][1]
        out += ["", f"Reference: `{first['split']}` split (N = {first['reference_n']}) of `{first['data']}`; floor: "
                f"{first['floor_n']} real training images against it; mean ± std over draws; downstream Δ: balanced "
                f"accuracy (b) real + synthetic − (a) real only, mean ± std over seeds [95 % interval]."]
    if rows_clf:
        out += ["" if out else "", "| classifier | split | N | accuracy | balanced accuracy | macro-F1 | ROC-AUC |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for d, r in rows_clf:
            m = r["metrics"]
            out.append(f"| {r['model']} ({d.name}) | {r['split']} | {m['n']} | {m['accuracy']:.3f} | "
                       f"{m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} | "
                       f"{'-' if m.get('auc') is None else format(m['auc'], '.3f')} |")
    if rows_seg:
        out += ["" if out else "", "| segmenter | scored on | N | Dice | IoU | HD95 (px) | ASD (px) |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for d, r in rows_seg:
            sm = r["summary"]
            where = r["split"] if "split" in r else "folder"
            out.append(f"| {r['model']} ({d.name}) | {where} | {r['n']} | "
                       + " | ".join(f"{sm[k]['mean']:.4f} ± {sm[k]['std']:.4f}" for k in ("dice", "iou", "hd95", "asd"))
                       + " |")
        out += ["", "Mean ± std over images; threshold, post-processing and resolution in each folder's report.md."]
    return "\n".join(out) + "\n"


def write_compare(dirs: Sequence[str | Path], out: str | Path | None) -> str:
    text = compare_markdown(dirs)
    if out is not None:
        atomic_write_text(out, text)
    return text
