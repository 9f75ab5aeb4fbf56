"""GAN training speed of this tree against the last commit before the one-loop split, in one process.

Why: splitting ``covidxray/train/gan.py`` into the generic loop and the GAN task must not slow the
GANs down (issue 8: >= 0.97x). Two separate benchmark processes differ by a few percent on a shared
2-core machine whatever the code does, so this script puts both versions in one process: the old
package is copied and imported as ``covidxray_pre``, both trainers get the same configuration, the same
data and the same fixed batch, and their steps run in alternating blocks (then whole ``fit()`` epochs,
alternating), so that machine drift hits both alike. The medians are compared.

Usage (from the repository root)::

    git worktree add /tmp/pre 4e5a870          # the commit before the split (GANTrainer)
    python bench/gan_split_ab.py --old-tree /tmp/pre --data .devdata/cxr64 [--models rawgan cgan] [--json ab.json]

Prints, per GAN: step and epoch images/s of both, and new / old.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HUGE = 10**9


def import_old(old_tree: Path, dst: Path):
    """Copy ``old_tree/covidxray`` to ``dst/covidxray_pre`` (imports renamed) and import what is needed."""
    pkg = dst / "covidxray_pre"
    shutil.copytree(old_tree / "covidxray", pkg)
    shutil.copytree(old_tree / "configs", dst / "configs")
    for f in pkg.rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        text = re.sub(r"\bcovidxray\.", "covidxray_pre.", text)
        text = re.sub(r"\bfrom covidxray import\b", "from covidxray_pre import", text)
        f.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(dst))
    from covidxray_pre.config import resolve_config
    from covidxray_pre.train.gan import GANTrainer

    return resolve_config, GANTrainer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", required=True, help="a checkout of the pre-split commit (4e5a870)")
    ap.add_argument("--data", required=True, help="a prepared folder (64 px is enough on a CPU)")
    ap.add_argument("--models", nargs="+", default=["rawgan", "cgan", "acgan", "unetgan", "unetcgan"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=10, help="alternating blocks of --steps steps each (default 10)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="alternating fit() epochs per version (default 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="gan-split-ab-"))
    old_cfg, GANTrainer = import_old(Path(args.old_tree).resolve(), tmp)
    from covidxray.config import resolve_config as new_cfg
    from covidxray.data.datasets import read_prepared_info
    from covidxray.train.loop import Trainer

    size = int(read_prepared_info(args.data)["size"])
    out = {}
    for model in args.models:
        flags = {"data": {"path": str(Path(args.data).resolve()), "image_size": size},
                 "train": {"batch_size": args.batch, "device": args.device, "epochs": 1,
                           "snapshot_every": HUGE, "checkpoint_every": HUGE}}
        old = GANTrainer(old_cfg(model, flags=flags), tmp / f"old-{model}")
        new = Trainer(new_cfg(model, flags=flags), tmp / f"new-{model}")
        x, y = new.data.images[: args.batch].to(new.device), new.data.labels[: args.batch].to(new.device)
        for t in (old, new):
            for _ in range(2):
                t.train_step(x, y)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for block in range(args.blocks):
            order = [("old", old), ("new", new)] if block % 2 == 0 else [("new", new), ("old", old)]
            for name, t in order:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    t.train_step(x, y)
                times[name].append((time.perf_counter() - t0) / args.steps)
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for rep in range(args.epochs):
            order = [("old", old), ("new", new)] if rep % 2 == 0 else [("new", new), ("old", old)]
            for name, t in order:
                stamps: list[float] = []
                t.on_step = lambda tr: stamps.append(time.perf_counter())
                if name == "new":
                    t.fit(t.epoch + 1)
                else:  # the old API: the total lives in the config
                    t.cfg.train.epochs = t.state.epoch + 1
                    t.fit()
                rates[name].append((len(stamps) - 1) * args.batch / (stamps[-1] - stamps[0]))
        row = {"step_images_per_s_old": args.batch / st.median(times["old"]),
               "step_images_per_s_new": args.batch / st.median(times["new"]),
               "epoch_images_per_s_old": st.median(rates["old"]), "epoch_images_per_s_new": st.median(rates["new"])}
        row["step_new_over_old"] = row["step_images_per_s_new"] / row["step_images_per_s_old"]
        row["epoch_new_over_old"] = row["epoch_images_per_s_new"] / row["epoch_images_per_s_old"]
        out[model] = row
        print(f"{model:9s} step img/s old {row['step_images_per_s_old']:7.1f} new {row['step_images_per_s_new']:7.1f} "
              f"new/old {row['step_new_over_old']:.3f} | epoch img/s old {row['epoch_images_per_s_old']:7.1f} "
              f"new {row['epoch_images_per_s_new']:7.1f} new/old {row['epoch_new_over_old']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
