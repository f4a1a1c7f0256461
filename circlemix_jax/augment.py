"""On-device augmentations: basic flips/crops and CutMix, Mixup and CircleMix.

Everything here is a pure function of an explicit PRNG key and runs inside the
jitted train step, per device (``step.prepare_shards``, a ``jax.shard_map``:
each device mixes within its own shard). Masks are built by
comparing precomputed per-pixel maps (the CircleMix border-position map, iota
grids for boxes) against sampled scalars, so there is no scatter and no dynamic
slicing: vmapped ``dynamic_update_slice`` becomes a while-loop on TPU
(jax#21367), while elementwise compares and selects vectorise cleanly.

Geometry (from the paper and the authors' code): a border position ``t`` is in degrees, each image side
spans 90 degrees; ``t=0`` is the top-left corner, 0->90 runs down the left edge,
90->180 along the bottom, 180->270 up the right edge, 270->360 back along the
top. The CircleMix polygon for ``[start, end)`` (centre, border point at start,
corners between, border point at end) is star-shaped from the centre, so a
pixel lies inside exactly when the ray from the centre through it leaves the
image at a position ``start <= T < end``.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("none", "mixup", "cutmix", "circlemix")
SAMPLERS = ("paper", "beta")
GRANULARITIES = ("batch", "example")
LAM_MODES = ("pixels", "formula", "mask")


@functools.cache
def border_position_map(height, width):
    """Border position T (degrees) of every pixel centre, for one image size.

    T is where the ray from the image centre through the pixel centre leaves the
    image, with pixel (i, j) centred at (j + 0.5, i + 0.5) in an image spanning
    [0, width] x [0, height].

    Args:
        height: Image height in pixels (static).
        width: Image width in pixels (static).

    Returns:
        A read-only float32 numpy array of shape (height, width) with values in
        [0, 360). The exact centre pixel of odd-sized images (a polygon vertex, so
        on every mask's boundary) gets an arbitrary value.
    """
    # Work in coordinates normalised to [-1, 1]^2: the map to the unit square is
    # affine and fixes the centre, and each side spans 90 degrees whatever its
    # length, so border positions and point-in-polygon are unchanged by it.
    v = (np.arange(height, dtype=np.float64) + 0.5) / height * 2.0 - 1.0
    u = (np.arange(width, dtype=np.float64) + 0.5) / width * 2.0 - 1.0
    v, u = np.meshgrid(v, u, indexing="ij")
    m = np.maximum(np.abs(u), np.abs(v))
    m = np.where(m == 0.0, 1.0, m)
    u, v = u / m, v / m  # the exit point, on the boundary of the unit square
    # Ties (diagonals) go to the vertical sides; both choices give the same t at
    # the corners, modulo 360.
    vertical_side = np.abs(u) >= np.abs(v)
    t = np.where(
        vertical_side,
        np.where(u < 0, 45.0 * (v + 1.0), 180.0 + 45.0 * (1.0 - v)),
        np.where(v > 0, 90.0 + 45.0 * (u + 1.0), 270.0 + 45.0 * (1.0 - u)))
    t = t.astype(np.float32)
    # Values a hair below 360 can round up to 360.0 in float32; 360 is 0.
    t = np.where(t >= 360.0, np.float32(0.0), t)
    t.setflags(write=False)  # it is cached and shared between callers
    return t


def circle_mask(height, width, start, end):
    """The paper's CircleMix polygon mask for the border arc [start, end).

    Jit with static sizes: ``jax.jit(circle_mask, static_argnums=(0, 1))``.
    The area fraction is (end - start) / 360 up to pixelisation, for any
    rectangle. For arcs that wrap past 360 see the ``'beta'`` sampler of `mix`.

    Args:
        height: Image height (static Python int).
        width: Image width (static Python int).
        start: Scalar start of the arc in degrees, may be traced.
        end: Scalar end of the arc in degrees, may be traced; ``start <= end``.

    Returns:
        A bool array of shape (height, width), True where the pixel centre lies
        inside the polygon (centre, border point at start, corners strictly
        between, border point at end).
    """
    t = jnp.asarray(border_position_map(height, width))
    return (t >= start) & (t < end)


def _wrapped_arc_mask(t, start, extent):
    """Pixels whose border position is within `extent` degrees after `start`."""
    return jnp.mod(t - start, 360.0) < extent


def _uniform_int(u, n):
    """Maps u ~ U[0, 1) to U{0, ..., n - 1}; n may be traced."""
    # min() guards against u * n rounding up to n in float32.
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _crop_flip_coords(n, crop, offset, flip):
    """Source index pairs and weights to crop `crop` px at `offset`, resize back.

    Output pixel i samples the crop at continuous position offset + (i + 0.5) *
    scale - 0.5 (pixel-centre alignment), bilinearly. A flip just reverses the
    output index, so it costs nothing extra. With crop == 0 and no flip the
    weights are exactly 0 and the result is the identity.
    """
    i = jnp.arange(n, dtype=jnp.float32)
    i = jnp.where(flip, n - 1 - i, i)
    size = (n - crop).astype(jnp.float32)
    pos = offset + (i + 0.5) * (size / n) - 0.5
    pos = jnp.clip(pos, offset, offset + size - 1.0)  # stay inside the crop
    i0 = jnp.floor(pos)
    w = pos - i0
    i0 = i0.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, n - 1)
    return i0, i1, w


def _reflect(i, n):
    """Index i mirrored into [0, n) without repeating the edge (numpy 'reflect')."""
    period = 2 * (n - 1)
    i = jnp.mod(i, period)
    return jnp.where(i >= n, period - i, i)


def _augment_one(key, image, max_crop, transpose, translate):
    h, w = image.shape[:2]
    # One uniform draw for all five choices: each extra threefry call adds
    # compile time for no statistical benefit.
    u = jax.random.uniform(key, (5,))
    flip_h, flip_v = u[0] < 0.5, u[1] < 0.5
    x = image.astype(jnp.float32)
    if translate:
        # Reflect-pad by max_crop // 2 and crop back to size: a pure shift, no zoom,
        # exact pixels (the PyTorch recipes' RandomCrop(size, padding, 'reflect')).
        pad = max_crop // 2
        rows = _reflect(jnp.arange(h) + _uniform_int(u[3], 2 * pad + 1) - pad, h)
        cols = _reflect(jnp.arange(w) + _uniform_int(u[4], 2 * pad + 1) - pad, w)
        rows = jnp.where(flip_v, rows[::-1], rows)
        cols = jnp.where(flip_h, cols[::-1], cols)
        x = jnp.take(jnp.take(x, rows, axis=0), cols, axis=1)
    else:
        crop = _uniform_int(u[2], max_crop + 1)
        off_y = _uniform_int(u[3], crop + 1).astype(jnp.float32)
        off_x = _uniform_int(u[4], crop + 1).astype(jnp.float32)
        # Bilinear resize by two row/column gathers: O(HWC) work. A dense
        # interpolation matmul (what jax.image.scale_and_translate does) costs
        # O(H^2 WC), which dominates at 256 px.
        i0, i1, wy = _crop_flip_coords(h, crop, off_y, flip_v)
        x = (jnp.take(x, i0, axis=0, mode="clip") * (1.0 - wy)[:, None, None]
             + jnp.take(x, i1, axis=0, mode="clip") * wy[:, None, None])
        j0, j1, wx = _crop_flip_coords(w, crop, off_x, flip_h)
        x = (jnp.take(x, j0, axis=1, mode="clip") * (1.0 - wx)[None, :, None]
             + jnp.take(x, j1, axis=1, mode="clip") * wx[None, :, None])
    if transpose:
        # A transpose at 1/2 on top of the two flips makes all 8 symmetries of the
        # square equally likely. Its own key keeps the flip/crop draws of runs
        # without it unchanged.
        swap = jax.random.bernoulli(jax.random.fold_in(key, 1))
        x = jnp.where(swap, jnp.swapaxes(x, 0, 1), x)
    return x.astype(image.dtype)


def basic_augment(rng, images, *, max_crop=16, transpose=False, translate=False):
    """The paper's basic augmentation, drawn independently for each example.

    Horizontal flip with probability 1/2, vertical flip with probability 1/2,
    and a random crop: c ~ U{0..max_crop} pixels are cut from each spatial
    dimension at a uniformly random offset, and the crop is resized back to the
    full size bilinearly.

    Args:
        rng: PRNG key.
        images: Float array (B, H, W, C).
        max_crop: Largest number of pixels cut from each dimension (static);
            clipped to min(H, W) - 1.
        transpose: Also swap height and width with probability 1/2, so that
            all 8 symmetries of the square are equally likely (square images).
        translate: Instead of crop-and-resize (a zoom), shift by
            U{-max_crop // 2 .. max_crop // 2} pixels in each dimension with
            mirrored borders.

    Returns:
        Augmented images with the shape and dtype of `images`.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"basic_augment needs float images, got {images.dtype}.")
    if transpose and images.shape[1] != images.shape[2]:
        raise ValueError(f"basic_augment: transpose needs square images, got {images.shape[1:3]}.")
    max_crop = max(0, min(int(max_crop), images.shape[1] - 1,
                          images.shape[2] - 1))
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(functools.partial(_augment_one, max_crop=max_crop, transpose=transpose,
                                      translate=translate))(keys, images)


def crop_pixels(max_crop, crop_fraction, size):
    """The crop in pixels: `crop_fraction` of the image side when set, else `max_crop`."""
    return int(round(crop_fraction * size)) if crop_fraction > 0 else int(max_crop)


def _rotate_one(key, image, max_degrees, scale):
    h, w = image.shape[:2]
    angle = jnp.deg2rad(jax.random.uniform(key, (), minval=-max_degrees, maxval=max_degrees))
    # The zoom's own key, so a run without it draws the same angles as before it existed.
    lo, hi = np.log(scale[0]), np.log(scale[1])
    zoom = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1), (), minval=lo, maxval=hi))
    cos, sin = jnp.cos(angle) / zoom, jnp.sin(angle) / zoom
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - (h - 1) / 2,
                        jnp.arange(w, dtype=jnp.float32) - (w - 1) / 2, indexing="ij")
    # Each output pixel samples the input at the inversely rotated and zoomed position.
    sy = cos * y - sin * x + (h - 1) / 2
    sx = sin * y + cos * x + (w - 1) / 2
    y0, x0 = jnp.floor(sy), jnp.floor(sx)
    wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    flat = image.reshape(h * w, -1)

    def tap(yy, xx):  # a gather from the flattened image, mirrored at the borders
        return jnp.take(flat, _reflect(yy, h) * w + _reflect(xx, w), axis=0)

    return ((1 - wy) * ((1 - wx) * tap(y0, x0) + wx * tap(y0, x0 + 1))
            + wy * ((1 - wx) * tap(y0 + 1, x0) + wx * tap(y0 + 1, x0 + 1))).astype(image.dtype)


def rotate(rng, images, *, max_degrees, scale=(1.0, 1.0)):
    """Rotates each example by U(-max_degrees, max_degrees) about its centre, and zooms it.

    The zoom factor is drawn log-uniformly from `scale`: below 1 the glomerulus
    shrinks, as in a crop taken with a wider margin or at a lower magnification;
    above 1 it grows. One resampling does both. Bilinear, with mirrored borders so
    no black corners appear. Gathers only (no scatter, no dynamic slicing), so it
    vectorises under vmap on every backend.

    Args:
        rng: PRNG key.
        images: Float array (B, H, W, C).
        max_degrees: Largest rotation in degrees (static).
        scale: (lowest, highest) zoom factor, both > 0 (static); (1, 1) does not zoom.

    Returns:
        Rotated images with the shape and dtype of `images`.
    """
    scale = (float(scale[0]), float(scale[1]))
    if not max_degrees and scale == (1.0, 1.0):
        return images
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(functools.partial(_rotate_one, max_degrees=float(max_degrees), scale=scale))(keys, images)


def check_geometry(augment) -> None:
    """Validates the geometry fields of `config.augment`.

    Raises:
        InputError: naming the field and its allowed values.
    """
    from circlemix_jax.errors import InputError  # keeps this module free of CLI concerns

    for name in ("basic", "transpose", "translate"):
        if not isinstance(augment.get(name, False), bool):
            raise InputError(f"config field augment.{name}={augment.get(name)!r} must be true or false")
    for name, lo, hi in (("max_crop", 0, None), ("crop_fraction", 0.0, 0.5), ("rotate_degrees", 0.0, 180.0)):
        v = augment.get(name, 0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi is not None and v > hi):
            raise InputError(f"config field augment.{name}={v!r} must be a number in "
                             f"[{lo}, {hi if hi is not None else 'inf'}]")
    scale = augment.get("scale", (1.0, 1.0))
    if (not isinstance(scale, (tuple, list)) or len(scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scale)
            or not 0.25 <= scale[0] <= scale[1] <= 4.0):
        raise InputError(f"config field augment.scale={scale!r} must be (lowest, highest) zoom factors "
                         "with 0.25 <= lowest <= highest <= 4")


def mixing_is_noop(per_device_batch):
    """Whether `mix` can mix nothing at this per-device batch size.

    Partners come from a roll within the device's shard, so a shard of one
    example has only itself; `mix` then returns its inputs unchanged. The train
    loop calls this once at start to warn.
    """
    return per_device_batch < 2


def _check_options(method, sampler, granularity, lam_mode, alpha, prob,
                   label_smoothing):
    for name, value, allowed in (("method", method, METHODS),
                                 ("sampler", sampler, SAMPLERS),
                                 ("granularity", granularity, GRANULARITIES),
                                 ("lam_mode", lam_mode, LAM_MODES)):
        if value not in allowed:
            raise ValueError(f"mix: {name}={value!r}; expected one of {allowed}.")
    # Only concrete Python numbers can be checked; traced values pass through.
    if isinstance(alpha, (int, float)) and not alpha > 0:
        raise ValueError(f"mix: alpha must be > 0, got {alpha}.")
    if isinstance(prob, (int, float)) and not 0 <= prob <= 1:
        raise ValueError(f"mix: prob must be in [0, 1], got {prob}.")
    if isinstance(label_smoothing, (int, float)) and not (
        0 <= label_smoothing < 1):
        raise ValueError(
            f"mix: label_smoothing must be in [0, 1), got {label_smoothing}.")


def _draw(key, *, method, sampler, alpha, lam_mode, height, width):
    """One mixing draw: (mask of pixels taken from image A or None, lam)."""
    k_u, k_beta = jax.random.split(key)
    # Two uniforms cover every method's position draws; one threefry call keeps
    # compile time down (jax.random.gamma, behind beta, is costly enough).
    u = jax.random.uniform(k_u, (2,))
    if method in ("mixup", "cutmix") or sampler == "beta":
        lam = jax.random.beta(k_beta, alpha, alpha)
    if method == "mixup":
        return None, lam.astype(jnp.float32)
    if method == "cutmix":
        # As in Yun et al.: the box is pasted from the partner (image B), its side
        # is sqrt(1 - lam) of the image's, its centre uniform, then clipped.
        ratio = jnp.sqrt(1.0 - lam)
        cut_h = jnp.floor(height * ratio).astype(jnp.int32)
        cut_w = jnp.floor(width * ratio).astype(jnp.int32)
        cy, cx = _uniform_int(u[0], height), _uniform_int(u[1], width)
        y1 = jnp.clip(cy - cut_h // 2, 0, height)
        y2 = jnp.clip(cy + cut_h // 2, 0, height)
        x1 = jnp.clip(cx - cut_w // 2, 0, width)
        x2 = jnp.clip(cx + cut_w // 2, 0, width)
        rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
        in_box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
        mask = ~in_box
    else:  # circlemix
        t = jnp.asarray(border_position_map(height, width))
        if sampler == "paper":
            # Sorted pair of U(0, 360): the arc never crosses 0 degrees, so the
            # top-left corner is almost never in the mask (the paper's bias).
            start, end = jnp.min(u) * 360.0, jnp.max(u) * 360.0
            mask = (t >= start) & (t < end)
            lam = (end - start) / 360.0
        else:
            # Uniform start plus a wrap-around arc: every pixel is in the mask with
            # the same probability E[lam].
            mask = _wrapped_arc_mask(t, u[0] * 360.0, 360.0 * lam)
    if lam_mode in ("pixels", "mask"):  # 'mask' falls back to pixels where no glomerulus is left
        lam = jnp.mean(mask, dtype=jnp.float32)
    return mask, lam.astype(jnp.float32)


def mask_lam(region, masks, fallback):
    """Each image's share of the glomerulus pixels in its mixed image.

    Args:
        region: (B, H, W) bool, True where the mixed image shows image A.
        masks: (B, H, W) float in [0, 1], the glomerulus masks of the unmixed
            images; the partner's is ``jnp.roll(masks, 1, 0)`` as in `mix`.
        fallback: (B,) lam used where the mixed image holds no glomerulus.

    Returns:
        (B,) float32: |mask_A inside region| / (that + |mask_B outside region|).
    """
    own = jnp.sum(jnp.where(region, masks, 0.0), axis=(1, 2))
    other = jnp.sum(jnp.where(region, 0.0, jnp.roll(masks, 1, axis=0)), axis=(1, 2))
    total = own + other
    return jnp.where(total > 0, own / jnp.where(total > 0, total, 1.0), fallback).astype(jnp.float32)


def mix(rng, images, labels, *, num_classes, method, alpha=1.0,
        sampler="paper", granularity="batch", prob=1.0, lam_mode="pixels",
        label_smoothing=0.0, masks=None):
    """Mixes each example (image A) with its neighbour in the shard (image B).

    The partner of example i is example i - 1 (``jnp.roll`` by 1 within this
    device's batch), so nobody is paired with itself when the batch has 2 or
    more examples and no cross-device traffic is needed. With a batch of 1 (see
    `mixing_is_noop`) or ``method='none'`` nothing is mixed.

    Methods: ``'mixup'`` blends ``lam * A + (1 - lam) * B`` with lam ~
    Beta(alpha, alpha). ``'cutmix'`` pastes a box of B into A (Yun et al.), with
    lam ~ Beta(alpha, alpha) setting the box side to sqrt(1 - lam).
    ``'circlemix'`` fills the polygon mask with A and the rest with B; sampler
    ``'paper'`` draws the arc as the sorted pair of two U(0, 360) draws, sampler
    ``'beta'`` draws start ~ U(0, 360), lam ~ Beta(alpha, alpha) and wraps the
    arc around 360.

    Call inside jit/shard_map with the options bound, e.g.
    ``functools.partial(mix, num_classes=K, **config.mix)``. The caller folds the
    device index into `rng` so devices draw differently.

    Args:
        rng: PRNG key.
        images: Float images (B, H, W, C), one device's shard.
        labels: Integer class ids (B,).
        num_classes: Number of classes K (static).
        method: 'none', 'mixup', 'cutmix' or 'circlemix' (static).
        alpha: Beta(alpha, alpha) parameter for mixup, cutmix and circlemix 'beta'.
        sampler: CircleMix arc sampler, 'paper' or 'beta' (static).
        granularity: 'batch' for one draw shared by the batch (the authors' code)
            or 'example' for one draw per example (static).
        prob: Probability that the batch ('batch') or each example ('example') is
            mixed; an unmixed example keeps its image and label, with lam = 1.
        lam_mode: 'pixels' sets lam to the exact fraction of pixels taken from A
            (cutmix after clipping, circlemix); 'formula' keeps the sampled value
            ((end - start) / 360 for the paper sampler); 'mask' sets it to A's
            share of the glomerulus pixels in the mixed image (`mask_lam`; needs
            `masks`, cutmix and circlemix only). Ignored for mixup (static).
        label_smoothing: Smoothing applied once to the one-hot labels before
            mixing, so rows still sum to 1.
        masks: Glomerulus masks (B, H, W) in [0, 1], for lam_mode 'mask'.

    Returns:
        (mixed images with the shape and dtype of `images`, soft labels (B, K)
        float32 equal to ``lam * y_A + (1 - lam) * y_B``, lam (B,) float32 the
        weight of image A, the example itself).

    Raises:
        ValueError: on an unknown option string or an out-of-range number.
    """
    _check_options(method, sampler, granularity, lam_mode, alpha, prob,
                   label_smoothing)
    if lam_mode == "mask" and method != "none" and (method == "mixup" or masks is None):
        raise ValueError("mix: lam_mode='mask' needs masks and method cutmix or circlemix, "
                         f"got method={method!r} and masks={'given' if masks is not None else None}.")
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"mix: expected images (B, H, W, C) and labels (B,), got "
                         f"{images.shape} and {labels.shape}.")
    batch, height, width = images.shape[:3]
    y_a = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    y_a = y_a * (1.0 - label_smoothing) + label_smoothing / num_classes
    if method == "none" or mixing_is_noop(batch):
        return images, y_a, jnp.ones((batch,), jnp.float32)

    draw = functools.partial(_draw, method=method, sampler=sampler, alpha=alpha,
                             lam_mode=lam_mode, height=height, width=width)
    k_draw, k_prob = jax.random.split(rng)
    if granularity == "batch":
        mask, lam = draw(k_draw)
        mixed = jax.random.bernoulli(k_prob, prob)
        lam = jnp.broadcast_to(jnp.where(mixed, lam, 1.0), (batch,))
        if mask is not None:
            mask = jnp.broadcast_to((mask | ~mixed)[None], (batch, height, width))
    else:
        mask, lam = jax.vmap(draw)(jax.random.split(k_draw, batch))
        mixed = jax.random.bernoulli(k_prob, prob, (batch,))
        lam = jnp.where(mixed, lam, 1.0)
        if mask is not None:
            mask = mask | ~mixed[:, None, None]
    if lam_mode == "mask":
        lam = mask_lam(jnp.broadcast_to(mask, (batch, height, width)), masks, lam)

    partner = jnp.roll(images, 1, axis=0)
    if mask is None:  # mixup
        w = lam[:, None, None, None]
        out = (w * images.astype(jnp.float32)
               + (1.0 - w) * partner.astype(jnp.float32)).astype(images.dtype)
    else:
        # A select, not a blend, so every output pixel is exactly A's or B's.
        out = jnp.where(mask[..., None], images, partner)
    y_b = jnp.roll(y_a, 1, axis=0)
    soft = lam[:, None] * y_a + (1.0 - lam)[:, None] * y_b
    return out, soft, lam
