"""The hierarchy: the merge rule, and children that really start from their parent's best checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from circlemix_jax import checkpoint, defaults, hierarchy
from circlemix_jax.errors import InputError

SIZE = 32


# --- merge rule (paper, section 3.2) ------------------------------------------------------------------------------

def test_merge_takes_child_only_where_parent_predicts_its_classes():
    parent = np.array([0, 1, 2, 3, 4, 3, 1])
    child = np.array([4, 4, 3, 4, 3, 3, 3])  # a C2 child: every prediction in {3, 4}
    np.testing.assert_array_equal(hierarchy.merge_predictions(parent, child, (3, 4)), [0, 1, 2, 4, 3, 3, 1])


def test_merge_with_nc2_and_identity_cases():
    parent = np.array([0, 1, 0, 2, 4])
    nc2 = np.array([1, 0, 0, 1, 0])
    np.testing.assert_array_equal(hierarchy.merge_predictions(parent, nc2, [0, 1]), [1, 0, 0, 2, 4])
    # A child that agrees with its parent changes nothing; one that covers every class replaces it.
    np.testing.assert_array_equal(hierarchy.merge_predictions(parent, parent, [0, 1, 2, 3, 4]), parent)
    np.testing.assert_array_equal(hierarchy.merge_predictions(parent, np.full(5, 2), [2]), [0, 1, 0, 2, 4])
    assert hierarchy.merge_predictions(np.array([], int), np.array([], int), [0, 1]).shape == (0,)


def test_merge_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="shape"):
        hierarchy.merge_predictions(np.array([0, 1]), np.array([0]), (0, 1))
    with pytest.raises(ValueError, match="outside its classes"):
        hierarchy.merge_predictions(np.array([3, 0]), np.array([2, 2]), (3, 4))


# --- children start from the parent ------------------------------------------------------------------------------

def _config(stage, **fields):
    c = defaults.get_config(stage, "smoke")
    c.data.image_size = SIZE
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """A finished-looking C5 run whose best checkpoint holds random values in every leaf.

    Shapes come from `jax.eval_shape` and values from numpy, so no program is
    compiled, and no leaf can match a child's own initialisation by accident.
    """
    from circlemix_jax import step as steplib

    workdir = str(tmp_path_factory.mktemp("parent") / "c5")
    config = _config("c5", seed=0)
    variables = _random_variables("c5", 1)
    state = steplib.init_state(variables, steplib.make_optimizer(config))
    os.makedirs(workdir)
    ckpts = checkpoint.RunCheckpoints(workdir)
    ckpts.save(checkpoint.BEST, 7, state, {"epochs_done": 1})
    ckpts.wait()
    ckpts.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump({"balanced_accuracy": 0.5, "balanced_f1": 0.4, "best_epoch": 0}, f)
    return workdir, variables


def _random_variables(stage, seed):
    """Variables of a stage's model with random values: shapes from eval_shape, so nothing compiles."""
    from circlemix_jax import step as steplib

    model = steplib.make_model(_config(stage))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


class _StubModel:
    """Stands in for the child's B0 in `train.initial_variables`: its init returns fixed random
    variables, so the test goes through the real entry point without compiling a network."""

    def __init__(self, variables):
        self.variables = variables

    def init(self, *args, **kwargs):
        return jax.tree_util.tree_map(jnp.asarray, self.variables)


def test_child_starts_from_parents_best_checkpoint(parent_run, monkeypatch):
    from circlemix_jax import train

    workdir, parent = parent_run
    stage = "c3"  # rows 2..4: not a prefix of the parent's, so a wrong slice would show
    messages = []
    monkeypatch.setattr(train, "log", messages.append)
    fresh = _random_variables(stage, 5)
    # What train_and_evaluate builds its first train state from, i.e. the child before training.
    child = jax.device_get(train.initial_variables(_config(stage, parent_workdir=workdir), _StubModel(fresh), SIZE))
    assert not np.array_equal(fresh["params"]["stem_conv"]["kernel"], child["params"]["stem_conv"]["kernel"])
    body = lambda p: {k: v for k, v in p.items() if k != "classifier"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, body(child["params"]), body(parent["params"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, child["batch_stats"], parent["batch_stats"])
    # Head = the parent's rows of the child's classes, so the child starts at the parent's restricted decision.
    rows = list(defaults.STAGE_CLASSES[stage])
    head, parent_head = child["params"]["classifier"], parent["params"]["classifier"]
    np.testing.assert_array_equal(head["kernel"], parent_head["kernel"][:, rows])
    np.testing.assert_array_equal(head["bias"], parent_head["bias"][rows])
    assert any("PARENT" in m and workdir in m for m in messages), messages


def test_fresh_head_keeps_the_childs_own_classifier():
    parent = {"kernel": np.arange(15.0).reshape(3, 5), "bias": np.arange(5.0)}
    fresh = {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}
    assert hierarchy.child_classifier(parent, range(5), (3, 4), fresh, "fresh") is fresh
    head = hierarchy.child_classifier(parent, range(5), (3, 4), fresh, "parent")
    np.testing.assert_array_equal(head["kernel"], [[3, 4], [8, 9], [13, 14]])
    np.testing.assert_array_equal(head["bias"], [3, 4])


def test_missing_parent_names_its_folder(tmp_path):
    where = str(tmp_path / "no-such-c5")
    with pytest.raises(InputError, match="no-such-c5.*does not exist"):
        hierarchy.init_from_parent(_config("nc2", parent_workdir=where), {}, log=lambda m: None)


def test_unfinished_parent_names_its_folder(parent_run, tmp_path):
    import shutil

    where = str(tmp_path / "unfinished")
    shutil.copytree(parent_run[0], where)
    os.remove(os.path.join(where, "metrics.json"))
    with pytest.raises(InputError, match="unfinished.*metrics.json"):
        hierarchy.init_from_parent(_config("c3", parent_workdir=where), {}, log=lambda m: None)
    shutil.rmtree(os.path.join(where, "checkpoints"))
    with open(os.path.join(where, "metrics.json"), "w") as f:
        f.write("{}")
    with pytest.raises(InputError, match="no best checkpoint"):
        hierarchy.init_from_parent(_config("c3", parent_workdir=where), {}, log=lambda m: None)


def test_parent_from_another_fold_is_refused(parent_run):
    config = _config("nc2", parent_workdir=parent_run[0], fold=1)
    with pytest.raises(InputError, match="fold=0.*leak"):
        hierarchy.init_from_parent(config, {}, log=lambda m: None)


def test_default_parent_is_c5_of_the_same_method_and_fold():
    config = defaults.get_config("c2", "circlemix")
    config.fold = 3
    assert hierarchy.parent_workdir(config) == os.path.abspath("runs/c5/circlemix/fold3")
    config.seed = 2  # a repeat with another seed finds the parent of that seed
    assert hierarchy.parent_workdir(config) == os.path.abspath("runs/c5/circlemix/seed2/fold3")
    config.parent_workdir = "elsewhere/c5"
    assert hierarchy.parent_workdir(config) == os.path.abspath("elsewhere/c5")


def test_runs_that_differ_only_in_seed_get_their_own_default_workdir():
    config = defaults.get_config("binary", "scratch")
    folders = set()
    for seed in range(4):
        config.seed = seed
        folders.add(defaults.default_workdir(config))
    assert len(folders) == 4 and "runs/binary/baseline/fold0" in folders


def test_merged_test_predictions_from_csv_files(tmp_path):
    def write(name, stage, preds, labels):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(defaults.get_config(stage).to_json_best_effort())
        lines = ["path,subject,label,pred,p_x"]
        lines += [f"img{i}.png,s,{y},{p},0.5" for i, (y, p) in enumerate(zip(labels, preds))]
        (d / "test_predictions.csv").write_text("\n".join(lines) + "\n")
        return str(d)

    labels = [0, 1, 3, 4, 2]
    parent = write("c5", "c5", [1, 1, 4, 4, 2], labels)
    child = write("c2", "c2", [3, 3, 3, 4, 4], labels)
    y, pred = hierarchy.merged_test_predictions(parent, [child])
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(pred, [1, 1, 3, 4, 2])
