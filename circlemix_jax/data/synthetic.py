"""The built-in synthetic glomerulus set, used when no manifest is given.

Ball-shaped objects on a pink, PAS-like tissue background, one look per class:

| id | class                    | what the generator draws                              |
|----|--------------------------|-------------------------------------------------------|
| 0  | normal                   | large tuft, many dark nuclei, bright Bowman's space   |
| 1  | periglomerular_fibrosis  | as normal, plus a thick pale-blue fibrous ring        |
| 2  | obsolescent              | shrunken, pale, homogeneous tuft, wrinkled capsule    |
| 3  | solidified               | large, dense, dark magenta solid ball, no space       |
| 4  | disappearing             | small, faint ball fading into the background          |

The set follows the paper's class proportions (2757:2206:1525:135:238) over 23
subjects, and is written once as PNGs plus a manifest into a cache folder, so it
goes through exactly the same loading code as real data.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from circlemix_jax import defaults
from circlemix_jax.defaults import FIVE_CLASSES

PAPER_COUNTS = (2757, 2206, 1525, 135, 238)
NUM_SUBJECTS = 23
GENERATED_SIZE = 128  # stored size; the pipeline resizes to config.data.image_size.
MIN_PER_CLASS = 12  # so every class reaches the training split of every fold.
VERSION = 1


def class_counts(total: int) -> tuple[int, ...]:
    """Per-class image counts for `total` images in the paper's proportions."""
    scale = total / sum(PAPER_COUNTS)
    return tuple(max(MIN_PER_CLASS, round(c * scale)) for c in PAPER_COUNTS)


def _draw(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # Tissue background: pink with low-frequency blotches and fine grain.
    noise = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1)).astype(np.float32)
    blotch = np.kron(noise, np.ones((8, 8), np.float32))[:size, :size]
    base = np.array([0.93, 0.78, 0.86], np.float32) + rng.normal(0, 0.02, 3).astype(np.float32)
    img = base + 0.03 * blotch[..., None] + rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)

    # Glomeruli sit near the centre of their crop (paper, Fig. 1).
    cy, cx = size / 2 + rng.normal(0, size * 0.04, 2)
    radius_frac = {0: 0.34, 1: 0.30, 2: 0.24, 3: 0.33, 4: 0.18}[label]
    r = size * radius_frac * rng.uniform(0.9, 1.1)
    aspect = rng.uniform(0.85, 1.15)
    d = np.sqrt(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2)
    theta = np.arctan2(yy - cy, xx - cx)

    def paint(mask: np.ndarray, color, strength=1.0):
        nonlocal img
        m = np.clip(mask, 0, 1)[..., None] * strength
        img = img * (1 - m) + np.asarray(color, np.float32) * m

    soft = lambda edge, width=1.5: 1 / (1 + np.exp((d - edge) / width))
    if label in (0, 1):
        if label == 1:  # periglomerular fibrosis: concentric pale-blue collagen ring
            paint(soft(r * 1.45) - soft(r * 1.12), (0.72, 0.78, 0.93), 0.9)
        paint(soft(r * 1.1) - soft(r * 1.02), (0.99, 0.97, 0.99))  # Bowman's space
        paint(soft(r * 0.98), (0.85, 0.55, 0.75))  # tuft
        n = int(rng.integers(40, 70))
        ny, nx = rng.uniform(-1, 1, (2, n)) * r * 0.75
        for y, x in zip(ny + cy, nx + cx):
            paint(np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (size / 110) ** 2)), (0.35, 0.2, 0.55), 0.9)
    elif label == 2:  # obsolescent: wrinkled capsule around a pale homogeneous tuft
        wrinkle = 1 + 0.06 * np.sin(theta * rng.integers(9, 15) + rng.uniform(0, 6))
        paint(soft(r * 1.15 * wrinkle) - soft(r * 1.0 * wrinkle), (0.75, 0.45, 0.70))
        paint(soft(r * 0.98 * wrinkle), (0.96, 0.82, 0.90))
    elif label == 3:  # solidified: dense solid ball, no Bowman's space
        paint(soft(r), (0.62, 0.22, 0.50))
        paint(soft(r * 0.6, 6.0), (0.55, 0.18, 0.45), 0.5)
    else:  # disappearing: small faint remnant
        paint(soft(r, 3.0), (0.86, 0.62, 0.80), 0.7)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate(folder: str, total: int, seed: int = 0) -> str:
    """Writes the synthetic set (PNGs + manifest.csv) into `folder`.

    Args:
      folder: destination; created atomically (written elsewhere, then renamed).
      total: approximate number of images.
      seed: generator seed; the same seed always gives the same images.

    Returns:
      The manifest path.
    """
    rng = np.random.default_rng(seed)
    rows = []
    tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=os.path.dirname(folder) or ".")
    os.makedirs(os.path.join(tmp, "images"))
    for label, count in enumerate(class_counts(total)):
        # Round-robin over subjects from a random offset spreads rare classes over
        # many subjects, so subject-level folds can stratify them.
        offset = int(rng.integers(NUM_SUBJECTS))
        for k in range(count):
            subject = f"S{(offset + k) % NUM_SUBJECTS:02d}"
            name = f"images/{FIVE_CLASSES[label]}_{k:04d}.png"
            Image.fromarray(_draw(rng, label, GENERATED_SIZE)).save(os.path.join(tmp, name))
            rows.append((name, FIVE_CLASSES[label], subject))
    with open(os.path.join(tmp, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "subject"])
        w.writerows(rows)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process won the race; keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
    return os.path.join(folder, "manifest.csv")


def ensure(total: int, seed: int = 0) -> str:
    """Returns the manifest of the synthetic set, generating it on first use."""
    folder = os.path.join(defaults.cache_root(), f"synthetic-v{VERSION}-n{total}-s{seed}")
    manifest = os.path.join(folder, "manifest.csv")
    if not os.path.exists(manifest):
        os.makedirs(defaults.cache_root(), exist_ok=True)
        print(f"Generating the built-in SYNTHETIC glomerulus set ({total} images) in {folder}", flush=True)
        generate(folder, total, seed)
    return manifest
