"""Orbax checkpoints of a run: `latest` (for resuming) and `best` (by val balanced accuracy).

Two managers in two folders, so rotating the latest checkpoint can never delete
the best one. Each checkpoint holds the train state and a small JSON `progress`
record: epochs done, best score so far, and the per-epoch history. The data
position and the PRNG stream are functions of the step counter (see
`pipeline.epoch_seed` and `step.train_step`), so the state's `step` restores both.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from circlemix_jax.errors import InputError
from circlemix_jax.rundir import absolute

LATEST, BEST = "latest", "best"


# `latest` keeps its previous step too, so a damaged newest checkpoint (a disk error, a
# copy cut short) still leaves one to resume from; `best` is replaced whole.
KEEP = {LATEST: 2, BEST: 1}
# What Orbax leaves behind when a process dies mid-save (its save is a write then a rename).
TEMPORARY_MARK = ".orbax-checkpoint-tmp"


def _manager(directory: str, kind: str) -> ocp.CheckpointManager:
    # Both managers save the same step at an epoch end: their multi-process barriers need their own names.
    options = ocp.CheckpointManagerOptions(max_to_keep=KEEP[kind], create=True, multiprocessing_options=(
        ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=kind)))
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "progress"))


class RunCheckpoints:
    """The `latest` and `best` checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str):
        root = os.path.join(absolute(workdir), "checkpoints")
        self._root = root
        self._open()

    def _open(self) -> None:
        try:
            self._managers = {k: _manager(os.path.join(self._root, k), k) for k in (LATEST, BEST)}
        except OSError as e:
            raise InputError(f"cannot write checkpoints under {self._root}: {e.strerror or e}") from None

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
        """Restores (state, progress) of `kind` onto the shardings in `abstract_state`.

        Raises:
          DamagedCheckpoint: the checkpoint's files cannot be read back.
        """
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step

        def read(target):
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()))
            return out.state, dict(out.progress)

        try:
            try:
                return read(abstract_state)
            except ValueError:
                if not dataclasses.is_dataclass(abstract_state):
                    raise
                # Checkpoints from before the state gained an optional field (such as `ema`) lack
                # it on disk, and Orbax will not match a missing None: read the fields that hold
                # arrays, then put the Nones back.
                fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
                state, progress = read({k: v for k, v in fields.items() if v is not None})
                return type(abstract_state)(**{**fields, **state}), progress
        except Exception as e:  # Orbax and tensorstore raise many types for bad files
            raise DamagedCheckpoint(os.path.join(self._root, kind, str(step)), e) from None

    def restore_latest_good(self, abstract_state: Any, log) -> tuple[Any, dict] | None:
        """The newest readable checkpoint to resume from: `latest`, its previous step, then `best`.

        Resuming from an older step is exact, because the data order and the PRNG
        stream are functions of the step: the run replays the lost steps.

        Returns:
          (state, progress), or None when the run has no checkpoint yet.

        Raises:
          InputError: checkpoints exist but none can be read, naming them and the way out.
        """
        candidates = [(LATEST, s) for s in sorted(self._managers[LATEST].all_steps(), reverse=True)]
        candidates += [(BEST, s) for s in sorted(self._managers[BEST].all_steps(), reverse=True)]
        damaged = []
        for kind, step in candidates:
            try:
                state, progress = self.restore(kind, abstract_state, step)
            except DamagedCheckpoint as e:
                damaged.append(e)
                continue
            if damaged:
                self._set_aside([d.folder for d in damaged])
                log(f"WARNING: {'; '.join(str(d) for d in damaged)}; moved to {self._root}/damaged; resuming "
                    f"from {kind} step {step} instead (the steps after it are replayed exactly)")
            return state, progress
        if damaged:
            raise InputError(f"{damaged[0]}, and no other checkpoint of this run can be read; delete "
                             f"{self._root} to train the run again from the start")
        return None

    def _set_aside(self, folders: list[str]) -> None:
        """Moves damaged step folders out of the managers' sight, so new saves can take their steps."""
        for m in self._managers.values():
            m.close()
        aside = os.path.join(self._root, "damaged")
        os.makedirs(aside, exist_ok=True)
        for folder in folders:
            kind, step = folder.split(os.sep)[-2:]
            os.replace(folder, os.path.join(aside, f"{kind}-{step}-{os.getpid()}"))
        self._open()

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
            except Exception:  # the error being reported is the first one
                pass

    def close(self) -> None:
        for m in self._managers.values():
            m.close()


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


class DamagedCheckpoint(Exception):
    """A checkpoint folder whose files cannot be read back (truncated, edited or half-copied)."""

    def __init__(self, folder: str, cause: Exception):
        reason = " ".join(str(cause).split())[:200] or type(cause).__name__
        super().__init__(f"checkpoint {folder} is damaged ({type(cause).__name__}: {reason})")
        self.folder = folder


def remove_temporaries(root: str) -> None:
    """Deletes the temporary folders of saves that a killed process never finished.

    Only called by the process holding the workdir's lock, so no save is in flight.
    """
    if "://" in root or not os.path.isdir(root):
        return
    for kind in (LATEST, BEST):
        folder = os.path.join(root, kind)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if TEMPORARY_MARK in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, as a restore target."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def best_state_path(workdir: str) -> str:
    """The folder of a run's best checkpoint (what children and predict load)."""
    return os.path.join(absolute(workdir), "checkpoints", BEST)
