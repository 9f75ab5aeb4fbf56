"""Downstream "generative classification": does a generator's output help a classifier on real X-rays?

For each seed, a classifier of the ``classifier`` family is trained by the shared loop on

(a) the real training images only;
(b) real + synthetic: every step keeps its real batch and adds generated images so that they are
    ``synthetic_ratio`` of the batch, labels drawn as in the real training split
    (``data.synthetic`` / ``data.synthetic_ratio``, see ``docs/classifiers.md``);
(c) synthetic only, TSTR ("GAN-train", Shmelkov et al. 2018): batches of generated images alone;

each selected on the real ``val`` split (``best.pt`` by the classifier's ``eval.metric``) and tested on the
real ``test`` split. Also **GAN-test**: the real-trained classifiers of (a) classify generated images of
known class. Reported: accuracy, balanced accuracy, macro-F1, per-class recall, ROC-AUC, the confusion
matrices (summed over seeds), mean ± std over seeds, and the paired difference (b) − (a) of balanced
accuracy with a 95 % t-interval over seeds, whatever its sign.

An unconditional generator cannot give labelled images: (b) and (c) are refused with a reason, and
only the class mix of its samples (as the real-trained classifiers see it) is reported.
Generated images are made on the device at each step and never written to disk. The classifier runs
live in ``OUT/downstream/`` (their configs, logs and curves; checkpoints are deleted once scored).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from covidxray.config import resolve_config
from covidxray.data.datasets import class_counts, load_tensor_data, resize_u8
from covidxray.errors import CovidXrayError
from covidxray.evaluate.figures import save_confusion_png
from covidxray.evaluate.report import mean_std
from covidxray.infer.predict import load_classifier, predict_probs
from covidxray.infer.generate import write_samples
from covidxray.infer.protocol import Classifier, LatentGenerator, having
from covidxray.metrics import classification as M
from covidxray.models.registry import get_model
from covidxray.train.loop import start_run
from covidxray.utils import resolve_device

ARMS = ("real", "real+synthetic", "synthetic")


def _score(run_dir: Path, test, device) -> dict[str, Any]:
    loaded = load_classifier(run_dir, "the downstream test")
    dev = resolve_device(device)
    probs = predict_probs(loaded.net.to(dev), resize_u8(test.images, loaded.image_size).to(dev), dev, 256,
                          loaded.mc_samples)["probs"]
    rep = M.classification_report(test.labels.cpu(), probs, test.classes)
    return {"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"], "macro_f1": rep["macro_f1"],
            "auc": rep["auc"], "recall": {c: rep["per_class"][c]["recall"] for c in test.classes},
            "confusion": rep["confusion"], "loaded": loaded}


def paired_delta(b: list[float], a: list[float]) -> dict[str, Any]:
    """Mean, std and 95 % t-interval of the paired differences b_i - a_i (no interval for one pair)."""
    from scipy import stats  # local: scipy.stats (~0.6 s) only for the interval of a paired delta

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    out: dict[str, Any] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0,
                           "n": int(d.size), "values": d.tolist(), "ci95": None}
    if d.size > 1:
        half = float(stats.t.ppf(0.975, d.size - 1)) * out["std"] / math.sqrt(d.size)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def check_downstream_args(classifier: str = "resnet18", seeds: int = 3, synthetic_ratio: float = 0.5,
                          epochs: int | None = None, **_: Any) -> None:
    """Refuse bad --downstream options before any expensive work (one line each)."""

    spec = get_model(classifier)
    if spec.name not in having(Classifier):
        raise CovidXrayError(f"--classifier {classifier} is a {spec.family} model",
                             f"Choose a classifier: {', '.join(having(Classifier))}")
    if seeds < 1:
        raise CovidXrayError(f"--seeds must be at least 1, got {seeds}")
    if not 0 < synthetic_ratio < 1:
        raise CovidXrayError(f"--synthetic-ratio must be in (0, 1), got {synthetic_ratio}",
                             "0.5 makes half of each batch generated (the synthetic-only arm always runs too)")
    if epochs is not None and epochs < 1:
        raise CovidXrayError(f"--epochs must be at least 1, got {epochs}")


def draw_pool(source, folder: Path, n: int, train_counts: list[int], seed: int, device: torch.device,
              log: Callable[[str], None]) -> dict[str, Any]:
    """Draw ``n`` labelled images of a conditional ``source`` once (per class in the real training proportions
    ``train_counts``, seeded ``seed``) into ``folder/<class>/`` as PNGs: the pool that arms (b) and (c) of every
    seed read (``data.synthetic`` = the folder), instead of a diffusion model's dozens of network evaluations
    per image inside each classifier step. Returns what the result records."""
    counts = class_counts(n, train_counts)
    per_class = ", ".join(f"{c} {k}" for c, k in zip(source.classes, counts))
    log(f"downstream: drawing a pool of {n} synthetic images once ({per_class}, seed {seed})")
    t0 = time.perf_counter()
    images, labels = source.draw(counts, seed, device)
    seconds = time.perf_counter() - t0
    for k, name in enumerate(source.classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        write_samples(images[labels.cpu() == k], folder / name)
    return {"drawn": "once, a pool", "n": n, "seed": seed, "per_class": dict(zip(source.classes, counts)),
            "seconds": round(seconds, 2), "seconds_per_image": round(seconds / max(n, 1), 4),
            "folder": str(folder.relative_to(folder.parents[1]))}


def run_downstream(source, data: str | Path, out: Path, *, classifier: str = "resnet18", seeds: int = 3,
                   synthetic_ratio: float = 0.5, epochs: int | None = None, device: str = "auto", seed: int = 0,
                   pool: int = 0,
                   gan_test_n: int = 100, sets: list[str] | None = None,
                   log: Callable[[str], None] | None = None, console=None) -> dict[str, Any]:
    """Train and test the arms of the module docstring; runs are written under ``out/downstream``.

    Args:
        source: a :class:`covidxray.evaluate.sources.GeneratorSource`.
        data: the prepared folder (its train/val/test splits).
        out: the evaluation's (temporary) output folder.
        classifier: a registered model of the classifier family.
        seeds: seeds per arm (``seed``, ``seed + 1``, ...).
        synthetic_ratio: fraction of each batch of arm (b) that is generated.
        epochs: classifier epochs (default: the classifier's config).
        pool: synthetic images drawn once for arms (b) and (c) of every seed (:func:`draw_pool`); 0 = on the fly
            for a latent generator (GANs, cVAE), else as many as the real training split.
        gan_test_n: generated images per class for GAN-test.
        sets: extra ``--set`` overrides for every classifier run.
    """

    log = log or (lambda msg: None)
    check_downstream_args(classifier, seeds, synthetic_ratio, epochs)
    data = Path(data)
    classes = list(source.classes)
    test = load_tensor_data(data, "test", classes, None, True, log)
    train_labels = load_tensor_data(data, "train", classes, None, True, log).labels
    root = out / "downstream"
    root.mkdir(parents=True, exist_ok=True)
    refused = None if source.conditional else (
        f"{source.name} is unconditional: its images carry no class, so arms (b) real + synthetic and (c) TSTR "
        f"cannot run; only the class mix of its samples is reported")
    arms = ["real"] if refused else list(ARMS)
    if refused:
        log(f"downstream: {refused}")
    seed_list = [seed + i for i in range(seeds)]
    per_arm: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    gan_test, class_mix = [], []
    dev = resolve_device(device)
    synthetic, pool_info = source.path, None  # a latent generator's run (drawn on the fly) or a folder of PNGs
    on_the_fly = isinstance(getattr(source, "loaded", None), LatentGenerator)
    if not refused and source.kind != "folder" and (pool or not on_the_fly):
        pool_info = draw_pool(source, root / "pool", pool or len(train_labels),
                              torch.bincount(train_labels, minlength=len(classes)).tolist(), seed + 30_000, dev, log)
        synthetic = str(root / "pool")
    for s in seed_list:
        for arm in arms:
            flags = {"data": {"path": str(data.resolve()), "classes": classes},
                     "train": {"epochs": epochs, "seed": s, "device": device}}
            extra = list(sets or [])
            if arm != "real":
                extra += [f"data.synthetic={synthetic}",
                          f"data.synthetic_ratio={synthetic_ratio if arm == 'real+synthetic' else 1.0}"]
            cfg = resolve_config(classifier, flags=flags, sets=extra)
            cfg.out = str(root / arm.replace("+", "_"))
            log(f"downstream: training {classifier} on {arm} data, seed {s}")
            trainer, finished = start_run(cfg, console=console)
            if not finished:
                raise KeyboardInterrupt
            sc = _score(trainer.run_dir, test, device)
            loaded = sc.pop("loaded")
            sc["run"] = str(Path(trainer.run_dir).relative_to(out))
            sc["epochs_trained"] = int(trainer.epoch)
            per_arm[arm].append(sc)
            if arm == "real":  # GAN-test / class mix with this real-trained classifier
                want = [gan_test_n] * len(classes) if source.conditional else gan_test_n * len(classes)
                imgs, labels = source.draw(want, seed=s + 20_000, device=dev)

                p = predict_probs(loaded.net.to(dev), resize_u8(imgs.to(dev), loaded.image_size), dev, 256,
                                  loaded.mc_samples)["probs"]
                pred = p.argmax(1)
                if labels is not None:
                    rep = M.classification_report(labels, p, classes)
                    gan_test.append({"accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"]})
                class_mix.append(torch.bincount(pred.cpu(), minlength=len(classes)).float().div(len(pred)).tolist())
            shutil.rmtree(Path(trainer.run_dir) / "checkpoints", ignore_errors=True)

    result: dict[str, Any] = {"classifier": classifier, "seeds": seed_list, "synthetic_ratio": synthetic_ratio,
                              "synthetic": pool_info or {"drawn": "on the fly" if source.kind != "folder" else
                                                         f"the {source.n_available} images of the folder"},
                              "epochs": epochs if epochs is not None else resolve_config(classifier).train.epochs,
                              "test_n": len(test), "classes": classes, "refused": refused, "arms": {}, "figures": []}
    for arm, rows in per_arm.items():
        agg = {k: mean_std([r[k] for r in rows]) for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc")}
        agg["recall"] = {c: mean_std([r["recall"][c] for r in rows]) for c in classes}
        conf = np.sum([np.asarray(r["confusion"]) for r in rows], axis=0).tolist()
        agg["confusion_sum"] = conf
        agg["per_seed"] = rows
        result["arms"][arm] = agg
        name = f"downstream_confusion_{arm.replace('+', '_')}.png"
        save_confusion_png(conf, classes, out / name,
                           title=f"{classifier} trained on {arm}, real test (summed over {len(rows)} seeds)")
        result["figures"].append(name)
    if "real+synthetic" in per_arm:
        result["delta"] = paired_delta([r["balanced_accuracy"] for r in per_arm["real+synthetic"]],
                                       [r["balanced_accuracy"] for r in per_arm["real"]])
        result["delta"]["metric"] = "balanced_accuracy"
    if gan_test:
        result["gan_test"] = {"n": gan_test_n * len(classes),
                              **{k: mean_std([g[k] for g in gan_test]) for k in ("accuracy", "balanced_accuracy")}}
    result["class_mix"] = {"predicted_by": "the real-trained classifiers of arm (a)",
                           "mean": dict(zip(classes, np.mean(class_mix, axis=0).tolist())) if class_mix else None,
                           "real_train": dict(zip(classes, (torch.bincount(train_labels, minlength=len(classes)).float()
                                                           / len(train_labels)).tolist()))}
    return result
