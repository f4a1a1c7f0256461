"""End to end: the smoke run as a user runs it, its outputs and a finished rerun.

Exact resume is tested in test_reliability (SIGTERM, SIGINT) and test_recipe
(SIGKILL, with the EMA on).
"""

import glob
import json
import os

from conftest import SMOKE, run_cli


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def test_outputs(smoke_run):
    workdir, result = smoke_run
    m = _metrics(workdir)
    for key in ("balanced_accuracy", "balanced_f1", "confusion_matrix", "per_class", "best_epoch", "class_names"):
        assert key in m
    assert len(m["confusion_matrix"]) == 5 and sum(map(sum, m["confusion_matrix"])) == m["num_examples"] > 0
    assert 0.0 <= m["balanced_accuracy"] <= 1.0
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    for name in ("config.json", "split.json", "test_predictions.csv"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "SYNTHETIC" in result.stdout and "TEST fold 0" in result.stdout


def test_tensorboard_has_training_scalars(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(smoke_run[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/param_norm", "train/update_norm",
                "val/balanced_accuracy", "val/balanced_f1", "train/img_per_s"):
        assert tag in tags, tag
    assert "train/mixed_batch" in acc.Tags()["images"]


def test_finished_run_is_not_trained_again(smoke_run):
    workdir, first = smoke_run
    assert "epoch 1/" in first.stdout + first.stderr
    result = run_cli(*SMOKE, f"--workdir={workdir}")
    assert result.returncode == 0 and "already finished" in result.stdout
    # What it did, not how long it took (which depends on the machine's load).
    assert "compiling the train step" not in result.stdout + result.stderr
    assert "epoch 1/" not in result.stdout + result.stderr

