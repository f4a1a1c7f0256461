"""Depthwise 2-D convolution: XLA's grouped convolution, or shift-and-add for XLA:CPU.

On CPU, XLA's grouped convolution (``feature_group_count=C``) is several times
slower forward+backward than adding up the k×k shifted taps (both give identical
results; BENCHMARKS.md has the timings). `depthwise_conv` offers both; which
one a model uses is chosen with its other layers (`models.layers`):

- ``'shift'``: shift-and-add with a hand-written backward pass (`jax.custom_vjp`,
  so reverse mode only: `jax.jvp` through it raises). Plain autodiff of
  shift-and-add is itself slow on CPU: each kernel-gradient reduction becomes a
  YNNPACK fusion that cannot read a slice, so XLA writes every shifted tap of the
  input to memory first (one full-size array per tap). The train step
  differentiates it under plain `jax.jit` with the batch split over devices, and
  XLA's partitioner sums the per-device kernel gradients. Differentiating it
  inside `jax.shard_map` with a replicated kernel would need the kernel cast to
  device-varying first (`lax.pcast`): a custom VJP must return cotangents of its
  inputs' exact types. The same holds for `layers.channel_matmul`.
- ``'xla'``: ``lax.conv_general_dilated(feature_group_count=C)``. Chosen on
  GPU/TPU, where cuDNN and the TPU compiler have dedicated depthwise kernels; we
  could not time those here; ``model.layers='cpu'`` runs 'shift' anywhere, to compare.

Implementation notes for 'shift' (what XLA:CPU did with each form we tried):

- XLA:CPU lowers a pad fused into a loop to a per-element pointer select,
  which becomes scalar gathers. With at most `_PER_TAP_PAD_MAX_TAPS` taps, one
  small pad per tap inside the fused loop is still the fastest. With more taps
  (5×5), padding the input once and taking plain slices is faster.
- Negative padding would be split by XLA into a shared pad plus slices, and a
  shared pad gets written out. So each tap slices only its valid region and
  pads that back with non-negative widths.
- Without autodiff (eval, predict), x's producer (BatchNorm and SiLU of the
  expand conv) is not otherwise written to memory, and XLA fuses it into each
  per-tap pad: kh*kw evaluations of SiLU per output. The inference forward
  therefore always pads once, which fuses the producer into that one pad
  (BENCHMARKS.md, "Eval: SiLU was computed once per depthwise tap").
- The kernel gradient gathers all taps into one (N, rows/R, W, taps, C) fused
  loop that sums R rows. Each input row is then read once for all taps. A
  `lax.rev` stops YNNPACK from pulling that loop into its reduction, which would
  write every gathered tap out again.
- When y's only consumer is a reduction (a scalar test loss such as
  ``sum(y * g)``), YNNPACK pulls the forward into that reduction and writes out
  every tap. In the model, BatchNorm reads y several times, so this does not
  happen there. We tried blocking it with a no-op `lax.reduce_precision` or
  `lax.rev` at the root. XLA then copied the forward into every BatchNorm
  consumer, which was slower still, so there is no blocker.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IMPLS = ("shift", "xla")
# Above this many taps, padding the input once beats one fused pad per tap (see module docstring).
_PER_TAP_PAD_MAX_TAPS = 9
# The kernel gradient sums up to this many output rows inside the fused loop before reducing.
_DK_ROWS = 16

Padding = tuple[tuple[int, int], tuple[int, int]]


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding,
                   impl: str = "xla") -> jax.Array:
    """Convolves each channel of `x` with its own kh×kw filter (no channel multiplier).

    Args:
      x: (N, H, W, C) input.
      kernel: (kh, kw, C) filters. Cast to x's dtype; the computation runs in
        x's dtype (the kernel gradient is accumulated in float32).
      stride: the same stride for H and W.
      padding: explicit ((top, bottom), (left, right)) zero padding, e.g.
        symmetric PyTorch style or asymmetric TF 'SAME' style.
      impl: 'xla' (grouped convolution) or 'shift' (shift-and-add, reverse-mode
        differentiable only).

    Returns:
      (N, Ho, Wo, C) array in x's dtype, Ho = (H + top + bottom - kh) // stride + 1.
    """
    kh, kw, c = kernel.shape
    if x.ndim != 4 or x.shape[-1] != c:
        raise ValueError(f"x must be (N, H, W, {c}) for a kernel of shape {kernel.shape}, got {x.shape}")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2 or min(min(p) for p in pads) < 0:
        raise ValueError(f"padding must be ((top, bottom), (left, right)) with non-negative ints, got {padding}")
    stride = int(stride)
    if stride < 1 or _out_size(x.shape[1], pads[0], kh, stride) < 1 or _out_size(x.shape[2], pads[1], kw, stride) < 1:
        raise ValueError(f"empty output for x {x.shape}, kernel {kernel.shape}, stride {stride}, padding {pads}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    kernel = kernel.astype(x.dtype)
    if impl == "xla":
        return lax.conv_general_dilated(x, kernel[:, :, None, :], (stride, stride), pads,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return _shift_conv(x, kernel, stride, pads)


def _out_size(n: int, pad: tuple[int, int], k: int, s: int) -> int:
    return (n + pad[0] + pad[1] - k) // s + 1


def _valid(n_in: int, n_out: int, lo: int, i: int, s: int) -> tuple[int, int, int]:
    """Output range [o0, o1) whose tap-i input o*s + i - lo is inside the image, and that first input index."""
    o0 = max(0, -(-(lo - i) // s))
    o1 = min(n_out, (n_in - 1 + lo - i) // s + 1)
    return o0, max(o0, o1), o0 * s + i - lo


def _strided(a: jax.Array, r0: int, c0: int, rows: int, cols: int, s: int) -> jax.Array:
    n, _, _, c = a.shape
    return lax.slice(a, (0, r0, c0, 0), (n, r0 + (rows - 1) * s + 1, c0 + (cols - 1) * s + 1, c), (1, s, s, 1))


def _sum(terms: list[jax.Array], shape, dtype) -> jax.Array:
    # A serial chain fuses into one loop and measured faster than a tree on XLA:CPU.
    if not terms:
        return jnp.zeros(shape, dtype)
    return functools.reduce(lambda a, b: a + b, terms)


def _forward(x, k, s, pads, pad_once=False):
    n, h, w, c = x.shape
    kh, kw, _ = k.shape
    ho, wo = _out_size(h, pads[0], kh, s), _out_size(w, pads[1], kw, s)
    terms = []
    if pad_once or kh * kw > _PER_TAP_PAD_MAX_TAPS:
        xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
        for i in range(kh):
            for j in range(kw):
                terms.append(_strided(xp, i, j, ho, wo, s) * k[i, j])
        return _sum(terms, None, None)
    for i in range(kh):
        h0, h1, a0 = _valid(h, ho, pads[0][0], i, s)
        for j in range(kw):
            w0, w1, b0 = _valid(w, wo, pads[1][0], j, s)
            if h1 > h0 and w1 > w0:  # taps that only ever see padding contribute nothing
                t = _strided(x, a0, b0, h1 - h0, w1 - w0, s) * k[i, j]
                place = ((0, 0, 0), (h0, ho - h1, 0), (w0, wo - w1, 0), (0, 0, 0))
                terms.append(lax.pad(t, jnp.zeros((), x.dtype), place))
    return _sum(terms, (n, ho, wo, c), x.dtype)


def _grad_x_per_tap(dy, k, s, pads, h, w):
    """dx as a sum over taps of the valid part of dy·k[i, j], zero-dilated (stride) and placed by a pad."""
    n, ho, wo, c = dy.shape
    kh, kw, _ = k.shape
    terms = []
    for i in range(kh):
        h0, h1, a0 = _valid(h, ho, pads[0][0], i, s)
        for j in range(kw):
            w0, w1, b0 = _valid(w, wo, pads[1][0], j, s)
            if h1 > h0 and w1 > w0:
                g = lax.slice(dy, (0, h0, w0, 0), (n, h1, w1, c)) * k[i, j]
                hi_h, hi_w = h - (a0 + (h1 - h0 - 1) * s + 1), w - (b0 + (w1 - w0 - 1) * s + 1)
                place = ((0, 0, 0), (a0, hi_h, s - 1), (b0, hi_w, s - 1), (0, 0, 0))  # interior = stride zeros
                terms.append(lax.pad(g, jnp.zeros((), dy.dtype), place))
    return _sum(terms, (n, h, w, c), dy.dtype)


def _grad_x_polyphase(dy, k, s, pads, h, w):
    """dx by output phase: phase (a, b) = rows a::s, cols b::s is a stride-1 correlation of dy with the taps
    that reach it, so no multiply lands on a dilation zero; the s×s phases are interleaved by a reshape."""
    n, ho, wo, c = dy.shape
    kh, kw, _ = k.shape

    def plan(size, lo, taps):  # per phase: (rows in phase, [(tap, dy offset)])
        return [(-(-(size - a) // s), [(i, (a + lo - i) // s) for i in range(taps) if (a + lo - i) % s == 0])
                for a in range(s)]

    ph, pw = plan(h, pads[0][0], kh), plan(w, pads[1][0], kw)
    mh, mw = ph[0][0], pw[0][0]  # phase 0 is the longest
    qh = [q for _, t in ph for _, q in t] or [0]
    qw = [q for _, t in pw for _, q in t] or [0]
    lh, lw = max(0, -min(qh)), max(0, -min(qw))
    dyp = jnp.pad(dy, ((0, 0), (lh, max(0, mh - 1 + max(qh) - (ho - 1))),
                       (lw, max(0, mw - 1 + max(qw) - (wo - 1))), (0, 0)))
    rows = []
    for _, taps_h in ph:
        cols = []
        for _, taps_w in pw:
            cols.append(_sum([lax.slice(dyp, (0, q + lh, p + lw, 0), (n, q + lh + mh, p + lw + mw, c)) * k[i, j]
                              for i, q in taps_h for j, p in taps_w], (n, mh, mw, c), dy.dtype))
        rows.append(jnp.stack(cols, axis=3))
    full = jnp.stack(rows, axis=2).reshape(n, mh * s, mw * s, c)
    return full[:, :h, :w, :]


def _grad_kernel(x, dy, kh, kw, s, pads):
    """dk[i, j, c] = sum over n, h, w of xpad[n, h*s+i, w*s+j, c] * dy[n, h, w, c], accumulated in float32."""
    n, ho, wo, c = dy.shape
    h, w = x.shape[1], x.shape[2]
    rows = next((r for r in range(min(_DK_ROWS, ho), 0, -1) if ho % r == 0 and (2 * r > _DK_ROWS or r == ho)),
                _DK_ROWS)
    blocks = -(-ho // rows)
    if blocks * rows != ho:  # zero dy rows; the x rows they meet are out of range and read as zero too
        dy = jnp.pad(dy, ((0, 0), (0, blocks * rows - ho), (0, 0), (0, 0)))
    ti, tj = np.repeat(np.arange(kh), kw), np.tile(np.arange(kw), kh)
    # Gather from x itself with out-of-range reads filled with 0: a padded copy of x measured slower.
    # Indices must not be negative (numpy indexing would wrap them), so padding positions point past the end.
    cols = (np.arange(wo) * s - pads[1][0])[None, :, None] + tj[None, None, :]
    cols = np.where(cols < 0, w, cols)
    terms = []
    for r in range(rows):
        xrows = ((np.arange(blocks) * rows + r) * s - pads[0][0])[:, None, None] + ti[None, None, :]
        xrows = np.where(xrows < 0, h, xrows)
        taps = x.at[:, xrows, cols, :].get(mode="fill", fill_value=0)  # (N, blocks, Wo, kh*kw, C), fused
        g = lax.slice(dy, (0, r, 0, 0), (n, r + (blocks - 1) * rows + 1, wo, c), (1, rows, 1, 1))
        terms.append(taps.astype(jnp.float32) * g.astype(jnp.float32)[:, :, :, None, :])
    part = lax.rev(_sum(terms, None, None), (1, 2))  # rev: keeps the loop out of the YNNPACK reduction
    return jnp.sum(part, axis=(0, 1, 2)).reshape(kh, kw, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shift_conv(x, k, s, pads):
    # Only reached without autodiff: pad once (module notes). Training goes through
    # _shift_conv_fwd, where x is a residual in memory and per-tap pads are faster.
    return _forward(x, k, s, pads, pad_once=True)


def _shift_conv_fwd(x, k, s, pads):
    return _forward(x, k, s, pads), (x, k)


def _shift_conv_bwd(s, pads, res, dy):
    x, k = res
    kh, kw, _ = k.shape
    h, w = x.shape[1], x.shape[2]
    grad_x = _grad_x_per_tap if kh * kw <= _PER_TAP_PAD_MAX_TAPS else _grad_x_polyphase
    dx = grad_x(dy, k, s, pads, h, w)
    dk = _grad_kernel(x, dy, kh, kw, s, pads)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_shift_conv.defvjp(_shift_conv_fwd, _shift_conv_bwd)
