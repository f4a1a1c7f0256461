"""Finished runs tested again with and without test-time augmentation (the 8 dihedral views).

Each run's best checkpoint predicts its own test images (the paths and labels
of its `test_predictions.csv`) twice: with the logits of the image alone, and
with the mean logits of its 8 dihedral views (`eval.tta`). Both go through the
run's stored decision rule. The checkpoint is the one the run chose, so this
measures TTA at test and predict time, not its effect on the choice of epoch.
The first column must reproduce the run's stored test score; the script says
so when it does not.

Used for docs/RESULTS.md ("Test-time augmentation on finished runs"); not part
of the package. Command:

  python docs/tta_probe.py --run runs/a --run runs/b
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from circlemix_jax import decision, hierarchy, step as steplib
from circlemix_jax.data import pipeline


def _found(y, pred, k) -> str:
    return f"{int(((pred == k) & (y == k)).sum())}/{int((y == k).sum())}"


def probe(workdir: str, decoded: dict) -> str:
    """One tab-separated line: the run, then balanced accuracy and per-class hits without and with TTA."""
    with open(os.path.join(workdir, "test_predictions.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [r["path"] for r in rows]
    y = np.array([int(r["label"]) for r in rows])
    stored = np.array([int(r["pred"]) for r in rows])
    config = hierarchy.load_run_config(workdir)
    mesh = steplib.make_mesh()
    state = steplib.replicate(hierarchy.restore_best(os.path.abspath(workdir), config), mesh)
    rule = decision.load(os.path.join(workdir, decision.FILENAME))
    bias = np.zeros(len(config.classes)) if rule is None else np.array(rule.bias)
    key = (config.data.image_size, tuple(paths))
    if key not in decoded:
        decoded[key] = pipeline.decode_all(paths, config.data.image_size, desc="decoding")
    cells = []
    for tta in (False, True):
        with config.unlocked():
            config.eval.tta = tta
        eval_fn = steplib.parallel_eval_step(config, steplib.make_model(config), mesh)
        logits = np.asarray(steplib.evaluate(eval_fn, state, decoded[key], y, config.eval_batch_size, mesh))
        pred = (logits + bias).argmax(-1)
        if not tta and not np.array_equal(pred, stored):
            cells.append(f"NOTE: {int((pred != stored).sum())} predictions differ from the stored ones")
        found = ", ".join(_found(y, pred, k) for k in range(len(config.classes)))
        cells.append(f"{'TTA' if tta else 'plain'} {100 * balanced_accuracy_score(y, pred):.1f} ({found})")
    return "\t".join([workdir, f"{config.data.image_size}px {config.split} fold {config.fold} seed {config.seed}"]
                     + cells)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a finished run's folder (repeatable)")
    args = parser.parse_args(argv)
    decoded: dict = {}
    for workdir in args.run:
        print(probe(workdir, decoded), flush=True)


if __name__ == "__main__":
    main()
