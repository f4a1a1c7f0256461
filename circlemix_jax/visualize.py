"""A figure like the paper's Figure 1: image pairs and their CutMix and CircleMix mixes.

    python -m circlemix_jax.visualize --config configs/c5.py --out mixed.png [--pairs 4]

Uses the configured data (the manifest, or the built-in synthetic set) and the
exact `augment.mix` code of the train step, so what you see is what trains.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from circlemix_jax import augment, data, pipeline
from circlemix_jax.errors import exits_cleanly

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/c5.py.", lock_config=True)
_OUT = flags.DEFINE_string("out", "mixed.png", "Where to write the PNG grid.")
_PAIRS = flags.DEFINE_integer("pairs", 4, "Number of image pairs (rows).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the pair choice and the masks.")


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
    import matplotlib  # noqa: PLC0415 - headless backend before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

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


@exits_cleanly
def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    records = data.read_manifest(data.manifest_path(config), config.class_names, config.data.label_map.to_dict())
    rng = np.random.default_rng(_SEED.value)
    take = rng.choice(len(records), size=min(len(records), 64), replace=False)
    subset = records.take(np.sort(take))
    images = pipeline.decode_all(subset.paths, config.data.image_size, config.data.workers, "decoding")
    fig = make_figure(images, subset.labels, records.class_names, _PAIRS.value, _SEED.value)
    fig.savefig(_OUT.value, dpi=110)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
