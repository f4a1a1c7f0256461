"""EfficientNet-B0 in Flax linen, laid out so ImageNet weights from timm,
torchvision, efficientnet_pytorch and Keras map onto it one tensor at a time.

Parameter tree (what `convert.py` targets):

    stem_conv/kernel, stem_bn/{scale,bias}
    blocks_{i}/{expand_conv, expand_bn, dw_conv, dw_bn, se_reduce, se_expand,
                project_conv, project_bn}          (i = 0..15; block 0 has no expand)
    head_conv/kernel, head_bn, classifier/{kernel,bias}

Depthwise kernels are stored as (kh, kw, C) and run through
`depthwise.depthwise_conv`, which picks the fastest formulation per backend.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from circlemix_jax.depthwise import depthwise_conv, vary_like

# (expand_ratio, kernel, stride, out_channels, repeats) for B0, from the paper
# by Tan & Le (2019), identical in all four reference implementations.
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
PADDINGS = ("symmetric", "same")


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
    raise ValueError(f"padding must be one of {PADDINGS}, got {mode!r}")


def _pads(x: jax.Array, kernel: int, stride: int, mode: str) -> tuple[tuple[int, int], ...]:
    return tuple(conv_padding(s, kernel, stride, mode) for s in x.shape[1:3])


class DepthwiseConv(nn.Module):
    """Per-channel k×k convolution without bias; kernel shape (k, k, C)."""

    kernel_size: int
    stride: int
    padding: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal", in_axis=(0, 1), out_axis=()),
            (k, k, x.shape[-1]), jnp.float32,
        )
        x = x.astype(self.dtype)
        return depthwise_conv(x, kernel.astype(self.dtype), self.stride, _pads(x, k, self.stride, self.padding))


class Conv1x1(nn.Module):
    """A 1×1 convolution computed as a matmul over the channel axis.

    Same parameters as `nn.Conv(features, (1, 1))` (kernel (1, 1, Cin, Cout),
    optional bias), so converted weights load unchanged. Written as `jnp.dot`
    because XLA:CPU lowers it to one GEMM whose weight gradient needs no
    transposed copies of the activations; measured 7-30% faster forward+backward
    than `conv_general_dilated` on B0's shapes (BENCHMARKS.md).
    """

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                            (1, 1, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        y = channel_matmul(x, vary_like(kernel[0, 0].astype(self.dtype), x))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32).astype(self.dtype)
        return y


@jax.custom_vjp
def channel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` over the last axis of `x` (N-d activations, 2-d weight), with a hand-written VJP.

    The weight gradient is one `dot_general` contracting every pixel axis of `x` and
    of the output gradient into (Cin, Cout). Autodiff of `jnp.dot` instead yields
    (Cout, Cin) and a transpose, and XLA:CPU first copies the activation gradient to
    a transposed layout: 21.7 ms against 4.1 ms for blocks_1's expand conv
    (16x64x64x16 -> 96) on this CPU (BENCHMARKS.md).
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


class BatchNorm(nn.Module):
    """BatchNorm over (N, H, W) with `nn.BatchNorm`'s variables and statistics.

    Same names and shapes as `nn.BatchNorm` (params scale/bias, batch_stats
    mean/var, biased batch variance, running averages with `momentum`, stats
    pmean-ed over `axis_name`), but it normalises as one per-channel affine map
    `x * a + b` with `a = scale / sqrt(var + eps)`, `b = bias - mean * a`. Autodiff
    of that form needs one fused reduction and one elementwise pass backward;
    flax's `(x - mean) * mul + bias` measured 3x slower forward+backward on this
    CPU (16x64x64x96: 48 ms vs 17 ms; BENCHMARKS.md). Statistics and the affine
    map are float32; the output is cast to `dtype`.
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    axis_name: str | None = None

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
            stats = jnp.concatenate([jnp.mean(xf, axis=(0, 1, 2)), jnp.mean(jnp.square(xf), axis=(0, 1, 2))])
            if self.axis_name is not None and not self.is_initializing():
                stats = jax.lax.pmean(stats, self.axis_name)
            mean, mean2 = stats[:features], stats[features:]
            var = jnp.maximum(mean2 - jnp.square(mean), 0.0)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
        a = scale * jax.lax.rsqrt(var + self.epsilon)
        b = bias - mean * a
        return (x.astype(jnp.float32) * a + b).astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite (depthwise-separable when expand=1)."""

    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    drop_path: float
    padding: str
    bn: Any  # partially applied nn.BatchNorm
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda feats, name, bias=False: Conv1x1(feats, bias, self.dtype, name=name)  # noqa: E731
        in_ch = x.shape[-1]
        h = x
        if self.expand_ratio != 1:
            h = nn.silu(self.bn(name="expand_bn")(conv(in_ch * self.expand_ratio, "expand_conv")(h)))
        h = DepthwiseConv(self.kernel_size, self.stride, self.padding, self.dtype, name="dw_conv")(h)
        h = nn.silu(self.bn(name="dw_bn")(h))
        # Squeeze-excite width is 0.25 of the block's *input* channels, as in B0.
        s = jnp.mean(h, axis=(1, 2), keepdims=True)
        s = nn.silu(conv(max(1, int(in_ch * 0.25)), "se_reduce", bias=True)(s))
        s = nn.sigmoid(conv(h.shape[-1], "se_expand", bias=True)(s))
        h = h * s
        h = self.bn(name="project_bn")(conv(self.out_channels, "project_conv")(h))
        if self.stride == 1 and in_ch == self.out_channels:
            h = DropPath(self.drop_path)(h, deterministic=not train) + x
        return h


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 classifier, NHWC input, returns logits.

    Attributes:
      num_classes: size of the classifier.
      padding: 'symmetric' (PyTorch-trained weights) or 'same' (TF-ported weights).
      bn_eps: BatchNorm epsilon; 1e-5 for PyTorch-trained, 1e-3 for TF-ported weights.
      bn_momentum: running-average decay of BatchNorm statistics (Flax convention,
        i.e. 1 - PyTorch momentum).
      dropout_rate: dropout before the classifier.
      drop_path_rate: stochastic depth of the last block; block i gets rate * i / 16.
      dtype: compute dtype (parameters always stay float32).
      axis_name: mesh axis over which BatchNorm statistics are averaged in
        training, so a data-parallel step normalises with global batch statistics.
    """

    num_classes: int
    padding: str = "symmetric"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.2
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        bn = lambda name: BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps,
            dtype=self.dtype, axis_name=self.axis_name if train else None, name=name)
        x = x.astype(self.dtype)
        x = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding=_pads(x, 3, 2, self.padding), use_bias=False,
                    dtype=self.dtype, name="stem_conv",
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))(x)
        x = nn.silu(bn("stem_bn")(x))
        num_blocks = sum(stage[-1] for stage in B0_STAGES)
        idx = 0
        for expand, kernel, stride, out, repeats in B0_STAGES:
            for r in range(repeats):
                x = MBConv(out, expand, kernel, stride if r == 0 else 1,
                           self.drop_path_rate * idx / num_blocks, self.padding, bn, self.dtype,
                           name=f"blocks_{idx}")(x, train)
                idx += 1
        x = Conv1x1(HEAD_CHANNELS, dtype=self.dtype, name="head_conv")(x)
        x = nn.silu(bn("head_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        # Logits in float32 so the loss and softmax stay accurate under bfloat16 compute.
        return x.astype(jnp.float32)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))


def block_names() -> Sequence[str]:
    """Names of the 16 MBConv blocks in order."""
    return [f"blocks_{i}" for i in range(sum(s[-1] for s in B0_STAGES))]
