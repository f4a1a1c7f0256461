"""End to end: the smoke run as a user runs it, its outputs, a finished rerun, exact resume after SIGKILL."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import CACHE, REPO, run_cli

CMD = ("circlemix_jax.main", "--config=configs/c5.py:smoke")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    t = time.time()
    result = run_cli(*CMD, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, time.time() - t, result


def test_outputs(finished_run):
    workdir, _, result = finished_run
    m = _metrics(workdir)
    for key in ("balanced_accuracy", "balanced_f1", "confusion_matrix", "per_class", "best_epoch", "class_names"):
        assert key in m
    assert len(m["confusion_matrix"]) == 5 and sum(map(sum, m["confusion_matrix"])) == m["num_examples"] > 0
    assert 0.0 <= m["balanced_accuracy"] <= 1.0
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    for name in ("config.json", "split.json", "test_predictions.csv"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "SYNTHETIC" in result.stdout and "TEST fold 0" in result.stdout


def test_tensorboard_has_training_scalars(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(finished_run[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/param_norm", "train/update_norm",
                "val/balanced_accuracy", "val/balanced_f1", "train/img_per_s"):
        assert tag in tags, tag
    assert "train/mixed_batch" in acc.Tags()["images"]


def test_finished_run_is_not_trained_again(finished_run):
    workdir, _, first = finished_run
    assert "epoch 1/" in first.stdout + first.stderr
    result = run_cli(*CMD, f"--workdir={workdir}")
    assert result.returncode == 0 and "already finished" in result.stdout
    # What it did, not how long it took (which depends on the machine's load).
    assert "compiling the train step" not in result.stdout + result.stderr
    assert "epoch 1/" not in result.stdout + result.stderr


def test_exact_resume_after_sigkill(finished_run, tmp_path):
    workdir = str(tmp_path / "killed")
    env = dict(os.environ, CIRCLEMIX_CACHE=CACHE)
    proc = subprocess.Popen([sys.executable, "-m", *CMD, f"--workdir={workdir}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(workdir, "checkpoints", "latest")
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(latest) and any(d.isdigit() for d in os.listdir(latest)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its first checkpoint; cannot test a kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))
    result = run_cli(*CMD, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from step" in result.stdout
    ignore = {"best_val_balanced_accuracy"}
    a, b = _metrics(finished_run[0]), _metrics(workdir)
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    assert a["best_val_balanced_accuracy"] == pytest.approx(b["best_val_balanced_accuracy"])
