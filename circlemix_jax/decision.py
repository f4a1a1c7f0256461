"""Decision rules for balanced accuracy: an additive per-class logit bias, stored with the run.

The network is trained on imbalanced classes and its argmax favours the common
ones: on the public set its errors are one-sided (sclerotic glomeruli missed far
more often than false alarms), so the argmax is not the decision that maximises
balanced accuracy. Every rule here predicts `argmax(logits + bias)`; the modes
differ only in where the bias comes from:

- 'argmax': bias 0, the paper's decision.
- 'prior': bias = -log p_train(y), the class frequencies of the training fold.
  For calibrated posteriors, argmax p(y|x) / p(y) is the Bayes rule for
  balanced error (the logit adjustment of Menon et al., 2021). It uses no
  validation data, so it cannot overfit the small validation set.
- 'val': a bias fitted on the best checkpoint's validation logits to maximise
  validation balanced accuracy. It corrects miscalibration that 'prior' cannot,
  but validation sets hold a few dozen images of the rare class from a handful
  of slides, so the fit is kept low-variance: K-1 free numbers (one class is the
  reference), exact line searches that start at the argmax and never leave a
  best interval that contains the current bias, the bias placed in the middle
  of that interval (the largest margin to the validation images on either
  side), and classes the validation set lacks keep bias 0 (their recall cannot
  be measured there, and pushing them down would remove them at test).

`fit` returns a `Rule`; `save`/`load` keep it as JSON in the run's workdir
(`decision.json`), and `predict` applies it to new images.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from circlemix_jax import rundir
from circlemix_jax.data import pipeline
from circlemix_jax.errors import InputError

MODES = ("argmax", "prior", "val")
FILENAME = "decision.json"
# Coordinate passes of the 'val' fit; each strictly improves validation balanced accuracy or ends the fit.
_MAX_PASSES = 5
# Two balanced accuracies closer than this are a tie (they are ratios of small counts).
_TIE = 1e-9
# Relative distance below which two threshold candidates are the same score.
_MERGE = 1e-9


@dataclasses.dataclass(frozen=True)
class Rule:
    """A fitted decision rule: predict argmax(logits + bias) over the stage's local class ids.

    Attributes:
      mode: one of `MODES`.
      bias: one additive logit bias per class of the stage.
      val_balanced_accuracy: validation balanced accuracy of the plain argmax.
      val_balanced_accuracy_adjusted: the same under this rule.
    """

    mode: str
    bias: tuple[float, ...]
    val_balanced_accuracy: float = float("nan")
    val_balanced_accuracy_adjusted: float = float("nan")


def check_options(config) -> None:
    """Checks the evaluation fields: eval.tta, eval.decision and split.

    Raises:
      InputError: naming the field, its value and the allowed values.
    """
    from circlemix_jax import data  # data's manifest readers are not needed here otherwise

    if not isinstance(config.eval.tta, bool):
        raise InputError(f"config field eval.tta={config.eval.tta!r} must be True or False")
    if config.eval.decision not in MODES:
        raise InputError(f"config field eval.decision={config.eval.decision!r} must be one of {MODES}")
    if config.split not in data.SPLITS:
        raise InputError(f"config field split={config.split!r} must be one of {data.SPLITS}")


def apply(rule: Rule, logits: np.ndarray) -> np.ndarray:
    """Local class ids (N,) under the rule."""
    logits = np.asarray(logits, np.float64)
    if logits.shape[-1] != len(rule.bias):
        raise ValueError(f"the rule has {len(rule.bias)} classes, the logits {logits.shape[-1]}")
    return np.argmax(logits + np.asarray(rule.bias), axis=-1)


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean recall over the classes present in `labels`, for one (N,) or many (J, N) predictions."""
    labels = np.asarray(labels)
    onehot = np.eye(num_classes)[labels]  # (N, K)
    support = onehot.sum(0)
    present = support > 0
    correct = (np.asarray(preds) == labels).astype(np.float64) @ onehot  # (..., K)
    return (correct[..., present] / support[present]).mean(-1)


def fit(mode: str, val_logits: np.ndarray, val_labels: np.ndarray, train_labels: np.ndarray,
        num_classes: int, train_probs: np.ndarray | None = None) -> Rule:
    """Fits a rule of `mode` (see the module notes).

    Args:
      mode: one of `MODES`.
      val_logits: (N, K) validation logits of the selected checkpoint.
      val_labels: (N,) local validation labels.
      train_labels: local training labels (for 'prior').
      num_classes: K.
      train_probs: the training batches' sampling probabilities per example, or None
        for a plain shuffle; 'prior' uses the class frequencies the batches hold.

    Returns:
      The rule, with its validation balanced accuracy before and after.
    """
    if mode not in MODES:
        raise InputError(f"config field eval.decision={mode!r} must be one of {MODES}")
    val_logits = np.asarray(val_logits, np.float64).reshape(-1, num_classes)
    val_labels = np.asarray(val_labels, np.int64)
    bias = np.zeros(num_classes)
    if mode == "prior":
        # Add-one counts: a class without training images gets a finite (large) bias, not inf.
        counts = pipeline.class_counts(train_labels, num_classes, train_probs) + 1.0
        bias = -np.log(counts / counts.sum())
        bias -= bias.mean()  # only differences matter; centred for readability
    elif mode == "val" and len(val_labels):
        bias = _fit_val_bias(val_logits, val_labels, num_classes)
    if not len(val_labels):
        return Rule(mode, tuple(float(b) for b in bias))
    before = balanced_accuracy(val_labels, val_logits.argmax(-1), num_classes)
    after = balanced_accuracy(val_labels, (val_logits + bias).argmax(-1), num_classes)
    return Rule(mode, tuple(float(b) for b in bias), float(before), float(after))


def _fit_val_bias(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Coordinate ascent on validation balanced accuracy, from bias 0, over the classes val holds."""
    bias = np.zeros(num_classes)
    present = np.flatnonzero(np.bincount(labels, minlength=num_classes))
    if len(present) < 2:
        return bias  # one class: every rule scores the same recall, so keep the argmax
    best = balanced_accuracy(labels, logits.argmax(-1), num_classes)
    for _ in range(_MAX_PASSES):
        improved = False
        for k in present[1:]:  # present[0] is the reference: only differences between biases matter
            bias[k], score = _line_search(logits, labels, bias, k, num_classes)
            improved |= score > best + _TIE
            best = max(best, score)
        if not improved:
            break
    return bias


def _line_search(logits, labels, bias, k: int, num_classes: int) -> tuple[float, float]:
    """The best bias of class k with the others fixed: (new bias, validation balanced accuracy).

    Example i is predicted k exactly when bias_k > t_i = max_{j != k}(logit_ij + bias_j) - logit_ik,
    so the score is piecewise constant between the sorted t_i and every interval is tried.
    """
    others = logits + bias
    others[:, k] = -np.inf
    alternative = others.argmax(1)
    t = others.max(1) - logits[:, k]
    edges = np.unique(t)
    # Images with equal scores reach t by different float roundings; an interval between two
    # such copies would be a decision no real threshold can make, so near-equal edges merge.
    edges = edges[np.concatenate([[True], np.diff(edges) > _MERGE * max(1.0, float(np.abs(edges).max()))])]
    # One probe value inside each of the len(edges) + 1 intervals.
    gap = float(np.median(np.diff(edges))) if len(edges) > 1 else 1.0
    probes = np.concatenate([[edges[0] - gap], (edges[:-1] + edges[1:]) / 2, [edges[-1] + gap]])
    preds = np.where(t[None, :] < probes[:, None], k, alternative[None, :])
    scores = balanced_accuracy(labels, preds, num_classes)
    best = scores.max()
    top = scores >= best - _TIE
    current = int(np.searchsorted(edges, bias[k]))  # the interval holding the current bias
    # Maximal runs of best intervals; stay in the current one when it is among them, else go to the nearest.
    starts = [j for j in range(len(top)) if top[j] and (j == 0 or not top[j - 1])]
    runs = [(a, next(j for j in range(a, len(top)) if j + 1 == len(top) or not top[j + 1])) for a in starts]
    lo_hi = [(edges[a - 1] if a > 0 else -np.inf, edges[b] if b < len(edges) else np.inf) for a, b in runs]
    inside = [i for i, (a, b) in enumerate(runs) if a <= current <= b]
    if inside:
        lo, hi = lo_hi[inside[0]]
    else:
        lo, hi = min(lo_hi, key=lambda r: min(abs(bias[k] - r[0]), abs(bias[k] - r[1])))
    if np.isfinite(lo) and np.isfinite(hi):
        return float((lo + hi) / 2), float(best)
    if inside:
        return float(bias[k]), float(best)  # already best, and no far side to centre between
    return float(hi - gap if np.isfinite(hi) else lo + gap), float(best)


def save(path: str, rule: Rule) -> None:
    """Writes the rule as JSON (atomically, also to gs://)."""
    rundir.write_json(path, dataclasses.asdict(rule))


def _score(value) -> float:
    """A stored validation score: null (or absent) is NaN, a score not computed."""
    return float("nan") if value is None else float(value)


def load(path: str) -> Rule | None:
    """The rule stored at `path`, or None when the run has none (runs made before rules existed).

    Raises:
      InputError: the file exists but is not a rule.
    """
    d = rundir.read_json(path, "the run's decision rule")
    if d is None:
        return None
    try:
        rule = Rule(mode=d["mode"], bias=tuple(float(b) for b in d["bias"]),
                    val_balanced_accuracy=_score(d.get("val_balanced_accuracy")),
                    val_balanced_accuracy_adjusted=_score(d.get("val_balanced_accuracy_adjusted")))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: not a decision rule ({e}); delete it to predict with the plain argmax") from None
    if rule.mode not in MODES:
        raise InputError(f"{path}: unknown decision mode {rule.mode!r}; expected one of {MODES}")
    return rule
