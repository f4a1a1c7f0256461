"""Glomerulus masks for mask-weighted mixing (`mix.lam_mode='mask'`).

With CutMix and CircleMix, the label of a mixed image is usually weighted by the
share of *pixels* each image contributes. A crop's corners are mostly tissue
around the glomerulus, not the glomerulus, so that share can credit an image
for pixels that carry none of its class. Where the manifest has a `mask`
column, each image's label can instead be weighted by its share of the
*glomerulus* pixels in the mixed image (see `augment.mix`).

The host decodes each mask next to its image and stores it as a fourth channel
of the uint8 cache, so batches, shuffling and resumes are unchanged, and the
train step moves the mask with the image through every geometric augmentation
before it splits the channels (`step.prepare_images`).
"""

from __future__ import annotations

import os

import numpy as np

from circlemix_jax.data import pipeline
from circlemix_jax.data.manifest import read_csv, resolve_path
from circlemix_jax.errors import InputError

COLUMN = "mask"


def mask_paths(manifest: str, paths) -> list[str]:
    """The manifest's mask file for each image path (absolute, like the records' paths).

    Raises:
      InputError: no `mask` column, or an image without a mask.
    """
    header, rows = read_csv(manifest)
    if COLUMN not in header:
        raise InputError(f"{manifest}: mix.lam_mode='mask' needs a '{COLUMN}' column (glomerulus masks); "
                         f"the header is {header}")
    by_image = {resolve_path(manifest, r["path"]): (r.get(COLUMN) or "").strip()
                for r in rows if (r.get("path") or "").strip()}
    out, missing = [], []
    for p in paths:
        m = by_image.get(os.path.normpath(p), "")
        if not m:
            missing.append(p)
        out.append(resolve_path(manifest, m))
    if missing:
        raise InputError(f"{manifest}: {len(missing)} image(s) have no '{COLUMN}' entry, e.g. {missing[0]}")
    return out


def with_mask_channel(images: np.ndarray, masks: list[str], workers: int = 4) -> np.ndarray:
    """(N, S, S, 4) uint8: the images with their masks' grey level (0 = background) as channel 4.

    Masks are resized like the images (bilinear), so a soft edge stays soft.
    """
    size = images.shape[1]
    decoded = pipeline.decode_all(masks, size, workers, "decoding masks")
    grey = np.round(decoded.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return np.concatenate([images, grey[..., None]], axis=-1)
