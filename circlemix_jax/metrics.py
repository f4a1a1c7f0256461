"""The paper's metrics: balanced accuracy, balanced F1 and confusion matrices.

Balanced accuracy is the mean recall over classes that occur in the ground
truth (sklearn's `balanced_accuracy_score`). Balanced F1 is the mean one-vs-rest
F1 over the classes that occur in the truth *or* the predictions (sklearn's
macro F1 with its default labels). A class a fold lacks altogether would score
F1 = 0 by convention and drag the mean down even for perfect predictions, so it
is left out; a prediction of an absent class still costs, as that class enters
the mean with F1 = 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           class_names: Sequence[str]) -> dict:
    """All metrics the project reports, as plain JSON-able Python values.

    Args:
      y_true: int labels, shape (N,).
      y_pred: int predictions, shape (N,).
      class_names: names of labels 0..K-1.

    Returns:
      dict with balanced_accuracy, balanced_f1, accuracy, per_class (recall,
      precision, f1, support per name), confusion_matrix (rows = truth) and
      class_names.
    """
    y_true = np.asarray(y_true, np.int64)
    y_pred = np.asarray(y_pred, np.int64)
    labels = list(range(len(class_names)))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(labels)), where=support > 0)
    precision, _, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    occurring = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    return {
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "balanced_f1": float(f1_score(y_true, y_pred, labels=occurring, average="macro", zero_division=0))
        if occurring else 0.0,
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "num_examples": int(len(y_true)),
        "per_class": {
            name: {"recall": float(recall[i]), "precision": float(precision[i]),
                   "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
    }
