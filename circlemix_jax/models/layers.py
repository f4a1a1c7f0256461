"""The three layer kinds EfficientNet-B0 repeats, in two interchangeable sets.

B0 is 1×1 convolutions, depthwise convolutions and BatchNorm, over and over.
`efficientnet.py` takes them as constructors (flax's `ModuleDef` idiom), so the
architecture never changes when the implementation does:

- `XLA`: flax's `nn.Conv` and `nn.BatchNorm`, and XLA's grouped convolution for
  the depthwise one. The plain formulation, and the fastest where cuDNN or the
  TPU compiler have dedicated kernels.
- `CPU`: hand-written forms that XLA:CPU runs faster (BENCHMARKS.md has the
  timings): a 1×1 convolution as one matmul with its own weight gradient, a
  BatchNorm applied as one affine map, and shift-and-add depthwise convolution.

Both sets create the same parameter and statistics names and shapes, so a
checkpoint or converted weights load into either, and the two give the same
logits and gradients up to float rounding (tests/test_model.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from circlemix_jax.models.depthwise import depthwise_conv

ModuleDef = Callable[..., nn.Module]
CHOICES = ("auto", "xla", "cpu")

KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_padding(size: int, kernel: int, stride: int, mode: str) -> tuple[int, int]:
    """Explicit (before, after) padding of one spatial axis.

    Args:
      size: input length along the axis.
      kernel: kernel length.
      stride: stride along the axis.
      mode: 'symmetric' pads (k-1)/2 on both sides, as PyTorch-trained weights
        expect; 'same' is TensorFlow's SAME, which pads the extra pixel after
        and so shifts stride-2 outputs by half a pixel. Weights ported from TF
        (tf_efficientnet_b0, efficientnet_pytorch, Keras) only reproduce their
        logits with 'same'.

    Returns:
      (before, after) padding in pixels.
    """
    if mode == "symmetric":
        return (kernel - 1) // 2, (kernel - 1) // 2
    if mode == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2
    raise ValueError(f"padding must be one of ('symmetric', 'same'), got {mode!r}")


def spatial_padding(x: jax.Array, kernel: int, stride: int, mode: str) -> tuple[tuple[int, int], ...]:
    """`conv_padding` of both spatial axes of an NHWC array."""
    return tuple(conv_padding(s, kernel, stride, mode) for s in x.shape[1:3])


class DepthwiseConv(nn.Module):
    """Per-channel k×k convolution without bias; kernel shape (k, k, C)."""

    kernel_size: int
    stride: int
    padding: str
    dtype: Any = jnp.float32
    impl: str = "xla"  # `depthwise.depthwise_conv`'s formulation

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=(0, 1),
                                                                        out_axis=()), (k, k, x.shape[-1]), jnp.float32)
        x = x.astype(self.dtype)
        return depthwise_conv(x, kernel.astype(self.dtype), self.stride,
                              spatial_padding(x, k, self.stride, self.padding), impl=self.impl)


def conv1x1(features: int, use_bias: bool = False, dtype: Any = jnp.float32, name: str | None = None) -> nn.Module:
    """flax's 1×1 `nn.Conv` with B0's initialisation."""
    return nn.Conv(features, (1, 1), use_bias=use_bias, dtype=dtype, kernel_init=KERNEL_INIT, name=name)


class MatmulConv1x1(nn.Module):
    """A 1×1 convolution computed as a matmul over the channel axis.

    The parameters of `conv1x1` (kernel (1, 1, Cin, Cout), optional bias). Written
    as `jnp.dot` because XLA:CPU lowers it to one GEMM whose weight gradient needs
    no transposed copies of the activations (`channel_matmul`).
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", KERNEL_INIT, (1, 1, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = channel_matmul(x, kernel[0, 0].astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
        return y


@jax.custom_vjp
def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` over the last axis of `x` (N-d activations, 2-d weight), with a hand-written VJP.

    The weight gradient is one `dot_general` contracting every pixel axis of `x` and
    of the output gradient into (Cin, Cout). Autodiff of `jnp.dot` instead yields
    (Cout, Cin) and a transpose, and XLA:CPU first copies the activation gradient
    to a transposed layout, several times slower on B0's expand convolutions.
    """
    return jnp.dot(x, w)


def _channel_matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _channel_matmul_bwd(res, g):
    x, w = res
    pixels = tuple(range(x.ndim - 1))
    dw = jax.lax.dot_general(x, g, ((pixels, pixels), ((), ())))
    return jnp.dot(g, w.T).astype(x.dtype), dw.astype(w.dtype)


channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


class AffineBatchNorm(nn.Module):
    """BatchNorm over (N, H, W) with `nn.BatchNorm`'s variables and statistics.

    Same names and shapes as `nn.BatchNorm` (params scale/bias, batch_stats
    mean/var, biased batch variance, running averages with `momentum`), but it normalises as one per-channel affine map
    `x * a + b` with `a = scale / sqrt(var + eps)`, `b = bias - mean * a`.
    Autodiff of that form needs one fused reduction and one elementwise pass
    backward; flax's `(x - mean) * mul + bias` is several times slower forward and
    backward on XLA:CPU (BENCHMARKS.md). Statistics and the affine map are float32; the output is
    cast to `dtype`.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            mean, mean2 = jnp.mean(xf, axis=(0, 1, 2)), jnp.mean(jnp.square(xf), axis=(0, 1, 2))
            var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        b = bias - mean * a
        return (x.astype(jnp.float32) * a + b).astype(self.dtype)


def _flax_batch_norm(use_running_average: bool, momentum: float, epsilon: float, dtype: Any,
                     name: str | None = None) -> nn.Module:
    # Statistics in float32 whatever the compute dtype, as AffineBatchNorm.
    return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum, epsilon=epsilon, dtype=dtype,
                        param_dtype=jnp.float32, force_float32_reductions=True, name=name)


@dataclasses.dataclass(frozen=True)
class Layers:
    """Constructors of B0's three layer kinds.

    Attributes:
      pointwise: (features, use_bias, dtype, name=) -> a 1×1 convolution.
      depthwise: (kernel_size, stride, padding, dtype, name=) -> a depthwise convolution.
      norm: (use_running_average, momentum, epsilon, dtype, name=) -> BatchNorm.
    """

    pointwise: ModuleDef
    depthwise: ModuleDef
    norm: ModuleDef


XLA = Layers(pointwise=conv1x1, depthwise=functools.partial(DepthwiseConv, impl="xla"), norm=_flax_batch_norm)
CPU = Layers(pointwise=MatmulConv1x1, depthwise=functools.partial(DepthwiseConv, impl="shift"), norm=AffineBatchNorm)


def resolve(choice: str = "auto", backend: str | None = None) -> str:
    """'xla' or 'cpu': `choice`, or with 'auto' 'cpu' on a CPU backend and 'xla' elsewhere.

    Raises:
      ValueError: `choice` is not one of CHOICES.
    """
    if choice not in CHOICES:
        raise ValueError(f"model.layers must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice
    return "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"


def layers(choice: str = "auto", backend: str | None = None) -> Layers:
    """The layer set `resolve(choice, backend)` names."""
    return CPU if resolve(choice, backend) == "cpu" else XLA
