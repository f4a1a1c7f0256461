"""Bad input: one line naming the culprit, exit code 2, no traceback, workdir untouched."""

import csv
import os

import pytest
from conftest import run_cli

from circlemix_jax import data, defaults
from circlemix_jax.defaults import FIVE_CLASSES


def _rows(manifest):
    root = os.path.dirname(manifest)
    with open(manifest) as f:
        return [dict(r, path=os.path.join(root, r["path"])) for r in csv.DictReader(f)]


def _write(path, rows, fields=("path", "label", "subject")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _check(result, *needles):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


@pytest.fixture
def workdir(tmp_path):
    w = tmp_path / "run"
    w.mkdir()
    (w / "keep.txt").write_text("precious")
    yield str(w)
    assert (w / "keep.txt").read_text() == "precious"


def _train(manifest, workdir, *extra, config="configs/binary.py:smoke"):
    return run_cli("circlemix_jax.main", f"--config={config}", f"--workdir={workdir}",
                   f"--config.data.manifest={manifest}", *extra, timeout=300)


def test_missing_manifest(tmp_path, workdir):
    _check(_train(tmp_path / "nope.csv", workdir), "nope.csv")


def test_missing_column(tmp_path, synthetic_manifest, workdir):
    m = _write(tmp_path / "m.csv", _rows(synthetic_manifest), fields=("path", "label"))
    _check(_train(m, workdir), "m.csv", "subject")


def test_manifest_saved_in_a_windows_code_page(tmp_path, synthetic_manifest, workdir):
    rows = _rows(synthetic_manifest)
    rows[2]["subject"] = "Schön"
    m = _write(tmp_path / "m.csv", rows)
    with open(m, encoding="utf-8") as f:
        text = f.read()
    with open(m, "w", encoding="cp1252", newline="") as f:
        f.write(text)
    _check(_train(m, workdir), "m.csv", "line 4", "not UTF-8", "0xf6")


def test_empty_manifest(tmp_path, workdir):
    _check(_train(_write(tmp_path / "m.csv", []), workdir), "m.csv", "no rows")


def test_duplicate_rows(tmp_path, synthetic_manifest, workdir):
    rows = _rows(synthetic_manifest)
    _check(_train(_write(tmp_path / "m.csv", rows + rows[:1]), workdir), "duplicate", os.path.basename(rows[0]["path"]))


def test_unknown_label(tmp_path, synthetic_manifest, workdir):
    rows = _rows(synthetic_manifest)
    rows[4]["label"] = "tubule"
    _check(_train(_write(tmp_path / "m.csv", rows), workdir), "m.csv", "line 6", "tubule")


def test_missing_and_corrupt_images_all_listed(tmp_path, synthetic_manifest, workdir):
    rows = _rows(synthetic_manifest)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(open(rows[0]["path"], "rb").read()[:100])
    rows[0]["path"] = str(corrupt)
    rows[1]["path"] = str(tmp_path / "missing.png")
    _check(_train(_write(tmp_path / "m.csv", rows), workdir), "corrupt.png", "missing.png")


def test_fold_out_of_range(synthetic_manifest, workdir):
    _check(_train(synthetic_manifest, workdir, "--config.fold=7"), "fold=7")


def test_unknown_config_field(synthetic_manifest, workdir):
    _check(_train(synthetic_manifest, workdir, "--config.data.no_such_field=1"), "no_such_field")


def test_class_missing_from_training_split(tmp_path, synthetic_manifest, workdir):
    rows = [r for r in _rows(synthetic_manifest) if r["label"] != "solidified"]
    lone = next(r for r in _rows(synthetic_manifest) if r["label"] == "solidified")
    rows.append(dict(lone, subject="LONE"))
    m = _write(tmp_path / "m.csv", rows)
    records = data.read_manifest(m, FIVE_CLASSES)
    fold = next(k for k in range(5) if "LONE" in set(records.subjects[data.make_split(records, k).test]))
    _check(_train(m, workdir, f"--config.fold={fold}", config="configs/c5.py:smoke"), "solidified",
           "no training images")


def test_balancing_centres_with_a_blank_centre(synthetic_manifest, tmp_path, workdir):
    rows = [dict(r, center="A" if i % 9 else "") for i, r in enumerate(_rows(synthetic_manifest))]
    m = _write(tmp_path / "m.csv", rows, ("path", "label", "subject", "center"))
    _check(_train(m, workdir, "--config.data.balance_centers=True"), "m.csv", "empty 'center' at line 2")
    assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_workdir_with_different_config(synthetic_manifest, workdir):
    config = defaults.get_config("binary", "smoke")
    with config.unlocked():
        config.data.manifest = synthetic_manifest
        config.seed = 123
    stored = config.to_json_best_effort(indent=1, sort_keys=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(stored)
    _check(_train(synthetic_manifest, workdir), "different config", "seed: 123 -> 0", "delete")
    assert open(os.path.join(workdir, "config.json")).read() == stored


def test_every_script_entry_point_exists_and_importing_clis_defines_no_flags():
    import importlib
    import tomllib

    from absl import flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
        assert module.removeprefix("circlemix_jax.") in {"main", "experiments", "predict", "explain", "export",
                                                         "visualize", "convert", "bench"}, name
    # Each CLI defines its flags when run, so several can be imported (tests, notebooks) at once.
    # (Libraries such as Grain define their own flags on import; ours are defined by run().)
    ours = {"config", "workdir", "out", "mode", "pairs", "manifest", "child", "print_config", "distributed"}
    assert not ours & set(flags.FLAGS)
