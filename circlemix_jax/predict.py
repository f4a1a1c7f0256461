"""Predict new glomerulus patches and report the share of globally sclerotic glomeruli per subject.

    python -m circlemix_jax.predict --workdir runs/c5/circlemix/fold0 \\
        [--child runs/nc2/circlemix/fold0 ...] (--manifest M.csv | --images DIR) --out preds.csv

Writes `preds.csv` (one row per image: class probabilities, the predicted class
id and name, merged through the children when given) and `preds_subjects.csv`
next to it (one row per subject: number of glomeruli, % globally sclerotic,
count per class, and the model's provenance in `model_*` columns). Before the
percentages it prints where each model came from (stage, method, data, image
size, epochs, test balanced accuracy) and a WARNING line for a model trained on
the synthetic set, a smoke-test model or an unfinished run. Globally sclerotic means obsolescent + solidified +
disappearing for a five-class model, global_sclerosis for a binary one.

Each model predicts under the decision rule stored with its run (`decision.json`,
see `decision`: e.g. a class-prior or validation-fitted logit bias for balanced
accuracy); `--argmax` ignores the rules and predicts the plain argmax. The
probability columns are the network's softmax either way.

A manifest needs a `path` column (relative paths: see `manifest.resolve_path`);
`subject` and `label` are optional (a label
is copied to the output for checking). Without a manifest every image under
DIR is read and its subject is the name of its folder.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from circlemix_jax import bootstrap, cli, decision, defaults, hierarchy, metrics, provenance
from circlemix_jax.data.manifest import read_csv, resolve_path
from circlemix_jax.errors import InputError, first_few

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# An image is taken for a mask when it has no colour (channels within MASK_MARGIN of each other)
# and at least MASK_SHARE of its pixels lie within MASK_MARGIN of black or white.
MASK_MARGIN = 24
MASK_SHARE = 0.8  # the public set's masks: at least 0.89 even at 32 px; its tissue in grey: at most 0.6


def read_inputs(manifest: str | None, images: str | None) -> tuple[list[str], list[str], list[str] | None]:
    """(absolute paths, subjects, labels or None) from a manifest or a folder.

    Raises:
      InputError: neither or both given, a missing file or column, or no images.
    """
    if bool(manifest) == bool(images):
        raise InputError("give exactly one of --manifest or --images")
    if images:
        if not os.path.isdir(images):
            raise InputError(f"--images folder not found: {images}")
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(images) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not paths:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {images}")
        paths = [os.path.abspath(p) for p in paths]
        return paths, [os.path.basename(os.path.dirname(p)) for p in paths], None
    header, rows = read_csv(manifest)
    if "path" not in header:
        raise InputError(f"{manifest}: missing column 'path'; the header is {header}")
    rows = [r for r in rows if (r.get("path") or "").strip()]
    if not rows:
        raise InputError(f"{manifest}: the manifest has no rows")
    paths = [resolve_path(manifest, r["path"]) for r in rows]
    subjects = [(r.get("subject") or "").strip() or os.path.basename(os.path.dirname(p)) for r, p in zip(rows, paths)]
    labels = [(r.get("label") or "").strip() for r in rows] if "label" in rows[0] else None
    return paths, subjects, labels


def summary_path(out_path: str) -> str:
    """Where the per-subject summary of `--out` goes: `<out>_subjects.csv`."""
    return os.path.splitext(out_path)[0] + "_subjects.csv"


def check_outputs(outputs, manifest: str | None, paths, run_dirs) -> None:
    """Refuses, before anything is written, an output that would overwrite what the command reads.

    Args:
      outputs: the files the command will write.
      manifest: the manifest read, or None.
      paths: the images read.
      run_dirs: the runs whose models are used; their existing files are theirs.

    Raises:
      InputError: an output is the manifest, one of the images, or an existing file of a run.
    """
    images = {os.path.realpath(p) for p in paths}
    runs = [os.path.realpath(d) for d in run_dirs]
    for out in outputs:
        real = os.path.realpath(out)
        if manifest and real == os.path.realpath(manifest):
            raise InputError(f"--out {out}: writing there would overwrite the manifest {manifest}; choose another path")
        if real in images:
            raise InputError(f"--out {out}: writing there would overwrite an input image; choose another path")
        owner = next((r for r in runs if os.path.commonpath([real, r]) == r), None)
        if owner and os.path.exists(real):
            raise InputError(f"--out {out}: writing there would overwrite {real}, a file of the run {owner}; "
                             "choose another path")


def predict_probs(workdir: str, paths: list[str], decoded: dict, workers: int = 4) -> tuple[object, np.ndarray]:
    """(the run's config, softmax probabilities (N, K) over its classes) from its best checkpoint."""
    config, logits = predict_logits(workdir, paths, decoded, workers)
    return config, _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def predict_logits(workdir: str, paths: list[str], decoded: dict, workers: int = 4) -> tuple[object, np.ndarray]:
    """(the run's config, logits (N, K) over its classes) from its best checkpoint.

    `decoded` caches the decoded images by size, so models sharing a size decode once.
    """
    import jax

    from circlemix_jax import step as steplib
    from circlemix_jax.data import pipeline

    config = hierarchy.load_run_config(workdir)
    state = hierarchy.restore_best(os.path.abspath(workdir), config)
    mesh = steplib.make_mesh()
    state = steplib.replicate(state, mesh)
    eval_fn = steplib.parallel_eval_step(config, steplib.make_model(config), mesh)
    size = config.data.image_size
    if size not in decoded:
        decoded[size] = pipeline.decode_all(paths, size, workers, f"decoding at {size}px")
        for warning in (mask_warning(paths, decoded[size]), greyscale_warning(paths, decoded[size], config)):
            if warning:
                print(warning, flush=True)
    images = decoded[size]
    batch = config.eval_batch_size - config.eval_batch_size % jax.device_count() or jax.device_count()
    logits = steplib.evaluate(eval_fn, state, images, np.zeros(len(paths), np.int32), batch, mesh)
    return config, np.asarray(logits, np.float64)


def greyscale_warning(paths, images: np.ndarray, config) -> str | None:
    """A WARNING line naming the images without colour, or None when every image has some.

    A model reads the stain from the colour channels, so a greyscale scan is one
    it saw rarely (the recipe turns some training images grey) or never. Such
    images are still predicted, not refused. A model trained on grey input
    (`data.input_norm='gray_per_image'`) gets no warning.
    """
    if config.data.input_norm == "gray_per_image":
        return None
    images = np.asarray(images)
    grey = [p for p, im in zip(paths, images) if (im[..., 0] == im[..., 1]).all() and (im[..., 1] == im[..., 2]).all()]
    if not grey:
        return None
    seen = config.augment.colour.get("grayscale", 0.0) if "colour" in config.augment else 0.0
    why = (f"the model saw grey images only as a training augmentation ({seen:.0%} of them), so expect it to do "
           "worse on these than on colour scans" if seen else
           "the model never saw a grey image in training, so its predictions for them are unreliable")
    return f"WARNING: {len(grey)} of {len(paths)} images are greyscale ({first_few(grey, 3)}): {why}"


def mask_warning(paths, images: np.ndarray) -> str | None:
    """A WARNING line naming the images that look like masks (black and white), or None.

    Data sets often keep each glomerulus's mask beside its image (the public set
    does), and `--images DIR` reads every image under DIR; a mask would be
    predicted as a glomerulus and counted in its folder's percentages.
    """
    images = np.asarray(images)
    # Mask pixels sit at the two extremes (a little off them after JPEG or resizing); stained tissue does not.
    extreme = ((images <= MASK_MARGIN) | (images >= 255 - MASK_MARGIN)).all(-1).mean((1, 2))
    grey = (images.max(-1).astype(np.int16) - images.min(-1)).max((1, 2)) <= MASK_MARGIN
    masks = [p for p, e, g in zip(paths, extreme, grey) if g and e >= MASK_SHARE]
    if not masks:
        return None
    return (f"WARNING: {len(masks)} of {len(paths)} images look like masks, not stained tissue (only black and "
            f"white: {first_few(masks, 3)}); leave them out of the manifest, or point --images at the images' "
            "own folder")


def sclerotic_ids(class_names) -> list[int]:
    """Global ids that count as global sclerosis."""
    return [i for i, n in enumerate(class_names) if n in defaults.SCLEROTIC or n == "global_sclerosis"]


def decide(workdir: str, logits: np.ndarray, use_rule: bool = True) -> tuple[np.ndarray, str]:
    """(local class ids, a description of the decision) under the run's stored rule, or the argmax."""
    rule = decision.load(os.path.join(workdir, decision.FILENAME)) if use_rule else None
    if rule is None:
        why = "--argmax" if not use_rule else f"no {decision.FILENAME}"
        return logits.argmax(-1), f"plain argmax ({why})"
    return decision.apply(rule, logits), f"decision rule '{rule.mode}' from {decision.FILENAME}"


def predict(workdir: str, children: list[str], paths: list[str], workers: int = 4, use_rules: bool = True) -> dict:
    """Per-image predictions of a model, merged through its children in the given order.

    Args:
      use_rules: decide with each run's stored decision rule (False: the plain argmax).

    Returns:
      {class_names, classes (the parent's global ids), pred (global ids),
      probs (N, K parent), children: [(stage, child classes, probs)],
      decisions: {workdir: how its predictions were decided},
      label_map: the model's {manifest label: class name}}.

    Raises:
      InputError: a child with another label space, or classes the parent lacks.
    """
    decoded = {}
    config, logits = predict_logits(workdir, paths, decoded, workers)
    classes = np.asarray(config.classes)
    local, how = decide(workdir, logits, use_rules)
    pred = classes[local]
    out = {"class_names": list(config.class_names), "classes": classes, "probs": _softmax(logits), "children": [],
           "decisions": {workdir: how}, "label_map": dict(config.data.label_map)}
    for child in children:
        child_config = hierarchy.load_run_config(child)
        if list(child_config.class_names) != list(config.class_names):
            raise InputError(f"--child {child} classifies {list(child_config.class_names)}, "
                             f"the model in --workdir {list(config.class_names)}")
        if not set(child_config.classes) <= set(config.classes):
            raise InputError(f"--child {child} has classes {list(child_config.classes)} that --workdir lacks")
        _, child_logits = predict_logits(child, paths, decoded, workers)
        child_classes = np.asarray(child_config.classes)
        child_local, out["decisions"][child] = decide(child, child_logits, use_rules)
        pred = hierarchy.merge_predictions(pred, child_classes[child_local], child_classes)
        out["children"].append((child_config.stage, child_classes, _softmax(child_logits)))
    out["pred"] = pred
    return out


def write_outputs(out_path: str, paths, subjects, labels, result: dict,
                  model_columns: dict | None = None) -> tuple[str, str]:
    """Writes the per-image CSV and the per-subject summary next to it; returns both paths.

    `model_columns` (`provenance_columns`) are appended to every per-subject row.
    """
    names = result["class_names"]
    header = ["path", "subject"] + (["label"] if labels is not None else []) + ["pred", "pred_name"]
    header += [f"p_{names[c]}" for c in result["classes"]]
    for stage, child_classes, _ in result["children"]:
        header += [f"{stage}_p_{names[c]}" for c in child_classes]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (p, s) in enumerate(zip(paths, subjects)):
                row = [p, s] + ([labels[i]] if labels is not None else []) + [int(result["pred"][i]),
                                                                              names[result["pred"][i]]]
                row += [f"{v:.6f}" for v in result["probs"][i]]
                for _, _, child_probs in result["children"]:
                    row += [f"{v:.6f}" for v in child_probs[i]]
                w.writerow(row)
        subjects_path = summary_path(out_path)
        summary = [{**row, **(model_columns or {})} for row in subject_summary(subjects, result["pred"], names)]
        with open(subjects_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary)
    except OSError as e:
        raise InputError(f"cannot write --out {out_path}: {e.strerror or e}") from None
    return out_path, subjects_path


def score_labels(labels, subjects, pred: np.ndarray, class_names, label_map=None) -> str | None:
    """One line scoring the predictions against a manifest's labels, or saying why they were not scored.

    A labelled set from a new centre is how a user learns whether to trust the
    model there, so the score comes with its 95% interval from a bootstrap over
    subjects (a slide's glomeruli share its stain, so images are not independent).
    Labels are read as the model's class names (or their integer ids), through
    its `data.label_map` (five-class names onto a binary model); blank labels
    are left out.

    Returns:
      the line, or None when no row has a label (or `labels` is None).
    """
    label_map = dict(label_map or {})
    names = list(class_names)
    rows = [i for i, y in enumerate(labels or []) if y]
    if not rows:
        return None
    mapped = [label_map.get(labels[i], labels[i]) for i in rows]
    # An integer id names a class, as in training manifests.
    mapped = [names[int(y)] if y.isdigit() and int(y) < len(names) else y for y in mapped]
    unknown = sorted({y for y in mapped if y not in names})
    if unknown:
        verb = "is" if len(unknown) == 1 else "are"
        return f"labels not scored: {first_few(map(repr, unknown))} {verb} not among the model's classes {names}"
    truth = np.array([names.index(y) for y in mapped])
    guess = np.asarray(pred)[rows]
    scores = metrics.classification_metrics(truth, guess, names)
    interval = bootstrap.subject_bootstrap(truth, guess, np.asarray(subjects)[rows], len(names))
    cm = scores["confusion_matrix"]
    recalls = ", ".join(f"{n} {cm[k][k]}/{sum(cm[k])}" for k, n in enumerate(names) if sum(cm[k]))
    if interval["subjects"] > 1:
        spread = (f"[95% CI {interval['low']:.4f}, {interval['high']:.4f}; "
                  f"bootstrap over {interval['subjects']} subjects]")
    else:  # resampling one subject only redraws it: no interval, and say how to get one
        spread = "[no interval: every image is of one subject; give the manifest a 'subject' column]"
    return (f"LABELS: balanced accuracy {scores['balanced_accuracy']:.4f} {spread} on {len(rows)} labelled "
            f"images; found per class: {recalls}")


def subject_summary(subjects, pred: np.ndarray, class_names) -> list[dict]:
    """Per subject: glomeruli, globally sclerotic count and %, and a count per class."""
    subjects, pred = np.asarray(subjects), np.asarray(pred)
    sclerotic = sclerotic_ids(class_names)
    rows = []
    for s in sorted(set(subjects.tolist())):
        p = pred[subjects == s]
        n_scl = int(np.isin(p, sclerotic).sum())
        row = {"subject": s, "glomeruli": len(p), "globally_sclerotic": n_scl,
               "pct_globally_sclerotic": f"{100 * n_scl / len(p):.1f}"}
        row.update({f"n_{name}": int((p == i).sum()) for i, name in enumerate(class_names)})
        rows.append(row)
    return rows


def provenance_columns(workdir: str, children) -> dict:
    """The per-subject CSV's `model_*` columns: the --workdir model's provenance and its children's folders."""
    return {**provenance.columns(provenance.describe(workdir)),
            "model_children": ";".join(os.path.abspath(c) for c in children)}


def print_provenance(workdirs) -> None:
    """One MODEL line per model, then every WARNING, so a smoke or synthetic model cannot go unnoticed."""
    described = [provenance.describe(d) for d in workdirs]
    for prov in described:
        print(provenance.line(prov), flush=True)
    for prov in described:
        for warning in provenance.warnings(prov):
            print(warning, flush=True)


def run() -> None:
    """CLI entry; flags are defined here so importing this module defines none."""
    from absl import app, flags

    workdir = flags.DEFINE_string("workdir", None, "Finished run whose best checkpoint predicts (e.g. a C5 run).")
    children = flags.DEFINE_multi_string("child", [], "Finished child run(s) that re-decide their classes, in order.")
    manifest = flags.DEFINE_string("manifest", None, "CSV with a path column (subject, label optional).")
    images = flags.DEFINE_string("images", None, "Folder of images; the subject is each image's folder name.")
    out = flags.DEFINE_string("out", None, "Per-image CSV; the per-subject summary goes to <out>_subjects.csv.")
    workers = flags.DEFINE_integer("workers", 4, "Decoding threads.")
    argmax = flags.DEFINE_bool("argmax", False, "Ignore the runs' stored decision rules (decision.json) and "
                               "predict the plain argmax.")
    flags.mark_flags_as_required(["workdir", "out"])

    @cli.command
    def main() -> None:
        paths, subjects, labels = read_inputs(manifest.value, images.value)
        check_outputs([out.value, summary_path(out.value)], manifest.value, paths, [workdir.value, *children.value])
        cli.configure_compilation_cache()
        for d in [workdir.value, *children.value]:
            hierarchy.require_best_checkpoint(os.path.abspath(d), finished=False)
        result = predict(workdir.value, children.value, paths, workers.value, use_rules=not argmax.value)
        print_provenance([workdir.value, *children.value])  # right above the percentages it qualifies
        for run_dir, how in result["decisions"].items():
            print(f"{run_dir}: {how}", flush=True)
        per_image, per_subject = write_outputs(out.value, paths, subjects, labels, result,
                                               provenance_columns(workdir.value, children.value))
        for row in subject_summary(subjects, result["pred"], result["class_names"]):
            print(f"{row['subject']}: {row['glomeruli']} glomeruli, {row['pct_globally_sclerotic']}% globally "
                  "sclerotic", flush=True)
        scored = score_labels(labels, subjects, result["pred"], result["class_names"], result["label_map"])
        if scored:
            print(scored, flush=True)
        print(f"wrote {per_image} and {per_subject}", flush=True)

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
