"""Known-answer tests of covidxray.metrics.classification (answers computed by hand in the comments)."""

import math

import numpy as np
import pytest
import torch

from covidxray.metrics import classification as M

# 3 classes; class 2 is never predicted.
Y = torch.tensor([0, 0, 0, 1, 1, 2, 2])
P = torch.tensor([0, 0, 1, 1, 1, 0, 1])


def test_accuracy_and_balanced_accuracy():
    assert M.accuracy(Y, P) == pytest.approx(4 / 7)
    # recalls: class 0 2/3, class 1 2/2, class 2 0/2 -> mean 5/9
    assert M.balanced_accuracy(Y, P, 3) == pytest.approx(5 / 9)


def test_per_class_scores_with_a_class_never_predicted():
    s = M.per_class_scores(Y, P, 3)
    # class 0: predicted {0,1,5} -> 2 right of 3; class 1: predicted {2,3,4,6} -> 2 of 4; class 2: never predicted
    np.testing.assert_allclose(s["precision"], [2 / 3, 2 / 4, 0.0])
    np.testing.assert_allclose(s["recall"], [2 / 3, 1.0, 0.0])
    f1_1 = 2 * 0.5 * 1.0 / 1.5
    np.testing.assert_allclose(s["f1"], [2 / 3, f1_1, 0.0])
    assert s["support"].tolist() == [3, 2, 2]
    assert M.macro_f1(Y, P, 3) == pytest.approx((2 / 3 + f1_1 + 0.0) / 3)


def test_balanced_accuracy_averages_only_the_classes_present():
    # class 2 absent from y_true: mean recall of classes 0 and 1 only
    y, p = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2, 1, 1])
    assert M.balanced_accuracy(y, p, 3) == pytest.approx((0.5 + 1.0) / 2)


def test_confusion_matrix_rows_are_true_classes():
    assert M.confusion(Y, P, 3).tolist() == [[2, 1, 0], [0, 2, 0], [1, 1, 0]]


def test_roc_auc_one_vs_rest_known_answer():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    # class 1 scores: negatives {0.1, 0.6}, positives {0.65, 0.8}: all 4 pairs ordered -> AUC 1
    # class 0 scores: positives {0.9, 0.4}, negatives {0.35, 0.2}: all 4 pairs ordered -> AUC 1
    macro, per = M.roc_auc_ovr(y, probs)
    assert macro == pytest.approx(1.0) and per.tolist() == [1.0, 1.0]
    probs2 = np.array([[0.5, 0.5], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    # class 1: negatives {0.5, 0.7}, positives {0.4, 0.8}: pairs (0.4>0.5 no, 0.4>0.7 no, 0.8>0.5, 0.8>0.7) -> 2/4
    assert M.roc_auc_ovr(y, probs2)[1][1] == pytest.approx(0.5)


def test_roc_auc_of_a_split_with_one_class_is_a_clear_error():
    with pytest.raises(ValueError, match="ROC-AUC is undefined for class 'covid': the split has only images of it"):
        M.roc_auc_ovr([0, 0, 0], [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]], ["covid", "normal"])
    with pytest.raises(ValueError, match="undefined for class 'viral_pneumonia': the split has no images of it"):
        M.roc_auc_ovr([0, 1, 0], [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]],
                      ["covid", "normal", "viral_pneumonia"])


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="outside"):
        M.balanced_accuracy([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="same length"):
        M.per_class_scores([0, 1], [0], 2)
    with pytest.raises(ValueError, match="empty"):
        M.confusion([], [], 2)


def test_entropy_and_report():
    assert M.predictive_entropy([[0.5, 0.5], [1.0, 0.0]]).tolist() == pytest.approx([math.log(2), 0.0])
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
                          [0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])  # argmax = P above
    rep = M.classification_report(Y, probs, ["covid", "normal", "viral_pneumonia"])
    assert rep["n"] == 7 and rep["accuracy"] == pytest.approx(4 / 7)
    assert rep["balanced_accuracy"] == pytest.approx(5 / 9)
    assert rep["per_class"]["viral_pneumonia"]["precision"] == 0.0
    assert rep["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 1, 0]]
    nll = -np.mean(np.log([0.8, 0.6, 0.3, 0.8, 0.7, 0.1, 0.3]))
    assert rep["nll"] == pytest.approx(nll)
    assert rep["auc"] is not None and rep["auc_error"] is None
    one = M.classification_report(torch.tensor([0, 0]), torch.tensor([[0.9, 0.1], [0.4, 0.6]]), ["covid", "normal"])
    assert one["auc"] is None and "undefined" in one["auc_error"]
