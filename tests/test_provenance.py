"""Where a model came from: provenance lines, loud warnings for synthetic and smoke models, predict's columns."""

import csv
import json

import pytest
from conftest import run_cli
from fake_run import make_run, write_images

from circlemix_jax import defaults, provenance


def _config_only(workdir, arg="", **data):
    """A run folder holding only config.json (and metrics.json): enough for provenance."""
    config = defaults.get_config("c5", arg)
    with config.unlocked():
        for k, v in data.items():
            config.data[k] = v
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    return workdir


def test_a_real_run_reads_cleanly(tmp_path):
    workdir = _config_only(tmp_path / "run", "circlemix", manifest="/data/bueno/manifest.csv")
    (workdir / "metrics.json").write_text(json.dumps({"balanced_accuracy": 0.8123, "best_epoch": 5}))
    prov = provenance.describe(str(workdir))
    assert prov["stage"] == "c5" and prov["method"] == "circlemix" and prov["data"] == "/data/bueno/manifest.csv"
    assert prov["image_size"] == 256 and prov["epochs"] == 8 and prov["best_epoch"] == 6
    assert provenance.warnings(prov) == []
    line = provenance.line(prov)
    assert "test balanced accuracy 0.8123" in line and "256 px, 8 epochs (best 6)" in line
    assert provenance.columns(prov)["model_test_balanced_accuracy"] == "0.8123"


def test_synthetic_smoke_and_unfinished_runs_warn(tmp_path):
    prov = provenance.describe(str(_config_only(tmp_path / "run", "smoke")))
    warnings = provenance.warnings(prov)
    assert len(warnings) == 3 and all(w.startswith("WARNING: ") for w in warnings)
    assert "SYNTHETIC" in warnings[0] and "smoke-test model (32 px, 2 epochs)" in warnings[1]
    assert "unfinished" in warnings[2] and "unknown" in provenance.line(prov)
    assert provenance.columns(prov)["model_best_epoch"] == ""


@pytest.mark.parametrize("best_val, classes, warns", [(0.4821, 2, True), (0.5499, 2, True), (0.55, 2, False),
                                                      (0.27, 5, True), (0.29, 5, False), (None, 2, False)])
def test_a_run_that_never_beat_chance_on_validation_warns(tmp_path, best_val, classes, warns):
    stage = "binary" if classes == 2 else "c5"
    config = defaults.get_config(stage)
    config.data.manifest = "/data/m.csv"
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort())
    metrics = {"balanced_accuracy": 0.5, "best_epoch": 3}
    if best_val is not None:
        metrics["best_val_balanced_accuracy"] = best_val
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    found = provenance.warnings(provenance.describe(str(workdir)))
    assert bool(found) == warns, found
    if warns:
        assert "never beat chance" in found[0] and f"chance {1 / classes:.2f}" in found[0]


@pytest.mark.parametrize("size,epochs,smoke", [(64, 8, True), (128, 3, True), (128, 4, False)])
def test_smoke_thresholds(size, epochs, smoke):
    prov = {"workdir": "w", "data": "m.csv", "image_size": size, "epochs": epochs, "test_balanced_accuracy": 0.9}
    assert bool(provenance.warnings(prov)) == smoke


def test_predict_prints_provenance_and_writes_its_columns(tmp_path):
    workdir = make_run(str(tmp_path / "run"), image_size=32, seed=4)
    write_images(str(tmp_path / "imgs"), 4)
    out = tmp_path / "p.csv"
    result = run_cli("circlemix_jax.predict", f"--workdir={workdir}", f"--images={tmp_path / 'imgs'}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("MODEL ") and "stage binary" in line and "data synthetic" in line for line in lines)
    assert any(line.startswith("WARNING: ") and "SYNTHETIC" in line for line in lines)
    assert any(line.startswith("WARNING: ") and "smoke-test model" in line for line in lines)
    with open(tmp_path / "p_subjects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        assert r["model_stage"] == "binary" and r["model_data"] == "synthetic" and r["model_image_size"] == "32"
        assert r["model_test_balanced_accuracy"] == "0.5000" and r["model_children"] == ""
