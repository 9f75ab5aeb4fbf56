"""Scoring a generator (a GAN run, a checkpoint, or a folder of generated PNGs) against real X-rays.

:func:`evaluate_generator` does, in this order:

1. **Images.** The real training split (for the floor and the memorisation check) and the reference
   split (``--split``, default ``test``) of ``--data`` are read once. ``repeats`` draws of ``N`` generated
   images are made on the device (seed ``seed + r`` for draw ``r``); a conditional source draws each
   class in the proportions of the real training split.
2. **Features, once per image set** (:mod:`covidxray.metrics.features`): the FID Inception, and the
   in-domain classifier with ``cxr_features``. The real splits' features are cached beside the data.
3. **Metrics** (:mod:`covidxray.metrics.generative`), each for every draw (mean ± std over draws):
   FID, KID, improved precision/recall (k = 3), density/coverage (k = 5); all classes together and,
   for a conditional source, per class (intra-class FID). **Beside each, the real-vs-real floor**:
   the same metric between ``N`` random real *training* images and the same reference split, which is
   what a perfect generator would score at this N.
4. **Diversity**: MS-SSIM of random pairs of generated images beside that of real training pairs.
5. **Memorisation**: each generated image's nearest training image in Inception space and in pixel
   space (32 x 32, per-image standardised); a sample is a *copy* when it is closer to the training
   set than the 1st percentile of the real reference images' nearest-training distances (so held-out
   real images score about 1 %, training images 100 %); Meehan et al.'s C_T; the 16 closest pairs.
6. **Downstream** (``downstream=...``): :mod:`covidxray.evaluate.downstream`.
7. **Report**: ``metrics.json``, ``report.md`` and figures, in a folder that appears whole or not at all
   (:mod:`covidxray.evaluate.report`).

Where this differs from the anchors: torch-fidelity and clean-fid download their networks and compare
against a fixed set; here the network is offline, every number carries N, the filter and the floor,
and the memorisation check is built in (none of them has one).
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from covidxray import __version__
from covidxray.data.datasets import CACHE_DIR, class_counts, load_tensor_data, read_prepared_info
from covidxray.errors import CovidXrayError
from covidxray.evaluate.downstream import check_downstream_args, run_downstream
from covidxray.evaluate.report import mean_std, write_generator_report
from covidxray.evaluate.sources import FolderSource, GeneratorSource, MaskSource, Source, mask_consistency
from covidxray.infer.generate import write_samples
from covidxray.infer.predict import classifier_features
from covidxray.infer.protocol import Generator, Loaded, MaskTranslator, load, require
from covidxray.metrics import generative as G
from covidxray.metrics.features import InceptionFeatures, cached_features
from covidxray.outdir import OutputDir
from covidxray.utils import resolve_device

ALL_METRICS = ("fid", "kid", "pr", "dc", "memorization", "diversity")
#: Below this many images the 2048 x 2048 covariance of FID is rank-deficient (Heusel et al. used 50k).
FID_MIN_N = 2048


def parse_metrics(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    names = ["memorization" if n in ("memorisation", "copies", "mem") else n for n in names]
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown or not names:
        raise CovidXrayError(f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}",
                             f"Choose from {','.join(ALL_METRICS)}")
    return list(dict.fromkeys(names))


def _set_metrics(fake: torch.Tensor, ref: torch.Tensor, wanted: list[str], seed: int,
                 fd_name: str = "fid", kd_name: str = "kid") -> dict[str, float]:
    """Every feature-space metric of one generated (or floor) set against the reference features."""
    out: dict[str, float] = {}
    if "fid" in wanted:
        out[fd_name] = G.fid_from_features(fake, ref)
    if "kid" in wanted:
        out[kd_name], out[f"{kd_name}_subset_std"] = G.kid(fake, ref, seed=seed)
    # k-NN radii need k + 2 points per set (prdc); smaller sets (a small class) are left out, and said so.
    if "pr" in wanted and min(len(fake), len(ref)) >= 3 + 2:
        out.update(G.precision_recall(ref, fake, k=3))
    if "dc" in wanted and min(len(fake), len(ref)) >= 5 + 2:
        out.update(G.density_coverage(ref, fake, k=5))
    return out


def _aggregate(per_draw: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    keys = list(dict.fromkeys(k for d in per_draw for k in d))
    return {k: mean_std([d.get(k) for d in per_draw]) for k in keys}


def load_source(run_or_checkpoint: str | Path | None, fake: str | Path | None, data_classes: list[str],
                skip_unreadable: bool, log: Callable[[str], None], loaded: Loaded | None = None) -> Source:
    if (run_or_checkpoint is None) == (fake is None):
        raise CovidXrayError("give either RUN_OR_CHECKPOINT or --fake FOLDER (not both)")
    if fake is not None:
        return FolderSource(fake, data_classes, skip_unreadable, log)
    loaded = load(run_or_checkpoint if loaded is None else loaded)
    if isinstance(loaded, MaskTranslator):  # X-rays from the masks of its training data
        return MaskSource(loaded)
    return GeneratorSource(require(loaded, Generator, "evaluate", "Score classifiers and segmenters with "
                                   "`covidxray evaluate RUN --data PREPARED` too: pass one of their runs"))


@dataclass
class GeneratorEvaluation:
    """What is asked of a generator evaluation (the CLI fills one from its options; see the module docstring).

    Attributes:
        data: the prepared folder with the real images (its ``train`` split gives the floor and the
            memorisation reference; ``split`` the reference of every metric).
        run: a generator's run folder or checkpoint (or None with ``fake``).
        loaded: the generator, when the caller loaded it already (not read twice).
        fake: a folder of generated images instead of a checkpoint (per-class sub-folders allowed).
        split: the reference split: ``test`` (default), ``val`` or ``train``.
        n: generated images per draw (default: as many as the real training images of the evaluated
            classes, so that the floor uses the same N).
        repeats: draws of ``n`` images (mean ± std over draws).
        metrics: subset of :data:`ALL_METRICS` (default: all).
        class_name: one class of a conditional source, or None/"all".
        inception_weights: the FID Inception's TorchScript file (default: env / installed package).
        cxr_features: a classifier run whose features give ``fd_cxr``/``kd_cxr`` too.
        out: output folder (default: ``RUN/eval-gen-SPLIT-CKPT`` or ``FOLDER-eval``): new, or an earlier
            generator evaluation's, whose files are replaced (:mod:`covidxray.outdir`).
        device, batch_size: where and how many images per forward pass.
        seed: seed of the draws (draw r uses seed + r) and of every random subset.
        skip_unreadable: with ``fake``, evaluate the readable images (the others are listed).
        downstream: options of :func:`covidxray.evaluate.downstream.run_downstream`, or None.
        save_samples: also write the first draw as PNGs into ``out/samples/`` (``<class>/`` sub-folders for a
            conditional source); otherwise generated images never reach the disk.
        segmenter: a mask -> X-ray model only: a U-Net run whose masks of the drawn X-rays are compared with the
            masks they were drawn from (``mask_consistency``: Dice over the first draw).
        sampling: a diffusion model's sampler options (``steps``, ``guidance``, ``sampler``; None = the run's);
            the settings in force are recorded as ``source.sampling`` in metrics.json.
    """

    data: str | Path
    run: str | Path | None = None
    loaded: Loaded | None = None
    fake: str | Path | None = None
    split: str = "test"
    n: int | None = None
    repeats: int = 5
    metrics: list[str] | None = None
    class_name: str | None = None
    inception_weights: str | None = None
    cxr_features: str | None = None
    out: str | Path | None = None
    device: str = "auto"
    batch_size: int = 64
    seed: int = 0
    skip_unreadable: bool = False
    downstream: dict[str, Any] | None = None
    save_samples: bool = False
    segmenter: str | Path | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What :func:`plan` settled before any image is drawn: the source, the data, N and the class counts."""

    source: Source
    od: OutputDir
    data: Path
    wanted: list[str]
    eval_classes: list[str]
    train: Any                      # TensorData of the training split (floor, memorisation)
    ref: Any                        # TensorData of the reference split
    n: int
    counts: list[int] | None        # per-class counts of a draw (labelled sources)
    floor_n: int
    repeats: int
    labelled: bool
    device: torch.device
    warnings: list[str] = field(default_factory=list)


@dataclass
class Draws:
    """The generated images of every draw (uint8, CPU) with their labels, and the floor's training indices."""

    images: list[tuple[torch.Tensor, torch.Tensor | None]]
    floors: list[torch.Tensor]
    first_masks: torch.Tensor | None
    seconds: float


def plan(req: GeneratorEvaluation, log: Callable[[str], None]) -> Plan:
    """Check the request, load the source and the real splits, and settle N, the class counts and the floor."""
    wanted = parse_metrics(",".join(req.metrics)) if req.metrics else list(ALL_METRICS)
    split, repeats = req.split, req.repeats
    if split not in ("train", "val", "test"):
        raise CovidXrayError(f"--split must be train, val or test; got '{split}'")
    if repeats < 1:
        raise CovidXrayError(f"--repeats must be at least 1, got {repeats}")
    if req.batch_size < 1:
        raise CovidXrayError(f"--batch-size must be at least 1, got {req.batch_size}")
    data = Path(req.data)
    info = read_prepared_info(data)
    data_classes = sorted(info.get("classes", []))
    if req.downstream is not None:
        check_downstream_args(**req.downstream)
    source = load_source(req.run, req.fake, data_classes, req.skip_unreadable, log, req.loaded)
    loaded = getattr(source, "loaded", None)
    if loaded is None and any(v is not None for v in req.sampling.values()):
        raise CovidXrayError("--steps, --guidance and --sampler set a diffusion model's sampler; the images of "
                             f"--fake {req.fake} are drawn already", "Drop them")
    sampling = loaded.configure(**req.sampling) if loaded is not None else {}
    if sampling:
        source.info["sampling"] = sampling
    if req.segmenter is not None and not isinstance(source, MaskSource):
        raise CovidXrayError("--segmenter scores the mask consistency of a pix2pix run; this source is "
                             f"'{source.name}'", "Drop --segmenter, or pass a pix2pix run")
    od = generator_output(req.out, source, split, data, req.fake)
    prepared = int(info["size"])
    if source.image_size != prepared:
        raise CovidXrayError(
            f"the generated images are {source.image_size} px but {data} was prepared at {prepared} px",
            f"Evaluate against data prepared at {source.image_size} px (`covidxray prepare SRC OUT --size "
            f"{source.image_size}`), so that real and generated images went through the same resize")
    missing = [c for c in source.classes if c not in data_classes]
    if missing:
        raise CovidXrayError(f"{data} has no class(es) {', '.join(missing)} of the generator "
                             f"({', '.join(source.classes)})", "Evaluate against data prepared with those classes")
    class_name = req.class_name
    if class_name not in (None, "all"):
        if not source.conditional:
            raise CovidXrayError(f"--class {class_name}: {source.name} is not class-conditional (it was trained on "
                                 f"{', '.join(source.classes)} together)", "Drop --class, or evaluate a conditional model")
        if class_name not in source.classes:
            raise CovidXrayError(f"unknown class '{class_name}'; {source.name} knows: {', '.join(source.classes)} (or all)")
        eval_classes = [class_name]
    else:
        eval_classes = list(source.classes)
    if source.kind == "checkpoint":
        trained_on = source.info.get("training_data")
        if trained_on and Path(trained_on).resolve() != data.resolve():
            log(f"note: {source.name} was trained on {trained_on}; the floor and the memorisation check use the "
                f"training split of {data}")

    dev = resolve_device(req.device)
    train = load_tensor_data(data, "train", eval_classes, None, True, log)
    ref = train if split == "train" else load_tensor_data(data, split, eval_classes, None, True, log)
    if split == "train":
        log("warning: the reference split is the training split: the floor compares it with itself")
    n_train = len(train)
    train_counts = torch.bincount(train.labels, minlength=len(eval_classes)).tolist()
    labelled = source.conditional
    folder_counts = None
    if labelled and source.kind == "folder":
        avail = source.class_available()  # type: ignore[attr-defined]
        folder_counts = [avail[source.classes.index(c)] for c in eval_classes]
    n = req.n
    if n is None:
        if folder_counts is not None:  # a labelled folder: all its images, in its own class proportions
            n = sum(folder_counts)
        else:
            n = n_train
            if source.n_available is not None:
                n = min(n, source.n_available)
    if n < 2:
        raise CovidXrayError(f"-n {n}: at least 2 generated images are needed (FID needs a covariance)",
                             "Pass -n 1000 or more (at least 2,048 for a full-rank FID)")
    warnings: list[str] = []
    if n < FID_MIN_N and "fid" in wanted:
        warnings.append(f"N = {n} < {FID_MIN_N}: the 2048-d covariance of FID is rank-deficient and FID is biased "
                        f"upwards at this N; compare it only with the floor at the same N, and prefer KID")
    if len(ref) < FID_MIN_N and "fid" in wanted:
        warnings.append(f"the reference split has only {len(ref)} images: every FID here, the floor included, is "
                        f"far above 0")
    for key, k in (("pr", 3), ("dc", 5)):
        if key in wanted and min(n, len(ref)) < k + 2:
            warnings.append(f"{key} left out: its k = {k} nearest-neighbour radii need at least {k + 2} images per "
                            f"set (N = {n}, reference {len(ref)})")
    # Per-class counts of each draw: the real training proportions (conditional sources).
    if folder_counts is not None and n == sum(folder_counts):
        counts = list(folder_counts)
    else:
        counts = class_counts(n, train_counts) if labelled else None
    if folder_counts is not None:
        short = [f"{c} ({have} < {want})" for c, have, want in zip(eval_classes, folder_counts, counts) if have < want]
        if short:
            raise CovidXrayError(f"--fake has too few images for N = {n} in the training proportions: "
                                 f"{', '.join(short)}", "Pass a smaller -n or write more samples per class")
    if source.n_available is not None and repeats > 1 and n >= source.n_available:
        log(f"note: the folder holds {source.n_available} images and N = {n}: every draw is the same set, so "
            f"--repeats {repeats} is reduced to 1")
        repeats = 1
    # The floor draws like the samples (per class for labelled sources), capped by what the training split has.
    floor_n = sum(min(c, t) for c, t in zip(counts, train_counts)) if labelled else min(n, n_train)
    if floor_n < n:
        warnings.append(f"the floor uses {floor_n} real training images (all there are"
                        f"{' in those class proportions' if labelled else ''}), fewer than N = {n}")
    return Plan(source, od, data, wanted, eval_classes, train, ref, n, counts, floor_n, repeats, labelled, dev,
                warnings)


def draw(p: Plan, req: GeneratorEvaluation) -> Draws:
    """``repeats`` draws of N generated images (seed + r), and the floor's N real training images per draw."""
    source, eval_classes, seed = p.source, p.eval_classes, req.seed
    images: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    first_masks = None
    t0 = time.perf_counter()
    for r in range(p.repeats):
        if p.labelled:
            full = [0] * len(source.classes)
            for i, c in enumerate(eval_classes):
                full[source.classes.index(c)] = p.counts[i]
            imgs, labels = source.draw(full, seed + r, p.device, batch_size=max(req.batch_size, 256))
            # labels in eval_classes' indices
            remap = torch.tensor([eval_classes.index(c) if c in eval_classes else -1 for c in source.classes])
            labels = remap[labels]
        else:
            imgs, labels = source.draw(p.n, seed + r, p.device, batch_size=max(req.batch_size, 256))
        images.append((imgs.cpu(), labels))
        if r == 0:
            first_masks = getattr(source, "last_masks", None)  # a mask -> X-ray model: the masks of the first draw
    seconds = time.perf_counter() - t0
    floors = []
    for r in range(p.repeats):
        g = torch.Generator().manual_seed(seed + 10_000 + r)
        if p.labelled:  # the floor draws each class like the generated set
            idx = []
            for i in range(len(eval_classes)):
                pool = (p.train.labels == i).nonzero().flatten()
                idx.append(pool[torch.randperm(len(pool), generator=g)[:p.counts[i]]])
            floors.append(torch.cat(idx))
        else:
            floors.append(torch.randperm(len(p.train), generator=g)[:p.floor_n])
    return Draws(images, floors, first_masks, seconds)


def features(p: Plan, d: Draws, req: GeneratorEvaluation, log: Callable[[str], None], progress=None
             ) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each feature space's features of the training and reference splits (cached) and of every draw."""
    extractors = []
    if any(m in p.wanted for m in ("fid", "kid", "pr", "dc", "memorization")):
        extractors.append(InceptionFeatures(req.inception_weights, p.device, req.batch_size))
    if req.cxr_features:
        extractors.append(classifier_features(req.cxr_features, p.device, req.batch_size))
    cache_dir = p.data / CACHE_DIR
    feats: dict[str, dict[str, Any]] = {}
    total = sum(len(imgs) for imgs, _ in d.images) * len(extractors)
    t0 = time.perf_counter()
    no_progress = lambda what, total: contextlib.nullcontext(lambda k: None)  # noqa: E731
    classes = ",".join(p.eval_classes)
    with (progress or no_progress)("features", total) as advance:
        for ex in extractors:
            f_train = cached_features(ex, p.train.images, cache_dir, f"train-{classes}", log)
            f_ref = f_train if p.ref is p.train else cached_features(ex, p.ref.images, cache_dir,
                                                                     f"{req.split}-{classes}", log)
            f_draws = [ex(imgs, advance) for imgs, _ in d.images]
            feats[ex.name] = {"extractor": ex, "train": f_train, "ref": f_ref, "draws": f_draws}
    seconds = time.perf_counter() - t0
    timing = {"features_s": round(seconds, 2), "feature_images": total,
              "features_img_per_s": round(total / seconds, 1) if seconds > 0 else None}
    return feats, timing


def score(p: Plan, d: Draws, feats: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """Every metric of every draw and of its floor (mean ± std over draws), per class, diversity, copies."""
    t0 = time.perf_counter()
    wanted, eval_classes, counts = p.wanted, p.eval_classes, p.counts
    result_metrics: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    for name, fs in feats.items():
        ex = fs["extractor"]
        space_wanted = wanted if name != "cxr" else [m for m in wanted if m in ("fid", "kid")] or ["fid", "kid"]
        rows, floor_rows = [], []
        for r in range(p.repeats):
            rows.append(_set_metrics(fs["draws"][r], fs["ref"], space_wanted, seed + r, ex.fd_name, ex.kd_name))
            floor_rows.append(_set_metrics(fs["train"][d.floors[r]], fs["ref"], space_wanted, seed + r,
                                           ex.fd_name, ex.kd_name))
        for k, v in _aggregate(rows).items():
            result_metrics[k] = v
        for k, v in _aggregate(floor_rows).items():
            result_metrics[f"{k}_floor"] = v
        if p.labelled and len(eval_classes) > 1 and name != "cxr":
            for i, c in enumerate(eval_classes):
                ref_c = fs["ref"][p.ref.labels == i]
                if len(ref_c) < 2 or counts[i] < 2:
                    per_class[c] = {"skipped": f"{len(ref_c)} reference / {counts[i]} generated images"}
                    continue
                rows_c, floor_c = [], []
                for r in range(p.repeats):
                    lab = d.images[r][1]
                    rows_c.append(_set_metrics(fs["draws"][r][lab == i], ref_c, space_wanted, seed + r,
                                               ex.fd_name, ex.kd_name))
                    fl = d.floors[r][p.train.labels[d.floors[r]] == i]
                    floor_c.append(_set_metrics(fs["train"][fl], ref_c, space_wanted, seed + r, ex.fd_name,
                                                ex.kd_name))
                entry = per_class.setdefault(c, {"n": counts[i], "reference_n": int(len(ref_c))})
                entry.update(_aggregate(rows_c))
                entry.update({f"{k}_floor": v for k, v in _aggregate(floor_c).items()})

    diversity = None
    if "diversity" in wanted:
        imgs0 = d.images[0][0]
        real_div = G.ms_ssim_diversity(p.train.images, n_pairs=200, seed=seed)
        diversity = {"generated": G.ms_ssim_diversity(imgs0, n_pairs=200, seed=seed), "real_train": real_div}

    memo = None
    if "memorization" in wanted:
        fi = next(iter(feats.values()))  # the FID network's space (named "unverified" for a stand-in)
        memo = _memorisation(fi["draws"][0], d.images[0][0], fi["train"], p.train.images, fi["ref"], p.ref.images,
                             seed)
        if memo["copies"] > 0.05:
            p.warnings.append(f"{memo['copies'] * 100:.1f} % of the samples are closer to a training image than "
                              f"99 % of real held-out images are: the generator may copy training images "
                              f"(see closest_pairs.png)")
    return {"metrics": result_metrics, "per_class": per_class, "diversity": diversity, "memorization": memo,
            "metrics_s": round(time.perf_counter() - t0, 2)}


def report(p: Plan, d: Draws, feats: dict[str, dict[str, Any]], scores: dict[str, Any], timing: dict[str, Any],
           req: GeneratorEvaluation, log: Callable[[str], None], t_start: float) -> dict[str, Any]:
    """The result (``metrics.json``) with the samples, mask consistency and downstream arms asked for, written
    with the report and its figures into the output folder."""
    import scipy  # local: only their versions are recorded, and the report is the last stage
    import sklearn  # local: scikit-learn (~1 s to import) is needed here only for its version in the report

    source = p.source
    result: dict[str, Any] = {
        "kind": "generator",
        "model": source.name,
        "source": {"kind": source.kind, "path": source.path, **{k: v for k, v in source.info.items()}},
        "conditional": source.conditional,
        "data": str(p.data.resolve()),
        "split": req.split,
        "reference_n": len(p.ref),
        "train_n": len(p.train),
        "classes": p.eval_classes,
        "class": req.class_name or "all",
        "n": p.n,
        "n_per_class": dict(zip(p.eval_classes, p.counts)) if p.labelled else None,
        "floor_n": p.floor_n,
        "repeats": p.repeats,
        "seed": req.seed,
        "image_size": source.image_size,
        "features": {name: fs["extractor"].record() for name, fs in feats.items()},
        "metrics_requested": p.wanted,
        "metrics": scores["metrics"],
        "per_class": scores["per_class"],
        "diversity": scores["diversity"],
        "memorization": scores["memorization"],
        "downstream": None,
        "warnings": p.warnings,
        "timing": {"generate_s": round(d.seconds, 2), **timing, "metrics_s": scores["metrics_s"]},
        "device": str(p.device),
        "versions": {"covidxray": __version__, "torch": torch.__version__, "numpy": np.__version__,
                     "scipy": scipy.__version__, "scikit-learn": sklearn.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def finish(tmp: Path) -> None:
        imgs0, lab0 = d.images[0]
        if req.save_samples:
            if lab0 is None:
                write_samples(imgs0, tmp / "samples")
            else:
                for i, c in enumerate(p.eval_classes):
                    write_samples(imgs0[lab0 == i], tmp / "samples" / c)
            result["samples_written"] = "samples/"
        if req.segmenter is not None:
            result["mask_consistency"] = mask_consistency(imgs0, d.first_masks, req.segmenter, p.device,
                                                          req.batch_size)
            log(f"mask consistency: Dice {result['mask_consistency']['dice']['mean']:.3f} ± "
                f"{result['mask_consistency']['dice']['std']:.3f} between the given masks and the U-Net's masks of "
                f"the {len(imgs0)} drawn X-rays")
        if req.downstream is not None:  # the classifier runs live inside the output folder
            result["downstream"] = run_downstream(source, p.data, tmp, device=req.device, seed=req.seed, log=log,
                                                  **req.downstream)
        result["seconds"] = round(time.perf_counter() - t_start, 2)

    write_generator_report(p.od, result, draws=d.images, train=p.train, before_write=finish)
    result["out"] = str(p.od.path)
    return result


def run_generator_evaluation(req: GeneratorEvaluation, log: Callable[[str], None] | None = None,
                             progress=None) -> dict[str, Any]:
    """The evaluation as its stages: :func:`plan` -> :func:`draw` -> :func:`features` -> :func:`score` ->
    :func:`report`. ``progress(what, total)``: a context giving ``advance(k)`` (the CLI's progress bar).

    Returns:
        The report written to ``metrics.json`` (plus ``out``).
    """
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    p = plan(req, log)
    d = draw(p, req)
    feats, timing = features(p, d, req, log, progress)
    scores = score(p, d, feats, req.seed)
    result = report(p, d, feats, scores, timing, req, log, t_start)
    for w in p.warnings:
        log(f"warning: {w}")
    return result


def evaluate_generator(run_or_checkpoint: str | Path | None, data: str | Path, *, log: Callable[[str], None] | None = None,
                       progress=None, **options: Any) -> dict[str, Any]:
    """Score generated images against a split of the prepared folder ``data``: the library's call,
    ``options`` as the fields of :class:`GeneratorEvaluation` (see the module docstring)."""
    return run_generator_evaluation(GeneratorEvaluation(data=data, run=run_or_checkpoint, **options), log, progress)


#: What an evaluate output folder of a generator holds (also the names of those written before the marker).
GENERATOR_OUTPUTS = ("metrics.json", "report.md", "*.png", "samples", "downstream")


def generator_output(out: str | Path | None, source: Source, split: str, data: Path, fake) -> OutputDir:
    """The checked output folder (new, or an earlier generator evaluation's), before any work starts."""
    return OutputDir(Path(out) if out is not None else default_generator_out(source, split), "evaluate-generator",
                     legacy=GENERATOR_OUTPUTS, inputs=[data] + ([fake] if fake is not None else []), option="--out")


def default_generator_out(source: Source, split: str) -> Path:
    p = Path(source.path)
    if source.kind == "folder":
        return p.with_name(f"{p.name}-eval-{split}")
    run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    return run / f"eval-gen-{split}-{p.stem}"


def _memorisation(f_gen: torch.Tensor, gen_u8: torch.Tensor, f_train: torch.Tensor, train_u8: torch.Tensor,
                  f_ref: torch.Tensor, ref_u8: torch.Tensor, seed: int, q: float = 0.01) -> dict[str, Any]:
    """Nearest-training-image distances of the samples vs those of held-out real images (see the module doc)."""
    out: dict[str, Any] = {"quantile": q}
    spaces = {"inception": (f_gen, f_train, f_ref),
              "pixel": (G.pixel_embedding(gen_u8), G.pixel_embedding(train_u8), G.pixel_embedding(ref_u8))}
    for space, (g, t, r) in spaces.items():
        d_gen, i_gen = G.nearest_distances(g, t)
        d_ref, _ = G.nearest_distances(r, t)
        thr = G.copy_threshold(d_ref, q)
        out[space] = {"threshold": float(thr), "copies": G.copies_fraction(d_gen, thr),
                      "median_nn_distance": float(np.median(d_gen)), "median_nn_distance_real": float(np.median(d_ref)),
                      "reference_copies": G.copies_fraction(d_ref, thr)}
        if space == "pixel":
            order = np.argsort(d_gen, kind="stable")[:16]
            out["closest"] = [{"sample": int(i), "train": int(i_gen[i]), "pixel_distance": float(d_gen[i])}
                              for i in order]
    ct = G.data_copying_ct(f_train, f_ref, f_gen, seed=seed)
    out["ct"] = ct
    out["copies"] = out["inception"]["copies"]
    out["copies_pixel"] = out["pixel"]["copies"]
    return out

