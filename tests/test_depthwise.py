"""Parity of the depthwise op with XLA's grouped convolution: values and both gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from circlemix_jax.models import layers
from circlemix_jax.models.depthwise import depthwise_conv


def _same(n, k, s):
    """TF 'SAME' padding: the extra row/column goes at the end, so it is asymmetric when the total is odd."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pads(h, w, k, s, style):
    if style == "sym":
        return ((k // 2, k // 2), (k // 2, k // 2))
    return (_same(h, k, s), _same(w, k, s))


def _reference(x, kernel, stride, pads):
    return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _value_and_grads(conv, x, kernel, weights, stride, pads):
    """Output and the gradients of a random-weighted sum of it w.r.t. x and the kernel."""
    def loss(x, kernel):
        y = conv(x, kernel, stride, pads)
        return jnp.vdot(y, weights), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    return (y,) + grads


def _shift(x, kernel, stride, pads):
    return depthwise_conv(x, kernel, stride, pads, impl="shift")


@functools.partial(jax.jit, static_argnums=(2, 3))
def _inference(x, kernel, stride, pads):
    return _shift(x, kernel, stride, pads)


def _inputs(h, w, k, c=6, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32),
            jnp.asarray(rng.standard_normal((k, k, c)), jnp.float32))


def _assert_close(actual, expected, tol):
    scale = max(1.0, float(jnp.max(jnp.abs(expected))))
    np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                               rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("style", ["sym", "same"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("size", [(8, 8), (9, 7)], ids=["even", "odd"])
def test_shift_matches_grouped_conv(size, k, stride, style):
    h, w = size
    pads = _pads(h, w, k, stride, style)
    x, kernel = _inputs(h, w, k)
    y_ref = _reference(x, kernel, stride, pads)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), jnp.float32)
    expected = _value_and_grads(_reference, x, kernel, weights, stride, pads)
    actual = _value_and_grads(_shift, x, kernel, weights, stride, pads)
    for name, a, e in zip(("y", "dx", "dkernel"), actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        _assert_close(a, e, 1e-5)
    # Without autodiff the op computes the forward another way (one pad, not one per tap).
    _assert_close(_inference(x, kernel, stride, pads), y_ref, 1e-5)


@pytest.mark.parametrize("h,w,k,stride,pads", [
    (2, 3, 5, 1, ((2, 2), (2, 2))),   # some taps only ever see padding
    (5, 6, 3, 2, ((0, 0), (0, 0))),   # no padding
    (6, 5, 5, 2, ((1, 2), (2, 1))),   # lopsided, also towards the end
    (20, 19, 3, 1, ((1, 1), (1, 1))),  # more output rows than the kernel gradient sums per block
    (21, 17, 5, 2, ((2, 2), (1, 3))),
])
def test_shift_edge_geometries(h, w, k, stride, pads):
    x, kernel = _inputs(h, w, k, c=3)
    y_ref = _reference(x, kernel, stride, pads)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(y_ref.shape), jnp.float32)
    expected = _value_and_grads(_reference, x, kernel, weights, stride, pads)
    actual = _value_and_grads(_shift, x, kernel, weights, stride, pads)
    for a, e in zip(actual, expected):
        _assert_close(a, e, 1e-5)
    _assert_close(_inference(x, kernel, stride, pads), y_ref, 1e-5)


@pytest.mark.parametrize("impl", ["shift", "xla"])
def test_bfloat16_keeps_dtype(impl):
    x, kernel = _inputs(8, 8, 3)
    pads = ((0, 1), (0, 1))
    conv = functools.partial(depthwise_conv, impl=impl)
    y32 = _reference(x, kernel, 2, pads)
    weights = jnp.ones(y32.shape, jnp.bfloat16)
    y, dx, dk = _value_and_grads(conv, x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), weights, 2, pads)
    assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
    _assert_close(y, y32, 5e-2)
    # A float32 kernel with a bfloat16 input computes in bfloat16.
    assert depthwise_conv(x.astype(jnp.bfloat16), kernel, 2, pads, impl=impl).dtype == jnp.bfloat16


def test_xla_impl_matches_reference():
    x, kernel = _inputs(9, 7, 5)
    pads = _pads(9, 7, 5, 2, "same")
    _assert_close(depthwise_conv(x, kernel, 2, pads, impl="xla"), _reference(x, kernel, 2, pads), 1e-6)


def test_auto_layers_resolve_per_backend():
    assert jax.default_backend() == "cpu"
    assert layers.resolve("auto") == "cpu"
    assert layers.resolve("auto", backend="gpu") == "xla"
    assert layers.resolve("auto", backend="tpu") == "xla"
    assert layers.resolve("cpu", backend="tpu") == "cpu"
    assert layers.layers("auto", backend="gpu") is layers.XLA
    assert layers.layers("cpu") is layers.CPU
    with pytest.raises(ValueError, match="model.layers"):
        layers.resolve("fast")


def test_rejects_bad_arguments():
    x, kernel = _inputs(8, 8, 3)
    with pytest.raises(ValueError, match="impl"):
        depthwise_conv(x, kernel, 1, ((1, 1), (1, 1)), impl="conv")
    with pytest.raises(ValueError, match="x must be"):
        depthwise_conv(x[..., :4], kernel, 1, ((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="padding"):
        depthwise_conv(x, kernel, 1, ((-1, 1), (1, 1)))
    with pytest.raises(ValueError, match="empty output"):
        depthwise_conv(x[:, :1, :1], kernel, 1, ((0, 0), (0, 0)))


def test_kernel_gradient_with_a_sharded_batch_matches_xla():
    # The train step is plain jit: it differentiates a replicated kernel against a batch
    # split over devices, and XLA's partitioner must sum the custom VJP's per-device
    # kernel gradients. Both impls, sharded, against the unsharded grouped convolution.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(jax.devices()[:2], ("data",))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9, 9, 6)), jnp.float32)
    k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 6)), jnp.float32)

    def loss(impl, k, x):
        return jnp.mean(depthwise_conv(x, k, 2, ((0, 1), (0, 1)), impl=impl) ** 2)

    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    want = jax.grad(functools.partial(loss, "xla"))(k, x)
    for impl in ("shift", "xla"):
        grad = jax.jit(jax.grad(functools.partial(loss, impl)), in_shardings=(replicated, split),
                       out_shardings=replicated)(k, x)
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)
