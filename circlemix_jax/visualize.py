"""Figures of what the train step does to images.

    python -m circlemix_jax.visualize --config configs/c5.py --out mixed.png [--pairs 4]
    python -m circlemix_jax.visualize --config configs/binary.py:scratch --mode=augment --out augment.png

The default mode is like the paper's Figure 1: image pairs and their CutMix and
CircleMix mixes. `--mode=augment` shows images (one per centre and class when
the manifest has a `center` column) next to their stain jitter alone, colour
jitter alone, and draws of the full train augmentation, at the config's strengths.
Uses the configured data (the manifest, or the built-in synthetic set) and the
exact code of the train step, so what you see is what trains.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from circlemix_jax import augment, cli, colour, data, step
from circlemix_jax.data import pipeline
from circlemix_jax.errors import InputError

_DRAWS = 3  # draws of each augmentation per image in --mode=augment


def pick_pairs(labels: np.ndarray, num_pairs: int, seed: int) -> np.ndarray:
    """Indices (num_pairs, 2) of image pairs, preferring pairs of different classes."""
    order = np.random.default_rng(seed).permutation(len(labels))
    pairs, used = [], set()
    for a in order:
        free = [b for b in order if b != a and b not in used and a not in used]
        partner = [b for b in free if labels[b] != labels[a]] or free
        if partner:
            pairs.append((a, partner[0]))
            used |= {a, partner[0]}
        if len(pairs) == num_pairs:
            break
    return np.array(pairs)


@functools.partial(jax.jit, static_argnames=("method",))
def mix_pair(rng: jax.Array, pair: jax.Array, method: str) -> tuple[jax.Array, jax.Array]:
    """Mixes image 0 (A) with image 1 (B) exactly as the train step does; returns (image, λ)."""
    labels = jnp.arange(2)
    out, _, lam = augment.mix(rng, pair, labels, num_classes=2, method=method, sampler="paper")
    return out[0], lam[0]


def make_figure(images: np.ndarray, labels: np.ndarray, class_names, num_pairs: int, seed: int):
    """Builds the matplotlib figure: columns A, B, CutMix(A,B), CircleMix(A,B)."""
    import matplotlib  # headless backend before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = pick_pairs(labels, num_pairs, seed)
    fig, axes = plt.subplots(len(pairs), 4, figsize=(10, 2.6 * len(pairs)), squeeze=False)
    rng = jax.random.key(seed)
    for row, (a, b) in enumerate(pairs):
        pair = jnp.asarray(images[[a, b]], jnp.float32) / 255.0
        panels = [(images[a], f"A: {class_names[labels[a]]}"), (images[b], f"B: {class_names[labels[b]]}")]
        for col, method in enumerate(("cutmix", "circlemix")):
            out, lam = mix_pair(jax.random.fold_in(rng, 2 * row + col), pair, method)
            panels.append((np.asarray(out), f"{'CutMix' if col == 0 else 'CircleMix'}  λ(A)={float(lam):.2f}"))
        for ax, (img, title) in zip(axes[row], panels):
            ax.imshow(img)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("Original pairs, CutMix and CircleMix (label = λ·A + (1-λ)·B)")
    fig.tight_layout()
    return fig


def augment_columns(config, rng: jax.Array, image: np.ndarray) -> list[tuple[np.ndarray, str]]:
    """(image, title) panels: the original, then `_DRAWS` each of stain, colour and full augmentation."""
    options = config.augment.colour.to_dict()
    stain = jax.jit(lambda k, x: colour.jitter_stain(k, x, strength=options["stain"]))
    jitter = jax.jit(lambda k, x: colour.jitter_colour(
        k, x, brightness=options["brightness"], contrast=options["contrast"], saturation=options["saturation"],
        hue=options["hue"]))
    full = jax.jit(lambda k, x: step.augment_images(config, k, x))
    x = jnp.asarray(image, jnp.float32)[None] / 255.0
    panels = [(image, "original")]
    for name, fn in ((f"stain {options['stain']}", stain), ("colour", jitter), ("train aug.", full)):
        for d in range(_DRAWS):
            panels.append((np.asarray(fn(jax.random.fold_in(rng, d), x)[0]), name))
    return panels


def pick_examples(records, centers: np.ndarray | None, seed: int, num: int) -> np.ndarray:
    """Row indices: one per (centre, class) when centres are known, else `num` at random."""
    order = np.random.default_rng(seed).permutation(len(records))
    if centers is None:
        return order[:num]
    seen, picked = set(), []
    for i in order:
        key = (centers[i], records.labels[i])
        if key not in seen:
            seen.add(key)
            picked.append(i)
    return np.array(sorted(picked, key=lambda i: (centers[i], records.labels[i])))


def _centers_if_any(records) -> np.ndarray | None:
    """Each record's centre, or None when the manifest has no usable `center` column."""
    try:
        return data.centers(records)
    except InputError:
        return None


def augment_figure(config, records, centers, seed: int, num: int = 6):
    """The --mode=augment figure: one row per picked image."""
    import matplotlib  # headless backend before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = pick_examples(records, centers, seed, num)
    subset = records.take(picked)
    images = pipeline.decode_all(subset.paths, config.data.image_size, config.data.workers, "decoding")
    cols = 1 + 3 * _DRAWS
    fig, axes = plt.subplots(len(picked), cols, figsize=(1.6 * cols, 1.7 * len(picked)), squeeze=False)
    rng = jax.random.key(seed)
    for row, (image, label) in enumerate(zip(images, subset.labels)):
        where = f"{centers[picked[row]]}\n" if centers is not None else ""
        for col, (img, title) in enumerate(augment_columns(config, jax.random.fold_in(rng, row), image)):
            ax = axes[row][col]
            ax.imshow(np.clip(img, 0, 1) if img.dtype != np.uint8 else img)
            ax.set_title(f"{where}{records.class_names[label]}" if col == 0 else title, fontsize=7)
            ax.axis("off")
    c = config.augment.colour
    fig.suptitle(f"Stain (OD) jitter, colour jitter (brightness {c.brightness}, contrast {c.contrast}, "
                 f"saturation {c.saturation}, hue {c.hue}) and the full train augmentation", fontsize=9)
    fig.tight_layout()
    return fig


def write_figure(config, out: str, mode: str, pairs: int, seed: int) -> None:
    """Writes the `mode` figure ('mix' or 'augment') of `config`'s data to `out`."""
    records = data.read_manifest(data.manifest_path(config), config.class_names, config.data.label_map.to_dict())
    if mode == "augment":
        centers = _centers_if_any(records) if config.data.manifest else None
        fig = augment_figure(config, records, centers, seed)
    else:
        rng = np.random.default_rng(seed)
        take = rng.choice(len(records), size=min(len(records), 64), replace=False)
        subset = records.take(np.sort(take))
        images = pipeline.decode_all(subset.paths, config.data.image_size, config.data.workers, "decoding")
        fig = make_figure(images, subset.labels, records.class_names, pairs, seed)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def run() -> None:
    """CLI entry (`python -m circlemix_jax.visualize`, `circlemix-visualize`); flags are
    defined here so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/c5.py.", lock_config=True)
    out = flags.DEFINE_string("out", "mixed.png", "Where to write the PNG grid.")
    pairs = flags.DEFINE_integer("pairs", 4, "Number of image pairs (rows).")
    seed = flags.DEFINE_integer("seed", 0, "Seed of the pair choice and the masks.")
    mode = flags.DEFINE_enum("mode", "mix", ["mix", "augment"], "mix: CutMix/CircleMix pairs; "
                             "augment: stain, colour and full train augmentation of single images.")

    @cli.command
    def main() -> None:
        write_figure(config.value, out.value, mode.value, pairs.value, seed.value)

    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config_flags=("config",)))


if __name__ == "__main__":
    run()
