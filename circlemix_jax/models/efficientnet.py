"""EfficientNet-B0 in Flax linen, laid out so ImageNet weights from timm,
torchvision, efficientnet_pytorch and Keras map onto it one tensor at a time.

The network is `B0_STAGES`, Table 1 of Tan & Le (2019): a stem, seven stages of
MBConv blocks, a head. Its layers come from a `layers.Layers` set, so the
CPU-fast implementations can replace flax's without touching this file.

Parameter tree (what `convert.py` targets):

    stem_conv/kernel, stem_bn/{scale,bias}
    blocks_{i}/{expand_conv, expand_bn, dw_conv, dw_bn, se_reduce, se_expand,
                project_conv, project_bn}          (i = 0..15; block 0 has no expand)
    head_conv/kernel, head_bn, classifier/{kernel,bias}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from circlemix_jax.models import layers as layerlib
from circlemix_jax.models.layers import KERNEL_INIT, Layers, spatial_padding

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
    bn: Any  # (name) -> this network's BatchNorm
    layers: Layers
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = lambda feats, name, bias=False: self.layers.pointwise(feats, bias, self.dtype, name=name)
        in_ch = x.shape[-1]
        h = x
        if self.expand_ratio != 1:
            h = nn.silu(self.bn(name="expand_bn")(conv(in_ch * self.expand_ratio, "expand_conv")(h)))
        h = self.layers.depthwise(self.kernel_size, self.stride, self.padding, self.dtype, name="dw_conv")(h)
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
      layers: the implementations of the 1×1, depthwise and BatchNorm layers
        (`layers.XLA` or `layers.CPU`); they compute the same function.
    """

    num_classes: int
    padding: str = "symmetric"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dropout_rate: float = 0.2
    drop_path_rate: float = 0.2
    dtype: Any = jnp.float32
    layers: Layers = layerlib.XLA

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {self.padding!r}")
        bn = lambda name: self.layers.norm(not train, self.bn_momentum, self.bn_eps, self.dtype, name=name)
        x = x.astype(self.dtype)
        x = nn.Conv(STEM_CHANNELS, (3, 3), (2, 2), padding=spatial_padding(x, 3, 2, self.padding), use_bias=False,
                    dtype=self.dtype, name="stem_conv", kernel_init=KERNEL_INIT)(x)
        x = nn.silu(bn("stem_bn")(x))
        num_blocks = sum(stage[-1] for stage in B0_STAGES)
        idx = 0
        for expand, kernel, stride, out, repeats in B0_STAGES:
            for r in range(repeats):
                x = MBConv(out, expand, kernel, stride if r == 0 else 1,
                           self.drop_path_rate * idx / num_blocks, self.padding, bn, self.layers, self.dtype,
                           name=f"blocks_{idx}")(x, train)
                idx += 1
        x = self.layers.pointwise(HEAD_CHANNELS, False, self.dtype, name="head_conv")(x)
        x = nn.silu(bn("head_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        # Logits in float32 so the loss and softmax stay accurate under bfloat16 compute.
        return x.astype(jnp.float32)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
