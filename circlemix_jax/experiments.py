"""The paper's evaluation protocol as one command: folds x methods x stages, then tables and figures.

    python -m circlemix_jax.experiments --config configs/paper.py --workdir runs/paper [--config.base.FIELD=VALUE]

Each run trains in this process through `train.train_and_evaluate` into
`<workdir>/<stage>/<method>/fold<k>`, or `<workdir>/<stage>/<method>/seed<S>/fold<k>`
when the config lists `seeds` (initialisation seeds; the split stays fixed);
children find their C5 parent there. A finished run (one with metrics.json) is
skipped, so rerunning the command resumes the protocol where it stopped.
Afterwards it writes `<workdir>/results.csv`, `<workdir>/results.md` and
confusion-matrix PNGs (see `report`). The merged C5+X scores are computed here
from the parent's and the child's test_predictions.csv: five-class metrics on
every test image.

Besides the per-fold scores, every method is scored on all its test predictions
pooled over the folds (every image once per seed), with a 95% interval from a
bootstrap over subjects (`bootstrap`), both for the plain argmax and under each
run's stored decision rule; against the baseline, the pooled difference gets a
paired subject-bootstrap interval. With split='leave_one_center_out' the folds
are the manifest's centres.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import ml_collections
import numpy as np
from sklearn.metrics import balanced_accuracy_score

from circlemix_jax import bootstrap, cli, config_check, data, defaults, hierarchy, report, rundir
from circlemix_jax.errors import InputError
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
    """One training run of the protocol; `seed` is None when the config lists no seeds (base.seed)."""

    stage: str
    method: str
    fold: int
    workdir: str
    seed: int | None = None

    @property
    def name(self) -> str:
        return f"{self.stage} {self.method}{'' if self.seed is None else f' seed{self.seed}'} fold{self.fold}"


def run_dir(root: str, stage: str, method: str, fold: int, seed: int | None = None) -> str:
    """<root>/<stage>/<method>[/seed<S>]/fold<k>: without seeds, the layout of single-seed protocols."""
    seed_part = [] if seed is None else [f"seed{seed}"]
    return os.path.join(os.path.abspath(root), stage, method, *seed_part, f"fold{fold}")


def seeds_of(paper) -> list[int | None]:
    """The initialisation seeds to run; [None] means the one seed `base.seed` in the seed-less layout."""
    return list(paper.seeds) or [None]


def folds_of(paper) -> list[int]:
    """The test folds to run: `folds`, or every fold when it is empty (every centre when leaving centres out).

    Raises:
      InputError: leaving centres out of a manifest without a `center` column.
    """
    if paper.folds:
        return list(paper.folds)
    if paper.base.split == "leave_one_center_out":
        return list(range(len(data.center_names(data.manifest_path(paper.base)))))
    return list(range(paper.base.num_folds))


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
    if paper.base.split == "leave_one_center_out":
        centres = data.center_names(data.manifest_path(paper.base))
        n, what = len(centres), f"the {len(centres)} centres {centres} (base.split='leave_one_center_out')"
    else:
        n, what = paper.base.num_folds, "base.num_folds"
    bad = [f for f in paper.folds if not 0 <= f < n]
    if bad:
        raise InputError(f"config field folds={tuple(paper.folds)} must lie in 0..{n - 1} ({what}); "
                         "() runs them all")
    seeds = list(paper.seeds)
    if len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise InputError(f"config field seeds={tuple(seeds)} must be distinct non-negative integers "
                         "(() = the one seed base.seed)")
    if paper.bootstrap_resamples < 100:
        raise InputError(f"config field bootstrap_resamples={paper.bootstrap_resamples} must be at least 100")
    flat = rundir.flatten_dict(paper.base.to_dict())
    clash = [k for k in PER_RUN_FIELDS if k in flat or any(f.startswith(k + ".") for f in flat)]
    if clash:
        raise InputError(f"config field base.{clash[0]} is set by each run and cannot be shared")


def stage_config(paper, stage: str, method: str, fold: int, root: str,
                 seed: int | None = None) -> ml_collections.ConfigDict:
    """The config of one run: the stage's defaults, then `paper.base`, then the run's own fields."""
    config = defaults.get_config(stage, method)
    config.update_from_flattened_dict(rundir.flatten_dict(paper.base.to_dict()))
    config.fold = fold
    if seed is not None:
        config.seed = seed
    if stage in defaults.CHILD_STAGES:
        config.parent_workdir = run_dir(root, "c5", method, fold, seed)
    return config


def plan(paper, root: str) -> list[Run]:
    """All runs in order: seed by seed (one seed's table is complete first), per fold and method, C5 first."""
    stages = [s for s in STAGE_ORDER if s in paper.stages]
    return [Run(s, m, f, run_dir(root, s, m, f, seed), seed)
            for seed in seeds_of(paper) for f in folds_of(paper) for m in paper.methods for s in stages]


def _finished(run: Run, config) -> bool:
    """True when the run has its test metrics and was made with this config."""
    if not os.path.isfile(os.path.join(run.workdir, "metrics.json")):
        return False
    rundir.check_config(run.workdir, config.to_json_best_effort(indent=1, sort_keys=True), KEEP_DESPITE,
                        defaults.field_defaults(run.stage))
    return True


def check_all(paper, root: str) -> None:
    """Checks every run's config before the first one starts, so a bad field fails in seconds, not hours.

    Raises:
      InputError: naming the run and the field.
    """
    import jax  # after the compilation cache is configured

    for run in plan(paper, root):
        try:
            config_check.check_run_config(stage_config(paper, run.stage, run.method, run.fold, root, run.seed),
                                          jax.device_count())
        except InputError as e:
            raise InputError(f"{run.name}: {e}") from None


def run_all(paper, root: str, stop: cli.StopRequest | None = None) -> None:
    """Trains every run of the protocol that is not finished yet, in this process."""
    from circlemix_jax import train  # after the compilation cache is configured

    runs = plan(paper, root)
    start = time.time()
    for i, run in enumerate(runs, start=1):
        config = stage_config(paper, run.stage, run.method, run.fold, root, run.seed)
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


def _test_predictions(parent_dir: str, child_dirs=()) -> dict:
    """A run's test predictions, merged through children: path, subject, label, pred (argmax) and
    pred_adjusted (under the stored decision rules; None when a run predates them)."""
    parent = hierarchy.read_predictions(os.path.join(parent_dir, "test_predictions.csv"))
    out = {k: parent[k] for k in ("path", "subject", "label")}
    children = []
    for child_dir in child_dirs:
        child = hierarchy.read_predictions(os.path.join(child_dir, "test_predictions.csv"))
        if not np.array_equal(child["path"], parent["path"]):
            raise InputError(f"{child_dir} was tested on other images than its parent {parent_dir}; "
                             "both must be the same fold of the same data")
        children.append((child, hierarchy.load_run_config(child_dir).classes))
    for key in ("pred", "pred_adjusted"):
        pred = parent.get(key)
        for child, classes in children:
            pred = None if pred is None or key not in child else hierarchy.merge_predictions(pred, child[key], classes)
        out[key] = pred
    return out


def collect(paper, root: str) -> tuple[list[dict], dict, dict]:
    """Scores of every finished run and merged setting.

    Returns:
      (rows {fold, seed, method, setting, test_center, balanced_accuracy, balanced_f1,
      accuracy, num_examples, adjusted_balanced_accuracy, adjusted_balanced_f1},
      {(setting, method): (confusion matrix summed over folds and seeds, class names)},
      {(setting, method, seed): [test predictions of each finished fold]}). Every image
      is in exactly one test fold, so per seed the summed matrix covers the data set once.
    """
    rows, matrices, predictions = [], {}, {}

    def add(fold, seed, method, setting, metrics, adjusted, preds, test_center=""):
        rows.append({"fold": fold, "seed": seed, "method": method, "setting": setting, "test_center": test_center,
                     "balanced_accuracy": metrics["balanced_accuracy"], "balanced_f1": metrics["balanced_f1"],
                     "accuracy": metrics["accuracy"], "num_examples": metrics["num_examples"],
                     "adjusted_balanced_accuracy": adjusted["balanced_accuracy"] if adjusted else None,
                     "adjusted_balanced_f1": adjusted["balanced_f1"] if adjusted else None})
        cm = np.asarray(metrics["confusion_matrix"])
        key = (setting, method)
        total = matrices[key][0] + cm if key in matrices else cm
        matrices[key] = (total, tuple(metrics["class_names"]))
        predictions.setdefault((setting, method, seed), []).append(preds)

    for seed in seeds_of(paper):
        row_seed = paper.base.seed if seed is None else seed
        for fold in folds_of(paper):
            for method in paper.methods:
                binary_dir = run_dir(root, "binary", method, fold, seed)
                if "binary" in paper.stages and (m := _read_metrics(binary_dir)):
                    add(fold, row_seed, method, "binary", m, m.get("adjusted"), _test_predictions(binary_dir),
                        m.get("test_center", ""))
                parent = run_dir(root, "c5", method, fold, seed)
                c5 = _read_metrics(parent) if "c5" in paper.stages else None
                if c5 is None:
                    continue
                centre = c5.get("test_center", "")
                add(fold, row_seed, method, "C5", c5, c5.get("adjusted"), _test_predictions(parent), centre)
                for child in defaults.CHILD_STAGES:
                    child_dir = run_dir(root, child, method, fold, seed)
                    if child in paper.stages and _read_metrics(child_dir) is not None:
                        merged = _test_predictions(parent, [child_dir])
                        names = c5["class_names"]
                        adjusted = (None if merged["pred_adjusted"] is None
                                    else classification_metrics(merged["label"], merged["pred_adjusted"], names))
                        add(fold, row_seed, method, CHILD_SETTING[child],
                            classification_metrics(merged["label"], merged["pred"], names), adjusted, merged, centre)
    return rows, matrices, predictions


def _stack(per_seed: dict[int, list[dict]], keep: set | None = None) -> dict | None:
    """The folds of each seed pooled, then the seeds stacked on the images all of them (and `keep`) tested."""
    pooled = {seed: {k: (np.concatenate([f[k] for f in folds]) if all(f[k] is not None for f in folds) else None)
                     for k in ("path", "subject", "label", "pred", "pred_adjusted")}
              for seed, folds in per_seed.items()}
    common = set.intersection(*(set(p["path"].tolist()) for p in pooled.values()))
    if keep is not None:
        common &= keep
    if not common:
        return None
    out = {k: [] for k in ("path", "subject", "label", "pred", "pred_adjusted")}
    for p in pooled.values():
        order = np.argsort(p["path"])
        order = order[np.isin(p["path"][order], list(common))]
        for k in out:
            out[k].append(None if p[k] is None else p[k][order])
    stacked = {k: (None if any(v is None for v in vs) else np.concatenate(vs)) for k, vs in out.items()}
    stacked["seeds"] = len(pooled)
    stacked["images"] = len(common)
    return stacked


def pooled_scores(paper, predictions: dict) -> tuple[list[dict], dict]:
    """Pooled balanced accuracy per setting and method, with subject-bootstrap intervals.

    Returns:
      (one row per (setting, method): {setting, method, balanced_accuracy, ci_low, ci_high,
      adjusted_balanced_accuracy, adjusted_ci_low, adjusted_ci_high, seed_scores (each seed's
      pooled balanced accuracy), seeds, num_examples (images per seed), subjects},
      {(setting, method): paired bootstrap difference against the baseline (argmax)}).
    """
    boot = {"resamples": paper.bootstrap_resamples, "seed": paper.bootstrap_seed}
    groups = {}
    for (setting, method, seed), folds in predictions.items():
        groups.setdefault((setting, method), {})[seed] = folds
    rows, differences = [], {}
    for (setting, method), per_seed in sorted(groups.items()):
        st = _stack(per_seed)
        if st is None:
            continue
        k = int(max(st[c].max() for c in ("label", "pred", "pred_adjusted") if st[c] is not None)) + 1
        plain = bootstrap.subject_bootstrap(st["label"], st["pred"], st["subject"], k, **boot)
        row = {"setting": setting, "method": method, "balanced_accuracy": plain["balanced_accuracy"],
               "ci_low": plain["low"], "ci_high": plain["high"], "seeds": st["seeds"],
               "num_examples": st["images"], "subjects": plain["subjects"],
               "adjusted_balanced_accuracy": None, "adjusted_ci_low": None, "adjusted_ci_high": None,
               "seed_scores": [float(balanced_accuracy_score(s["label"], s["pred"]))
                               for s in (_stack({seed: folds}) for seed, folds in per_seed.items()) if s]}
        if st["pred_adjusted"] is not None:
            adj = bootstrap.subject_bootstrap(st["label"], st["pred_adjusted"], st["subject"], k, **boot)
            row.update(adjusted_balanced_accuracy=adj["balanced_accuracy"], adjusted_ci_low=adj["low"],
                       adjusted_ci_high=adj["high"])
        rows.append(row)
        if method != report.BASELINE and (setting, report.BASELINE) in groups:
            base_paths = _stack(groups[(setting, report.BASELINE)])
            common = set(st["path"].tolist()) & set(base_paths["path"].tolist()) if base_paths else set()
            a, b = _stack(groups[(setting, report.BASELINE)], common), _stack(per_seed, common)
            if a and b:
                differences[(setting, method)] = bootstrap.paired_difference(
                    bootstrap.subject_bootstrap(a["label"], a["pred"], a["subject"], k, **boot),
                    bootstrap.subject_bootstrap(b["label"], b["pred"], b["subject"], k, **boot))
    return rows, differences


def centre_recall(paper, predictions: dict) -> dict:
    """Sclerotic recall per centre, pooled over folds and seeds, where the manifest has a `center` column.

    Returns:
      {(setting, method): {centre: (sclerotic images found, sclerotic images)}}; {} without centres.
    """
    try:
        where = data.path_centers(data.manifest_path(paper.base))
    except InputError:
        return {}
    out = {}
    for (setting, method, _), folds in sorted(predictions.items(), key=lambda kv: str(kv[0])):
        names = defaults.BINARY_CLASSES if setting == "binary" else defaults.FIVE_CLASSES
        sclerotic = [i for i, n in enumerate(names) if n in defaults.SCLEROTIC or n == "global_sclerosis"]
        counts = out.setdefault((setting, method), {})
        for f in folds:
            truth = np.isin(f["label"], sclerotic)
            found = truth & np.isin(f["pred"], sclerotic)
            for path, t, hit in zip(f["path"], truth, found):
                if t:
                    c = where.get(path, "?")
                    n_found, n = counts.get(c, (0, 0))
                    counts[c] = (n_found + int(hit), n + 1)
    return out


def write_results(paper, root: str, wall_s: float | None = None) -> list[str]:
    """Writes results.csv, results.md and the figures; returns the paths written."""
    rows, matrices, predictions = collect(paper, root)
    if not rows:
        raise InputError(f"{root} holds no finished runs to report")
    pooled, differences = pooled_scores(paper, predictions)
    written = [report.write_csv(rows, os.path.join(root, "results.csv"), pooled)]
    figures = []
    five = [s for s in ("C5", "C5+NC2") if any(k[0] == s for k in matrices)]
    if five:
        figures.append(report.confusion_grid(matrices, five, list(paper.methods),
                                             os.path.join(root, "confusion_c5.png")))
    if any(k[0] == "binary" for k in matrices):
        figures.append(report.confusion_grid(matrices, ["binary"], list(paper.methods),
                                             os.path.join(root, "confusion_binary.png")))
    md = report.markdown(rows, list(paper.methods), describe(paper, wall_s), [os.path.basename(f) for f in figures],
                         pooled=pooled, differences=differences, centres=centre_recall(paper, predictions))
    path = os.path.join(root, "results.md")
    with open(path, "w") as f:
        f.write(md)
    return written + [path] + figures


def training_summary(b) -> str:
    """The training recipe of config `b` in words: the schedule it ran, and each recipe option that is on."""
    o = b.optim
    if o.schedule == "cosine":
        schedule = "cosine decay to 0"
    else:
        schedule = f"lr x{o.decay_factor} at {o.decay_at:.0%} of the steps"
    parts = [f"{b.num_epochs} epochs", f"{b.data.image_size} px", f"batch {b.batch_size}",
             f"SGD lr {o.lr} momentum {o.momentum}{' (Nesterov)' if o.nesterov else ''}", schedule]
    if o.warmup_epochs:
        parts.append(f"{o.warmup_epochs:g} warm-up epochs")
    if o.weight_decay:
        parts.append(f"weight decay {o.weight_decay:g}")
    if o.ema_decay:
        parts.append(f"weight EMA {o.ema_decay:g}")
    if o.logit_adjust:
        parts.append(f"logit-adjusted loss (tau {o.logit_adjust:g})")
    if b.mix.label_smoothing:
        parts.append(f"label smoothing {b.mix.label_smoothing:g}")
    a = b.augment
    jitter = a.colour.to_dict()
    blur, noise = jitter.pop("blur", 0.0), jitter.pop("noise", 0.0)
    extra = [w for w, on in (("8 dihedral symmetries", a.transpose),
                             (f"rotation ±{a.rotate_degrees:g}°", a.rotate_degrees),
                             (f"zoom {a.scale[0]:g}-{a.scale[1]:g}", tuple(a.scale) != (1.0, 1.0)),
                             ("colour and stain jitter", any(jitter.values())),
                             (f"blur up to {blur:g} of the side", blur),
                             (f"noise up to {noise:g}", noise)) if on]
    if extra:
        parts.append("augmentation: " + ", ".join(extra))
    parts.append(f"input normalisation '{b.data.input_norm}'")
    if b.data.get("balance_centers", False):
        parts.append("batches balanced over centre and class")
    parts.append(f"CircleMix sampler '{b.mix.sampler}', mixing granularity '{b.mix.granularity}', "
                 f"lambda from '{b.mix.lam_mode}'")
    return ", ".join(parts)


def describe(paper, wall_s: float | None) -> list[str]:
    """The settings that produced the tables, for the report's header."""
    b = paper.base
    source = (f"manifest {b.data.manifest}" if b.data.manifest
              else f"built-in SYNTHETIC set ({b.data.synthetic_count} images)")
    split = (f"{b.num_folds} subject-level folds" if b.split == "subject_kfold"
             else "leave one centre out (fold k = the k-th centre)")
    seeds = f"initialisation seeds {list(paper.seeds)}" if paper.seeds else f"initialisation seed {b.seed}"
    lines = [f"Data: {source}; {split}, test folds {folds_of(paper)}, split seed {b.split_seed}, {seeds}.",
             f"Methods: {', '.join(paper.methods)}; stages: {', '.join(s for s in STAGE_ORDER if s in paper.stages)}.",
             f"Training: {training_summary(b)}.",
             f"Evaluation: test-time augmentation {'on (8 dihedral views)' if b.eval.tta else 'off'}, decision rule "
             f"'{b.eval.decision}'; intervals from {paper.bootstrap_resamples} subject-bootstrap resamples "
             f"(seed {paper.bootstrap_seed})."]
    if wall_s is not None:
        lines.append(f"Wall time of this invocation: {wall_s / 60:.1f} min.")
    return lines


def run() -> None:
    """CLI entry: flags are defined here, not at import, so tests can import this module."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Protocol config, e.g. configs/paper.py or configs/paper.py:smoke.", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, "Root folder of all runs and of the results.")
    report_only = flags.DEFINE_bool("report_only", False, "Only rewrite the tables and figures from finished runs.")
    flags.mark_flags_as_required(["config", "workdir"])

    stop = cli.install_stop_handlers()

    @cli.command
    def main() -> None:
        from circlemix_jax import train  # after flag parsing, which must stay fast

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
