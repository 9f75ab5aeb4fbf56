"""Scoring a trained classifier on a split of a prepared folder: metrics, predictions, a confusion matrix.

:func:`evaluate_classifier` predicts every image of the split (batched, on the device; the mean of
``eval.mc_samples`` Monte-Carlo dropout passes when the model has them), computes the metrics of
:mod:`covidxray.metrics.classification` and writes, into one folder that appears whole or not at all:

* ``metrics.json`` - every number, N per class, the split, the checkpoint, the data, the
  preprocessing, the package versions, and the overlap check with the training images;
* ``predictions.csv`` - per image: id, true and predicted class, the class probabilities, the
  predictive entropy (and the mutual information with MC dropout);
* ``confusion.png`` - the confusion matrix (counts and row-normalised recall), for a paper.

Overlap check: the evaluated images are compared with the model's training split (read from the
training run's prepared folder, when it is still there) by pixel hash and, where the data name
patients, by patient id. Any overlap is reported and warned about: such a score is not a test score.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

from covidxray import __version__
from covidxray.data.datasets import load_tensor_data, read_prepared_info, resize_u8
from covidxray.errors import CovidXrayError
from covidxray.evaluate.figures import save_confusion_png
from covidxray.infer.predict import load_classifier, predict_probs
from covidxray.infer.protocol import Loaded
from covidxray.metrics import classification as M
from covidxray.outdir import OutputDir
from covidxray.utils import resolve_device


def _manifest_rows(root: Path) -> list[dict[str, str]]:
    path = root / "manifest.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CovidXrayError(f"{path} is damaged ({type(exc).__name__})",
                             "Run `covidxray prepare` again into a new folder") from None


def overlap_with_training(train_root: str, train_split: str, eval_root: Path, eval_split: str,
                          classes: list[str]) -> dict[str, Any]:
    """Images of ``eval_root/eval_split`` whose pixels (or patient) also appear in the training split."""
    train_root_p = Path(train_root) if train_root else None
    if train_root_p is None or not (train_root_p / "manifest.csv").is_file():
        return {"checked": False, "reason": f"the training data folder {train_root or '?'} is not available"}
    try:
        train = [r for r in _manifest_rows(train_root_p) if r.get("split") == train_split and r.get("class") in classes]
    except CovidXrayError as exc:  # the training data are the run's, not this command's input: say, do not stop
        return {"checked": False, "reason": str(exc)}
    evald = [r for r in _manifest_rows(eval_root) if r.get("split") == eval_split and r.get("class") in classes]
    hashes = {r["pixel_sha256"] for r in train if r.get("pixel_sha256")}
    patients = {r["patient_id"] for r in train if r.get("patient_id")}
    same_pixels = [r["file"] for r in evald if r.get("pixel_sha256") and r["pixel_sha256"] in hashes]
    same_patient = [r["file"] for r in evald if r.get("patient_id") and r["patient_id"] in patients]
    return {"checked": True, "training_data": str(train_root_p), "training_split": train_split,
            "same_pixels": len(same_pixels), "same_patient": len(same_patient),
            "examples": (same_pixels + same_patient)[:5]}


#: What a classifier's evaluate output folder holds (also the names of those written before the marker).
CLASSIFIER_OUTPUTS = ("metrics.json", "predictions.csv", "confusion.png")


def default_out(checkpoint_path: Path, split: str) -> Path:
    """``<run>/eval-<split>`` for a checkpoint inside ``<run>/checkpoints/``, else beside the file."""
    parent = checkpoint_path.parent
    run = parent.parent if parent.name == "checkpoints" else parent
    return run / f"eval-{split}-{checkpoint_path.stem}"


def evaluate_classifier(checkpoint: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
                        device: str = "auto", batch_size: int = 256, mc_samples: int | None = None,
                        log: Callable[[str], None] | None = None,
                        loaded: Loaded | None = None) -> dict[str, Any]:
    """Score a classifier checkpoint (file, or run folder: ``best.pt`` when present) on ``split`` of ``data``.

    Args:
        checkpoint: a classifier's checkpoint or run folder.
        data: a prepared folder (``covidxray prepare``); its classes must include the model's.
        split: ``test`` (default), ``val`` or ``train``.
        out: output folder (default: :func:`default_out`): new, or an earlier classifier evaluation's, whose
            files are replaced (:mod:`covidxray.outdir`).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward pass.
        mc_samples: Monte-Carlo dropout passes (default: the run's ``eval.mc_samples``; 1 without MC dropout).
        log: callable for one-line notes.
        loaded: the model, when the caller loaded it already (``covidxray.infer.protocol.load``).

    Returns:
        The report written to ``metrics.json`` (plus ``out``: the folder written).
    """
    log = log or (lambda msg: None)
    if split not in ("train", "val", "test"):
        raise CovidXrayError(f"--split must be train, val or test; got '{split}'")
    loaded = load_classifier(checkpoint if loaded is None else loaded, "evaluate")
    ckpt = loaded.checkpoint
    data = Path(data)
    od = OutputDir(Path(out) if out is not None else default_out(Path(ckpt["path"]), split), "evaluate-classifier",
                   legacy=CLASSIFIER_OUTPUTS, inputs=[data], option="--out")
    classes = loaded.classes
    info = read_prepared_info(data)
    missing = [c for c in classes if c not in info.get("classes", [])]
    if missing:
        raise CovidXrayError(f"{data} has no class(es) {', '.join(missing)} that the model predicts "
                             f"({', '.join(classes)})", "Evaluate on data prepared with the same classes")
    left_out = sorted(set(info.get("classes", [])) - set(classes))
    if left_out:
        log(f"note: images of class(es) {', '.join(left_out)} are left out: the model does not know them")
    td = load_tensor_data(data, split, classes, None, True, log)
    dev = resolve_device(device)
    images = td.images.to(dev)
    size = loaded.image_size
    resized_from = int(images.shape[-1])
    if resized_from != size:
        log(f"images prepared at {resized_from} px are resized to the model's {size} px (bilinear, antialiased)")
        images = resize_u8(images, size)
    net = loaded.net.to(dev)
    mc = loaded.mc_samples if mc_samples is None else mc_samples
    if mc > 1 and not getattr(net, "mc_dropout", False):
        raise CovidXrayError(f"--mc-samples {mc} needs a model trained with Monte-Carlo dropout (model.mc_dropout > 0)")
    t0 = time.perf_counter()
    pred = predict_probs(net, images, dev, batch_size, max(mc, 1))
    seconds = time.perf_counter() - t0
    probs, y = pred["probs"], td.labels.cpu()
    report = M.classification_report(y, probs, classes)
    cfg = loaded.cfg
    overlap = overlap_with_training(cfg.data.path, cfg.data.split, data, split, classes)
    if overlap.get("same_pixels") or overlap.get("same_patient"):
        log(f"warning: {overlap['same_pixels']} evaluated images have the same pixels as training images and "
            f"{overlap['same_patient']} share a patient with them (e.g. {', '.join(overlap['examples'])}): "
            f"this is not a held-out score")
    if Path(cfg.data.path).resolve() == data.resolve() and split == cfg.data.split:
        log(f"warning: split '{split}' is the model's training split: this is not a held-out score")

    import sklearn  # local: scikit-learn (~1 s to import) is needed here only for its version in the report
    import torchvision  # local: torchvision (~1 s) is needed here only for its version in the report

    ckpt_path = Path(ckpt["path"])
    result = {
        "kind": "classifier",
        "model": cfg.model.name,
        "checkpoint": str(ckpt_path.resolve()),
        "checkpoint_epoch": int(ckpt["epoch"]),
        "checkpoint_step": int(ckpt["step"]),
        "data": str(data.resolve()),
        "split": split,
        "classes": classes,
        "n_per_class": {c: report["per_class"][c]["support"] for c in classes},
        "image_size": size,
        "resized_from": resized_from if resized_from != size else None,
        "mc_samples": max(mc, 1),
        "metrics": {k: report[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "auc", "nll")},
        "auc_error": report["auc_error"],
        "per_class": report["per_class"],
        "confusion": report["confusion"],
        "mean_entropy": float(pred["entropy"].mean()) if len(y) else None,
        "overlap_with_training": overlap,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(y) / seconds, 1) if seconds > 0 else None,
        "device": str(dev),
        "versions": {"covidxray": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "scikit-learn": sklearn.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_outputs(od, result, td.ids, y, probs, pred)
    result["out"] = str(od.path)
    return result


def _predictions_csv(ids: list[str], classes: list[str], y: torch.Tensor, probs: torch.Tensor,
                     pred: dict[str, torch.Tensor]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    mi = pred.get("mutual_information")
    w.writerow(["id", "true", "predicted", *[f"p_{c}" for c in classes], "entropy",
                *(["mutual_information"] if mi is not None else [])])
    top = probs.argmax(1)
    for i, id_ in enumerate(ids):
        row = [id_, classes[int(y[i])], classes[int(top[i])], *[f"{float(p):.6f}" for p in probs[i]],
               f"{float(pred['entropy'][i]):.6f}"]
        if mi is not None:
            row.append(f"{float(mi[i]):.6f}")
        w.writerow(row)
    return buf.getvalue()


def _write_outputs(od: OutputDir, result: dict[str, Any], ids: list[str], y: torch.Tensor, probs: torch.Tensor,
                   pred: dict[str, torch.Tensor]) -> None:
    """Write the three files into the output folder, each whole (metrics.json last)."""

    with od.writing() as tmp:
        (tmp / "predictions.csv").write_text(_predictions_csv(ids, result["classes"], y, probs, pred), encoding="utf-8")
        save_confusion_png(result["confusion"], result["classes"], tmp / "confusion.png",
                           title=f"{result['model']} on {result['split']} (N = {result['metrics']['n']})")
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
