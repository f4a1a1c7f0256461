"""A real run: TTA, a fitted decision rule, centre-balanced batches, a held-out centre; predict under its rule."""

import csv
import json
import os

import numpy as np
import pytest
from conftest import run_cli

from circlemix_jax import data, decision

CMD = ("circlemix_jax.main", "--config=configs/binary.py:smoke")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def centred_manifest(synthetic_manifest, tmp_path_factory):
    """The synthetic set with a `center` column: subjects dealt to three centres in turn."""
    rows = _read(synthetic_manifest)
    subjects = sorted({r["subject"] for r in rows})
    centre = {s: ("A", "B", "C")[i % 3] for i, s in enumerate(subjects)}
    root = os.path.dirname(os.path.abspath(synthetic_manifest))
    path = str(tmp_path_factory.mktemp("centred") / "manifest.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "subject", "center"])
        for r in rows:
            w.writerow([os.path.join(root, r["path"]), r["label"], r["subject"], centre[r["subject"]]])
    return path


@pytest.fixture(scope="module")
def run(centred_manifest, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("eval-run") / "run")
    result = run_cli(*CMD, f"--workdir={workdir}", f"--config.data.manifest={centred_manifest}",
                     "--config.split=leave_one_center_out", "--config.fold=1", "--config.eval.tta=True",
                     "--config.eval.decision=val", "--config.data.balance_centers=True", timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_run_stores_the_rule_and_reports_both_decisions(run, centred_manifest):
    workdir, result = run
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))
    rule = decision.load(os.path.join(workdir, decision.FILENAME))
    assert rule.mode == "val" and len(rule.bias) == 2
    assert metrics["decision"]["bias"] == list(rule.bias)
    assert metrics["adjusted"]["num_examples"] == metrics["num_examples"]
    assert metrics["test_center"] == "B" and "under the decision rule 'val'" in result.stdout
    rows = _read(os.path.join(workdir, "test_predictions.csv"))
    probs = np.array([[float(r["p_non_sclerotic"]), float(r["p_global_sclerosis"])] for r in rows])
    # The rule on the stored (rounded) probabilities reproduces pred_adjusted away from ties.
    margin = np.abs(np.diff(np.log(probs), axis=1)[:, 0] + rule.bias[1] - rule.bias[0])
    clear = margin > 1e-3
    expected = decision.apply(rule, np.log(probs))
    assert np.array_equal(expected[clear], np.array([int(r["pred_adjusted"]) for r in rows])[clear])
    adjusted_ba = metrics["adjusted"]["balanced_accuracy"]
    assert 0.0 <= adjusted_ba <= 1.0
    # The test set is exactly centre B.
    split = json.load(open(os.path.join(workdir, "split.json")))
    assert split["held_out_center"] == "B"
    manifest = {os.path.normpath(r["path"]): r["center"] for r in _read(centred_manifest)}
    assert {manifest[r["path"]] for r in rows} == {"B"}


def test_predict_uses_the_stored_rule_unless_argmax(run, tmp_path):
    workdir, _ = run
    rows = _read(os.path.join(workdir, "test_predictions.csv"))[:12]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject\n" + "".join(f"{r['path']},{r['subject']}\n" for r in rows))
    out = tmp_path / "preds.csv"
    result = run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--manifest={manifest}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decision rule 'val'" in result.stdout
    assert [int(r["pred"]) for r in _read(out)] == [int(r["pred_adjusted"]) for r in rows]  # same TTA logits
    plain = run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--manifest={manifest}", f"--out={out}",
                    "--argmax")
    assert plain.returncode == 0 and "plain argmax (--argmax)" in plain.stdout
    assert [int(r["pred"]) for r in _read(out)] == [int(r["pred"]) for r in rows]
    # A rule that always says sclerotic: pred_name follows the stored rule, not the probabilities.
    decision.save(os.path.join(workdir, decision.FILENAME), decision.Rule("val", (0.0, 1e6)))
    forced = run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--manifest={manifest}", f"--out={out}")
    assert forced.returncode == 0
    assert {r["pred_name"] for r in _read(out)} == {"global_sclerosis"}


def test_leave_one_centre_out_without_center_column_is_one_line(synthetic_manifest, tmp_path):
    result = run_cli(*CMD, f"--workdir={tmp_path / 'w'}", f"--config.data.manifest={synthetic_manifest}",
                     "--config.split=leave_one_center_out")
    assert result.returncode == 2 and "'center'" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert data.CENTER_COLUMN == "center"
