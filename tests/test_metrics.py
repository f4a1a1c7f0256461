"""Metrics against sklearn's independent implementations."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score

from circlemix_jax.metrics import classification_metrics


def test_against_sklearn_random():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c", "d", "e"]
    for _ in range(20):
        y = rng.integers(0, 5, 200)
        p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
        m = classification_metrics(y, p, names)
        assert np.isclose(m["balanced_accuracy"], balanced_accuracy_score(y, p))
        assert np.isclose(m["balanced_f1"], f1_score(y, p, average="macro"))
        assert m["confusion_matrix"] == confusion_matrix(y, p).tolist()


def test_known_values():
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, p, ["x", "y", "z"])
    # recalls 3/4, 1, 1/2 -> mean 0.75
    assert np.isclose(m["balanced_accuracy"], 0.75)
    assert m["per_class"]["z"] == {"recall": 0.5, "precision": 1.0, "f1": 2 / 3, "support": 2}
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]


# The sklearn reference warns about exactly the case under test.
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_absent_class_is_left_out_of_balanced_accuracy():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 2, 1, 1])
    m = classification_metrics(y, p, ["x", "y", "z"])
    assert np.isclose(m["balanced_accuracy"], balanced_accuracy_score(y, p))
    # Class 2 occurs only as a wrong prediction: it enters the F1 mean with F1 = 0.
    assert np.isclose(m["balanced_f1"], (2 / 3 + 1 + 0) / 3)


def test_perfect_predictions_score_one_whatever_classes_a_fold_lacks():
    names = ["a", "b", "c", "d", "e"]
    rng = np.random.default_rng(1)
    for present in ([0], [3, 4], [0, 2], [1, 2, 4], [0, 1, 2, 3, 4]):
        y = rng.choice(present, 50)
        m = classification_metrics(y, y, names)
        assert m["balanced_accuracy"] == 1.0
        assert m["balanced_f1"] == 1.0


def test_balanced_f1_by_hand_on_a_fold_lacking_classes():
    # Truth has classes 0 and 3 of five; one class-3 image is called 1.
    y = np.array([0, 0, 0, 3, 3])
    p = np.array([0, 0, 0, 3, 1])
    m = classification_metrics(y, p, ["a", "b", "c", "d", "e"])
    # F1: class 0 = 1, class 3 = 2/3 (P 1, R 1/2), class 1 = 0 (predicted, never true).
    assert np.isclose(m["balanced_f1"], (1 + 2 / 3 + 0) / 3)
    assert np.isclose(m["balanced_accuracy"], (1 + 0.5) / 2)
