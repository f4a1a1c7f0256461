"""The subject-level bootstrap of pooled balanced accuracy, against independent references."""

import itertools
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from circlemix_jax import bootstrap


def _data(rng, subjects=12, per_subject=(1, 30), accuracy=0.8):
    sizes = rng.integers(*per_subject, size=subjects)
    subject = np.repeat(np.arange(subjects), sizes).astype(str)
    labels = (rng.random(len(subject)) < rng.random(subjects)[np.repeat(np.arange(subjects), sizes)]).astype(int)
    preds = np.where(rng.random(len(labels)) < accuracy, labels, 1 - labels)
    return labels, preds, np.char.add("S", subject)


def _pooled_reference(labels, preds, subjects, drawn_ids):
    """sklearn's balanced accuracy on the images of the drawn subjects, concatenated."""
    idx = np.concatenate([np.flatnonzero(subjects == s) for s in drawn_ids])
    return balanced_accuracy_score(labels[idx], preds[idx])


def test_replicates_are_balanced_accuracy_of_the_drawn_subjects_images():
    labels, preds, subjects = _data(np.random.default_rng(0), subjects=6)
    out = bootstrap.subject_bootstrap(labels, preds, subjects, 2, resamples=60, seed=3)
    ids = np.unique(subjects)
    idx = bootstrap.resample_indices(len(ids), 60, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on replicates with one class
        expected = [_pooled_reference(labels, preds, subjects, ids[i]) for i in idx]
    np.testing.assert_allclose(out["replicates"], expected, atol=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))


def test_bootstrap_distribution_matches_exact_enumeration_on_three_subjects():
    """With 3 subjects every one of the 27 ordered draws is equally likely: the exact bootstrap law."""
    labels = np.array([1, 1, 0, 0, 0, 1, 0, 1, 1, 0])
    preds = np.array([1, 0, 0, 0, 1, 1, 0, 0, 1, 1])
    subjects = np.array(["a", "a", "a", "b", "b", "b", "c", "c", "c", "c"])
    ids = np.unique(subjects)
    exact = np.array([_pooled_reference(labels, preds, subjects, ids[list(d)])
                      for d in itertools.product(range(3), repeat=3)])
    out = bootstrap.subject_bootstrap(labels, preds, subjects, 2, resamples=20000, seed=0)
    assert np.mean(out["replicates"]) == pytest.approx(exact.mean(), abs=0.005)
    assert np.quantile(out["replicates"], 0.5) == pytest.approx(np.quantile(exact, 0.5), abs=0.02)


def test_interval_contains_the_point_and_is_deterministic():
    labels, preds, subjects = _data(np.random.default_rng(1))
    a = bootstrap.subject_bootstrap(labels, preds, subjects, 2, seed=5)
    b = bootstrap.subject_bootstrap(labels, preds, subjects, 2, seed=5)
    c = bootstrap.subject_bootstrap(labels, preds, subjects, 2, seed=6)
    assert a["low"] <= a["balanced_accuracy"] <= a["high"] and a["low"] < a["high"]
    assert (a["low"], a["high"]) == (b["low"], b["high"]) and np.array_equal(a["replicates"], b["replicates"])
    assert not np.array_equal(a["replicates"], c["replicates"])
    assert len(a["replicates"]) == bootstrap.RESAMPLES and a["subjects"] == 12


def test_one_dominant_subject_gives_a_wide_interval():
    """400 sclerotic images of one slide, all found, and 10 on nine other slides, all missed."""
    subjects = np.array(["big"] * 400 + [f"s{i}" for i in range(9) for _ in range(21)])
    labels = np.array([1] * 400 + [1 if j == 0 else 0 for _ in range(9) for j in range(21)])
    preds = np.array([1] * 400 + [0] * (9 * 21))
    dominated = bootstrap.subject_bootstrap(labels, preds, subjects, 2)
    # The same predictions, each image its own subject: what an image-level bootstrap would say.
    images = bootstrap.subject_bootstrap(labels, preds, np.arange(len(labels)).astype(str), 2)
    assert dominated["high"] - dominated["low"] > 0.3
    assert images["high"] - images["low"] < 0.1


def test_stacked_seeds_are_the_mean_of_each_seeds_pooled_score():
    labels, preds0, subjects = _data(np.random.default_rng(2))
    preds1 = np.where(np.random.default_rng(3).random(len(labels)) < 0.2, 1 - preds0, preds0)
    stacked = bootstrap.subject_bootstrap(np.tile(labels, 2), np.concatenate([preds0, preds1]),
                                          np.tile(subjects, 2), 2, resamples=200)
    one = [bootstrap.subject_bootstrap(labels, p, subjects, 2, resamples=200) for p in (preds0, preds1)]
    assert stacked["balanced_accuracy"] == pytest.approx(np.mean([o["balanced_accuracy"] for o in one]))
    np.testing.assert_allclose(stacked["replicates"], np.mean([o["replicates"] for o in one], axis=0))


def test_edge_cases_one_class_and_single_image_subjects():
    # Every subject has one image and the truth lacks class 1: balanced accuracy is the recall of class 0.
    out = bootstrap.subject_bootstrap([0, 0, 0, 0], [0, 1, 0, 0], ["a", "b", "c", "d"], 2, resamples=100)
    assert out["balanced_accuracy"] == pytest.approx(0.75)
    assert 0.0 <= out["low"] <= out["high"] <= 1.0
    empty = bootstrap.subject_bootstrap([], [], [], 2)
    assert np.isnan(empty["balanced_accuracy"]) and empty["subjects"] == 0


def test_paired_difference():
    labels, preds, subjects = _data(np.random.default_rng(4), subjects=20)
    a = bootstrap.subject_bootstrap(labels, preds, subjects, 2, resamples=300)
    same = bootstrap.paired_difference(a, a)
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0
    better = np.where(np.random.default_rng(5).random(len(labels)) < 0.5, labels, preds)  # fixes half the errors
    d = bootstrap.paired_difference(a, bootstrap.subject_bootstrap(labels, better, subjects, 2, resamples=300))
    assert d["difference"] > 0 and d["low"] > 0 and d["share_b_better"] > 0.95
    other = bootstrap.subject_bootstrap(labels[:-5], preds[:-5], np.char.add(subjects[:-5], "x"), 2, resamples=300)
    with pytest.raises(ValueError, match="same subjects"):
        bootstrap.paired_difference(a, other)
