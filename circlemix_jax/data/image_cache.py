"""Decoded images on disk: every image of a manifest at one size, in one memory-mapped uint8 file.

A set that does not fit in memory (100,000 glomeruli at 256 px are 20 GB) is
decoded once into `<cache_dir>/<paths>-<size>px-<content>.npy` and read back
through a memory map: the pages Grain gathers batches from are the kernel's
page cache, which it can drop under pressure, not the process's own memory.

The file's name holds a SHA-256 of every image file's bytes (in the order of
the manifest's sorted, distinct paths) and of the size, so a changed image or
manifest names another file and the old one is never read. The file is written
under a temporary name and renamed once complete, so a killed run never leaves
half a cache that a later run would trust. Every fold and stage of a manifest
shares one file per image size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import glob
import hashlib
import os
import time

import numpy as np

from circlemix_jax import defaults
from circlemix_jax.data import pipeline
from circlemix_jax.errors import InputError

MODES = ("auto", "memory", "disk")
# Bumped when decoding changes (resize filter, mode conversion): old files then no longer match.
VERSION = 1
_READ_CHUNK = 1 << 20


class ImageRows:
    """Some rows of a uint8 image store (an array or a memory-mapped .npy), in a given order.

    Indexing returns a new in-memory array, like indexing a numpy array, so the
    pipeline gathers batches from it as from the in-memory cache. Rows of a file
    are read with one `pread` each rather than through the memory map: touching
    a mapped page for the first time costs a page fault per 4 KiB (48 for a
    256 px image), and an epoch touches every image once.

    Args:
      store: (N, S, S, C) uint8, usually the read-only `np.memmap` of `open_or_build`.
      rows: which rows of `store`, in this view's order.
    """

    def __init__(self, store: np.ndarray, rows):
        self.store = store
        self.rows = np.asarray(rows, np.int64)
        self._row_bytes = int(np.prod(store.shape[1:], dtype=np.int64)) * store.dtype.itemsize
        self._fd = None
        if isinstance(store, np.memmap) and store.filename:
            self._fd = os.open(store.filename, os.O_RDONLY)
            self._offset = store.offset

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows),) + self.store.shape[1:]

    @property
    def dtype(self) -> np.dtype:
        return self.store.dtype

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self._row_bytes

    def __getitem__(self, index) -> np.ndarray:
        rows = self.rows[index]
        if np.ndim(rows) == 0:
            return self[np.atleast_1d(index)][0]
        out = np.empty((len(rows),) + self.store.shape[1:], self.store.dtype)
        if self._fd is None:
            out[...] = self.store[rows]
            return out
        # Ascending file offsets: from a cold disk, neighbouring rows share read-ahead.
        for k in np.argsort(rows, kind="stable"):
            view = memoryview(out[k]).cast("B")
            if os.preadv(self._fd, [view], self._offset + int(rows[k]) * self._row_bytes) != self._row_bytes:
                raise InputError(f"the decoded cache {self.store.filename} is shorter than its header says; "
                                 "delete it to decode again")
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # numpy's protocol signature
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def default_dir() -> str:
    """`<cache root>/decoded`: beside the synthetic set and the compile cache ($CIRCLEMIX_CACHE)."""

    return os.path.join(defaults.cache_root(), "decoded")


def choose(mode: str, num_images: int, size: int, budget_mib: float) -> str:
    """'memory' or 'disk': `mode` itself, or for 'auto' whether the decoded set fits in `budget_mib`."""
    if mode != "auto":
        return mode
    return "disk" if num_images * size * size * 3 > budget_mib * 2**20 else "memory"


def _file_digest(path: str) -> str:
    """SHA-256 of a file's bytes; an unreadable file gets a marker (decoding then names it)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    except OSError as e:
        return f"unreadable:{e.errno}"
    return h.hexdigest()


def cache_name(paths: list[str], size: int, workers: int) -> str:
    """The cache file's name for these distinct paths (in this order) at `size`: reads every file once."""
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        digests = list(pool.map(_file_digest, paths))
    names = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    content = hashlib.sha256(f"v{VERSION}\n{size}\n".encode())
    for p, d in zip(paths, digests):
        content.update(f"{p}\t{d}\n".encode())
    return f"{names}-{size}px-{content.hexdigest()[:32]}.npy"


def open_or_build(paths, size: int, workers: int, folder: str = "") -> tuple[np.ndarray, dict[str, int], bool]:
    """The decoded images of `paths` at `size` as a read-only memory map, decoding them if needed.

    Args:
      paths: image files (repeats allowed; each is stored once).
      size: image side in pixels.
      workers: threads for reading and decoding.
      folder: where cache files live ('' = `default_dir()`).

    Returns:
      (store (N, size, size, 3) uint8, {path: row of store}, whether it was decoded now).

    Raises:
      InputError: an image cannot be read (every bad one is named), or the folder cannot be written.
    """
    distinct = sorted({str(p) for p in paths})
    row_of = {p: i for i, p in enumerate(distinct)}
    folder = folder or default_dir()
    name = cache_name(distinct, size, workers)
    path = os.path.join(folder, name)
    if os.path.exists(path):
        print(f"decoded cache: {len(distinct)} images at {size}px from {path}", flush=True)
        return _open(path, (len(distinct), size, size, 3)), row_of, False
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(folder, exist_ok=True)
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(distinct), size, size, 3))
        _reserve(tmp)
        pipeline.decode_all(distinct, size, workers, f"decoding into {path}", out=store)
        store.flush()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before it gets the name that later runs trust
        del store
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write the decoded cache {path} (config field data.cache_dir): "
                         f"{e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    _remove_stale(folder, name)
    return _open(path, (len(distinct), size, size, 3)), row_of, True


def _open(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """The cache file as a read-only memory map, checked against the shape its name stands for.

    Raises:
      InputError: the file was cut short or overwritten since it was written.
    """
    try:
        store = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise InputError(f"the decoded cache {path} is damaged ({' '.join(str(e).split())[:80]}); "
                         "delete it to decode again") from None
    if store.shape != shape or store.dtype != np.uint8:
        raise InputError(f"the decoded cache {path} holds {store.dtype} {store.shape}, not uint8 {shape}; "
                         "delete it to decode again")
    return store


def _reserve(path: str) -> None:
    """Allocates the whole file now: a write through a memory map to a full disk kills the process (SIGBUS).

    Raises:
      OSError: the disk has no room (ENOSPC). Filesystems without fallocate are left as they are.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS
        return
    with open(path, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def _remove_stale(folder: str, name: str) -> None:
    """Deletes caches of the same paths and size whose images have since changed, and dead runs' temporaries."""
    prefix = name.rsplit("-", 1)[0]
    for old in glob.glob(os.path.join(folder, f"{prefix}-*.npy")) + glob.glob(os.path.join(folder, "*.npy.tmp*")):
        if os.path.basename(old) == name or (".tmp" in old and not _abandoned(old)):
            continue
        with contextlib.suppress(OSError):
            os.remove(old)


def _abandoned(tmp: str) -> bool:
    """Whether a temporary file's writer is gone: its pid is not running here and it is an hour old.

    The age guards a cache folder shared between hosts, where the pid names another machine's process.
    """
    try:
        if time.time() - os.path.getmtime(tmp) < 3600:
            return False
        os.kill(int(tmp.rsplit(".tmp", 1)[1]), 0)
    except (ProcessLookupError, ValueError):
        return True
    except OSError:
        return False
    return False
