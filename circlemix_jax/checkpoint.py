"""Orbax checkpoints of a run: `latest` (for resuming) and `best` (by val balanced accuracy).

Two managers in two folders, so rotating the latest checkpoint can never delete
the best one. Each checkpoint holds the train state and a small JSON `progress`
record: epochs done, best score so far, and the per-epoch history. The data
position and the PRNG stream are functions of the step counter (see
`pipeline.epoch_seed` and `step.train_step`), so the state's `step` restores both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from circlemix_jax.errors import InputError

LATEST, BEST = "latest", "best"


def _manager(directory: str, kind: str) -> ocp.CheckpointManager:
    # Both managers save the same step at an epoch end: their multi-process barriers need their own names.
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, multiprocessing_options=(
        ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind)))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "progress"))


class RunCheckpoints:
    """The `latest` and `best` checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str):
        root = os.path.join(absolute(workdir), "checkpoints")
        self._root = root
        try:
            self._managers = {k: _manager(os.path.join(root, k), k) for k in (LATEST, BEST)}
        except OSError as e:
            raise InputError(f"cannot write checkpoints under {root}: {e.strerror or e}") from None

    def latest_step(self, kind: str = LATEST) -> int | None:
        """Step of the newest checkpoint of `kind`, or None."""
        return self._managers[kind].latest_step()

    def save(self, kind: str, step: int, state: Any, progress: dict) -> None:
        """Saves asynchronously; Orbax writes to a temporary folder and renames, so it is atomic.

        Raises:
          InputError: the disk has no room for it, or the write failed for lack of space or rights.
        """
        if step in self._managers[kind].all_steps():
            return  # a resumed run replaying an epoch whose save survived: the same step is the same state
        self._check_space(kind, step, state)
        try:
            self._managers[kind].save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)
        except (OSError, ValueError) as e:
            if (err := _storage_error(e, f"could not save the {kind} checkpoint at step {step}")) is None:
                raise
            self._drain()
            raise err from None

    def restore(self, kind: str, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, progress) of `kind` onto the shardings in `abstract_state`."""
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
        except ValueError:
            # A checkpoint saved before the state gained optional fields (None when their
            # feature is off, e.g. `ema`) lacks them on disk: restore the others alone.
            fields = _present_fields(abstract_state)
            if fields is None:
                raise
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(fields), progress=ocp.args.JsonRestore()))
            return abstract_state.replace(**out.state), dict(out.progress)
        return out.state, dict(out.progress)

    def wait(self, kind: str | None = None) -> None:
        """Blocks until pending async saves (of `kind`, or of both) are on disk."""
        try:
            for k, m in self._managers.items():
                if kind in (None, k):
                    m.wait_until_finished()
        except (OSError, ValueError) as e:
            if (err := _storage_error(e, "could not finish saving a checkpoint")) is None:
                raise
            self._drain()
            raise err from None

    def _check_space(self, kind: str, step: int, state: Any) -> None:
        """Refuses a save that cannot fit on a local disk, before Orbax's writer threads fail noisily.

        The previous checkpoint is only deleted after the new one is complete, so
        the new one needs its full size free. Remote workdirs (gs://) are not checked.
        """
        if "://" in self._root or not os.path.isdir(self._root):
            return
        need = sum(x.nbytes for x in jax.tree_util.tree_leaves(state)) * 1.05 + (1 << 20)  # + metadata
        free = shutil.disk_usage(self._root).free
        if free < need:
            raise InputError(f"could not save the {kind} checkpoint at step {step}: {self._root} has "
                             f"{free / 2**20:.1f} MiB free, a checkpoint needs {need / 2**20:.1f} MiB "
                             "(No space left on device)")

    def _drain(self) -> None:
        """Lets failed background saves finish, so their logs come before our one-line error."""
        for m in self._managers.values():
            try:
                m.close()
            except Exception:  # noqa: BLE001 - the error being reported is the first one
                pass

    def close(self) -> None:
        for m in self._managers.values():
            m.close()


def _present_fields(state: Any) -> dict | None:
    """The non-None fields of a dataclass state as a dict, or None when there are none to drop."""
    if not dataclasses.is_dataclass(state):
        return None
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    if all(v is not None for v in fields.values()):
        return None
    return {k: v for k, v in fields.items() if v is not None}


def _storage_error(e: Exception, what: str) -> InputError | None:
    """A full disk or read-only workdir as one line; None for any other error (re-raised as is).

    Orbax reports tensorstore write failures as ValueError("RESOURCE_EXHAUSTED: ...
    No space left on device [os_error_code='28']"), not as OSError.
    """
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (m := re.search(r"os_error_code='(\d+)'", str(e))):
        code = int(m.group(1))
    if code is None:
        return None
    return InputError(f"{what}: {os.strerror(code)} (is the disk full or the workdir read-only?)")


def absolute(workdir: str) -> str:
    """An absolute local path, or a URL such as gs://bucket/run unchanged (Orbax and TensorBoard write there)."""
    return workdir if "://" in workdir else os.path.abspath(workdir)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, as a restore target."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def best_state_path(workdir: str) -> str:
    """The folder of a run's best checkpoint (what children and predict load)."""
    return os.path.join(absolute(workdir), "checkpoints", BEST)


def check_config(workdir: str, config_json: str, ignore: tuple[str, ...]) -> None:
    """Refuses to resume a workdir that holds a run with a different config.

    Raises:
      InputError: listing the differing fields and how to start fresh.
    """
    path = os.path.join(workdir, "config.json")
    if not epath.Path(path).exists():
        return
    try:
        old = flatten_dict(json.loads(epath.Path(path).read_text()))
    except json.JSONDecodeError:
        raise InputError(f"{path} is not valid JSON; move it away to start a fresh run") from None
    new = flatten_dict(json.loads(config_json))
    diff = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not any(k == i or k.startswith(i + ".") for i in ignore))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise InputError(f"{workdir} holds a run with a different config ({shown}); "
                         "use another --workdir, or delete that folder to start fresh")


def flatten_dict(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: config fields by dotted name (empty dicts kept as leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
