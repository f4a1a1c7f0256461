"""The data-parallel train step: 1 and 4 devices compute the same update."""

import jax
import numpy as np
import pytest
from fake_run import random_variables

from circlemix_jax import defaults, step


def _config():
    c = defaults.get_config("c5", "smoke")
    with c.unlocked():
        # Augmentation is drawn per device, so it differs between 1 and 4 devices; switch it off.
        # Dropout and drop-path run on the global batch with one key: strong, to show they agree.
        c.augment.basic = False
        c.model.dropout_rate = 0.5
        c.model.drop_path_rate = 0.5
    return c


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 255, (8, 32, 32, 3), np.uint8), "label": rng.integers(0, 5, 8).astype(np.int32)}


@pytest.fixture(scope="module")
def init_variables():
    """Random B0 variables, made once (compiling B0's own init would cost far more than the steps)."""
    return random_variables(step.make_model(_config()), 32)


_TRAIN_STEPS = {}


def _one_step(num_devices, batch, variables, lr=None, config=None, seed=0):
    """One train step from `variables`; the jitted step is kept per (devices, config), so tests share its trace."""
    config = config or _config()
    key = (num_devices, config.to_json())
    if key not in _TRAIN_STEPS:
        mesh = step.make_mesh(num_devices)
        tx = step.make_optimizer(config)
        _TRAIN_STEPS[key] = mesh, tx, step.parallel_train_step(config, step.make_model(config), tx, mesh)
    mesh, tx, train = _TRAIN_STEPS[key]
    state = step.replicate(step.init_state(variables, tx), mesh)
    state, metrics = train(state, step.shard_batch(batch, mesh), jax.random.key(seed),
                           np.float32(config.optim.lr if lr is None else lr))
    return jax.device_get(state), jax.device_get(metrics)


def test_one_and_four_devices_agree(batch, init_variables):
    """The model runs on the global batch with one key: loss, update, statistics and dropout masks agree."""
    assert jax.device_count() >= 4, "conftest sets 4 CPU devices"
    s1, m1 = _one_step(1, batch, init_variables)
    s4, m4 = _one_step(4, batch, init_variables)
    assert np.isclose(m1["loss"], m4["loss"], rtol=1e-5), (m1["loss"], m4["loss"])
    assert int(s1.step) == int(s4.step) == 1 and not m1["nonfinite"]
    worst = max(float(np.max(np.abs(a - b)))
                for a, b in zip(jax.tree_util.tree_leaves(s1.params), jax.tree_util.tree_leaves(s4.params)))
    assert worst < 1e-4, worst  # measured 2e-5: the 1/keep scaling of dropout amplifies rounding
    # BatchNorm statistics are synchronised: running means agree too.
    for a, b in zip(jax.tree_util.tree_leaves(s1.batch_stats), jax.tree_util.tree_leaves(s4.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The step did something: parameters moved.
    leaves = zip(jax.tree_util.tree_leaves(init_variables["params"]), jax.tree_util.tree_leaves(s1.params))
    assert any(not np.allclose(a, b) for a, b in leaves)
    # And dropout was on: another key draws other masks and another loss (the same program).
    _, m1_other = _one_step(1, batch, init_variables, seed=1)
    assert not np.isclose(m1_other["loss"], m1["loss"], rtol=1e-3)


def test_mixing_stays_per_device(batch):
    """Each device augments and mixes its own shard with its own key, as before the step became plain jit."""
    config = defaults.get_config("c5", "smoke,circlemix")
    mesh, rng = step.make_mesh(4), jax.random.key(5)
    sharded = step.shard_batch(batch, mesh)
    x, soft, lam = step.parallel_prepare(config, mesh)(sharded["image"], sharded["label"], rng)
    for d in range(4):
        own = slice(2 * d, 2 * d + 2)
        want = step.prepare_images(config, step.step_keys(rng, 0, d)[0], batch["image"][own], batch["label"][own],
                                   normalise=False)
        np.testing.assert_allclose(np.asarray(x)[own], np.clip(want[0], 0, 1), atol=1e-6)
        np.testing.assert_allclose(np.asarray(soft)[own], want[1], atol=1e-6)
        np.testing.assert_allclose(np.asarray(lam)[own], want[2], atol=1e-6)


def test_lr_argument_sets_the_step_size(batch, init_variables):
    """The lr is a traced argument: lr 0 leaves the weights where they were (one program serves every fold)."""
    s0, m0 = _one_step(1, batch, init_variables, lr=0.0)
    for a, b in zip(jax.tree_util.tree_leaves(init_variables["params"]), jax.tree_util.tree_leaves(s0.params)):
        np.testing.assert_array_equal(a, b)
    assert float(m0["update_norm"]) == 0.0 and float(m0["grad_norm"]) > 0.0
    assert float(s0.opt_state.hyperparams["learning_rate"]) == 0.0


def test_learning_rate_schedule_divides_at_decay_at():
    config = _config()
    config.num_epochs, config.optim.lr, config.optim.decay_at, config.optim.decay_factor = 4, 0.01, 0.5, 0.1
    lrs = [step.learning_rate(config, 10, s) for s in range(40)]
    assert lrs[:20] == [0.01] * 20 and lrs[20:] == pytest.approx([0.001] * 20)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(batch=16, backend="gpu", cores=64, devices=1), 1),   # accelerators fill up on one batch
    (dict(batch=16, backend="cpu", cores=2, devices=1), 2),
    (dict(batch=16, backend="cpu", cores=64, devices=1), 4),   # capped: compile time grows per piece
    (dict(batch=12, backend="cpu", cores=5, devices=1), 4),    # largest divisor of 12 that is <= 5
    (dict(batch=7, backend="cpu", cores=4, devices=1), 1),     # a prime batch cannot be cut evenly
    (dict(batch=16, backend="cpu", cores=2, devices=4), 1),    # 4 fake devices on 2 cores: no spare cores
    (dict(batch=3, backend="cpu", cores=16, devices=2), 3),
    (dict(batch=0, backend="cpu", cores=2, devices=1), 1),
])
def test_eval_pieces_divides_the_batch_over_spare_cores(kwargs, expected):
    assert step.eval_pieces(**kwargs) == expected


def test_eval_in_pieces_gives_the_whole_batch_logits(batch, monkeypatch):
    """Cutting the eval batch changes nothing per example, in order (running BatchNorm stats)."""
    config = _config()
    model, mesh = step.make_model(config), step.make_mesh(1)
    x = (batch["image"].astype(np.float32) / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    variables = random_variables(model, 32, calibration=x)  # running statistics that fit these inputs
    state = step.init_state(variables, step.make_optimizer(config))
    logits, calls = {}, []
    for pieces in (1, 4):
        monkeypatch.setattr(step, "eval_pieces", lambda b, n=pieces: calls.append(b) or n)
        fn = step.parallel_eval_step(config, model, mesh)
        logits[pieces] = np.asarray(fn(step.replicate(state, mesh), batch["image"]))
    assert calls == [8, 8]
    whole = np.asarray(jax.jit(lambda v: model.apply(v, x, train=False))(variables))
    assert np.ptp(whole, axis=0).min() > 0.05  # examples differ, so a reordered piece would show
    # Rounding differs by about 1e-4: the matmuls block a batch of 2 differently from
    # one of 8, and the eval step fuses differently. A misplaced example is off by > 0.05.
    for got in (logits[4], logits[1]):
        np.testing.assert_allclose(got, whole, rtol=1e-3, atol=5e-4)
