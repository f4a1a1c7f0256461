"""Balanced accuracy pooled over test folds, with a bootstrap interval that resamples subjects.

Images of one slide share its stain, scanner and patient, so they are not
independent: on the public set one mostly sclerotic slide can decide a fold.
Resampling images would treat 900 correlated images as 900 independent ones
and give intervals far too narrow. Here each replicate draws the *subjects*
with replacement, pools all images of the drawn subjects (a subject drawn twice
counts twice), and recomputes balanced accuracy; the interval is the percentile
interval of the replicates.

Several seeds of one method predict the same images. Passing their predictions
stacked (labels and subjects repeated) gives, per replicate, the pooled balanced
accuracy of all seeds together, which equals the mean over seeds of each seed's
pooled balanced accuracy: every seed has the same class supports, so the recalls
average. A subject is drawn for all seeds at once, so the interval covers the
subject sampling, with the seed noise averaged.
"""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
SEED = 0


def _per_subject_counts(labels, preds, subjects, num_classes: int):
    """(sorted subject ids, support (S, K), correct (S, K)): per subject and true class."""
    ids, inverse = np.unique(np.asarray(subjects), return_inverse=True)
    labels = np.asarray(labels, np.int64)
    correct = (np.asarray(preds, np.int64) == labels).astype(np.float64)
    support = np.zeros((len(ids), num_classes))
    hits = np.zeros((len(ids), num_classes))
    np.add.at(support, (inverse, labels), 1.0)
    np.add.at(hits, (inverse, labels), correct)
    return ids, support, hits


def _balanced_accuracy(support: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Mean recall over the classes with support, along the last axis; NaN where no class has any."""
    present = support > 0
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=present)
    n = present.sum(-1)
    return np.divide(recall.sum(-1), n, out=np.full(n.shape, np.nan), where=n > 0)


def resample_indices(num_subjects: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, num_subjects) indices into the sorted subject ids, drawn with replacement.

    Depends only on its arguments, so two methods scored on the same subjects get
    the same replicates and their difference is a paired comparison.
    """
    return np.random.default_rng(seed).integers(num_subjects, size=(resamples, num_subjects))


def subject_bootstrap(labels, preds, subjects, num_classes: int | None = None, resamples: int = RESAMPLES,
                      seed: int = SEED, confidence: float = 0.95) -> dict:
    """Pooled balanced accuracy with a subject-level percentile bootstrap interval.

    Args:
      labels: (N,) true class ids of every pooled test image.
      preds: (N,) predicted class ids.
      subjects: (N,) subject (slide or patient) of each image.
      num_classes: K (defaults to the largest id + 1).
      resamples: bootstrap replicates.
      seed: the bootstrap's seed: the same seed and subjects give the same replicates.
      confidence: the interval's coverage.

    Returns:
      {balanced_accuracy, low, high, replicates (resamples,), subjects (count),
      subject_ids (sorted)}.
    """
    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    if num_classes is None:
        num_classes = int(max(labels.max(initial=0), preds.max(initial=0))) + 1
    ids, support, hits = _per_subject_counts(labels, preds, subjects, num_classes)
    point = float(_balanced_accuracy(support.sum(0), hits.sum(0)))
    if len(ids) == 0:
        return {"balanced_accuracy": float("nan"), "low": float("nan"), "high": float("nan"),
                "replicates": np.zeros(0), "subjects": 0, "subject_ids": ids}
    idx = resample_indices(len(ids), resamples, seed)
    # How often each subject is drawn, then the pooled counts of every replicate as one matmul.
    weights = np.zeros((resamples, len(ids)))
    np.add.at(weights, (np.arange(resamples)[:, None], idx), 1.0)
    replicates = _balanced_accuracy(weights @ support, weights @ hits)
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(replicates, [tail, 100 - tail])
    return {"balanced_accuracy": point, "low": float(low), "high": float(high), "replicates": replicates,
            "subjects": len(ids), "subject_ids": ids}


def paired_difference(a: dict, b: dict, confidence: float = 0.95) -> dict:
    """Pooled balanced accuracy of b minus a, with a paired subject-bootstrap interval.

    Args:
      a, b: `subject_bootstrap` results over the same subjects with the same seed and
        resamples, so replicate i of both draws the same subjects.

    Returns:
      {difference, low, high, share_b_better (share of replicates where b > a)}.

    Raises:
      ValueError: the two were drawn over different subjects or replicates.
    """
    if not np.array_equal(a["subject_ids"], b["subject_ids"]) or a["replicates"].shape != b["replicates"].shape:
        raise ValueError("a paired bootstrap needs both scores drawn over the same subjects and replicates")
    d = b["replicates"] - a["replicates"]
    if not len(d):
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "share_b_better": float("nan")}
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(d, [tail, 100 - tail])
    return {"difference": b["balanced_accuracy"] - a["balanced_accuracy"], "low": float(low), "high": float(high),
            "share_b_better": float(np.mean(d > 0))}
