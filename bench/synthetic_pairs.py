"""Do synthetic (X-ray, mask) pairs help a lung segmenter? U-Net test Dice on real X-rays with and without them.

Usage (from the repository root)::

    python bench/synthetic_pairs.py --data PREPARED --pix2pix RUN [--low-pix2pix RUN25] [--seeds 3] [--epochs 30]
        [--low 0.25] [--copies 1] [--set arch.width=16] [--device auto] [--out DIR] [--json OUT.json]
        [--steps S --sampler dpm2m]
    python bench/synthetic_pairs.py --quick --device cpu        # a smoke test on demo phantoms (trains its own pix2pix)
    python bench/synthetic_pairs.py --data PREPARED --low-pix2pix EDM_MASK_RUN25 --low-only   # the low regime alone

``--pix2pix`` / ``--low-pix2pix`` take any mask -> X-ray model (``pix2pix``, ``edm_mask``); ``--steps`` and
``--sampler`` set a diffusion model's sampler. ``--low-only`` skips the full regime.

For each data regime - *full* (every masked training image of ``PREPARED``) and *low* (a seeded ``--low``
fraction of them, the rest of the training split dropped; val and test untouched) - and each seed, three U-Nets
with the same settings (``--epochs``, ``--set``), selected on the real validation masks (``best.pt``) and scored by
``covidxray evaluate`` on the real test masks (post-processed, as ``segment``):

* (a) **real**: the regime's real (X-ray, mask) pairs;
* (b) **real + pix2pix**: those plus ``--copies`` pix2pix pairs per mask, drawn from *deformed* masks of the same
  images (``sample --from-data --deform --mix``), so no new real information enters;
* (c) **pix2pix only**: the synthetic pairs alone (``sample --from-data --deform``).

The pix2pix run must have been trained on the regime's images only: ``--pix2pix`` for *full*, ``--low-pix2pix`` for
*low* (without it the low regime is skipped, said so, rather than letting a generator that saw the other 75 %
of the masks leak them in). The table gives test Dice mean ± std over seeds per arm, and the paired difference
(b - a) and (c - a) with its 95 % t-interval, whatever its sign.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))



def low_subset(src: Path, dst: Path, fraction: float, seed: int) -> int:
    """A copy of a prepared folder keeping a seeded ``fraction`` of the masked training rows (no unmasked ones)."""
    import random

    rows = list(csv.DictReader((src / "manifest.csv").open(newline="", encoding="utf-8")))
    masked = [i for i, r in enumerate(rows) if r["split"] == "train" and r["mask"]]
    keep = set(random.Random(seed).sample(masked, max(2, round(fraction * len(masked)))))
    out = [r for i, r in enumerate(rows) if r["split"] != "train" or i in keep]
    dst.mkdir(parents=True)
    for r in out:
        for key in ("file", "mask"):
            if r.get(key):
                (dst / r[key]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / r[key], dst / r[key])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(out)
    (dst / "manifest.csv").write_text(buf.getvalue(), encoding="utf-8")
    info = json.loads((src / "prepare.json").read_text())
    info["low_fraction"] = fraction
    counts: dict[str, dict[str, int]] = {}  # the manifest's rows, as a prepared folder's counts must be
    for r in out:
        counts.setdefault(r["split"], {}).setdefault(r["class"], 0)
        counts[r["split"]][r["class"]] += 1
    info["counts"] = counts
    (dst / "prepare.json").write_text(json.dumps(info, indent=2))
    return len(keep)


def run_regime(name: str, data: Path, pix2pix: Path, args, tmp: Path, log) -> dict[str, Any]:
    from covidxray.evaluate.pairs import segmentation_pairs

    return segmentation_pairs(pix2pix, data, tmp / name, seeds=args.seeds, epochs=args.epochs, sets=args.set,
                              copies=args.copies, device=args.device,
                              sampling={"steps": args.steps, "sampler": args.sampler},
                              log=lambda msg: log(f"{name} {msg}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--pix2pix", type=Path)
    ap.add_argument("--low-pix2pix", type=Path)
    ap.add_argument("--low", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, help="keep the data and runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--steps", type=int, default=None, help="a diffusion model's sampler steps")
    ap.add_argument("--sampler", default=None, help="a diffusion model's sampler (heun | euler | dpm2m)")
    ap.add_argument("--low-only", action="store_true", help="skip the full regime (--pix2pix not needed)")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    tmp = args.out or Path(tempfile.mkdtemp(prefix="pairs-"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "regimes": {}}
    try:
        if args.quick:
            from covidxray.config import resolve_config
            from covidxray.data.prepare import prepare_demo
            from covidxray.train.loop import start_run

            args.seeds, args.epochs = 2, 1
            args.set = ["arch.width=8", "arch.depth=3", "train.batch_size=8", *args.set]
            if args.data is None:
                args.data = tmp / "demo"
                prepare_demo(args.data, per_class=24, size=64, seed=0, workers=1, progress=False)
            cfg = resolve_config("pix2pix", flags={"data": {"path": str(args.data)},
                                                   "train": {"epochs": 1, "device": args.device}},
                                 sets=["arch.g_channels=8", "arch.d_channels=8", "arch.d_layers=2"])
            cfg.out = str(tmp / "p2p")
            args.pix2pix = start_run(cfg)[0].run_dir
            args.low_pix2pix = args.low_pix2pix or args.pix2pix  # a smoke test of the code path only (it saw all masks)
        if args.data is None or (args.pix2pix is None and not args.low_only) or (args.low_only and not args.low_pix2pix):
            ap.error("--data and --pix2pix are required (or --quick; --low-only needs --low-pix2pix)")
        if not args.low_only:
            res["regimes"]["full"] = run_regime("full", args.data, args.pix2pix, args, tmp, log)
        if args.low_pix2pix is not None:
            low = tmp / "low-data"
            n = low_subset(args.data, low, args.low, seed=0)
            log(f"low regime: {n} masked training images ({args.low:.0%})")
            res["regimes"][f"low ({args.low:.0%})"] = run_regime("low", low, args.low_pix2pix, args, tmp, log)
        else:
            log("low regime skipped: --low-pix2pix (a pix2pix trained on the low subset only) was not given")
    finally:
        if args.out is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    from covidxray.evaluate.pairs import ARMS

    print("\n| regime | real | real + synthetic | synthetic only | Δ (b − a) [95 % CI] | Δ (c − a) [95 % CI] |")
    print("|---|---|---|---|---|---|")
    for name, r in res["regimes"].items():
        cells = [f"{r['arms'][a]['dice']['mean']:.4f} ± {r['arms'][a]['dice']['std'] or 0:.4f}" for a in ARMS]
        deltas = []
        for key in ("delta_b", "delta_c"):
            d = r[key]
            ci = f" [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else ""
            deltas.append(f"{d['mean']:+.4f}{ci}")
        print(f"| {name} | " + " | ".join(cells + deltas) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
