"""Metrics: pure functions on labels, predictions, probabilities or features (plus thin classes).

* :mod:`covidxray.metrics.classification` - accuracy, balanced accuracy, per-class precision/recall/F1,
  macro-F1, one-vs-rest ROC-AUC, confusion matrix, predictive entropy (scikit-learn's arithmetic).
"""
