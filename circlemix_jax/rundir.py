"""A run's folder: who holds it, which config made it, and which data it was made from.

A workdir is resumed by rerunning the same command, so it must refuse anything
that would make the resumed run a different one:
- a second process on the same folder (a lock naming the holder's pid and host);
- a different config (the resolved config is kept in `config.json`);
- different data: `split.json` records every split's images and a fingerprint of
  their labels, subjects and decoded pixels. A manifest that gained subjects gives
  a new split, whose test fold would hold images the checkpoint was trained on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import socket
from collections.abc import Iterator

import numpy as np
from etils import epath

from circlemix_jax.errors import InputError

LOCK = ".lock"
CONFIG = "config.json"
SPLIT = "split.json"
METRICS = "metrics.json"
SPLITS = ("train", "val", "test")
# How a run executes, not what it computes: a rerun or resume may change them (the cache's
# place; model.layers picks between implementations of the same function, e.g. resuming a
# CPU run on a GPU).
EXECUTION_FIELDS = ("data.workers", "data.cache", "data.cache_memory_mib", "data.cache_dir", "log_every_steps",
                    "checkpoint_every_steps", "eval_batch_size", "model.layers")


def absolute(workdir: str) -> str:
    """An absolute local path, or a URL such as gs://bucket/run unchanged (Orbax and TensorBoard write there)."""
    return workdir if "://" in workdir else os.path.abspath(workdir)


def _finite(obj):
    """`obj` with every NaN or infinite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, obj) -> None:
    """Writes JSON atomically on a local disk (a kill never leaves half a file; a GCS object appears whole).

    A NaN (e.g. a validation score the plain-argmax rule never computes) is
    written as null: Python would write a bare NaN, which is not JSON, and R's,
    JavaScript's and jq's readers refuse the whole file.
    """
    tmp = epath.Path(path + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, allow_nan=False))
    tmp.replace(path)


def read_json(path: str, what: str):
    """A JSON file of the workdir, or None when absent.

    Raises:
      InputError: the file exists but is not valid JSON.
    """
    p = epath.Path(path)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError) as e:
        raise InputError(f"{path} ({what}) is damaged ({type(e).__name__}); move it away to start afresh") from None


# --- config ---------------------------------------------------------------------------------------

def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: config fields by dotted name (empty dicts kept as leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get_field(config, dotted: str):
    """config['a']['b'] for 'a.b': a config field by its dotted name."""
    for part in dotted.split("."):
        config = config[part]
    return config


def check_config(workdir: str, config_json: str, ignore: tuple[str, ...], added: dict | None = None) -> None:
    """Refuses to resume a workdir that holds a run with a different config.

    Args:
      workdir: the run folder.
      config_json: the new run's resolved config as JSON.
      ignore: dotted fields (or prefixes) that may differ between runs.
      added: {dotted field: value} of fields newer than some runs. A field that an older
        run's config lacks matches when it holds this value, which reproduces what
        the code did before the field existed (new features are off by default).

    Raises:
      InputError: listing the differing fields and how to start fresh.
    """
    old = read_json(os.path.join(workdir, CONFIG), "the run's config")
    if old is None:
        return
    old, new = flatten_dict(old), flatten_dict(json.loads(config_json))
    added = added or {}
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not any(k == i or k.startswith(i + ".") for i in ignore)
                  and not (k not in old and k in added and _same(new.get(k), added[k])))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise InputError(f"{workdir} holds a run with a different config ({shown}); "
                         "use another --workdir, or delete that folder to start fresh")


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --- data identity --------------------------------------------------------------------------------

def split_record(records, split) -> dict:
    """The images of each split, as `split.json` records them (all classes, not just a stage's).

    Each split lists its subjects and image paths, and a fingerprint of the
    (path, label, subject) rows, so a relabelled image counts as changed data.
    """
    out = {}
    for name in SPLITS:
        idx = getattr(split, name)
        rows = "\n".join(f"{p}\t{r}\t{s}" for p, r, s in zip(records.paths[idx], records.raw_labels[idx],
                                                            records.subjects[idx]))
        out[name] = {"subjects": sorted(set(records.subjects[idx].tolist())),
                     "paths": records.paths[idx].tolist(),
                     "rows_sha256": hashlib.sha256(rows.encode()).hexdigest()}
    if getattr(split, "held_out", None):
        out["held_out_center"] = split.held_out
    return out


def pixels_sha256(images) -> str:
    """Fingerprint of decoded images: a changed image file changes it.

    Hashed a few rows at a time, so images on disk (image_cache.ImageRows) are never
    all in memory at once; the digest is that of the whole contiguous array.
    """
    h = hashlib.sha256()
    for start in range(0, len(images), 256):
        h.update(np.ascontiguousarray(images[start:start + 256]).data)
    return h.hexdigest()


def describe_change(old: dict, new: dict) -> str | None:
    """What differs between two `split_record`s, in words, or None if they hold the same rows."""
    changes = []
    for name in SPLITS:
        if name not in old:
            continue
        before, after = set(old[name]["paths"]), set(new[name]["paths"])
        added, removed = sorted(after - before), sorted(before - after)
        if added:
            changes.append(f"{name} would gain {len(added)} image(s) (e.g. {added[0]})")
        if removed:
            changes.append(f"{name} would lose {len(removed)} image(s) (e.g. {removed[0]})")
        if not added and not removed and old[name].get("rows_sha256", new[name]["rows_sha256"]) != \
                new[name]["rows_sha256"]:
            changes.append(f"{name} images have new labels or subjects")
    return "; ".join(changes) or None


def check_data(workdir: str, record: dict) -> None:
    """Refuses a rerun whose manifest gives another split than the one the run was made on.

    Raises:
      InputError: saying what changed and how to go on safely.
    """
    path = os.path.join(workdir, SPLIT)
    old = read_json(path, "the run's split")
    if old is None:
        return
    change = describe_change(old, record)
    if change:
        raise InputError(f"the data changed since {workdir} was made ({change}); its checkpoints were trained on "
                         f"the split in {path}, so testing on a new split would leak training images. "
                         "Restore the manifest, or train the changed data in a new --workdir")


def check_pixels(workdir: str, fingerprints: dict[str, str]) -> None:
    """Refuses a rerun whose image files changed since the run was made (same paths, new pixels).

    Raises:
      InputError: naming the split whose images changed.
    """
    old = read_json(os.path.join(workdir, SPLIT), "the run's split") or {}
    changed = [n for n in SPLITS if old.get(n, {}).get("pixels_sha256", fingerprints[n]) != fingerprints[n]]
    if changed:
        raise InputError(f"the {', '.join(changed)} image file(s) of {workdir} changed since the run was made "
                         "(same paths, different pixels); restore them, or train in a new --workdir")


# --- lock -----------------------------------------------------------------------------------------

def _holder(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a process killed mid-write: treat as stale


def _alive(holder: dict) -> bool:
    """Whether the lock's holder still runs. On another host we cannot tell, so assume it does."""
    if holder.get("host") != socket.gethostname():
        return bool(holder)
    try:
        os.kill(int(holder["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _locks(workdir: str) -> bool:
    """Whether this process takes part in the workdir's lock.

    Remote workdirs (gs://) are not locked: object stores have no atomic create
    here. In a multi-process job every process shares the workdir, so process 0
    alone holds the job's lock; each taking it would refuse the others as a second run.
    """
    import jax  # only once a run is under way; the CLIs parse flags without it

    return "://" not in workdir and jax.process_index() == 0


def check_unlocked(workdir: str) -> None:
    """Refuses at once if a live process holds the workdir (read-only; see `locked`).

    Raises:
      InputError: naming the holder's pid and host.
    """
    if not _locks(workdir):
        return
    holder = _holder(os.path.join(workdir, LOCK))
    if holder and _alive(holder):
        raise InputError(f"{workdir} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                         f"(lock file {os.path.join(workdir, LOCK)}); wait for it, or delete the lock file "
                         "if that process is gone")


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock file for the block; a stale lock of a dead process is taken over.

    Remote workdirs and processes other than a job's process 0 take no lock (`_locks`).

    Raises:
      InputError: a live process holds the lock.
    """
    if not _locks(workdir):
        yield
        return
    path = os.path.join(workdir, LOCK)
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and _alive(holder):
                check_unlocked(workdir)  # raises with the holder's name
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        except OSError as e:
            raise InputError(f"cannot write to workdir {workdir}: {e.strerror or errno.errorcode.get(e.errno)}") \
                from None
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    else:
        raise InputError(f"cannot take the lock {path}: another process keeps taking it")
    try:
        yield
    finally:
        if _holder(path) == mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
