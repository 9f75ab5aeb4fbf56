"""Do synthetic (X-ray, mask) pairs help a lung segmenter? U-Net test Dice on real X-rays with and without them.

For each seed, three U-Nets with the same settings, selected on the real validation masks (``best.pt``) and
scored like ``covidxray evaluate RUN --data PREPARED`` on the real test masks (post-processed, as ``segment``):

* (a) **real**: the prepared folder's real (X-ray, mask) training pairs;
* (b) **real + synthetic**: those plus ``copies`` pairs per mask from a mask -> X-ray model (``pix2pix``,
  ``edm_mask``), drawn from *deformed* masks of the same images (``sample --from-data --deform --mix``), so no new
  real information enters;
* (c) **synthetic only**: the synthetic pairs alone (``sample --from-data --deform``).

The result gives test Dice mean ± std over seeds per arm and the paired differences (b − a) and (c − a) with
their 95 % t-intervals, whatever their sign. The mask model must have been trained on the same folder's
training images only (or a subset of them), never on its validation or test masks.

Used by ``covidxray study`` (``eval.segmentation``: the segmentation table of every mask-conditional arm) and by
``bench/synthetic_pairs.py`` (also the low-data regime).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from covidxray.evaluate.downstream import paired_delta
from covidxray.evaluate.report import mean_std
from covidxray.evaluate.segmentation import evaluate_segmenter
from covidxray.infer.synthesize import synthesize_pairs

#: The three U-Net arms: (a) real, (b) real + synthetic, (c) synthetic only.
ARMS = ("real", "real+synthetic", "synthetic")


def unet_test_dice(data: str | Path, seed: int, epochs: int, sets: Sequence[str], device: str, runs: Path,
                   model: str = "unet") -> dict[str, Any]:
    """Train a U-Net on ``data``'s training pairs (``runs`` holds its run folder) and score its ``best.pt`` on
    the real test masks of ``data``: test Dice and HD95 (means), N train and test, the selected epoch."""
    from covidxray.config import resolve_config
    from covidxray.train.loop import start_run

    cfg = resolve_config(model, flags={"data": {"path": str(data)},
                                       "train": {"epochs": epochs, "seed": seed, "device": device}},
                         sets=list(sets))
    cfg.out = str(runs)
    t0 = time.perf_counter()
    trainer, finished = start_run(cfg, console=None)
    if not finished:  # Ctrl-C: the U-Net stopped early; its Dice would not be the protocol's
        raise KeyboardInterrupt
    res = evaluate_segmenter(trainer.run_dir, data, "test", out=trainer.run_dir / "eval-test", device=device)
    return {"dice": res["summary"]["dice"]["mean"], "hd95": res["summary"]["hd95"]["mean"], "n_test": res["n"],
            "n_train": len(trainer.data), "best_epoch": res["checkpoint_epoch"], "run": str(trainer.run_dir),
            "seconds": round(time.perf_counter() - t0, 1)}


def synthetic_sets(translator: str | Path, data: str | Path, seed: int, out: Path, device: str,
                   copies: int = 1, sampling: dict[str, Any] | None = None) -> dict[str, Path]:
    """The prepared folders of arms (b) and (c) for one seed, written under ``out`` (replaced if present)."""
    sets = {}
    for arm, mix in (("real+synthetic", True), ("synthetic", False)):
        folder = out / f"{arm.replace('+', '-')}-s{seed}"
        if folder.exists():  # a stage that was interrupted: its pairs are drawn again, identically
            shutil.rmtree(folder)
        synthesize_pairs(translator, folder, from_data=data, deform=True, copies=copies, mix=mix, seed=seed,
                         device=device, sampling={k: v for k, v in (sampling or {}).items() if v is not None})
        sets[arm] = folder
    return sets


def summarize_pairs(per: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: test Dice mean ± std over seeds and the runs; the paired Δs (b − a) and (c − a)."""
    real = [r["dice"] for r in per["real"]]
    return {"arms": {a: {"dice": mean_std([r["dice"] for r in per[a]]), "runs": per[a]} for a in ARMS if per.get(a)},
            "delta_b": paired_delta([r["dice"] for r in per["real+synthetic"]], real),
            "delta_c": paired_delta([r["dice"] for r in per["synthetic"]], real)}


def segmentation_pairs(translator: str | Path, data: str | Path, out: Path, *, seeds: int = 3, epochs: int = 30,
                       sets: Sequence[str] = (), copies: int = 1, device: str = "auto",
                       sampling: dict[str, Any] | None = None, real: list[dict[str, Any]] | None = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Arms (a), (b), (c) over ``seeds`` seeds (module docstring) in ``out``; ``real``: arm (a)'s results when
    already measured with the same data, seeds and settings (a study shares them between its mask arms)."""
    log = log or (lambda msg: None)
    per: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    for seed in range(seeds):
        pairs = synthetic_sets(translator, data, seed, out / "pairs", device, copies, sampling)
        folders = {"real": Path(data), **pairs}
        for arm in ARMS:
            if arm == "real" and real is not None:
                per[arm].append(real[seed])
                continue
            r = unet_test_dice(folders[arm], seed, epochs, sets, device, out / "runs")
            per[arm].append(r)
            log(f"U-Net seed {seed} {arm}: test Dice {r['dice']:.4f} (N train {r['n_train']}, {r['seconds']} s)")
    return summarize_pairs(per)
