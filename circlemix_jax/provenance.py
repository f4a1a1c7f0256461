"""Where a model came from, and whether its predictions should be trusted at all.

Predict, explain and export print and store this next to what they produce:
a 3-epoch 32 px model trained on the built-in synthetic set still prints
confident percentages, and nothing else in its output says so.
"""

from __future__ import annotations

import json
import os

from circlemix_jax import defaults, hierarchy

# Smoke and plumbing runs, not models: the smoke preset trains 2 epochs at 32 px,
# the paper 8 epochs at 256 px. At 64 px or less a glomerulus's tuft, capsule and
# sclerosis are a few pixels across.
SMOKE_MAX_IMAGE_SIZE = 64
SMOKE_MAX_EPOCHS = 3
# A run whose best validation balanced accuracy got less than this share of the way
# from chance (1/K) to 1 did not learn: a seed can fail outright, and its test score
# and predictions then say nothing, however confident the percentages look.
LEARNED_MIN_SHARE = 0.1


def describe(workdir: str, config=None) -> dict:
    """The provenance of a run's model as flat JSON-able values.

    Args:
      workdir: the run folder.
      config: its config, when already loaded.

    Returns:
      {workdir, stage, method, fold, data ('synthetic' or the manifest path),
      image_size, epochs, best_epoch (1-based, None when unfinished),
      test_balanced_accuracy and best_val_balanced_accuracy (None when
      unfinished), num_classes, init ('random' or the converted weights' folder)}.
    """
    workdir = os.path.abspath(workdir)
    config = config if config is not None else hierarchy.load_run_config(workdir)
    metrics = {}
    path = os.path.join(workdir, "metrics.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                metrics = json.load(f)
        except (OSError, ValueError):  # a damaged metrics file leaves the test score unknown, not the model
            metrics = {}
    best = metrics.get("best_epoch")
    return {
        "workdir": workdir,
        "stage": config.stage,
        "method": defaults.method_name(config),
        "fold": int(config.fold),
        "data": config.data.manifest or "synthetic",
        "image_size": int(config.data.image_size),
        "epochs": int(config.num_epochs),
        "best_epoch": None if best is None else int(best) + 1,
        "test_balanced_accuracy": metrics.get("balanced_accuracy"),
        "best_val_balanced_accuracy": metrics.get("best_val_balanced_accuracy"),
        "num_classes": len(config.classes),
        "init": config.model.init_from or "random",
    }


def warnings(prov: dict) -> list[str]:
    """Loud one-line warnings for models whose predictions mean little: synthetic, smoke or unfinished."""
    out = []
    if prov["data"] == "synthetic":
        out.append(f"WARNING: the model in {prov['workdir']} was trained on the built-in SYNTHETIC set, not on "
                   "glomeruli; its predictions on real patches mean nothing")
    if prov["image_size"] <= SMOKE_MAX_IMAGE_SIZE or prov["epochs"] <= SMOKE_MAX_EPOCHS:
        out.append(f"WARNING: the model in {prov['workdir']} is a smoke-test model ({prov['image_size']} px, "
                   f"{prov['epochs']} epochs): it checks the plumbing, do not read its percentages as results")
    if prov["test_balanced_accuracy"] is None:
        out.append(f"WARNING: the run {prov['workdir']} is unfinished (no metrics.json): it has no test score")
    did_not_learn = chance_warning(prov["workdir"], prov.get("best_val_balanced_accuracy"), prov.get("num_classes"))
    if did_not_learn:
        out.append(did_not_learn)
    return out


def chance_warning(workdir: str, best_val: float | None, num_classes: int | None) -> str | None:
    """A WARNING line when a run's best validation balanced accuracy stayed near chance, else None."""
    if best_val is None or not num_classes:
        return None
    chance = 1.0 / num_classes
    if best_val >= chance + LEARNED_MIN_SHARE * (1.0 - chance):
        return None
    return (f"WARNING: the model in {workdir} never beat chance on its validation set (best balanced accuracy "
            f"{best_val:.4f}, chance {chance:.2f}): it did not learn, and its predictions mean nothing; train it "
            "again (another --config.seed) before using it")


def line(prov: dict) -> str:
    """One line: 'MODEL: stage binary, method circlemix, fold 0, data M, 256 px, 8 epochs (best 6), test ...'."""
    score = prov["test_balanced_accuracy"]
    best = f" (best {prov['best_epoch']})" if prov["best_epoch"] is not None else ""
    return (f"MODEL {prov['workdir']}: stage {prov['stage']}, method {prov['method']}, fold {prov['fold']}, "
            f"data {prov['data']}, {prov['image_size']} px, {prov['epochs']} epochs{best}, init {prov['init']}, "
            f"test balanced accuracy {'unknown' if score is None else f'{score:.4f}'}")


def columns(prov: dict, prefix: str = "model_") -> dict:
    """The provenance as CSV columns (None as an empty cell, the score with 4 decimals)."""
    out = {}
    for k, v in prov.items():
        if v is None:
            v = ""
        elif isinstance(v, float):
            v = f"{v:.4f}"
        out[prefix + k] = v
    return out
