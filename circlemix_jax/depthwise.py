"""Depthwise convolution (provisional shift-and-add; the tuned version replaces this file)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax import lax


def _xla(x, kernel, stride, padding):
    return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1])


def _shift(x, kernel, stride, padding):
    kh, kw, _ = kernel.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1,
                                               xp.shape[3]), (1, stride, stride, 1))
            term = tap * kernel[i, j]
            out = term if out is None else out + term
    return out


def depthwise_conv(x, kernel, stride, padding, impl="auto"):
    """Per-channel convolution of NHWC `x` with a (kh, kw, C) kernel and explicit padding."""
    if impl == "auto":
        impl = os.environ.get("CIRCLEMIX_DEPTHWISE") or ("shift" if jax.default_backend() == "cpu" else "xla")
    return (_shift if impl == "shift" else _xla)(x, kernel, stride, padding)
