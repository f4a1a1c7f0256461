"""Decision rules for balanced accuracy: fitting, properties, storage and option checks."""

import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from circlemix_jax import decision, defaults
from circlemix_jax.errors import InputError


def _gaussian(rng, counts, sep=2.0, dim=1):
    """Calibrated logits of K Gaussian classes (means sep apart on a line, unit variance) with equal priors.

    The logit of class c is the log-likelihood of x under c (plus a constant), so with
    balanced classes the argmax is the Bayes rule.
    """
    labels = np.repeat(np.arange(len(counts)), counts)
    means = sep * np.arange(len(counts))
    x = means[labels] + rng.standard_normal(len(labels))
    logits = -0.5 * (x[:, None] - means[None, :]) ** 2
    return logits, labels


def _ba(labels, preds):
    return balanced_accuracy_score(labels, preds)


def _recall_mean(labels, preds):
    """Balanced accuracy written out: the mean over present classes of the share predicted right."""
    return np.mean([np.mean(preds[labels == c] == c) for c in np.unique(labels)])


def test_val_fit_never_lowers_validation_balanced_accuracy_and_keeps_an_optimal_argmax():
    rng = np.random.default_rng(0)
    logits, labels = _gaussian(rng, (400, 400))
    rule = decision.fit("val", logits, labels, labels, 2)
    assert rule.val_balanced_accuracy_adjusted >= rule.val_balanced_accuracy
    # Balanced classes and calibrated logits: argmax is already the best rule, and the fit stays near it.
    assert abs(rule.bias[1] - rule.bias[0]) < 0.5
    test_logits, test_labels = _gaussian(np.random.default_rng(1), (5000, 5000))
    plain = _ba(test_labels, test_logits.argmax(-1))
    assert _ba(test_labels, decision.apply(rule, test_logits)) >= plain - 0.01


def test_separable_validation_keeps_perfect_predictions():
    rng = np.random.default_rng(0)
    logits, labels = _gaussian(rng, (30, 40, 20), sep=12.0)
    assert _ba(labels, logits.argmax(-1)) == 1.0
    rule = decision.fit("val", logits, labels, labels, 3)
    assert rule.val_balanced_accuracy_adjusted == 1.0
    np.testing.assert_array_equal(decision.apply(rule, logits), labels)


@pytest.mark.parametrize("counts, shift", [((60, 40), (6.0, 0.0)), ((50, 30, 20, 15, 10), (5.0, -3.0, 4.0, 0.0, -4.0))])
def test_val_fit_recovers_shifted_logits(counts, shift):
    """A constant per-class shift wrecks the argmax; the bias fitted on validation undoes it on new data."""
    val_logits, val_labels = _gaussian(np.random.default_rng(0), counts, sep=3.0)
    test_logits, test_labels = _gaussian(np.random.default_rng(1), [20 * c for c in counts], sep=3.0)
    shift = np.asarray(shift)
    clean = _ba(test_labels, test_logits.argmax(-1))
    shifted = _ba(test_labels, (test_logits + shift).argmax(-1))
    assert shifted < clean - 0.15  # the shift really hurts
    rule = decision.fit("val", val_logits + shift, val_labels, val_labels, len(counts))
    assert _ba(test_labels, decision.apply(rule, test_logits + shift)) > clean - 0.03


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True, database=None)
@hypothesis.given(seed=st.integers(0, 10_000), n0=st.integers(1, 40), n1=st.integers(1, 40),
                  sep=st.floats(0.0, 3.0))
def test_binary_fit_matches_a_brute_force_threshold_scan(seed, n0, n1, sep):
    rng = np.random.default_rng(seed)
    logits, labels = _gaussian(rng, (n0, n1), sep=sep)
    logits = np.round(logits * 16) / 16  # ties between images, in binary fractions so differences are exact
    rule = decision.fit("val", logits, labels, labels, 2)
    d = logits[:, 1] - logits[:, 0]
    edges = np.unique(d)
    # Every distinct decision: predict 1 when d > c, for c below, between and above the scores.
    cuts = np.concatenate([[edges[0] - 1], (edges[:-1] + edges[1:]) / 2, [edges[-1] + 1]])
    scores = np.array([_recall_mean(labels, (d > c).astype(int)) for c in cuts])
    assert rule.val_balanced_accuracy_adjusted == pytest.approx(scores.max())
    assert rule.val_balanced_accuracy_adjusted >= rule.val_balanced_accuracy - 1e-12
    # The threshold sits in a best interval, in its middle when that interval is bounded.
    c = rule.bias[0] - rule.bias[1]
    assert _recall_mean(labels, (d > c).astype(int)) == pytest.approx(scores.max())
    top = scores >= scores.max() - 1e-12
    if c in edges:  # only when the argmax is best and its interval unbounded: nothing to centre in
        assert c == 0.0 and (top[0] or top[-1])
        return
    j = int(np.searchsorted(edges, c))  # c lies in interval j, between edges[j - 1] and edges[j]
    assert top[j]
    a, b = j, j
    while a > 0 and top[a - 1]:
        a -= 1
    while b + 1 < len(top) and top[b + 1]:
        b += 1
    if a > 0 and b < len(edges):
        assert c == pytest.approx((edges[a - 1] + edges[b]) / 2)


def test_prior_correction_is_the_balanced_bayes_rule():
    """Posterior logits under a 9:1 prior: subtracting the log prior gives the likelihood-ratio rule."""
    rng = np.random.default_rng(0)
    loglik, labels = _gaussian(rng, (9000, 1000), sep=2.0)
    prior = np.array([0.9, 0.1])
    posterior_logits = loglik + np.log(prior)
    rule = decision.fit("prior", posterior_logits, labels, labels, 2)
    np.testing.assert_allclose(rule.bias[1] - rule.bias[0], np.log(9.0), atol=0.01)
    plain = _ba(labels, posterior_logits.argmax(-1))
    adjusted = _ba(labels, decision.apply(rule, posterior_logits))
    assert adjusted > plain + 0.05
    assert adjusted == pytest.approx(_ba(labels, loglik.argmax(-1)), abs=0.005)


def test_classes_missing_from_validation_keep_bias_zero():
    rng = np.random.default_rng(0)
    logits, labels = _gaussian(rng, (30, 30, 30), sep=2.0)
    keep = labels != 2
    logits[:, 1] -= 2.0  # something to fit for the classes that are there
    rule = decision.fit("val", logits[keep], labels[keep], labels, 3)
    assert rule.bias[2] == 0.0 and rule.bias[1] > 0
    one_class = decision.fit("val", logits[labels == 0], labels[labels == 0], labels, 3)
    assert one_class.bias == (0.0, 0.0, 0.0)
    # A stage class with no training image: the prior bias is large but finite.
    assert np.all(np.isfinite(decision.fit("prior", logits, labels, np.array([0, 0, 1]), 3).bias))


def test_argmax_mode_and_empty_validation():
    logits, labels = _gaussian(np.random.default_rng(0), (5, 5))
    assert decision.fit("argmax", logits, labels, labels, 2).bias == (0.0, 0.0)
    rule = decision.fit("val", np.zeros((0, 2)), np.zeros(0, int), labels, 2)
    assert rule.bias == (0.0, 0.0)


def test_save_and_load(tmp_path):
    rule = decision.Rule("val", (0.0, 1.25), 0.7, 0.8)
    path = str(tmp_path / decision.FILENAME)
    decision.save(path, rule)
    assert decision.load(path) == rule
    assert decision.load(str(tmp_path / "absent.json")) is None
    (tmp_path / "bad.json").write_text("{\"mode\": \"val\"}")
    with pytest.raises(InputError, match="bad.json"):
        decision.load(str(tmp_path / "bad.json"))


def test_a_rule_without_validation_scores_is_standard_json(tmp_path):
    import json
    import math

    path = str(tmp_path / decision.FILENAME)
    decision.save(path, decision.Rule("argmax", (0.0, 0.0)))  # the argmax rule scores nothing on validation

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    stored = json.loads(open(path).read(), parse_constant=refuse)  # as strict readers (R, JavaScript, jq) do
    assert stored["val_balanced_accuracy"] is None
    back = decision.load(path)
    assert back.mode == "argmax" and math.isnan(back.val_balanced_accuracy)
    assert math.isnan(back.val_balanced_accuracy_adjusted)


@pytest.mark.parametrize("field, value, words", [
    ("eval.decision", "threshold", ["eval.decision", "threshold", "prior"]),
    ("eval.tta", 1, ["eval.tta", "True or False"]),
    ("split", "by_center", ["split", "by_center", "leave_one_center_out"]),
])
def test_check_options_names_field_value_and_choices(field, value, words):
    config = defaults.get_config("binary", "smoke")
    decision.check_options(config)  # the defaults pass
    with config.unlocked():
        section, _, name = field.rpartition(".")
        target = config[section] if section else config
        target.unlock()
        del target[name]
        target[name] = value
    with pytest.raises(InputError) as e:
        decision.check_options(config)
    for word in words:
        assert word in str(e.value)


def test_runs_from_before_the_evaluation_fields_load_with_the_old_behaviour(tmp_path):
    from circlemix_jax import hierarchy

    old = json.loads(defaults.get_config("binary", "smoke").to_json_best_effort())
    del old["eval"], old["split"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = hierarchy.load_run_config(str(tmp_path))
    assert config.eval.tta is False and config.eval.decision == "argmax" and config.split == "subject_kfold"
    decision.check_options(config)
