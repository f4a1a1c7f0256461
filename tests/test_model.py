"""EfficientNet-B0 structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_run import random_variables

from circlemix_jax.models import EfficientNetB0, count_params, layers
from circlemix_jax.models.layers import channel_matmul, conv_padding


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_parameter_count_matches_reference_b0(padding):
    model = EfficientNetB0(num_classes=1000, padding=padding)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    assert count_params(variables["params"]) == 5_288_548
    assert len([k for k in variables["params"] if k.startswith("blocks_")]) == 16


def test_output_shape_and_train_mode():
    model = EfficientNetB0(num_classes=5)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    # Flax's init checked by shapes only: compiling it (or running it eagerly) costs far more.
    variables = random_variables(model, 64)
    logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    out, updates = jax.jit(lambda v: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)},
                                                 mutable=["batch_stats"]))(variables)
    assert out.shape == (2, 5)
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                                     updates["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))  # every BatchNorm updated its statistics


@pytest.mark.parametrize("size, k, s", [(224, 3, 2), (225, 3, 2), (256, 5, 2), (15, 5, 1), (7, 3, 2)])
def test_same_padding_matches_lax_same(size, k, s):
    # lax's 'SAME' is TF's rule; our explicit pads must reproduce it exactly.
    lo, hi = conv_padding(size, k, s, "same")
    expected = jax.lax.padtype_to_pads((size,), (k,), (s,), "SAME")[0]
    assert (lo, hi) == tuple(expected)
    assert conv_padding(size, k, s, "symmetric") == ((k - 1) // 2, (k - 1) // 2)


def test_bad_padding_is_refused():
    with pytest.raises(ValueError, match="padding"):
        EfficientNetB0(num_classes=2, padding="valid").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (6, 8, 1)])
def test_channel_matmul_gradients_match_autodiff_of_dot(shape):
    """The hand-written VJP of the 1x1 convolutions against autodiff of jnp.dot (values and both gradients)."""
    *lead, cin, cout = shape
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (*lead, cin))
    w = jax.random.normal(kw, (cin, cout))
    g = jax.random.normal(kg, (*lead, cout))
    ours, our_vjp = jax.vjp(channel_matmul, x, w)
    ref, ref_vjp = jax.vjp(jnp.dot, x, w)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(our_vjp(g), ref_vjp(g)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


_LAYER_CASES = {
    "pointwise": lambda ls: ls.pointwise(7, True, jnp.float32),
    "depthwise": lambda ls: ls.depthwise(5, 2, "same", jnp.float32),
    "norm_train": lambda ls: ls.norm(False, 0.9, 1e-3, jnp.float32),
    "norm_eval": lambda ls: ls.norm(True, 0.9, 1e-3, jnp.float32),
}


@pytest.mark.parametrize("kind", sorted(_LAYER_CASES))
def test_cpu_and_xla_layers_compute_the_same_function(kind):
    """Each CPU-fast layer against flax's: the same variables, outputs, statistics and gradients."""
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, size=(3, 9, 9, 6)), jnp.float32)
    fast, plain = _LAYER_CASES[kind](layers.CPU), _LAYER_CASES[kind](layers.XLA)
    variables = fast.init(jax.random.key(0), x)
    if "batch_stats" in variables:  # running statistics that differ from the init values
        variables = {**variables, "batch_stats": {"mean": jnp.arange(6.0) / 6, "var": jnp.arange(1.0, 7.0)}}
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(plain.init(jax.random.key(0), x))
    g = jnp.asarray(np.random.default_rng(1).normal(size=fast.apply(variables, x, mutable=True)[0].shape))

    def outputs_and_grads(layer):
        def loss(params, x):
            out, updated = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(out * g), (out, updated)
        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

    ours, theirs = outputs_and_grads(fast), outputs_and_grads(plain)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_both_layer_sets_build_one_parameter_tree():
    x = jnp.zeros((1, 64, 64, 3))
    trees = [jax.eval_shape(lambda ls=ls: EfficientNetB0(num_classes=3, layers=ls).init(jax.random.key(0), x))
             for ls in (layers.CPU, layers.XLA)]
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), trees[0]) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), trees[1])
