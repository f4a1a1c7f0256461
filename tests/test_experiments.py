"""The experiments command: the protocol's orchestration, merged scores, tables and figures, and a real mini run.

Compiling one B0 train step costs 30-90 s on the 2-core CPU and the full
`paper.py:smoke` needs nine (3 methods x 3 class counts), so the suite runs:
  - the whole protocol (2 folds x 3 methods x 5 stages) with a stand-in for
    `train.train_and_evaluate` that writes a run's outputs, in-process;
  - a real mini protocol through the CLI (1 fold, baseline, C5 + NC2: two
    compiled train steps), shared with test_predict;
  - the exact `paper.py:smoke` command only when CIRCLEMIX_FULL_SMOKE=1.
"""

import csv
import importlib.util
import json
import os
import time

import numpy as np
import pytest
from conftest import REPO, run_cli, shared_dir

from circlemix_jax import defaults, experiments, hierarchy, report
from circlemix_jax.metrics import classification_metrics

SMOKE = ("circlemix_jax.experiments", "--config=configs/paper.py:smoke")
# One fold of baseline C5 + NC2. The base fields are put back to configs/c5.py:smoke's, so the C5 run
# compiles exactly test_train's programs and the shared persistent cache serves them to it.
MINI = ("--config.methods=('baseline',)", "--config.folds=(0,)", "--config.stages=('c5', 'nc2')",
        "--config.base.num_epochs=2", "--config.base.optim.decay_at=0.5", "--config.base.augment.max_crop=16")
SKILL = {"baseline": 0.5, "cutmix": 0.6, "circlemix": 0.7}  # the stand-in's share of correct predictions


def _paper_config(arg):
    spec = importlib.util.spec_from_file_location("paper_config", os.path.join(REPO, "configs", "paper.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def mini_protocol(tmp_path_factory) -> tuple[str, float, str]:
    """Runs the real mini protocol once per test session (all workers) into a shared folder.

    test_predict calls this too. Whichever test process asks first runs it; every
    caller gets that first run's output, so neither module depends on the order
    or the worker the modules run in. Returns (workdir, seconds, stdout).
    """
    with shared_dir(tmp_path_factory, "paper-mini") as folder:
        workdir, log = str(folder / "run"), folder / "result.json"
        if not log.exists():
            t = time.time()
            result = run_cli(*SMOKE, *MINI, f"--workdir={workdir}", timeout=1200)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            log.write_text(json.dumps({"seconds": time.time() - t, "stdout": result.stdout}))
        out = json.loads(log.read_text())
    return workdir, out["seconds"], out["stdout"]


# --- the whole protocol with a stand-in trainer ------------------------------------------------------------------

def fake_train(config, workdir, stop=None):
    """Writes what a finished run writes (config.json, test_predictions.csv, metrics.json), skilled per method."""
    from circlemix_jax import train

    records, split, parts = train.load_fold(config)
    test = records.take(split.test)
    method = defaults.method_name(config)
    classes = np.asarray(config.classes)
    rng = np.random.default_rng([config.fold, len(classes), int(SKILL[method] * 10)])
    guess = classes[rng.integers(len(classes), size=len(test))]
    right = np.isin(test.labels, classes) & (rng.random(len(test)) < SKILL[method])
    pred = np.where(right, test.labels, guess)
    # With a decision rule, a stand-in 'adjusted' prediction that fixes some more errors.
    rule = config.eval.decision != "argmax"
    adjusted = np.where(np.isin(test.labels, classes) & (rng.random(len(test)) < 0.5), test.labels, pred)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    with open(os.path.join(workdir, "test_predictions.csv"), "w") as f:
        f.write("path,subject,label,pred" + (",pred_adjusted" if rule else "") + "\n"
                + "".join(f"{p},{s},{y},{q}" + (f",{a}" if rule else "") + "\n" for p, s, y, q, a in
                          zip(test.paths, test.subjects, test.labels, pred, adjusted)))
    local = {c: i for i, c in enumerate(classes)}
    keep = np.isin(test.labels, classes)
    metrics = classification_metrics([local[y] for y in test.labels[keep]], [local[q] for q in pred[keep]],
                                     parts["test"].class_names)
    if rule:
        metrics["adjusted"] = classification_metrics([local[y] for y in test.labels[keep]],
                                                     [local[q] for q in adjusted[keep]], parts["test"].class_names)
    if split.held_out:
        metrics["test_center"] = split.held_out
    metrics.update(stage=config.stage, method=method, fold=config.fold, best_epoch=0)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    fake_train.calls.append((config.stage, method, config.fold, config.parent_workdir))
    return metrics


def _manifest_without_images(folder) -> str:
    """120 rows over 23 subjects, every class in many subjects; the stand-in never opens the images."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), (40, 32, 24, 12, 12))
    subjects = (np.arange(len(labels)) + rng.integers(23, size=len(labels))) % 23
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as f:
        f.write("path,label,subject\n" + "".join(f"img{i}.png,{defaults.FIVE_CLASSES[y]},S{s:02d}\n"
                                                 for i, (y, s) in enumerate(zip(labels, subjects))))
    return path


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    from circlemix_jax import train

    root = str(tmp_path_factory.mktemp("protocol"))
    paper = _paper_config("smoke")
    paper.base.data.manifest = _manifest_without_images(root)
    fake_train.calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "train_and_evaluate", fake_train)
        experiments.run_all(paper, root)
        first_calls = list(fake_train.calls)
        experiments.run_all(paper, root)  # a rerun skips every finished run
    written = experiments.write_results(paper, root, wall_s=1.0)
    return paper, root, first_calls, fake_train.calls, written


def _rows(workdir, pooled=False):
    """results.csv's per-fold rows (or its pooled rows)."""
    with open(os.path.join(workdir, "results.csv")) as f:
        return [r for r in csv.DictReader(f) if (r["fold"] == report.POOLED) == pooled]


def test_protocol_runs_every_stage_once_with_parents_first(protocol):
    paper, root, first, after_rerun, _ = protocol
    assert len(first) == 2 * 3 * 5 and after_rerun == first
    done = set()
    for stage, method, fold, parent in first:
        if stage in defaults.CHILD_STAGES:
            assert parent == experiments.run_dir(root, "c5", method, fold) and ("c5", method, fold) in done
        done.add((stage, method, fold))


def test_results_csv_md_and_figures(protocol):
    _, root, _, _, written = protocol
    rows = _rows(root)
    assert len(rows) == 2 * 3 * 5
    assert {r["method"] for r in rows} == {"baseline", "cutmix", "circlemix"}
    assert {r["setting"] for r in rows} == set(experiments.SETTINGS)
    md = open(os.path.join(root, "results.md")).read()
    for text in ("Table 1", "Table 2", "Binary ACC", "Five-class F1", "C5+NC2 ACC", "C5+C2 F1",
                 "Paired comparison", "| circlemix | C5+C3 |", "![confusion_c5.png]"):
        assert text in md, text
    for png in ("confusion_c5.png", "confusion_binary.png"):
        path = os.path.join(root, png)
        assert path in written
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png


def test_merged_rows_are_the_merge_rule_on_all_test_images(protocol):
    _, root, _, _, _ = protocol
    parent, child = (experiments.run_dir(root, s, "cutmix", 1) for s in ("c5", "c3"))
    c5 = hierarchy.read_predictions(os.path.join(parent, "test_predictions.csv"))
    c3 = hierarchy.read_predictions(os.path.join(child, "test_predictions.csv"))
    routed = np.isin(c5["pred"], [2, 3, 4])
    merged = np.where(routed, c3["pred"], c5["pred"])
    expected = classification_metrics(c5["label"], merged, range(5))
    row = next(r for r in _rows(root) if (r["method"], r["setting"], r["fold"]) == ("cutmix", "C5+C3", "1"))
    assert float(row["balanced_accuracy"]) == pytest.approx(expected["balanced_accuracy"], abs=1e-6)
    assert float(row["balanced_f1"]) == pytest.approx(expected["balanced_f1"], abs=1e-6)
    assert int(row["num_examples"]) == len(c5["label"])  # every test image, not only C3's classes


def test_tables_rank_the_stand_in_methods_by_skill(protocol):
    rows = _rows(protocol[1])
    mean = {m: np.mean([float(r["balanced_accuracy"]) for r in rows if r["method"] == m and r["setting"] == "C5"])
            for m in SKILL}
    assert mean["baseline"] < mean["circlemix"]


# --- the real thing, small ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return mini_protocol(tmp_path_factory)


def test_mini_protocol_trains_writes_and_resumes(mini):
    workdir, seconds, stdout = mini
    print(f"mini protocol took {seconds:.0f}s")
    assert "[1/2] c5 baseline fold0" in stdout and "[2/2] nc2 baseline fold0" in stdout
    # The child was initialised from its parent's best checkpoint by train.initial_variables.
    assert f"PARENT: loaded the best checkpoint of {os.path.join(workdir, 'c5', 'baseline', 'fold0')}" in stdout
    rows = _rows(workdir)
    assert {r["setting"] for r in rows} == {"C5", "C5+NC2"}
    assert os.path.exists(os.path.join(workdir, "results.md"))
    assert os.path.exists(os.path.join(workdir, "confusion_c5.png"))
    assert "epoch 1/" in stdout  # the first run trained (and says so where the rerun is read)
    again = run_cli(*SMOKE, *MINI, f"--workdir={workdir}")
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2
    # Skipped means not trained again: no compile, no epoch (checked by what it did, not how long
    # it took, which depends on the machine's load).
    assert "compiling the train step" not in again.stdout + again.stderr
    assert "epoch 1/" not in again.stdout + again.stderr


@pytest.mark.skipif(not os.environ.get("CIRCLEMIX_FULL_SMOKE"), reason="the full paper.py:smoke takes ~10-20 min "
                    "on 2 cores; set CIRCLEMIX_FULL_SMOKE=1 to run it")
def test_full_smoke_command(tmp_path):
    result = run_cli(*SMOKE, f"--workdir={tmp_path}", timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = open(tmp_path / "results.csv").read()
    for name in ("baseline", "cutmix", "circlemix", "binary", "C5", "C5+NC2", "C5+C3", "C5+C2"):
        assert name in names, name
    assert (tmp_path / "results.md").exists() and list(tmp_path.glob("*.png"))


# --- helpers -----------------------------------------------------------------------------------------------------

def test_bad_protocol_field_is_one_line(tmp_path):
    result = run_cli(*SMOKE, f"--workdir={tmp_path}", "--config.methods=('baseline', 'nope')")
    assert result.returncode == 2
    assert "methods" in result.stderr and "Traceback" not in result.stderr


def test_stage_config_layers_base_over_stage_defaults():
    protocol = _paper_config("smoke")
    config = experiments.stage_config(protocol, "c2", "cutmix", 1, "/r")
    assert config.classes == (3, 4) and config.mix.method == "cutmix" and config.fold == 1
    assert config.data.image_size == protocol.base.data.image_size and config.num_epochs == 1
    assert config.parent_workdir == "/r/c5/cutmix/fold1"
    binary = experiments.stage_config(protocol, "binary", "baseline", 0, "/r")
    assert binary.mix.method == "none" and binary.data.label_map["solidified"] == "global_sclerosis"
    assert binary.parent_workdir == ""
    runs = experiments.plan(protocol, "/r")
    assert len(runs) == 30 and [r.stage for r in runs[:5]] == ["c5", "nc2", "c3", "c2", "binary"]


def test_paired_comparison_and_formatting():
    base = {0: 0.60, 1: 0.70, 2: 0.50, 3: 0.55, 4: 0.65}
    better = {f: v + 0.02 * (f + 1) for f, v in base.items()}
    c = report.paired(base, better)
    assert c["n"] == 5 and c["improved"] == 5 and c["mean_diff"] == pytest.approx(6.0)
    assert c["p"] == pytest.approx(0.0625)  # the smallest two-sided p with 5 pairs
    assert report.paired({0: 0.5, 1: 0.6}, {0: 0.6, 1: 0.5})["p"] is None  # too few folds for a test
    assert report.mean_std([0.7, 0.8]) == "75.0 ± 7.1" and report.mean_std([0.5]) == "50.0"
    assert report.mean_std([]) == "–"


def test_report_header_names_the_schedule_that_ran():
    spec = importlib.util.spec_from_file_location("paper_config", os.path.join(REPO, "configs", "paper.py"))
    paper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(paper)
    recipe = experiments.training_summary(paper.get_config("scratch").base)
    assert "cosine decay" in recipe and "x0.1" not in recipe and "od_per_image" in recipe
    assert "weight EMA 0.99" in recipe and "8 dihedral symmetries" in recipe
    assert "blur up to 0.01 of the side" in recipe and "noise up to 0.03" in recipe
    papers = experiments.training_summary(paper.get_config("").base)
    assert "lr x0.1 at 50% of the steps" in papers and "cosine" not in papers and "EMA" not in papers
    assert "blur" not in papers and "noise" not in papers and "jitter" not in papers
