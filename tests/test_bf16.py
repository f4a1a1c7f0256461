"""Mixed precision: bfloat16 compute with float32 parameters still trains."""

import jax
import jax.numpy as jnp
import numpy as np
from fake_run import random_variables

from circlemix_jax import defaults, step


def _config():
    config = defaults.get_config("c5", "smoke")
    with config.unlocked():
        config.model.dtype = "bfloat16"
        config.mix.method = "none"
        config.augment.basic = False  # a fixed batch, so the loss curve reflects optimisation only
        config.model.dropout_rate = 0.0
        config.model.drop_path_rate = 0.0
        # 0.05 sits at the edge of stability for BatchNorm over 10 images: float32 spikes too
        # (loss 1.8 -> 3.1 at step 6) and bf16 can end high. At 0.01 both fall smoothly
        # (12 steps: float32 1.82 -> 0.08, bf16 1.82 -> 0.013; BENCHMARKS.md).
        config.optim.lr = 0.01
    return config


def _easy_batch(n=10, size=32, classes=5):
    # Each class has its own flat colour plus noise: separable, so a few steps must fit it.
    rng = np.random.default_rng(0)
    labels = np.arange(n, dtype=np.int32) % classes
    colours = rng.integers(0, 256, (classes, 3))
    images = np.clip(colours[labels][:, None, None, :] + rng.normal(0, 20, (n, size, size, 3)), 0, 255)
    return {"image": images.astype(np.uint8), "label": labels}


def test_bf16_computes_in_bf16_with_float32_params():
    config = _config()
    model = step.make_model(config)
    x = jnp.zeros((2, 32, 32, 3))
    # Shapes and dtypes only: tracing needs no compilation, so this test stays fast.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    forward = lambda v: model.apply(v, x, train=True, mutable=["batch_stats"])[0]
    jaxpr = str(jax.make_jaxpr(forward)(variables))
    heavy = [ln for ln in jaxpr.splitlines() if "dot_general" in ln or "conv_general_dilated" in ln]
    assert heavy and all("bf16[" in ln for ln in heavy), [ln for ln in heavy if "bf16[" not in ln][:3]
    assert jax.eval_shape(forward, variables).dtype == jnp.float32  # loss and softmax stay float32


def test_bf16_training_converges():
    config = _config()
    mesh = step.make_mesh(1)
    model = step.make_model(config)
    tx = step.make_optimizer(config)
    variables = random_variables(model, 32)
    state = step.replicate(step.init_state(variables, tx), mesh)
    train = step.parallel_train_step(config, model, tx, mesh)
    batch = step.shard_batch(_easy_batch(), mesh)
    losses = []
    for _ in range(12):
        state, metrics = train(state, batch, jax.random.key(1), np.float32(config.optim.lr))
        losses.append(float(metrics["loss"]))
        assert not bool(metrics["nonfinite"]), losses
    assert {p.dtype for p in jax.tree_util.tree_leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses
