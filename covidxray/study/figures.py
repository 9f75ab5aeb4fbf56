"""The study's figures, written into the study folder (each PNG atomically) and linked from ``study.md``.

* ``curves_kimg.png`` and ``curves_seconds.png``: the FID (or the ``fd_*`` of the feature network in use) of
  every scored point against the kimg it was trained for and against its training seconds, one line per arm,
  error bars the std over the evaluation's draws, and the real-vs-real floor as a band (the floors of all the
  points drawn, with a line at their mean): quality per compute.
* ``forest_downstream.png``: the downstream Δ of balanced accuracy (real + synthetic − real only) of each arm
  with its 95 % interval, 0 marked; written when an arm has one.
* ``grid_<arm>.png``: images drawn from the arm's full-budget checkpoint (``checkpoints/last.pt``) by the
  evaluation's own source (:func:`covidxray.evaluate.generator.load_source`: a generator's ``draw`` through the
  protocol layer, a mask -> X-ray model's deformed training masks), seeded with the protocol's seed and with
  the arm's sampler options; one row per class for a conditional arm. Tiled by
  :func:`covidxray.data.grids.save_grid`.
* ``grids.png``: every arm's grid side by side, titled, the class of each row named.

Curves and the forest plot come from the manifest alone and are redrawn with every report; a grid costs a
model load and a few draws, so a run's report draws only the grids that are missing or whose arm changed
(the manifest's ``grids`` records what each was drawn from), and ``--report`` redraws them all.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import numpy as np

from covidxray.data.grids import save_grid
from covidxray.evaluate.figures import pyplot, save_figure
from covidxray.evaluate.generator import load_source
from covidxray.study.spec import StudySpec, digest
from covidxray.utils import resolve_device

CURVES = {"kimg": "curves_kimg.png", "seconds": "curves_seconds.png"}
FOREST = "forest_downstream.png"
GRIDS = "grids.png"
#: Images per row of a grid (one row per class of a conditional arm, two rows of an unconditional one).
PER_ROW = 8


def grid_name(arm: str) -> str:
    return f"grid_{arm}.png"


def _current(entry: dict[str, Any] | None, keys: dict[str, Any] | None) -> bool:
    """Whether an arm's manifest entry is of the spec as it is now (always, without ``keys``)."""
    return entry is not None and (keys is None or entry.get("key") == keys["train"])


def scored_points(spec: StudySpec, manifest: dict[str, Any], keys: dict[str, dict[str, Any]] | None = None
                  ) -> dict[str, list[dict[str, Any]]]:
    """Per arm of ``spec``, its scored points in budget order (those whose scoring is of the spec now)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in spec.arms:
        entry = manifest.get("arms", {}).get(arm.name)
        k = None if keys is None else keys.get(arm.name)
        if not _current(entry, k):
            continue
        pts = []
        for label, p in sorted(entry.get("points", {}).items(), key=lambda kv: kv[1]["fraction"]):
            ev = p.get("eval") or {}
            if ev.get("status") != "done" or (k is not None and ev.get("key") != k["points"].get(label)):
                continue
            if (ev.get("fd") or {}).get("mean") is None:
                continue
            pts.append({"label": label, "kimg": p.get("kimg"), "seconds": p.get("seconds"), "fd": ev["fd"],
                        "floor": ev.get("fd_floor"), "fd_name": ev.get("fd_name")})
        if pts:
            out[arm.name] = pts
    return out


def save_curves(path: Path, points: dict[str, list[dict[str, Any]]], x: str, fd_label: str) -> Path | None:
    """FD against ``x`` (``kimg`` or ``seconds``), one line per arm, the floor as a band (see the module doc)."""
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    try:
        floors = [p["floor"] for pts in points.values() for p in pts if (p.get("floor") or {}).get("mean") is not None]
        if floors:
            lo = min(f["mean"] - (f.get("std") or 0.0) for f in floors)
            hi = max(f["mean"] + (f.get("std") or 0.0) for f in floors)
            mid = float(np.mean([f["mean"] for f in floors]))
            ax.axhspan(lo, hi, color="0.6", alpha=0.25, lw=0)
            ax.axhline(mid, color="0.35", ls="--", lw=1, label="real-vs-real floor")
        for name, pts in points.items():
            pts = [p for p in pts if p.get(x) is not None]
            if not pts:
                continue
            xs = [p[x] for p in pts]
            ys = [p["fd"]["mean"] for p in pts]
            err = [(p["fd"].get("std") or 0.0) if len(p["fd"].get("values", [])) > 1 else 0.0 for p in pts]
            ax.errorbar(xs, ys, yerr=err if any(err) else None, marker="o", ms=4, lw=1.2, capsize=3, label=name)
        ax.set_xlabel("kimg (thousands of training images shown)" if x == "kimg" else "training seconds (wall clock)")
        ax.set_ylabel(f"{fd_label} (lower is better)")
        ax.set_title(f"{fd_label} at each scored point of the budget", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def save_forest(path: Path, rows: list[dict[str, Any]]) -> Path | None:
    """The downstream Δ of each arm that has one, mean and 95 % interval, 0 marked; None when no arm has one."""
    found = [(r["arm"], (r.get("downstream") or {}).get("delta")) for r in rows if r.get("status") == "done"]
    found = [(name, d) for name, d in found if d and d.get("mean") is not None]
    if not found:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * len(found)), dpi=120)
    try:
        y = np.arange(len(found))[::-1]
        for yi, (name, d) in zip(y, found):
            ci = d.get("ci95")
            if ci:
                ax.plot(ci, [yi, yi], color="C0", lw=2)
            ax.plot([d["mean"]], [yi], "s", color="C0", ms=6)
        ax.axvline(0.0, color="0.3", lw=1, ls="--")
        ax.set_yticks(y, [f"{name} ({d.get('n', '?')} seeds)" for name, d in found])
        ax.set_xlabel("Δ balanced accuracy: real + synthetic − real only (mean, 95 % CI)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- grids
def grid_key(entry: dict[str, Any], sampling: dict[str, Any], seed: int) -> str:
    """What a grid is drawn from: the arm's training key, its sampler options and the seed."""
    return digest({"train": entry.get("key"), "sampling": sampling, "seed": seed, "per_row": PER_ROW})


def draw_grid(out: Path, name: str, checkpoint: Path, sampling: dict[str, Any], seed: int, device: str,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Draw ``grid_<name>.png`` from ``checkpoint`` (see the module docstring); returns what it records."""
    source = load_source(checkpoint, None, [], False, log)
    settings = source.loaded.configure(**sampling)
    dev = resolve_device(device)
    if source.conditional:
        images, _ = source.draw([PER_ROW] * len(source.classes), seed, dev, batch_size=64)
        rows = list(source.classes)
    else:
        images, _ = source.draw(2 * PER_ROW, seed, dev, batch_size=64)
        rows = []
    save_grid(images.cpu(), out / grid_name(name), nrow=PER_ROW)
    record = {"file": grid_name(name), "checkpoint": str(checkpoint), "model": source.name, "rows": rows,
              "seed": seed, "sampling": settings or None}
    del source
    gc.collect()
    return record


def save_grids(path: Path, out: Path, grids: dict[str, dict[str, Any]], order: list[str]) -> Path | None:
    """Every arm's grid side by side (``order``), titled with the arm and its model, rows named by class."""
    from PIL import Image

    shown = [(a, grids[a]) for a in order if a in grids and (out / grids[a]["file"]).is_file()]
    if not shown:
        return None
    tiles = []
    for _, g in shown:
        with Image.open(out / g["file"]) as im:
            tiles.append(np.asarray(im.convert("L")))
    aspect = max(t.shape[0] / t.shape[1] for t in tiles)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.6 * aspect + 0.6), dpi=120, squeeze=False)
    try:
        for ax, (arm, g), tiles in zip(axes[0], shown, tiles):
            ax.imshow(tiles, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            rows = g.get("rows") or []
            if rows:  # one row of tiles per class
                h = tiles.shape[0] / len(rows)
                ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], [r.replace("_", " ") for r in rows],
                              fontsize=8)
            else:
                ax.set_yticks([])
            model = g.get("model", "?")
            ax.set_title(arm if arm == model else f"{arm} ({model})", fontsize=9)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)

