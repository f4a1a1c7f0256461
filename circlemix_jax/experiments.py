"""The paper's evaluation protocol as one command: folds x methods x stages, then tables and figures.

    python -m circlemix_jax.experiments --config configs/paper.py --workdir runs/paper [--config.base.FIELD=VALUE]

Each run trains in this process through `train.train_and_evaluate` into
`<workdir>/<stage>/<method>/fold<k>`; children find their C5 parent there. A
finished run (one with metrics.json) is skipped, so rerunning the command
resumes the protocol where it stopped. Afterwards it writes
`<workdir>/results.csv`, `<workdir>/results.md` and confusion-matrix PNGs
(see `report`). The merged C5+X scores are computed here from the parent's and
the child's test_predictions.csv: five-class metrics on every test image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import ml_collections
import numpy as np

from circlemix_jax import cli, config_check, defaults, hierarchy, report, rundir
from circlemix_jax.errors import InputError, exits_cleanly
from circlemix_jax.metrics import classification_metrics

# Stage order: every child after its C5 parent.
STAGE_ORDER = ("c5", "nc2", "c3", "c2", "binary")
CHILD_SETTING = {"nc2": "C5+NC2", "c3": "C5+C3", "c2": "C5+C2"}
SETTINGS = ("binary", "C5", "C5+NC2", "C5+C3", "C5+C2")
# Fields each run sets itself; `base` may not hold them (paper.py removes them).
PER_RUN_FIELDS = ("stage", "classes", "class_names", "data.label_map", "mix.method", "parent_workdir", "fold")
# A finished run is kept when only these differ from the stored config (parent_workdir
# is an absolute path, so it changes when the whole workdir is moved).
KEEP_DESPITE = (*rundir.EXECUTION_FIELDS, "parent_workdir")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the protocol."""

    stage: str
    method: str
    fold: int
    workdir: str

    @property
    def name(self) -> str:
        return f"{self.stage} {self.method} fold{self.fold}"


def run_dir(root: str, stage: str, method: str, fold: int) -> str:
    return os.path.join(os.path.abspath(root), stage, method, f"fold{fold}")


def validate(paper) -> None:
    """Checks the protocol's own fields.

    Raises:
      InputError: naming the bad field.
    """
    bad = [m for m in paper.methods if m not in defaults.METHODS]
    if bad or not paper.methods:
        raise InputError(f"config field methods={tuple(paper.methods)} must name some of {defaults.METHODS}")
    bad = [s for s in paper.stages if s not in STAGE_ORDER]
    if bad or not paper.stages:
        raise InputError(f"config field stages={tuple(paper.stages)} must name some of {STAGE_ORDER}")
    bad = [f for f in paper.folds if not 0 <= f < paper.base.num_folds]
    if bad or not paper.folds:
        raise InputError(f"config field folds={tuple(paper.folds)} must lie in 0..{paper.base.num_folds - 1} "
                         "(base.num_folds)")
    flat = rundir.flatten_dict(paper.base.to_dict())
    clash = [k for k in PER_RUN_FIELDS if k in flat or any(f.startswith(k + ".") for f in flat)]
    if clash:
        raise InputError(f"config field base.{clash[0]} is set by each run and cannot be shared")


def stage_config(paper, stage: str, method: str, fold: int, root: str) -> ml_collections.ConfigDict:
    """The config of one run: the stage's defaults, then `paper.base`, then the run's own fields."""
    config = defaults.get_config(stage, method)
    config.update_from_flattened_dict(rundir.flatten_dict(paper.base.to_dict()))
    config.fold = fold
    if stage in defaults.CHILD_STAGES:
        config.parent_workdir = run_dir(root, "c5", method, fold)
    return config


def plan(paper, root: str) -> list[Run]:
    """All runs in order: per fold and method, C5 before its children."""
    stages = [s for s in STAGE_ORDER if s in paper.stages]
    return [Run(s, m, f, run_dir(root, s, m, f)) for f in paper.folds for m in paper.methods for s in stages]


def _finished(run: Run, config) -> bool:
    """True when the run has its test metrics and was made with this config."""
    if not os.path.isfile(os.path.join(run.workdir, "metrics.json")):
        return False
    rundir.check_config(run.workdir, config.to_json_best_effort(indent=1, sort_keys=True), KEEP_DESPITE)
    return True


def check_all(paper, root: str) -> None:
    """Checks every run's config before the first one starts, so a bad field fails in seconds, not hours.

    Raises:
      InputError: naming the run and the field.
    """
    import jax  # noqa: PLC0415 - after the compilation cache is configured

    for run in plan(paper, root):
        try:
            config_check.check_run_config(stage_config(paper, run.stage, run.method, run.fold, root),
                                          jax.device_count())
        except InputError as e:
            raise InputError(f"{run.name}: {e}") from None


def run_all(paper, root: str, stop: cli.StopRequest | None = None) -> None:
    """Trains every run of the protocol that is not finished yet, in this process."""
    from circlemix_jax import train  # noqa: PLC0415 - after the compilation cache is configured

    runs = plan(paper, root)
    start = time.time()
    for i, run in enumerate(runs, start=1):
        config = stage_config(paper, run.stage, run.method, run.fold, root)
        head = f"[{i}/{len(runs)}] {run.name}"
        if _finished(run, config):
            print(f"{head}: finished earlier, skipped", flush=True)
            continue
        print(f"{head} -> {run.workdir}", flush=True)
        t0 = time.time()
        try:
            metrics = train.train_and_evaluate(config, run.workdir, stop=stop)
        except InputError as e:
            raise InputError(f"{run.name}: {e}") from None
        print(f"{head}: balanced_accuracy {metrics['balanced_accuracy']:.4f} balanced_f1 "
              f"{metrics['balanced_f1']:.4f} in {time.time() - t0:.0f}s (total {(time.time() - start) / 60:.1f} min)",
              flush=True)


def _read_metrics(workdir: str) -> dict | None:
    path = os.path.join(workdir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def collect(paper, root: str) -> tuple[list[dict], dict]:
    """Scores of every finished run and merged setting.

    Returns:
      (rows {fold, method, setting, balanced_accuracy, balanced_f1, accuracy,
      num_examples}, {(setting, method): (confusion matrix summed over folds,
      class names)}). Every image is in exactly one test fold, so the summed
      matrix covers the whole data set once.
    """
    rows, matrices = [], {}

    def add(fold, method, setting, metrics):
        rows.append({"fold": fold, "method": method, "setting": setting,
                     "balanced_accuracy": metrics["balanced_accuracy"], "balanced_f1": metrics["balanced_f1"],
                     "accuracy": metrics["accuracy"], "num_examples": metrics["num_examples"]})
        cm = np.asarray(metrics["confusion_matrix"])
        key = (setting, method)
        total = matrices[key][0] + cm if key in matrices else cm
        matrices[key] = (total, tuple(metrics["class_names"]))

    for fold in paper.folds:
        for method in paper.methods:
            if "binary" in paper.stages and (m := _read_metrics(run_dir(root, "binary", method, fold))):
                add(fold, method, "binary", m)
            parent = run_dir(root, "c5", method, fold)
            c5 = _read_metrics(parent) if "c5" in paper.stages else None
            if c5 is None:
                continue
            add(fold, method, "C5", c5)
            for child in defaults.CHILD_STAGES:
                child_dir = run_dir(root, child, method, fold)
                if child in paper.stages and _read_metrics(child_dir) is not None:
                    labels, pred = hierarchy.merged_test_predictions(parent, [child_dir])
                    add(fold, method, CHILD_SETTING[child], classification_metrics(labels, pred, c5["class_names"]))
    return rows, matrices


def write_results(paper, root: str, wall_s: float | None = None) -> list[str]:
    """Writes results.csv, results.md and the figures; returns the paths written."""
    rows, matrices = collect(paper, root)
    if not rows:
        raise InputError(f"{root} holds no finished runs to report")
    written = [report.write_csv(rows, os.path.join(root, "results.csv"))]
    figures = []
    five = [s for s in ("C5", "C5+NC2") if any(k[0] == s for k in matrices)]
    if five:
        figures.append(report.confusion_grid(matrices, five, list(paper.methods),
                                             os.path.join(root, "confusion_c5.png")))
    if any(k[0] == "binary" for k in matrices):
        figures.append(report.confusion_grid(matrices, ["binary"], list(paper.methods),
                                             os.path.join(root, "confusion_binary.png")))
    md = report.markdown(rows, list(paper.methods), describe(paper, wall_s), [os.path.basename(f) for f in figures])
    path = os.path.join(root, "results.md")
    with open(path, "w") as f:
        f.write(md)
    return written + [path] + figures


def describe(paper, wall_s: float | None) -> list[str]:
    """The settings that produced the tables, for the report's header."""
    b = paper.base
    data = (f"manifest {b.data.manifest}" if b.data.manifest
            else f"built-in SYNTHETIC set ({b.data.synthetic_count} images)")
    lines = [f"Data: {data}; {b.num_folds} subject-level folds, test folds {list(paper.folds)}.",
             f"Methods: {', '.join(paper.methods)}; stages: {', '.join(s for s in STAGE_ORDER if s in paper.stages)}.",
             f"Training: {b.num_epochs} epochs, {b.data.image_size} px, batch {b.batch_size}, SGD lr {b.optim.lr} "
             f"momentum {b.optim.momentum}, lr x{b.optim.decay_factor} at {b.optim.decay_at:.0%} of the steps, "
             f"CircleMix sampler '{b.mix.sampler}', mixing granularity '{b.mix.granularity}'."]
    if wall_s is not None:
        lines.append(f"Wall time of this invocation: {wall_s / 60:.1f} min.")
    return lines


def run() -> None:
    """CLI entry: flags are defined here, not at import, so tests can import this module."""
    from absl import app, flags, logging  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Protocol config, e.g. configs/paper.py or configs/paper.py:smoke.", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Root folder of all runs and of the results.")
    report_only = flags.DEFINE_bool("report_only", False, "Only rewrite the tables and figures from finished runs.")
    flags.mark_flags_as_required(["config", "workdir"])

    stop = cli.install_stop_handlers()

    @exits_cleanly
    def main(argv) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
        from circlemix_jax import train  # noqa: PLC0415 - after flag parsing, which must stay fast

        paper, root = config_flag.value, os.path.abspath(workdir_flag.value)
        validate(paper)
        start = time.time()
        if not report_only.value:
            cli.configure_compilation_cache()
            check_all(paper, root)
            try:
                run_all(paper, root, stop)
            except train.Stopped as e:
                saved = f"saved step {e.step} of {e.workdir}" if e.step is not None else "nothing to save"
                print(f"{stop.name}: {saved}; rerun the same command to go on", file=sys.stderr, flush=True)
                sys.exit(cli.EXIT_CODES[e.signum])
            except FloatingPointError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.exit(3)
        for path in write_results(paper, root, None if report_only.value else time.time() - start):
            print(f"wrote {path}", flush=True)

    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, config_flags=("config",)))


if __name__ == "__main__":
    run()
