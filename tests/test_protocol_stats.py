"""The experiments driver's seeds, pooled subject-bootstrap scores and leave-one-centre-out (stand-in trainer)."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score
from test_experiments import _paper_config, _rows, fake_train

from circlemix_jax import defaults, experiments, hierarchy, report
from circlemix_jax.errors import InputError

CENTRES = ("SAS", "SESCAM", "VUHSK")


def _manifest(folder, with_center=True) -> str:
    """150 rows over 24 subjects in 3 centres, every class in several subjects of each; no images are opened."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), (50, 40, 30, 15, 15))
    subjects = (np.arange(len(labels)) + rng.integers(24, size=len(labels))) % 24
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as f:
        f.write("path,label,subject" + (",center" if with_center else "") + "\n")
        f.writelines(f"img{i}.png,{defaults.FIVE_CLASSES[y]},S{s:02d}" + (f",{CENTRES[s % 3]}" if with_center else "")
                     + "\n" for i, (y, s) in enumerate(zip(labels, subjects)))
    return path


def _run(paper, root):
    from circlemix_jax import train

    fake_train.calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_and_evaluate", fake_train)
        experiments.validate(paper)
        experiments.run_all(paper, root)
    return experiments.write_results(paper, root, wall_s=1.0)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seeded"))
    paper = _paper_config("smoke")
    paper.base.data.manifest = _manifest(root)
    paper.base.eval.decision = "val"
    paper.seeds = (0, 1, 2)
    paper.methods = ("baseline", "circlemix")
    paper.stages = ("c5", "nc2", "binary")
    _run(paper, root)
    return paper, root, list(fake_train.calls)


def test_seeds_axis_runs_every_seed_in_its_own_folder(seeded):
    paper, root, calls = seeded
    assert len(calls) == 3 * 2 * 2 * 3
    for seed in (0, 1, 2):
        workdir = experiments.run_dir(root, "c5", "circlemix", 1, seed)
        assert workdir.endswith(os.path.join("c5", "circlemix", f"seed{seed}", "fold1"))
        assert json.load(open(os.path.join(workdir, "config.json")))["seed"] == seed
        child = json.load(open(os.path.join(experiments.run_dir(root, "nc2", "circlemix", 1, seed), "config.json")))
        assert child["parent_workdir"] == workdir
    # Seed-major order: the first seed's table is complete before the second seed starts.
    assert [c[2] for c in calls[:12]] == [0] * 6 + [1] * 6 and calls[0][0] == "c5"
    assert experiments.run_dir(root, "c5", "baseline", 0) == os.path.join(root, "c5", "baseline", "fold0")


def test_pooled_score_is_the_mean_over_seeds_of_the_pooled_predictions(seeded):
    paper, root, _ = seeded
    pooled = {(r["setting"], r["method"]): r for r in _rows(root, pooled=True)}
    assert set(pooled) == {(s, m) for s in ("binary", "C5", "C5+NC2") for m in ("baseline", "circlemix")}
    for key in ("balanced_accuracy", "adjusted_balanced_accuracy"):
        column = "pred" if key == "balanced_accuracy" else "pred_adjusted"
        per_seed = []
        for seed in (0, 1, 2):
            files = [hierarchy.read_predictions(os.path.join(experiments.run_dir(root, "binary", "circlemix", f, seed),
                                                             "test_predictions.csv")) for f in (0, 1)]
            per_seed.append(balanced_accuracy_score(np.concatenate([f["label"] for f in files]),
                                                    np.concatenate([f[column] for f in files])))
        row = pooled[("binary", "circlemix")]
        assert float(row[key]) == pytest.approx(np.mean(per_seed), abs=1e-6)
    low, high = float(row["ci_low"]), float(row["ci_high"])
    assert low <= float(row["balanced_accuracy"]) <= high and high - low > 0.01
    fold_rows = [r for r in _rows(root) if r["setting"] == "binary" and r["method"] == "circlemix"]
    assert sorted({r["seed"] for r in fold_rows}) == ["0", "1", "2"] and len(fold_rows) == 6
    assert all(r["adjusted_balanced_accuracy"] for r in fold_rows)


def test_results_md_has_pooled_intervals_and_a_paired_bootstrap(seeded):
    _, root, _ = seeded
    md = open(os.path.join(root, "results.md")).read()
    for text in ("Pooled over the folds", "resamples subjects", "| binary | circlemix |", "pooled ΔACC (pp) [95% CI]",
                 "initialisation seeds [0, 1, 2]", "decision rule 'val'"):
        assert text in md, text
    line = next(x for x in md.splitlines() if x.startswith("| circlemix | binary |"))
    assert line.count("[") == 1 and line.rstrip().endswith("] |")  # the pooled Δ with its interval
    # Runs without a decision rule (the seed-less protocol of test_experiments) leave the adjusted cells empty.
    assert report.pooled_table([], [], ["baseline"]).startswith("_no")


@pytest.fixture(scope="module")
def loco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loco"))
    paper = _paper_config("smoke,loco")
    paper.base.data.manifest = _manifest(root)
    paper.methods = ("baseline", "cutmix")
    paper.stages = ("binary",)
    _run(paper, root)
    return paper, root, list(fake_train.calls)


def test_leave_one_centre_out_protocol_tests_every_centre(loco):
    paper, root, calls = loco
    assert paper.base.split == "leave_one_center_out" and experiments.folds_of(paper) == [0, 1, 2]
    assert sorted(c[2] for c in calls) == [0, 0, 1, 1, 2, 2]
    rows = _rows(root)
    assert {(r["fold"], r["test_center"]) for r in rows} == {("0", "SAS"), ("1", "SESCAM"), ("2", "VUHSK")}
    md = open(os.path.join(root, "results.md")).read()
    assert "## Leave one centre out" in md and "| SAS | SESCAM | VUHSK |" in md
    assert "## Sclerotic recall per centre" in md and "leave one centre out" in md


def test_protocol_fields_are_checked(tmp_path):
    paper = _paper_config("smoke,loco")
    paper.base.data.manifest = _manifest(str(tmp_path), with_center=False)
    with pytest.raises(InputError, match="'center'"):
        experiments.validate(paper)
    paper.base.data.manifest = _manifest(str(tmp_path))
    paper.folds = (0, 3)
    with pytest.raises(InputError, match=r"folds=\(0, 3\) must lie in 0\.\.2.*VUHSK"):
        experiments.validate(paper)
    paper = _paper_config("smoke")
    paper.seeds = (1, 1)
    with pytest.raises(InputError, match="seeds"):
        experiments.validate(paper)
    with pytest.raises(ValueError, match="loco"):
        _paper_config("smoke,nope")
