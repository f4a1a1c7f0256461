"""Property tests for circlemix_jax.augment against independent references."""
import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image, ImageDraw

from circlemix_jax import augment

jit_circle_mask = jax.jit(augment.circle_mask, static_argnums=(0, 1))

MASK_SIZES = [(256, 256), (224, 224), (33, 33), (101, 101), (48, 80)]


# --- An independent rasterisation of the paper's polygon --------------------
# Written from the geometry in augment's module docstring, not from border_position_map: build
# the polygon's vertices and test pixel centres with the even-odd rule.

def _border_point(t, h, w):
    """(x, y) of border position t, in an image spanning [0, w] x [0, h]."""
    t = t % 360.0
    side = min(int(t // 90), 3)
    f = (t - 90.0 * side) / 90.0
    return [(0.0, h * f),           # down the left edge
            (w * f, float(h)),      # along the bottom edge
            (float(w), h * (1 - f)),  # up the right edge
            (w * (1 - f), 0.0)][side]  # back along the top edge


def _paper_polygon(h, w, start, end):
    corners = [(0.0, (0.0, 0.0)), (90.0, (0.0, float(h))),
               (180.0, (float(w), float(h))), (270.0, (float(w), 0.0))]
    return ([(w / 2, h / 2), _border_point(start, h, w)]
            + [c for tc, c in corners if start < tc < end]
            + [_border_point(end, h, w)])


def _pixel_centres_in_polygon(h, w, poly):
    py, px = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    inside = np.zeros((h, w), bool)
    for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1]):
        if y1 == y2:
            continue
        crosses = (y1 > py) != (y2 > py)
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _on_ray(h, w, t):
    """Pixel centres on the segment from the image centre to border point t."""
    bx, by = _border_point(t, h, w)
    py, px = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    dx, dy = bx - w / 2, by - h / 2
    cross = dx * (py - h / 2) - dy * (px - w / 2)
    return np.abs(cross) <= 1e-9 * (abs(dx) + abs(dy) + 1) * (h + w)


def _pil_polygon(h, w, poly):
    image = Image.new("L", (w, h), 0)
    ImageDraw.Draw(image).polygon(poly, fill=255)
    return np.asarray(image) > 0


# --- circle_mask -------------------------------------------------------------

@pytest.mark.parametrize("size", MASK_SIZES)
@hypothesis.settings(max_examples=30, deadline=None, derandomize=True,
                     database=None)
@hypothesis.given(a=st.floats(0, 360, width=32), b=st.floats(0, 360, width=32))
def test_circle_mask_matches_point_in_polygon(size, a, b):
    h, w = size
    start, end = min(a, b), max(a, b)
    mask = np.asarray(jit_circle_mask(h, w, start, end))
    ref = _pixel_centres_in_polygon(h, w, _paper_polygon(h, w, start, end))
    assert mask.shape == (h, w) and mask.dtype == bool
    # Pixel centres exactly on a bounding ray are ties (e.g. the diagonal when
    # start is 0 on a square); the mask takes [start, end), the reference is
    # arbitrary there, so they are left out.
    off_ray = ~(_on_ray(h, w, start) | _on_ray(h, w, end))
    assert (mask == ref)[off_ray].mean() >= 0.995
    # Stronger than the 99.5% criterion: only a few float32 roundings may differ.
    assert (mask != ref)[off_ray].sum() <= 3


@pytest.mark.parametrize("size", [(256, 256), (224, 224)])
def test_circle_mask_agrees_with_pil(size):
    # PIL's fill has its own edge convention, so only large sizes reach 99.5%.
    h, w = size
    rng = np.random.default_rng(0)
    for _ in range(20):
        start, end = np.sort(rng.uniform(0, 360, 2).astype(np.float32))
        mask = np.asarray(jit_circle_mask(h, w, start, end))
        ref = _pil_polygon(h, w, _paper_polygon(h, w, float(start), float(end)))
        assert (mask == ref).mean() >= 0.995


@pytest.mark.parametrize("size", [(256, 256), (224, 224), (101, 101), (48, 80)])
def test_circle_mask_area_is_arc_fraction(size):
    h, w = size
    rng = np.random.default_rng(1)
    for _ in range(30):
        start, end = np.sort(rng.uniform(0, 360, 2).astype(np.float32))
        mask = jit_circle_mask(h, w, start, end)
        assert abs(float(mask.mean()) - (end - start) / 360) <= 0.01


def test_border_position_map_convention():
    t = augment.border_position_map(64, 96)
    assert t.dtype == np.float32 and t.shape == (64, 96)
    assert t.min() >= 0 and t.max() < 360
    assert t[0, 0] < 1 or t[0, 0] > 359          # top-left corner
    assert 89 < t[-1, 0] < 91                     # bottom-left corner
    assert 179 < t[-1, -1] < 181                  # bottom-right corner
    assert 269 < t[0, -1] < 271                   # top-right corner
    assert 44 < t[32, 0] < 46 and 134 < t[-1, 48] < 136
    assert 224 < t[31, -1] < 226 and 314 < t[0, 47] < 316


# --- mix ----------------------------------------------------------------------
# Compiling mix takes seconds (jax.random.gamma, behind Beta, dominates), so the
# tests share one batch shape and one cached jitted function per set of static
# options; prob, alpha and label_smoothing are traced arguments.

B, H, W = 6, 32, 32
LABELS = jnp.array([0, 1, 2, 3, 4, 0])
K = 5


@functools.cache
def _compiled_mix(static):
    def run(rng, images, labels, prob, alpha, label_smoothing):
        return augment.mix(rng, images, labels, num_classes=K, prob=prob,
                           alpha=alpha, label_smoothing=label_smoothing,
                           **dict(static))
    return jax.jit(run)


def run_mix(rng, images, labels, *, prob=1.0, alpha=1.0, label_smoothing=0.0,
            **static):
    return _compiled_mix(tuple(sorted(static.items())))(
        rng, images, labels, prob, alpha, label_smoothing)


def _distinct(b, h=H, w=W, c=2):
    """Example i is the constant i + 1, so every pixel says where it came from."""
    return jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None],
                            (b, h, w, c)).astype(jnp.float32)


# Box and polygon masks share the granularity code, so cutmix is run per
# example only; each Beta-sampling option set costs a gamma compile.
CONFIGS = [dict(method="mixup", granularity="batch"),
           dict(method="mixup", granularity="example"),
           dict(method="cutmix", granularity="example"),
           dict(method="circlemix", sampler="paper", granularity="batch"),
           dict(method="circlemix", sampler="paper", granularity="example"),
           dict(method="circlemix", sampler="beta", granularity="batch"),
           dict(method="circlemix", sampler="beta", granularity="example")]
PAPER = dict(method="circlemix", sampler="paper", granularity="example")
BETA = dict(method="circlemix", sampler="beta", granularity="example")


def _cfg_id(cfg):
    return "-".join(cfg.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_soft_labels_and_pixels_match_lam(cfg):
    x = _distinct(B)
    partner = jnp.roll(x, 1, axis=0)
    for seed in range(3):
        out, soft, lam = run_mix(jax.random.key(seed), x, LABELS, alpha=0.4, **cfg)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert soft.shape == (B, K) and lam.shape == (B,)
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
        assert ((soft > 0).sum(1) <= 2).all()
        expect = (lam[:, None] * jax.nn.one_hot(LABELS, K)
                  + (1 - lam[:, None]) * jax.nn.one_hot(jnp.roll(LABELS, 1), K))
        np.testing.assert_allclose(soft, expect, atol=1e-6)
        assert (lam >= 0).all() and (lam <= 1).all()
        if cfg["granularity"] == "batch":
            np.testing.assert_allclose(lam, lam[0])
        if cfg["method"] == "mixup":
            lam4 = lam[:, None, None, None]
            np.testing.assert_allclose(out, lam4 * x + (1 - lam4) * partner,
                                       rtol=1e-6)
        else:
            from_a = out == x
            assert (from_a | (out == partner)).all()  # a select, never a blend
            np.testing.assert_allclose(lam, from_a.mean((1, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_lam_is_mean_of_ones_mixed_with_zeros(cfg):
    # Even examples are all ones and their partners (i - 1) all zeros, so an
    # even output's mean is lam; an odd output's mean is 1 - lam.
    x = jnp.broadcast_to((jnp.arange(B) % 2 == 0)[:, None, None, None],
                         (B, H, W, 2)).astype(jnp.float32)
    for seed in range(3):
        out, _, lam = run_mix(jax.random.key(seed), x, LABELS, **cfg)
        means = out.mean((1, 2, 3))
        np.testing.assert_allclose(means[0::2], lam[0::2], atol=1e-5)
        np.testing.assert_allclose(means[1::2], 1 - lam[1::2], atol=1e-5)


@pytest.mark.parametrize("cfg", CONFIGS + [dict(method="none")], ids=_cfg_id)
def test_prob_zero_is_identity(cfg):
    x = jax.random.normal(jax.random.key(0), (B, H, W, 2))
    out, soft, lam = run_mix(jax.random.key(1), x, LABELS, prob=0.0,
                             label_smoothing=0.1, **cfg)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(lam, 1.0)
    np.testing.assert_allclose(soft, jax.nn.one_hot(LABELS, K) * 0.9 + 0.1 / K,
                               atol=1e-7)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_same_key_same_output(cfg):
    x = _distinct(B)
    first = run_mix(jax.random.key(7), x, LABELS, **cfg)
    again = run_mix(jax.random.key(7), x, LABELS, **cfg)
    other = run_mix(jax.random.key(8), x, LABELS, **cfg)
    for u, v in zip(first, again):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_never_paired_with_itself(cfg):
    x = _distinct(B)
    own = np.asarray(x)
    for seed in range(3):
        out, _, lam = run_mix(jax.random.key(seed), x, LABELS, **cfg)
        out = np.asarray(out)
        changed = (out != own).any((1, 2, 3))
        # Every example with lam < 1 visibly took something from another example.
        np.testing.assert_array_equal(changed, np.asarray(lam) < 1)


@pytest.mark.parametrize("b", [2, 3, 5])
def test_odd_and_tiny_batches_pair_with_neighbour(b):
    x = _distinct(b)
    out, _, lam = run_mix(jax.random.key(0), x, jnp.arange(b) % K, **PAPER)
    own = np.asarray(x)
    partner = np.roll(own, 1, axis=0)
    assert (partner[:, 0, 0, 0] != own[:, 0, 0, 0]).all()
    out = np.asarray(out)
    assert ((out == own) | (out == partner)).all()
    np.testing.assert_allclose(lam, (out == own).mean((1, 2, 3)), atol=1e-6)
    assert (np.asarray(lam) < 1).any()


def test_batch_of_one_is_noop():
    assert augment.mixing_is_noop(1) and not augment.mixing_is_noop(2)
    x = _distinct(1)
    out, soft, lam = augment.mix(jax.random.key(0), x, jnp.array([2]),
                                 num_classes=K, method="circlemix")
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(lam, 1.0)
    np.testing.assert_array_equal(soft, jax.nn.one_hot(jnp.array([2]), K))


def test_cutmix_lam_is_clipped_box_fraction():
    x = _distinct(B, H, W, 1)
    cfg = dict(method="cutmix", granularity="example")
    clipped = formula_differs = 0
    for seed in range(10):
        out, _, lam = run_mix(jax.random.key(seed), x, LABELS, alpha=0.5, **cfg)
        _, _, lam_f = run_mix(jax.random.key(seed), x, LABELS, alpha=0.5,
                              lam_mode="formula", **cfg)
        box = np.asarray(out != x)[..., 0]
        for i in range(B):  # host-side reference, test only
            rows, cols = box[i].any(1), box[i].any(0)
            np.testing.assert_array_equal(box[i], rows[:, None] & cols[None, :])
            np.testing.assert_allclose(lam[i], 1 - rows.mean() * cols.mean(),
                                       atol=1e-6)
            clipped += bool(rows[0] or rows[-1] or cols[0] or cols[-1])
        # 'formula' keeps the sampled lam; clipping only shrinks the box.
        assert (lam_f <= lam + 1e-6).all()
        formula_differs += int((lam_f < lam - 1e-3).sum())
    assert clipped > 5 and formula_differs > 5


def test_circlemix_formula_lam_close_to_pixel_lam():
    x = _distinct(B)
    for seed in range(5):
        _, _, lam_p = run_mix(jax.random.key(seed), x, LABELS, **PAPER)
        _, _, lam_f = run_mix(jax.random.key(seed), x, LABELS, lam_mode="formula",
                              **PAPER)
        assert np.abs(lam_p - lam_f).max() < 0.03  # pixelisation at 32 px


def test_prob_half_mixes_about_half_of_the_examples():
    x = _distinct(B)
    kept = []
    for seed in range(60):
        out, _, lam = run_mix(jax.random.key(seed), x, LABELS, prob=0.5, **BETA)
        untouched = np.asarray((out == x).all((1, 2, 3)))
        np.testing.assert_array_equal(untouched, np.asarray(lam) == 1)
        kept.append(untouched)
    assert 0.4 < np.mean(kept) < 0.6  # 360 draws: 0.026 standard error


def test_label_smoothing_applied_once():
    _, soft, _ = run_mix(jax.random.key(0), _distinct(B), LABELS,
                         label_smoothing=0.2, method="mixup", granularity="batch")
    np.testing.assert_allclose(soft.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(soft.min(), 0.2 / K, atol=1e-6)


def _mask_frequency(cfg, draws=4200):
    """P(pixel is image A's) over many per-example draws, alpha = 1."""
    x = _distinct(B)
    hits = np.zeros((H, W))
    for seed in range(draws // B):
        out, _, _ = run_mix(jax.random.key(seed), x, LABELS, **cfg)
        hits += np.asarray((out == x)[..., 0].sum(0))
    return hits / (draws // B * B)


def test_beta_sampler_is_spatially_uniform():
    # E[lam] = 1/2 for Beta(1, 1), so every pixel is A's with probability 1/2.
    # 4200 draws: one standard error is 0.008.
    freq = _mask_frequency(BETA)
    corners = [freq[0, 0], freq[0, -1], freq[-1, 0], freq[-1, -1]]
    edge_centres = [freq[16, 0], freq[0, 16], freq[-1, 16], freq[16, -1]]
    np.testing.assert_allclose(corners + edge_centres, 0.5, atol=0.04)
    assert np.abs(freq - 0.5).max() < 0.05


def test_paper_sampler_has_top_left_bias():
    # With a sorted pair the arc never crosses 0: P(T in arc) = 2p(1 - p) for
    # p = T / 360, so the top-left corner is (almost) never in the mask.
    freq = _mask_frequency(PAPER)
    assert freq[0, 0] < 0.02
    assert abs(freq[-1, -1] - 0.5) < 0.04      # T = 180
    assert abs(freq[-1, 0] - 0.375) < 0.04     # T = 90
    assert abs(freq[0, -1] - 0.375) < 0.04     # T = 270


@pytest.mark.parametrize("n_dev,per_dev,sampler",
                         [(1, 3, "paper"), (4, 3, "paper"), (4, 5, "beta"),
                          (4, 1, "beta")])
def test_mix_under_jit_and_shard_map(n_dev, per_dev, sampler):
    mesh = jax.make_mesh((n_dev,), ("data",), devices=jax.devices()[:n_dev])
    mixer = functools.partial(augment.mix, num_classes=K, method="circlemix",
                              sampler=sampler, granularity="example")

    def per_device(rng, images, labels):
        rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
        return mixer(rng, images, labels)

    step = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                 in_specs=(P(), P("data"), P("data")),
                                 out_specs=P("data")))
    b = n_dev * per_dev
    shard = jax.sharding.NamedSharding(mesh, P("data"))
    x = jax.device_put(_distinct(b, 16, 16, 1), shard)
    labels = jax.device_put(jnp.arange(b) % K, shard)
    rng = jax.device_put(jax.random.key(0), jax.sharding.NamedSharding(mesh, P()))
    out, soft, lam = step(rng, x, labels)
    assert out.shape == x.shape and soft.shape == (b, K) and lam.shape == (b,)
    np.testing.assert_allclose(soft.sum(1), 1, atol=1e-6)
    own = np.asarray(x)
    # Partners are rolled within each device's shard, never across devices.
    partner = np.roll(own.reshape(n_dev, per_dev, 16, 16, 1), 1, axis=1).reshape(
        own.shape)
    out = np.asarray(out)
    assert ((out == own) | (out == partner)).all()
    np.testing.assert_allclose(lam, (out == own).mean((1, 2, 3)), atol=1e-6)
    if per_dev == 1:
        np.testing.assert_array_equal(out, own)
    else:
        assert (np.asarray(lam) < 1).any()


def test_invalid_options_raise():
    x, y = _distinct(2), jnp.zeros(2, jnp.int32)
    for bad in [dict(method="circle"), dict(method="mixup", sampler="x"),
                dict(method="cutmix", granularity="device"),
                dict(method="cutmix", lam_mode="exact"),
                dict(method="mixup", alpha=0.0), dict(method="mixup", prob=1.5)]:
        with pytest.raises(ValueError):
            augment.mix(jax.random.key(0), x, y, num_classes=K, **bad)


# --- basic_augment ------------------------------------------------------------

def _ramp_batch(b, h, w):
    """Channels: x-ramp, y-ramp, noise. The ramps reveal flips and crops."""
    xs = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32), (b, h, w))
    ys = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (b, h, w))
    noise = jax.random.uniform(jax.random.key(42), (b, h, w))
    return jnp.stack([xs, ys, noise], axis=-1)


jit_basic_augment = jax.jit(augment.basic_augment)
AUG_SHAPE = (256, 40, 64)


def test_basic_augment_shape_dtype_determinism():
    x = _ramp_batch(*AUG_SHAPE)
    first = jit_basic_augment(jax.random.key(1), x)
    assert first.shape == x.shape and first.dtype == x.dtype
    np.testing.assert_array_equal(first, jit_basic_augment(jax.random.key(1), x))
    assert not np.array_equal(first, jit_basic_augment(jax.random.key(2), x))
    small = jit_basic_augment(jax.random.key(0),
                              _ramp_batch(2, 16, 24).astype(jnp.bfloat16))
    assert small.shape == (2, 16, 24, 3) and small.dtype == jnp.bfloat16


_scale_and_translate = jax.jit(
    lambda image, scale, shift: jax.image.scale_and_translate(
        image, image.shape, (0, 1), scale, shift, "linear", antialias=False))


def test_basic_augment_flips_and_crops():
    b, h, w = AUG_SHAPE
    x = _ramp_batch(b, h, w)
    out = np.asarray(jit_basic_augment(jax.random.key(0), x))
    # Flip: the ramp runs backwards. Crop c: the ramp's slope is (n - c) / n.
    flip_h = out[:, 0, -1, 0] < out[:, 0, 0, 0]
    flip_v = out[:, -1, 0, 1] < out[:, 0, 0, 1]
    assert 0.4 < flip_h.mean() < 0.6 and 0.4 < flip_v.mean() < 0.6
    assert 0.15 < (flip_h & flip_v).mean() < 0.35  # independent draws
    # Interior ramp steps are (n - c) / n exactly; the ends clamp to the crop.
    crop_x = w * (1 - np.abs(out[:, 0, 2, 0] - out[:, 0, 1, 0]))
    crop_y = h * (1 - np.abs(out[:, 2, 0, 1] - out[:, 1, 0, 1]))
    np.testing.assert_allclose(crop_x, np.round(crop_x), atol=1e-3)
    np.testing.assert_allclose(crop_x, crop_y, atol=1e-3)  # same c both ways
    crop = np.round(crop_x).astype(int)
    assert crop.min() == 0 and crop.max() == 16 and 6 < crop.mean() < 10
    # The kept window lies inside the image and spans n - c - 1 ramp units.
    lo_x = np.minimum(out[:, 0, 0, 0], out[:, 0, -1, 0])
    hi_x = np.maximum(out[:, 0, 0, 0], out[:, 0, -1, 0])
    lo_y = np.minimum(out[:, 0, 0, 1], out[:, -1, 0, 1])
    np.testing.assert_allclose(hi_x - lo_x, w - crop - 1, atol=1e-3)
    assert lo_x.min() >= 0 and hi_x.max() <= w - 1
    assert lo_x[crop == 16].max() > 0 and lo_y[crop == 16].max() > 0
    assert (lo_x != lo_y).mean() > 0.5  # offsets are drawn independently
    # No crop and no flip is exactly the identity.
    plain = (crop == 0) & ~flip_h & ~flip_v
    assert plain.any()
    np.testing.assert_array_equal(out[plain], np.asarray(x)[plain])
    # Bilinear resampling of the noise channel, against jax.image, interior only
    # (at the borders we clamp to the crop, jax.image reads outside it).
    for i in range(12):
        scale = jnp.array([h / (h - crop[i]), w / (w - crop[i])])
        ref = _scale_and_translate(x[i, ..., 2:], scale,
                                   -jnp.array([lo_y[i], lo_x[i]]) * scale)
        ref = np.asarray(ref)[::-1 if flip_v[i] else 1, ::-1 if flip_h[i] else 1]
        np.testing.assert_allclose(out[i, 1:-1, 1:-1, 2:], ref[1:-1, 1:-1],
                                   atol=1e-5)
