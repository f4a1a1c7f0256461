"""Orbax checkpoints of a run: `latest` (for resuming) and `best` (by val balanced accuracy).

Two managers in two folders, so rotating the latest checkpoint can never delete
the best one. Each checkpoint holds the train state and a small JSON `progress`
record: epochs done, best score so far, and the per-epoch history. The data
position and the PRNG stream are functions of the step counter (see
`pipeline.epoch_seed` and `step.train_step`), so the state's `step` restores both.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
        root = os.path.join(os.path.abspath(workdir), "checkpoints")
        try:
            self._managers = {k: _manager(os.path.join(root, k), k) for k in (LATEST, BEST)}
        except OSError as e:
            raise InputError(f"cannot write checkpoints under {root}: {e.strerror or e}") from None

    def latest_step(self, kind: str = LATEST) -> int | None:
        """Step of the newest checkpoint of `kind`, or None."""
        return self._managers[kind].latest_step()

    def save(self, kind: str, step: int, state: Any, progress: dict) -> None:
        """Saves asynchronously; Orbax writes to a temporary folder and renames, so it is atomic."""
        try:
            self._managers[kind].save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)
        except OSError as e:
            raise InputError(f"could not save the {kind} checkpoint at step {step}: {e.strerror or e} "
                             "(is the disk full or the workdir read-only?)") from None

    def restore(self, kind: str, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores (state, progress) of `kind` onto the shardings in `abstract_state`."""
        manager = self._managers[kind]
        step = manager.latest_step() if step is None else step
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
        return out.state, dict(out.progress)

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        for m in self._managers.values():
            m.wait_until_finished()

    def close(self) -> None:
        for m in self._managers.values():
            m.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing `tree`, as a restore target."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def best_state_path(workdir: str) -> str:
    """The folder of a run's best checkpoint (what children and predict load)."""
    return os.path.join(os.path.abspath(workdir), "checkpoints", BEST)


def check_config(workdir: str, config_json: str, ignore: tuple[str, ...]) -> None:
    """Refuses to resume a workdir that holds a run with a different config.

    Raises:
      InputError: listing the differing fields and how to start fresh.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            old = flatten_dict(json.load(f))
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
