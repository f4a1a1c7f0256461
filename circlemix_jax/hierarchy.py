"""The paper's hierarchy (section 3.2): children fine-tuned from C5, and the merge rule.

A child stage (NC2, C3, C2) starts from the best checkpoint of its parent C5 of
the same fold and method: backbone and BatchNorm statistics are copied, and the
classifier is built from the parent's rows for the child's classes (see
`child_classifier` for why). At test time the child re-decides every image the
parent put into one of its classes (`merge_predictions`).

Everything here works on global class ids, the ids into `config.class_names`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from circlemix_jax import checkpoint, defaults, rundir
from circlemix_jax.errors import InputError

HEAD = "classifier"
HEAD_MODES = ("parent", "fresh")
# Fields that decide which images are in which fold: a child must share them with
# its parent, or the child's test fold would hold the parent's training images.
SPLIT_FIELDS = ("fold", "num_folds", "val_fraction", "split_seed", "data.manifest")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `workdir/config.json`.

    Raises:
      InputError: no such run, or an unreadable config.json.
    """
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise InputError(f"{workdir} holds no run (no config.json); train it first with circlemix_jax.main")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from None
    if isinstance(raw, dict) and "seed" in raw:
        raw.setdefault("split_seed", raw["seed"])  # runs from before split_seed split with `seed`
    if isinstance(raw, dict):  # runs from before these fields evaluated this way
        raw.setdefault("split", "subject_kfold")
        raw.setdefault("eval", {"tta": False, "decision": "argmax"})
    return ml_collections.ConfigDict(raw)


def require_best_checkpoint(workdir: str, finished: bool = True) -> None:
    """Checks that a run exists, has a best checkpoint and (optionally) its test metrics.

    Raises:
      InputError: naming the workdir and what is missing.
    """
    if not epath.Path(workdir).is_dir():
        raise InputError(f"run folder {workdir} does not exist; train that stage first")
    if finished and not (epath.Path(workdir) / "metrics.json").is_file():
        raise InputError(f"run {workdir} is unfinished (no metrics.json); rerun its training command to finish it")
    best = epath.Path(checkpoint.best_state_path(workdir))
    if not best.is_dir() or not any(d.name.isdigit() for d in best.iterdir()):
        raise InputError(f"run {workdir} has no best checkpoint under {best}")


def restore_best(workdir: str, config):
    """The best train state of a finished run, as host numpy arrays.

    The restore target is the state's shape tree from `jax.eval_shape`, so nothing
    is computed or compiled; without shardings Orbax returns numpy arrays, which
    callers then place wherever they need them.
    """
    from circlemix_jax import step as steplib  # keeps merge-only users free of the model

    require_best_checkpoint(workdir, finished=False)
    model = steplib.make_model(config)
    tx = steplib.make_optimizer(config)
    dummy = np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32)
    prior = steplib.log_prior(config, np.arange(len(config.classes)))  # only its shape matters here
    abstract = jax.eval_shape(lambda: steplib.init_state(model.init(jax.random.key(0), dummy, train=False), tx,
                                                         ema=steplib.ema_enabled(config), log_prior=prior))
    ckpts = checkpoint.RunCheckpoints(workdir)
    try:
        state, _ = ckpts.restore(checkpoint.BEST, abstract)
    except checkpoint.DamagedCheckpoint as e:
        raise InputError(f"{e}: it does not match {workdir}/config.json or its files are cut short; "
                         "rerun that run's training command in a fresh --workdir") from None
    finally:
        ckpts.close()
    return state


def parent_workdir(config) -> str:
    """The parent run's folder: `config.parent_workdir`, else C5's default for this fold and method.

    Relative paths resolve against the current directory, like `--workdir`.
    """
    if config.parent_workdir:
        return rundir.absolute(config.parent_workdir)
    parent = ml_collections.ConfigDict(config.to_dict())
    parent.stage = "c5"  # default_workdir then reads the same method and fold
    return rundir.absolute(defaults.default_workdir(parent))


def _check_compatible(config, parent_config, where: str) -> None:
    """A child must share its parent's label space and fold split."""
    if list(parent_config.class_names) != list(config.class_names):
        raise InputError(f"parent {where} classifies {list(parent_config.class_names)}, "
                         f"but this stage uses {list(config.class_names)}")
    missing = sorted(set(config.classes) - set(parent_config.classes))
    if missing:
        raise InputError(f"parent {where} has no output for class id(s) {missing} of stage {config.stage}")
    for field in SPLIT_FIELDS:
        ours, theirs = rundir.get_field(config, field), rundir.get_field(parent_config, field)
        if field == "data.manifest" and ours and theirs:  # the same file may be spelled two ways
            ours, theirs = os.path.realpath(ours), os.path.realpath(theirs)
        if ours != theirs:
            raise InputError(f"parent {where} was trained with {field}={theirs!r} but this stage has {ours!r}; "
                             "a different split would leak the parent's training images into the test fold")
    if not config.data.manifest and config.data.synthetic_count != parent_config.data.synthetic_count:
        raise InputError(f"parent {where} used data.synthetic_count={parent_config.data.synthetic_count}, "
                         f"this stage {config.data.synthetic_count}: different synthetic sets")


def is_child(config) -> bool:
    """Whether a stage starts from a parent run's best checkpoint."""
    return bool(config.parent_workdir) or config.stage in defaults.CHILD_STAGES


def check_parent(config, split_record: dict) -> None:
    """Checks, before the child's workdir is touched, that its parent can be fine-tuned from.

    The parent must be finished, share the child's label space and split fields,
    and have been made from the same data: a manifest changed since the parent
    ran would give the child a split whose test fold holds the parent's
    training images.

    Args:
      config: the child stage's config.
      split_record: the child's split as `rundir.split_record` gives it.

    Raises:
      InputError: naming the parent and what does not match.
    """
    where = parent_workdir(config)
    require_best_checkpoint(where)
    _check_compatible(config, load_run_config(where), where)
    recorded = rundir.read_json(os.path.join(where, rundir.SPLIT), "the parent's split")
    change = rundir.describe_change(recorded, split_record) if recorded else None
    if change:
        raise InputError(f"the data changed since parent {where} was trained ({change}), so this stage's test "
                         "fold would hold the parent's training images; retrain the parent on the current data")


def child_classifier(parent_head: dict, parent_classes, child_classes, fresh_head: dict,
                     mode: str = "parent") -> dict:
    """The child's classifier {kernel (F, K_child), bias (K_child,)}.

    'parent' (the default) takes the parent's rows (kernel columns and biases)
    for the child's classes. The child's logits then equal the parent's logits
    restricted to those classes, so its softmax is the parent's distribution
    conditioned on the image being one of them, and its argmax is the parent's
    restricted decision. Fine-tuning therefore starts exactly at the parent's
    merged result (C5+X = C5 before the first step) and can only move away from
    it on evidence. A fresh random head instead starts at chance, and its large
    early gradients flow into the copied backbone at the full learning rate,
    partly undoing the features the child was meant to inherit; with a few
    dozen C2 images (the paper's rarest classes) that matters most.

    'fresh' keeps the child's own random initialisation (`fresh_head`).
    """
    if mode not in HEAD_MODES:
        raise InputError(f"config field model.child_head={mode!r} must be one of {HEAD_MODES}")
    if mode == "fresh":
        return fresh_head
    rows = [list(parent_classes).index(c) for c in child_classes]
    return {"kernel": np.asarray(parent_head["kernel"])[:, rows], "bias": np.asarray(parent_head["bias"])[rows]}


def init_from_parent(config, variables: dict, log: Callable[[str], None] = print) -> dict:
    """Replaces a child's fresh variables by its parent's best checkpoint.

    Args:
      config: the child stage's config.
      variables: the child's freshly initialised {'params', 'batch_stats'}.
      log: where to say what was loaded.

    Returns:
      {'params', 'batch_stats'} (host arrays) with the parent's backbone and BatchNorm
      statistics and the head from `child_classifier` (mode from the optional
      config field `model.child_head`, default 'parent').

    Raises:
      InputError: missing or unfinished parent, or one trained on another
        label space or fold split.
    """
    where = parent_workdir(config)
    require_best_checkpoint(where)
    parent_config = load_run_config(where)
    _check_compatible(config, parent_config, where)
    from circlemix_jax import step as steplib  # keeps merge-only users free of the model

    best = restore_best(where, parent_config)
    parent = steplib.eval_variables(best)  # the EMA weights when it kept them

    ours = jax.tree_util.tree_map(np.shape, {k: v for k, v in variables["params"].items() if k != HEAD})
    theirs = jax.tree_util.tree_map(np.shape, {k: v for k, v in parent["params"].items() if k != HEAD})
    if ours != theirs:
        raise InputError(f"the backbone in {where} does not match this stage's model (different architecture)")
    mode = config.model.get("child_head", "parent")
    params = dict(parent["params"])
    params[HEAD] = child_classifier(parent["params"][HEAD], parent_config.classes, config.classes,
                                    jax.device_get(variables["params"][HEAD]), mode)
    parent_metrics = json.loads((epath.Path(where) / "metrics.json").read_text())
    head = f"the parent's rows for classes {list(config.classes)}" if mode == "parent" else "freshly initialised"
    log(f"PARENT: loaded the best checkpoint of {where} (step {int(best.step)}, epoch "
        f"{parent_metrics.get('best_epoch', -1) + 1}, its test balanced_accuracy "
        f"{parent_metrics.get('balanced_accuracy', float('nan')):.4f}): backbone and BatchNorm statistics copied; "
        f"classifier = {head}")
    if defaults.method_name(parent_config) != defaults.method_name(config):
        log(f"NOTE: the parent was trained with {defaults.method_name(parent_config)}, "
            f"this stage uses {defaults.method_name(config)}")
    return {"params": params, "batch_stats": parent["batch_stats"]}


def merge_predictions(parent: np.ndarray, child: np.ndarray, child_classes) -> np.ndarray:
    """The paper's merge rule on global class ids.

    Where the parent predicts one of `child_classes`, the child decides;
    elsewhere the parent's prediction stands.

    Args:
      parent: (N,) parent predictions.
      child: (N,) child predictions for the same images, each in `child_classes`.
      child_classes: the child's global class ids.

    Returns:
      (N,) merged predictions.
    """
    parent, child = np.asarray(parent), np.asarray(child)
    if parent.shape != child.shape:
        raise ValueError(f"parent and child predictions differ in shape: {parent.shape} vs {child.shape}")
    routed = np.isin(parent, np.asarray(child_classes))
    stray = routed & ~np.isin(child, np.asarray(child_classes))
    if stray.any():
        raise ValueError(f"child predicts class(es) {sorted(set(child[stray].tolist()))} "
                         f"outside its classes {list(child_classes)}")
    return np.where(routed, child, parent)


def read_predictions(path: str) -> dict[str, np.ndarray]:
    """A run's test_predictions.csv: paths, subjects, labels, preds (global ids), probs.

    `pred_adjusted` (the prediction under the run's decision rule) comes too when the file has it.

    Raises:
      InputError: missing file or columns.
    """
    if not epath.Path(path).is_file():
        raise InputError(f"{path} not found; the run has not finished its test evaluation")
    rows = list(csv.DictReader(io.StringIO(epath.Path(path).read_text(), newline="")))
    if not rows or not {"path", "label", "pred"} <= set(rows[0]):
        raise InputError(f"{path}: expected columns path,subject,label,pred,p_<class>...")
    prob_cols = [c for c in rows[0] if c.startswith("p_")]
    out = {"path": np.array([r["path"] for r in rows]), "subject": np.array([r.get("subject", "") for r in rows]),
           "label": np.array([int(r["label"]) for r in rows]), "pred": np.array([int(r["pred"]) for r in rows]),
           "probs": np.array([[float(r[c]) for c in prob_cols] for r in rows], np.float64).reshape(len(rows), -1)}
    if "pred_adjusted" in rows[0]:  # runs made before decision rules lack it
        out["pred_adjusted"] = np.array([int(r["pred_adjusted"]) for r in rows])
    return out


def merged_test_predictions(parent_dir: str, child_dirs) -> tuple[np.ndarray, np.ndarray]:
    """(labels, merged predictions) over the parent's test fold, children applied in order."""
    parent = read_predictions(os.path.join(parent_dir, "test_predictions.csv"))
    pred = parent["pred"]
    for child_dir in child_dirs:
        child = read_predictions(os.path.join(child_dir, "test_predictions.csv"))
        if not np.array_equal(child["path"], parent["path"]):
            raise InputError(f"{child_dir} was tested on other images than its parent {parent_dir}; "
                             "both must be the same fold of the same data")
        pred = merge_predictions(pred, child["pred"], load_run_config(child_dir).classes)
    return parent["label"], pred
