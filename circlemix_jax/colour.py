"""On-device colour, stain and scanner augmentation of RGB images in [0, 1].

Stain colour differs between centres and scanners, and on the public set the
centre is confounded with the label, so a network can score well by reading the
stain instead of the glomerulus. These jitters make colour an unreliable cue:

- `jitter_colour`: brightness, contrast, saturation and hue, as torchvision's
  ColorJitter (each factor drawn per example, applied in a fixed order).
- `jitter_stain`: a random scale and shift of each stain's concentration in
  optical-density (OD) space (Tellez et al. 2018, "H&E-DAB" jitter). The stain
  basis is Ruifrok and Johnston's haematoxylin/eosin/DAB (2001). PAS is not
  H&E, but any invertible basis of OD space works: scaling one stain's
  concentration changes that stain's intensity, which is what differs between
  labs, while the tissue structure (where each stain sits) is untouched.
- `jitter_density`: a random power of each image's optical density. The
  per-image OD input (`model_input`) cancels a scale and offset of the density,
  but not how a lab's heavy staining compresses dense regions against light
  ones; a power changes exactly that ratio.
- `grayscale`: with some probability, an example loses its colour entirely.
- `blur` and `noise`: a Gaussian blur of random width and additive Gaussian noise,
  per example. Scanners differ in focus, optics and sensor noise as well as in
  colour, and a network that leans on the finest texture one scanner resolves can
  misread another's (Tellez et al. 2019 found such "morphology" jitter, with the
  colour ones, best across centres).

All are pure functions `(rng, images) -> images`, drawn independently for each
example, jit- and vmap-friendly, and the identity at zero strength.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Rows: the OD colour of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001),
# each of unit length. Concentrations c relate to OD by od = c @ RGB_FROM_HED.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], np.float32)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)
# Transmitted light below this fraction is treated as this fraction: log(0) is -inf.
_MIN_LIGHT = 1e-3
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _gray(x):
    return jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=([-1], [0]))[..., None]


def _blend(a, b, factor):
    """factor * a + (1 - factor) * b, clipped to [0, 1] (torchvision's _blend)."""
    return jnp.clip(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(x):
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc, minc = jnp.max(x, -1), jnp.min(x, -1)
    v, delta = maxc, maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(maxc == r, (g - b) / safe, jnp.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = jnp.where(delta > 0, jnp.mod(h / 6.0, 1.0), 0.0)
    return h, s, v


def _hsv_to_rgb(h, s, v):
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    i = jnp.mod(i, 6).astype(jnp.int32)[..., None]
    choices = [jnp.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    out = choices[0]
    for k in range(1, 6):  # six selects: elementwise, no gather
        out = jnp.where(i == k, choices[k], out)
    return out


def _colour_one(u, x, brightness, contrast, saturation, hue):
    # Factors from one uniform draw per property: 1 + U(-s, s), hue shift U(-h, h) turns.
    if brightness:
        x = jnp.clip(x * (1.0 + brightness * (2.0 * u[0] - 1.0)), 0.0, 1.0)
    if contrast:
        x = _blend(x, jnp.mean(_gray(x)), 1.0 + contrast * (2.0 * u[1] - 1.0))
    if saturation:
        x = _blend(x, _gray(x), 1.0 + saturation * (2.0 * u[2] - 1.0))
    if hue:
        h, s, v = _rgb_to_hsv(x)
        x = _hsv_to_rgb(jnp.mod(h + hue * (2.0 * u[3] - 1.0), 1.0), s, v)
    return x


def jitter_colour(rng, images, *, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
    """Random brightness, contrast, saturation and hue, drawn per example.

    Brightness scales the image by 1 + U(-b, b); contrast and saturation blend
    it with its mean grey level and its grey image by a factor 1 + U(-s, s);
    hue shifts the HSV hue by U(-h, h) of a full turn.

    Args:
        rng: PRNG key.
        images: Float RGB images (B, H, W, 3) in [0, 1].
        brightness: Strength in [0, 1) (static).
        contrast: Strength in [0, 1) (static).
        saturation: Strength in [0, 1] (static).
        hue: Strength in [0, 0.5] (static).

    Returns:
        Images of the same shape and dtype, in [0, 1].
    """
    if not (brightness or contrast or saturation or hue):
        return images
    u = jax.random.uniform(rng, (images.shape[0], 4))
    fn = lambda u, x: _colour_one(u, x, brightness, contrast, saturation, hue)
    return jax.vmap(fn)(u, images.astype(jnp.float32)).astype(images.dtype)


def rgb_to_od_stains(x):
    """Stain concentrations (..., 3) of RGB (..., 3) in [0, 1], in the HED basis."""
    od = -jnp.log(jnp.maximum(x, _MIN_LIGHT))
    return od @ jnp.asarray(HED_FROM_RGB)


def od_stains_to_rgb(c):
    """The inverse of `rgb_to_od_stains`, clipped to [0, 1]."""
    return jnp.clip(jnp.exp(-(c @ jnp.asarray(RGB_FROM_HED))), 0.0, 1.0)


def jitter_stain(rng, images, *, strength=0.0):
    """Scales and shifts each stain's OD concentration at random, per example.

    Each of the three HED concentrations c becomes c * (1 + U(-s, s)) + U(-s, s) * 0.1:
    the scale models more or less stain, the small shift a tinted background.

    Args:
        rng: PRNG key.
        images: Float RGB images (B, H, W, 3) in [0, 1].
        strength: s in [0, 1) (static); 0 returns the images unchanged.

    Returns:
        Images of the same shape and dtype, in [0, 1].
    """
    if not strength:
        return images
    u = jax.random.uniform(rng, (images.shape[0], 2, 3), minval=-strength, maxval=strength)
    scale, shift = 1.0 + u[:, 0, None, None, :], 0.1 * u[:, 1, None, None, :]
    c = rgb_to_od_stains(images.astype(jnp.float32))
    return od_stains_to_rgb(c * scale + shift).astype(images.dtype)


def jitter_density(rng, images, *, strength=0.0):
    """Raises each example's optical density to a random power, od -> od ** g.

    g is drawn log-uniformly from [1 / (1 + s), 1 + s]. Below 1 it lifts faint
    density towards the dense (a heavily stained slide, where the tuft reads as
    one dark mass); above 1 it does the reverse. A scale and offset of the density
    cancel in the `od_per_image` input; this nonlinear change does not, so the
    network must learn to read glomeruli at both.

    Args:
        rng: PRNG key.
        images: Float RGB images (B, H, W, 3) in [0, 1].
        strength: s >= 0 (static); 0 returns the images unchanged.

    Returns:
        Images of the same shape and dtype, in [0, 1].
    """
    if not strength:
        return images
    log_g = jax.random.uniform(rng, (images.shape[0], 1, 1, 1), minval=-1.0, maxval=1.0) * np.log1p(strength)
    od = -jnp.log(jnp.maximum(images.astype(jnp.float32), _MIN_LIGHT))
    return jnp.exp(-(od ** jnp.exp(log_g))).astype(images.dtype)


def grayscale(rng, images, *, prob=0.0):
    """Replaces each example by its grey image (3 equal channels) with probability `prob`."""
    if not prob:
        return images
    pick = jax.random.bernoulli(rng, prob, (images.shape[0], 1, 1, 1))
    return jnp.where(pick, jnp.broadcast_to(_gray(images), images.shape), images)


def _gaussian_taps(sigma, radius):
    """Normalised 1-D Gaussian weights (B, 2 * radius + 1) for per-example widths `sigma` (B,)."""
    k = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    # A width of 0 is the identity: every weight but the centre's underflows to 0.
    w = jnp.exp(-0.5 * (k / jnp.maximum(sigma, 1e-3)[:, None]) ** 2)
    return w / jnp.sum(w, axis=1, keepdims=True)


def _smooth_axis(x, taps, axis):
    """Convolves (B, H, W, C) along `axis` (1 or 2) with each example's taps, mirrored borders."""
    radius = (taps.shape[1] - 1) // 2
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    xp = jnp.pad(x, pad, mode="reflect")
    n = x.shape[axis]
    # Static shifted slices and a weighted sum: elementwise, so it vectorises on every backend.
    out = 0.0
    for j in range(taps.shape[1]):
        part = jax.lax.slice_in_dim(xp, j, j + n, axis=axis)
        out = out + taps[:, j, None, None, None] * part
    return out


def gaussian_blur(images, sigma, radius):
    """Blurs each example (B, H, W, C) with its own Gaussian std `sigma` (B,) in pixels.

    Separable, truncated at `radius` pixels (static), with mirrored borders (numpy's
    'reflect'); a std of 0 returns the example unchanged.
    """
    taps = _gaussian_taps(sigma, radius)
    return _smooth_axis(_smooth_axis(images.astype(jnp.float32), taps, 1), taps, 2).astype(images.dtype)


def blur(rng, images, *, fraction=0.0):
    """A Gaussian blur of each example, its std drawn from U(0, fraction * side).

    The width is a fraction of the image side, so the same setting blurs the same
    tissue at any image size.

    Args:
        rng: PRNG key.
        images: Float RGB images (B, H, W, 3) in [0, 1].
        fraction: The largest std as a fraction of the image side (static); 0 returns the
            images unchanged.

    Returns:
        Images of the same shape and dtype.
    """
    max_sigma = fraction * max(images.shape[1], images.shape[2])
    if not max_sigma:
        return images
    sigma = jax.random.uniform(rng, (images.shape[0],), maxval=max_sigma)
    # Three stds hold 99.7% of the weight; a mirrored pad cannot exceed the side.
    radius = max(1, min(int(np.ceil(3.0 * max_sigma)), min(images.shape[1:3]) - 1))
    return gaussian_blur(images, sigma, radius)


def noise(rng, images, *, std=0.0):
    """Adds Gaussian noise to each example, its std drawn from U(0, std), clipped to [0, 1].

    Args:
        rng: PRNG key.
        images: Float RGB images (B, H, W, 3) in [0, 1].
        std: The largest noise std in image units (static); 0 returns the images unchanged.

    Returns:
        Images of the same shape and dtype, in [0, 1].
    """
    if not std:
        return images
    k_std, k_noise = jax.random.split(rng)
    s = jax.random.uniform(k_std, (images.shape[0], 1, 1, 1), maxval=std)
    x = images.astype(jnp.float32) + s * jax.random.normal(k_noise, images.shape)
    return jnp.clip(x, 0.0, 1.0).astype(images.dtype)


def augment(rng, images, options):
    """Every jitter of `options` (a `config.augment.colour` mapping) in a fixed order.

    Stain and density first (they model the slide), then the scanner's blur, the
    camera-like jitters and its noise, then grey.
    """
    k_stain, k_colour, k_gray = jax.random.split(rng, 3)
    x = jitter_stain(k_stain, images, strength=options.get("stain", 0.0))
    # Their own keys from the stain's, so adding them left every other draw as it was.
    x = jitter_density(jax.random.fold_in(k_stain, 1), x, strength=options.get("density", 0.0))
    x = blur(jax.random.fold_in(k_stain, 2), x, fraction=options.get("blur", 0.0))
    x = jitter_colour(k_colour, x, brightness=options.get("brightness", 0.0), contrast=options.get("contrast", 0.0),
                      saturation=options.get("saturation", 0.0), hue=options.get("hue", 0.0))
    x = noise(jax.random.fold_in(k_stain, 3), x, std=options.get("noise", 0.0))
    return grayscale(k_gray, x, prob=options.get("grayscale", 0.0))


# How `model_input` turns [0, 1] RGB into the network's input (`config.data.input_norm`).
INPUT_NORMS = ("dataset", "od_per_image", "gray_per_image")
# A flat image has no spread to divide by; below this std (in input units) it is not amplified.
_MIN_STD = 1e-2


def _standardise(x):
    mean = jnp.mean(x, axis=(-3, -2), keepdims=True)
    std = jnp.std(x, axis=(-3, -2), keepdims=True)
    return (x - mean) / jnp.maximum(std, _MIN_STD)


def model_input(data_config, x):
    """RGB images in [0, 1] (..., H, W, 3) -> the network's float input.

    - 'dataset' (the paper's): (x - mean) / std per channel, one mean and std for all images.
    - 'od_per_image': each image's optical density, -log(x), standardised per channel over
      its own pixels. The scale and offset of every stain's density (how much stain a lab
      applied, how bright its scanner is) cancel, so the network sees where the stains
      sit, not how strong they are.
    - 'gray_per_image': the grey image standardised over its own pixels, in all 3
      channels: no colour at all, only morphology and relative intensity.

    The per-image forms are the same function at train and test time, so a model
    trained with one never sees another centre's absolute stain strength.

    Args:
        data_config: `config.data` (its `input_norm`, `mean` and `std`).
        x: Float images in [0, 1].

    Returns:
        float32 images of the same shape.
    """
    x = x.astype(jnp.float32)
    kind = data_config.get("input_norm", "dataset")
    if kind == "od_per_image":
        return _standardise(-jnp.log(jnp.maximum(x, _MIN_LIGHT)))
    if kind == "gray_per_image":
        return jnp.broadcast_to(_standardise(_gray(x)), x.shape)
    return (x - jnp.asarray(data_config.mean, jnp.float32)) / jnp.asarray(data_config.std, jnp.float32)


def is_off(options) -> bool:
    """Whether `options` asks for no colour change at all."""
    return not any(options.get(k, 0.0) for k in RANGES)


# Field -> (low, high) inclusive, and why the bound: a factor 1 - s must stay > 0,
# a hue shift of half a turn already reaches every hue, a density power beyond 1/2..2 is not tissue,
# a blur wider than a tenth of the side or noise beyond a fifth of the range leaves no glomerulus.
RANGES = {"brightness": (0.0, 0.99), "contrast": (0.0, 0.99), "saturation": (0.0, 1.0), "hue": (0.0, 0.5),
          "stain": (0.0, 0.99), "density": (0.0, 1.0), "grayscale": (0.0, 1.0), "blur": (0.0, 0.1),
          "noise": (0.0, 0.2)}


def check_options(options) -> None:
    """Validates `config.augment.colour`.

    Raises:
        InputError: naming the field `augment.colour.<name>` and its range.
    """
    from circlemix_jax.errors import InputError  # keeps this module free of CLI concerns

    for name in options:
        if name not in RANGES:
            raise InputError(f"config field augment.colour.{name} is unknown; expected one of {tuple(RANGES)}")
    for name, (lo, hi) in RANGES.items():
        v = options.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise InputError(f"config field augment.colour.{name}={v!r} must be a number in [{lo}, {hi}]")
