"""Classification metrics as pure functions of labels, predictions and probabilities.

Each function takes class indices ``y_true`` (N,), predicted indices ``y_pred`` (N,) and/or
predicted probabilities ``probs`` (N, C) as tensors or arrays, and ``n_classes``; it returns plain
floats or NumPy arrays. The arithmetic is scikit-learn's (the reference implementation papers of
this field report), with this project's conventions made explicit:

* per-class precision/recall/F1 are computed for **every** class ``0..n_classes-1``; a class never
  predicted gets precision 0 (``zero_division=0``), a class absent from ``y_true`` recall 0;
* balanced accuracy is the mean recall over the classes present in ``y_true`` (Brodersen et al.
  2010; scikit-learn's ``balanced_accuracy_score``);
* one-vs-rest ROC-AUC needs both positives and negatives of every class: a split where a class has
  no images (or only that class) raises :class:`ValueError` naming the class, never a silent NaN.

Example:
    >>> import torch
    >>> y, p = torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0, 0, 1, 1, 1, 2])
    >>> round(accuracy(y, p), 4), round(balanced_accuracy(y, p, 3), 4)
    (0.8333, 0.8889)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["accuracy", "balanced_accuracy", "per_class_scores", "macro_f1", "roc_auc_ovr", "confusion",
           "predictive_entropy", "classification_report"]


def _np(x: Any, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype) if dtype is not None else arr


def _labels(y_true: Any, y_pred: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = _np(y_true, np.int64).ravel(), _np(y_pred, np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}")
    if t.size == 0:
        raise ValueError("no predictions to score (empty y_true)")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.min() < 0 or a.max() >= n_classes:
            raise ValueError(f"{name} holds class indices outside [0, {n_classes}): {sorted(set(a.tolist()))[:10]}")
    return t, p


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of correct predictions."""
    t, p = _np(y_true, np.int64).ravel(), _np(y_pred, np.int64).ravel()
    if t.size == 0 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be non-empty and of one length, got {t.shape} and {p.shape}")
    from sklearn.metrics import accuracy_score  # local: sklearn (~0.9 s) stays out of every training start

    return float(accuracy_score(t, p))


def balanced_accuracy(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Mean per-class recall over the classes present in ``y_true``."""
    t, p = _labels(y_true, y_pred, n_classes)
    present = np.unique(t)
    recall = per_class_scores(t, p, n_classes)["recall"]
    return float(recall[present].mean())


def per_class_scores(y_true: Any, y_pred: Any, n_classes: int) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support (true count) of every class, as arrays of length ``n_classes``."""
    from sklearn.metrics import precision_recall_fscore_support  # local: sklearn (~0.9 s) stays out of every training start

    t, p = _labels(y_true, y_pred, n_classes)
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=list(range(n_classes)), average=None,
                                                             zero_division=0)
    return {"precision": prec.astype(float), "recall": rec.astype(float), "f1": f1.astype(float),
            "support": support.astype(int)}


def macro_f1(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Unweighted mean of the per-class F1 scores over the classes present in ``y_true``."""
    t, p = _labels(y_true, y_pred, n_classes)
    f1 = per_class_scores(t, p, n_classes)["f1"]
    return float(f1[np.unique(t)].mean())


def roc_auc_ovr(y_true: Any, probs: Any, class_names: Sequence[str] | None = None) -> tuple[float, np.ndarray]:
    """One-vs-rest ROC-AUC per class and their unweighted mean (macro).

    Args:
        y_true: class indices (N,).
        probs: predicted probabilities (N, C); rows need not sum exactly to 1.
        class_names: names for the error message.

    Raises:
        ValueError: a class has no positive or no negative example in ``y_true`` (AUC undefined).
    """
    from sklearn.metrics import roc_auc_score  # local: sklearn (~0.9 s) stays out of every training start

    t = _np(y_true, np.int64).ravel()
    pr = _np(probs, np.float64)
    if pr.ndim != 2 or pr.shape[0] != t.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N = {t.shape[0]}, got {pr.shape}")
    k = pr.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    aucs = np.empty(k)
    for c in range(k):
        pos = t == c
        if pos.all() or not pos.any():
            raise ValueError(f"ROC-AUC is undefined for class '{names[c]}': the split has "
                             f"{'only' if pos.all() else 'no'} images of it")
        aucs[c] = roc_auc_score(pos, pr[:, c])
    return float(aucs.mean()), aucs


def confusion(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Confusion matrix ``M[i, j]`` = images of true class i predicted as j (``n_classes`` x ``n_classes``)."""
    from sklearn.metrics import confusion_matrix  # local: sklearn (~0.9 s) stays out of every training start

    t, p = _labels(y_true, y_pred, n_classes)
    return confusion_matrix(t, p, labels=list(range(n_classes))).astype(int)


def predictive_entropy(probs: Any) -> np.ndarray:
    """Entropy (nats) of each row of predicted probabilities (N, C): the uncertainty of a (mean) prediction."""
    pr = _np(probs, np.float64)
    return -(pr * np.log(np.clip(pr, 1e-12, 1.0))).sum(axis=-1)


def classification_report(y_true: Any, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Every metric of this module for one split, as JSON-ready values.

    Returns:
        ``n``, ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auc`` (macro one-vs-rest, or None
        with ``auc_error`` saying why), ``nll`` (mean negative log-likelihood of the true class),
        ``per_class`` (precision, recall, F1, support, AUC per class name), ``confusion`` (list of rows).
    """
    names = list(class_names)
    k = len(names)
    pr = _np(probs, np.float64)
    t = _np(y_true, np.int64).ravel()
    pred = pr.argmax(axis=1)
    scores = per_class_scores(t, pred, k)
    try:
        auc, aucs = roc_auc_ovr(t, pr, names)
        auc_error = None
    except ValueError as exc:
        auc, aucs, auc_error = None, [None] * k, str(exc)
    nll = float(-np.log(np.clip(pr[np.arange(t.size), t], 1e-12, 1.0)).mean())
    return {
        "n": int(t.size),
        "accuracy": accuracy(t, pred),
        "balanced_accuracy": balanced_accuracy(t, pred, k),
        "macro_f1": macro_f1(t, pred, k),
        "auc": auc,
        "auc_error": auc_error,
        "nll": nll,
        "per_class": {name: {"precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
                             "f1": float(scores["f1"][i]), "support": int(scores["support"][i]),
                             "auc": None if aucs[i] is None else float(aucs[i])}
                      for i, name in enumerate(names)},
        "confusion": confusion(t, pred, k).tolist(),
    }
