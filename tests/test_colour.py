"""Colour and stain augmentation: properties, and references independent of the code under test."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from circlemix_jax import colour
from circlemix_jax.errors import InputError

STRONG = {"brightness": 0.3, "contrast": 0.3, "saturation": 0.5, "hue": 0.1, "stain": 0.5, "density": 0.5,
          "grayscale": 0.3, "blur": 0.05, "noise": 0.05}
FUNCTIONS = {
    "colour": lambda k, x, s: colour.jitter_colour(k, x, brightness=0.3 * s, contrast=0.3 * s, saturation=0.5 * s,
                                                   hue=0.1 * s),
    "stain": lambda k, x, s: colour.jitter_stain(k, x, strength=0.5 * s),
    "density": lambda k, x, s: colour.jitter_density(k, x, strength=0.5 * s),
    "grayscale": lambda k, x, s: colour.grayscale(k, x, prob=0.5 * s),
    "blur": lambda k, x, s: colour.blur(k, x, fraction=0.1 * s),
    "noise": lambda k, x, s: colour.noise(k, x, std=0.05 * s),
    "all": lambda k, x, s: colour.augment(k, x, {n: v * s for n, v in STRONG.items()}),
}


def _images(b=8, h=12, w=10, seed=0):
    # Tissue-like colours (pink/purple, never pure black) plus some extremes.
    x = np.random.default_rng(seed).uniform(0.0, 1.0, (b, h, w, 3)).astype(np.float32)
    x[:, 0, 0] = 0.0
    x[:, 0, 1] = 1.0
    return jnp.asarray(x)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_shape_range_determinism_and_identity_at_zero(name):
    fn = jax.jit(FUNCTIONS[name], static_argnums=2)
    x = _images()
    out = fn(jax.random.key(0), x, 1.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, fn(jax.random.key(0), x, 1.0))
    assert not np.array_equal(out, fn(jax.random.key(1), x, 1.0))
    assert not np.allclose(out, x, atol=1e-3)
    np.testing.assert_array_equal(fn(jax.random.key(0), x, 0.0), x)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_examples_are_jittered_independently(name):
    fn = jax.jit(FUNCTIONS[name], static_argnums=2)
    one = _images(1)
    same = jnp.repeat(one, 16, axis=0)
    out = np.asarray(fn(jax.random.key(3), same, 1.0))
    # The same image, 16 times: the draws differ between examples (grey or not: 2 outcomes).
    distinct = {out[i].tobytes() for i in range(16)}
    assert len(distinct) >= (2 if name == "grayscale" else 10), len(distinct)
    # An example's result depends only on itself and its position, not on the others.
    other = same.at[1:].set(_images(15, seed=9))
    np.testing.assert_allclose(np.asarray(fn(jax.random.key(3), other, 1.0))[0], out[0], atol=1e-6)


def test_hsv_round_trip_and_against_colorsys():
    x = np.asarray(_images(2))
    h, s, v = (np.asarray(a) for a in colour._rgb_to_hsv(jnp.asarray(x)))
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)]).reshape(*x.shape[:3], 3)
    np.testing.assert_allclose(s, ref[..., 1], atol=1e-6)
    np.testing.assert_allclose(v, ref[..., 2], atol=1e-6)
    hue_gap = np.abs(h - ref[..., 0])
    np.testing.assert_allclose(np.minimum(hue_gap, 1 - hue_gap), 0, atol=1e-5)
    back = colour._hsv_to_rgb(jnp.asarray(h), jnp.asarray(s), jnp.asarray(v))
    np.testing.assert_allclose(back, x, atol=1e-5)


def test_hue_shift_matches_colorsys():
    x = _images(1, 4, 4)
    out = np.asarray(colour.jitter_colour(jax.random.key(5), x, hue=0.2))
    u = jax.random.uniform(jax.random.key(5), (1, 4))
    shift = 0.2 * (2.0 * float(u[0, 3]) - 1.0)
    for p, q in zip(np.asarray(x).reshape(-1, 3), out.reshape(-1, 3)):
        h, s, v = colorsys.rgb_to_hsv(*p)
        np.testing.assert_allclose(q, colorsys.hsv_to_rgb((h + shift) % 1.0, s, v), atol=1e-5)


def test_brightness_scales_and_saturation_keeps_grey_and_grayscale_is_luma():
    x = _images(4) * 0.5  # no clipping at +30% brightness
    out = np.asarray(colour.jitter_colour(jax.random.key(0), x, brightness=0.3))
    ratio = out / np.maximum(np.asarray(x), 1e-6)
    for i in range(4):
        r = ratio[i][np.asarray(x)[i] > 0.05]
        assert np.ptp(r) < 1e-4 and 0.7 - 1e-6 <= r.mean() <= 1.3 + 1e-6
    grey = jnp.broadcast_to(jnp.linspace(0.1, 0.9, 12)[None, :, None, None], (4, 12, 10, 3))
    np.testing.assert_allclose(colour.jitter_colour(jax.random.key(0), grey, saturation=0.9), grey, atol=1e-6)
    g = np.asarray(colour.grayscale(jax.random.key(0), x, prob=1.0))
    luma = np.asarray(x) @ np.array([0.299, 0.587, 0.114], np.float32)
    for c in range(3):
        np.testing.assert_allclose(g[..., c], luma, atol=1e-6)


def test_stain_basis_is_ruifrok_johnston():
    # scikit-image's hed_from_rgb (rounded), an independent statement of the same basis.
    skimage_hed_from_rgb = np.array([[1.88, -1.01, -0.56], [-0.07, 1.13, -0.14], [-0.60, -0.48, 1.57]])
    np.testing.assert_allclose(colour.HED_FROM_RGB, skimage_hed_from_rgb, atol=0.01)
    x = _images() * 0.98 + 0.01  # above the OD floor
    np.testing.assert_allclose(colour.od_stains_to_rgb(colour.rgb_to_od_stains(x)), x, atol=1e-5)


def test_stain_jitter_scales_each_stain_concentration():
    x = _images(3) * 0.9 + 0.05
    out = colour.jitter_stain(jax.random.key(2), x, strength=0.4)
    u = np.asarray(jax.random.uniform(jax.random.key(2), (3, 2, 3), minval=-0.4, maxval=0.4))
    c_in, c_out = np.asarray(colour.rgb_to_od_stains(x)), np.asarray(colour.rgb_to_od_stains(out))
    unclipped = (np.asarray(out) > 1e-3).all(-1) & (np.asarray(out) < 1.0).all(-1)
    for i in range(3):
        expect = c_in[i] * (1 + u[i, 0]) + 0.1 * u[i, 1]
        np.testing.assert_allclose(c_out[i][unclipped[i]], expect[unclipped[i]], atol=1e-4)


def test_density_jitter_is_a_power_of_each_images_optical_density():
    x = _images(4) * 0.9 + 0.05
    out = np.asarray(colour.jitter_density(jax.random.key(5), x, strength=0.5))
    g = np.exp(np.log(1.5) * np.asarray(jax.random.uniform(jax.random.key(5), (4, 1, 1, 1), minval=-1, maxval=1)))
    assert (g > 1 / 1.5 - 1e-6).all() and (g < 1.5 + 1e-6).all() and np.ptp(g) > 0.1
    np.testing.assert_allclose(-np.log(out), (-np.log(np.asarray(x))) ** g, rtol=1e-4, atol=1e-5)
    # Not a scale and offset of the density: the optical-density input does not cancel it,
    # yet each image keeps the order of its pixels' densities.
    before = np.asarray(colour.model_input(_data("od_per_image"), x))
    after = np.asarray(colour.model_input(_data("od_per_image"), jnp.asarray(out)))
    assert np.abs(after - before).max() > 0.1
    for i in range(4):
        order = np.argsort(before[i, ..., 1], axis=None)
        assert (np.diff(after[i, ..., 1].ravel()[order]) >= -1e-4).all()


def test_gaussian_blur_matches_scipy_per_example():
    from scipy import ndimage

    x = _images(3, 16, 13)
    sigma = np.array([0.0, 0.7, 2.0], np.float32)
    out = np.asarray(colour.gaussian_blur(x, jnp.asarray(sigma), radius=6))
    for i, s in enumerate(sigma):
        # scipy's 'mirror' is numpy's 'reflect' (the edge pixel is not repeated).
        want = np.asarray(x[i]) if s == 0 else ndimage.gaussian_filter(
            np.asarray(x[i]), (s, s, 0), mode="mirror", truncate=6 / s)
        np.testing.assert_allclose(out[i], want, atol=1e-5)


def test_blur_widths_are_a_fraction_of_the_side_whatever_the_size():
    # An impulse's spread after the blur is its std: within [0, fraction * side] at each size.
    for side in (24, 48):
        x = jnp.zeros((64, side, side, 3)).at[:, side // 2, side // 2].set(1.0)
        out = np.asarray(colour.blur(jax.random.key(0), x, fraction=0.05))[..., 0]
        d = np.arange(side) - side // 2
        spread = np.sqrt((out.sum(axis=2) * d ** 2).sum(axis=1) / out.sum(axis=(1, 2)))
        assert spread.max() <= 0.05 * side + 1e-3 and spread.max() > 0.8 * 0.05 * side
        assert spread.min() < 0.2 * 0.05 * side
        np.testing.assert_allclose(out.sum(axis=(1, 2)), 1.0, rtol=1e-4)  # nothing lost


def test_noise_is_zero_mean_with_a_per_example_std_up_to_the_setting():
    x = jnp.full((64, 32, 32, 3), 0.5)
    diff = np.asarray(colour.noise(jax.random.key(0), x, std=0.05)) - 0.5
    std = diff.reshape(64, -1).std(axis=1)
    assert abs(diff.mean()) < 1e-3 and std.max() <= 0.05 * 1.05 and std.min() < 0.01
    assert np.ptp(std) > 0.03


@pytest.mark.parametrize("field,value", [("hue", 0.6), ("stain", -0.1), ("density", 1.5), ("brightness", 1.0),
                                         ("grayscale", True), ("saturation", "a lot"), ("sharpness", 0.1),
                                         ("blur", 0.2), ("noise", -0.01)])
def test_check_options_names_the_field(field, value):
    options = dict.fromkeys(colour.RANGES, 0.0) | {field: value}
    with pytest.raises(InputError, match=f"augment.colour.{field}"):
        colour.check_options(options)
    colour.check_options(STRONG)


def _data(norm):
    import ml_collections

    return ml_collections.ConfigDict({"input_norm": norm, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)})


def test_dataset_input_is_the_per_channel_mean_std_formula():
    x = _images()
    want = (np.asarray(x) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(colour.model_input(_data("dataset"), x), want, rtol=1e-5, atol=1e-5)


def test_od_per_image_cancels_each_images_stain_strength_and_background():
    # x -> exp(-b) * x**a per channel scales that channel's optical density by a and
    # shifts it by b: more or less stain, a brighter or darker scanner.
    x = jnp.clip(_images(), 0.05, 0.95)
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 2.0, (x.shape[0], 1, 1, 3)).astype(np.float32)
    b = rng.uniform(0.0, 0.5, (x.shape[0], 1, 1, 3)).astype(np.float32)
    y = np.exp(-b) * np.asarray(x) ** a
    out = colour.model_input(_data("od_per_image"), x)
    np.testing.assert_allclose(colour.model_input(_data("od_per_image"), jnp.asarray(y)), out, atol=2e-4)
    # Each image, each channel: zero mean, unit std over its own pixels.
    np.testing.assert_allclose(np.asarray(out).mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out).std(axis=(1, 2)), 1.0, atol=1e-4)


def test_gray_per_image_ignores_colour_brightness_and_contrast():
    x = _images()
    gray = np.asarray(x) @ np.array([0.299, 0.587, 0.114], np.float32)
    out = np.asarray(colour.model_input(_data("gray_per_image"), x))
    assert out.shape == x.shape
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    want = (gray - gray.mean(axis=(1, 2), keepdims=True)) / gray.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out[..., 1], want, atol=1e-4)
    dimmer = 0.2 + 0.5 * np.repeat(gray[..., None], 3, -1)  # the same grey image, less contrast, brighter
    np.testing.assert_allclose(colour.model_input(_data("gray_per_image"), jnp.asarray(dimmer))[..., 0], want,
                               atol=1e-4)


def test_a_flat_image_is_not_amplified():
    x = jnp.full((1, 8, 8, 3), 0.7, jnp.float32)
    for norm in ("od_per_image", "gray_per_image"):
        assert np.all(np.isfinite(colour.model_input(_data(norm), x)))
        np.testing.assert_allclose(colour.model_input(_data(norm), x), 0.0, atol=1e-5)
