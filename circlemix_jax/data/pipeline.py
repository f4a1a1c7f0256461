"""Host input pipeline: decode and resize once into a uint8 cache, then Grain batches.

The host only decodes, resizes and batches; flips, crops and mixing run on the
device inside the train step. Decoded images live in one (N, S, S, 3) uint8
array (1.3 GB for the paper's 6,861 images at 256 px), or, for a set larger
than memory, in image_cache's file on disk; either way every epoch costs only a
gather per batch, and `prefetch` puts batches on the device ahead of their step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from circlemix_jax.errors import InputError


def load_image(path: str, size: int) -> np.ndarray:
    """Decodes one image into (size, size, 3) uint8 RGB.

    Grayscale, palette, RGBA and 16-bit images are converted rather than refused:
    alpha is composited on white (slide background), 16-bit is scaled to 8-bit.

    Raises:
      OSError, UnidentifiedImageError, ValueError: unreadable or corrupt file.
    """
    with Image.open(path) as im:
        im.load()  # forces a full decode, so truncated files fail here and not later
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, np.float64)
            arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
            im = Image.fromarray(arr)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
        return np.asarray(im, np.uint8)


def decode_all(paths, size: int, workers: int = 4, desc: str = "decoding", out: np.ndarray | None = None
               ) -> np.ndarray:
    """Decodes every image in parallel threads (PIL releases the GIL).

    Args:
      paths: image files.
      size: output side in pixels.
      workers: decoding threads.
      desc: what the progress lines call the work.
      out: (N, size, size, 3) uint8 to decode into (a memory map for the disk cache); new if None.

    Returns:
      uint8 array (N, size, size, 3): `out` when given.

    Raises:
      InputError: listing every missing or unreadable file, not only the first.
    """
    if out is None:
        out = np.empty((len(paths), size, size, 3), np.uint8)
    bad: list[str] = []

    def one(i: int) -> None:
        try:
            out[i] = load_image(paths[i], size)
        except FileNotFoundError:
            bad.append(f"{paths[i]} (missing)")
        except Image.DecompressionBombError:
            bad.append(f"{paths[i]} (larger than PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels; "
                       "crop it to the glomerulus)")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as e:
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:80] or type(e).__name__
            bad.append(f"{paths[i]} (unreadable: {reason})")

    start, tty = time.time(), sys.stderr.isatty()
    last_line = start
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for done, _ in enumerate(pool.map(one, range(len(paths))), start=1):
            if tty and (done % 64 == 0 or done == len(paths)):
                print(f"\r{desc}: {done}/{len(paths)} images", end="", file=sys.stderr, flush=True)
            elif not tty and time.time() - last_line > 30:  # a log file gets a line now and then
                last_line = time.time()
                print(f"{desc}: {done}/{len(paths)} images", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    if bad:
        bad.sort()
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise InputError(f"{len(bad)} image(s) could not be read: {', '.join(bad[:10])}{more}")
    print(f"{desc}: {len(paths)} images at {size}px in {time.time() - start:.1f}s", flush=True)
    return out


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch: a function of (seed, epoch) only, so resumes replay it."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _process_slice(n: int) -> slice:
    """This process's share of a global batch of n (multi-host: one slice each)."""
    import jax  # local: keep the module importable without initialising a backend

    per = n // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def balanced_probs(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sampling probabilities under which every (group, label) cell present weighs the same.

    In the public set the centre predicts the label (4% of one centre's glomeruli
    are sclerotic, 42% of another's), so a network can learn the centre instead of
    the glomerulus. Drawn with these probabilities, every centre shows every class
    it has equally often, and a centre's look carries no information about the label.

    Args:
      labels: (N,) class ids.
      groups: (N,) group of each example (the centre).

    Returns:
      (N,) float64 probabilities summing to 1.
    """
    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    pairs = np.stack([group_ids, np.asarray(labels)], axis=1)
    cells = np.unique(pairs, axis=0, return_inverse=True)[1].ravel()  # one id per (group, label)
    counts = np.bincount(cells)
    probs = 1.0 / (counts[cells] * len(counts))
    return probs / probs.sum()


def class_counts(labels: np.ndarray, num_classes: int, probs: np.ndarray | None = None) -> np.ndarray:
    """How many images of each class an epoch of `train_batches` holds, on average.

    Args:
      labels: (N,) class ids.
      num_classes: K.
      probs: the epoch's sampling probabilities (`balanced_probs`), or None for a plain shuffle.

    Returns:
      (K,) float64 counts summing to N.
    """
    weights = None if probs is None else np.asarray(probs) * len(labels)
    return np.bincount(np.asarray(labels, np.int64), weights, minlength=num_classes).astype(np.float64)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, epoch: int,
                  start: int = 0, workers: int = 4, probs: np.ndarray | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled training batches, starting at batch `start`.

    Drops the remainder so every step has the same shape (one compilation). With
    `probs` (e.g. `balanced_probs`) the epoch is as many draws with replacement,
    weighted by them, so it keeps its length and its steps; either way the order
    depends only on (seed, epoch), so a resumed run replays it.

    Yields:
      {'image': uint8 (B_local, S, S, 3), 'label': int32 (B_local,)} where B_local
      is this process's slice of the global batch.
    """
    local = _process_slice(batch_size)
    if probs is None:
        ds = grain.MapDataset.range(len(labels)).shuffle(seed=epoch_seed(seed, epoch))
    else:
        rng = np.random.default_rng(epoch_seed(seed, epoch))
        ds = grain.MapDataset.source(rng.choice(len(labels), size=len(labels), p=probs))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds[start:]
    ds = ds.map(lambda idx: {"image": images[idx[local]], "label": labels[idx[local]].astype(np.int32)})
    yield from ds.to_iter_dataset(_read_options(workers, ahead=4))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps in one epoch (remainder dropped)."""
    return num_examples // batch_size


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                 workers: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order; the last batch is padded and masked.

    Yields:
      {'image', 'label', 'mask'}: mask is False on padding rows.
    """
    local = _process_slice(batch_size)
    n = len(labels)
    padded = -(-n // batch_size) * batch_size
    index = np.arange(padded)

    def gather(idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = idx[local]
        valid = idx < n
        safe = np.where(valid, idx, 0)
        return {"image": images[safe], "label": labels[safe].astype(np.int32), "mask": valid}

    ds = grain.MapDataset.source(index).batch(batch_size).map(gather)
    yield from ds.to_iter_dataset(_read_options(workers, ahead=2))


def _read_options(workers: int, ahead: int) -> grain.ReadOptions:
    """`workers` gathering threads and at least `ahead` batches in flight.

    The buffer is never smaller than the thread count: grain can use only as many
    threads as batches may be in flight, and says so at every epoch otherwise.
    """
    return grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(ahead, workers))


def default_workers() -> int:
    """Host threads for decoding: all cores, at least 2."""
    return max(2, os.cpu_count() or 2)


# Batch gathers are memory copies, so a few threads keep even a fast accelerator fed;
# more would only add thread switches on the cores XLA is computing on.
MAX_LOADER_THREADS = 8


def loader_threads(configured: int) -> int:
    """Threads that gather training batches: the configured number, raised to the host's cores (up to 8).

    A config written for a 2-core laptop (data.workers=4) then still feeds a 16-core
    GPU host, where a cold disk cache needs several reads in flight.
    """
    return max(configured, min(os.cpu_count() or 1, MAX_LOADER_THREADS))


def prefetch(batches: Iterable, put: Callable, depth: int = 2) -> Iterator:
    """Yields `put(batch)` for each batch, with `depth` batches put ahead of the one in use.

    With `put` a host-to-device copy, the copies of the next batches are issued
    while the device still runs the current step, so a step never waits for its
    input. JAX copies and steps run asynchronously: the order of the calls is the
    order on the device, and nothing here waits for either.
    """
    queue = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > depth:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
