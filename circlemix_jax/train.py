"""One run: one stage of the hierarchy on one fold, in five phases.

    check -> prepare -> train -> test -> write

`check` does everything that can fail on the user's input (config values, the
manifest, every image of every split, the workdir's config, data and lock)
before a byte is written, so a bad input leaves the workdir as it was.
`prepare` takes the workdir's lock, builds the model and resumes from the
newest readable checkpoint; `train` runs the epochs, keeping the best epoch by
validation balanced accuracy; `test` evaluates that best checkpoint once on the
test fold; `write` stores the predictions and metrics. Rerunning the same
command resumes the same run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import signal

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from circlemix_jax import (
    augment,
    checkpoint,
    config_check,
    data,
    decision,
    defaults,
    epoch_steps,
    hierarchy,
    masks,
    provenance,
    rundir,
    step as steplib,
    summary,
)
from circlemix_jax.cli import StopRequest, install_stop_handlers
from circlemix_jax.data import image_cache, pipeline
from circlemix_jax.data.manifest import read_csv
from circlemix_jax.defaults import method_name
from circlemix_jax.epoch_steps import Stopped
from circlemix_jax.errors import InputError
from circlemix_jax.metrics import classification_metrics
from circlemix_jax.models import layers
from circlemix_jax.progress import Progress, log
from circlemix_jax.summary import SummaryWriter


@dataclasses.dataclass
class Inputs:
    """What `check` established: the run's config, its data (decoded) and its folder."""

    config: object
    workdir: str
    config_json: str
    records: data.Records  # every image of the manifest
    split: data.Split
    parts: dict  # {'train', 'val', 'test'}: the stage's images, relabelled to local ids
    test_records: data.Records  # every image of the test fold (children need them all to merge)
    images: dict  # {'train', 'val', 'test'}: decoded uint8 (N, S, S, 3), in memory or image_cache.ImageRows
    split_record: dict  # what split.json holds
    train_probs: np.ndarray | None = None  # sampling probabilities of the training images (data.balance_centers)

    @property
    def steps_per_epoch(self) -> int:
        return pipeline.steps_per_epoch(len(self.parts["train"]), self.config.batch_size)


def load_fold(config):
    """Reads the manifest, makes the fold split and restricts it to the stage's classes.

    Returns:
      (all records, fold split, {'train','val','test'} records of the stage).
    """
    records = data.read_manifest(data.manifest_path(config), config.class_names, config.data.label_map.to_dict())
    if not config.data.manifest:
        log("DATA: the built-in SYNTHETIC glomerulus set (set --config.data.manifest=PATH for real data)")
    split = data.make_split(records, config.fold, config.num_folds, config.val_fraction, config.split_seed,
                            config.split)
    _, parts = data.restrict(records, split, config.classes)
    return records, split, parts


def sampling_probs(config, train: data.Records) -> np.ndarray | None:
    """The training batches' sampling probabilities (`data.balance_centers`), or None for a plain shuffle.

    A manifest without a `center` column is taken as one centre, so the batches
    balance the classes only; a line says so.

    Raises:
      InputError: a row without a centre.
    """
    if not config.data.get("balance_centers", False):
        return None
    if data.CENTER_COLUMN in read_csv(train.source)[0]:
        where = data.centers(train, "data.balance_centers=True")
    else:
        log(f"BALANCE: {train.source} has no '{data.CENTER_COLUMN}' column, so the training batches balance "
            "the classes only (add the column to balance centres too)")
        where = np.zeros(len(train), np.int64)
    return pipeline.balanced_probs(train.labels, where)


def check(config, workdir: str) -> Inputs | dict:
    """Every check on the user's input, reading only.

    Returns:
      The run's inputs, or the test metrics of a run that is already finished.

    Raises:
      InputError: the first problem found, naming the field, file or row.
    """
    if config.model.init_from:
        from circlemix_jax import convert  # optional weight readers

        convert.override_config(config, log=log)  # padding, eps and mean/std must match the weights
    config_check.check_run_config(config, jax.device_count())
    workdir = rundir.absolute(workdir)
    config_json = config.to_json_best_effort(indent=1, sort_keys=True)
    rundir.check_config(workdir, config_json, rundir.EXECUTION_FIELDS, defaults.field_defaults(config.stage))
    finished = rundir.read_json(os.path.join(workdir, rundir.METRICS), "the run's test metrics")
    if finished is not None:
        log(f"{workdir} is already finished; test balanced_accuracy={finished.get('balanced_accuracy', 0):.4f} "
            f"balanced_f1={finished.get('balanced_f1', 0):.4f} (delete metrics.json to re-evaluate)")
        return finished
    rundir.check_unlocked(workdir)

    records, split, parts = load_fold(config)
    record = rundir.split_record(records, split)
    rundir.check_data(workdir, record)
    if hierarchy.is_child(config):
        hierarchy.check_parent(config, record)
    if pipeline.steps_per_epoch(len(parts["train"]), config.batch_size) == 0:
        raise InputError(f"config field batch_size={config.batch_size} exceeds the {len(parts['train'])} "
                         "training images")
    train_probs = sampling_probs(config, parts["train"])  # before decoding: a blank centre fails at once
    test_records = records.take(split.test)
    workers = config.data.workers
    named = (("train", parts["train"]), ("val", parts["val"]), ("test", test_records))
    images = decoded_images(config, records, named)
    if config.mix.lam_mode == "mask":  # glomerulus masks ride along as a 4th channel (see masks.py)
        images["train"] = masks.with_mask_channel(
            np.asarray(images["train"]), masks.mask_paths(data.manifest_path(config), parts["train"].paths), workers)
    fingerprints = {name: rundir.pixels_sha256(x) for name, x in images.items()}
    rundir.check_pixels(workdir, fingerprints)
    for name, fp in fingerprints.items():
        record[name]["pixels_sha256"] = fp
    return Inputs(config, workdir, config_json, records, split, parts, test_records, images, record, train_probs)


def decoded_images(config, records: data.Records, named) -> dict:
    """The decoded images of each named split: in memory, or rows of the on-disk cache (`data.cache`).

    Either way one decode covers every split, so one error lists every unreadable image of all of them.

    Args:
      config: the run's config (`data.image_size`, `data.workers`, `data.cache*`).
      records: every image of the manifest; the disk cache holds them all, so folds and stages share it.
      named: ((split name, its records), ...).

    Returns:
      {split name: uint8 (N, S, S, 3) array or image_cache.ImageRows}.
    """
    size, workers = config.data.image_size, config.data.workers
    count = sum(len(recs) for _, recs in named)
    if image_cache.choose(config.data.cache, count, size, config.data.cache_memory_mib) == "disk":
        store, row_of, _ = image_cache.open_or_build(records.paths, size, workers, config.data.cache_dir)
        return {name: image_cache.ImageRows(store, [row_of[str(p)] for p in recs.paths]) for name, recs in named}
    decoded = pipeline.decode_all(np.concatenate([recs.paths for _, recs in named]), size, workers,
                                  "decoding train, val and test")
    ends = np.cumsum([len(recs) for _, recs in named])
    return {name: x for (name, _), x in zip(named, np.split(decoded, ends[:-1]))}


@dataclasses.dataclass
class Machinery:
    """The compiled pieces of a run: mesh, model, optimiser and jitted steps."""

    mesh: object
    model: object
    tx: object
    train_fn: object
    eval_fn: object


def initial_variables(config, model, image_size: int) -> dict:
    """Random init, then the converted ImageNet backbone or the parent stage, if configured."""
    dummy = np.zeros((1, image_size, image_size, 3), np.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.key(config.seed))
    if config.model.init_from:
        from circlemix_jax import convert  # optional torch/h5 readers

        variables = convert.init_backbone(config.model.init_from, variables, log=log)
    if hierarchy.is_child(config):
        variables = hierarchy.init_from_parent(config, variables, log=log)
    return variables


def prepare(inputs: Inputs, ckpts: checkpoint.RunCheckpoints) -> tuple[Machinery, steplib.TrainState, dict]:
    """Builds the model and steps, resumes from the newest readable checkpoint, writes config and split.

    Call with the workdir's lock held.
    """
    config = inputs.config
    mesh = steplib.make_mesh()
    model = steplib.make_model(config)
    tx = steplib.make_optimizer(config)
    variables = initial_variables(config, model, config.data.image_size)
    state = steplib.replicate(steplib.init_state(variables, tx, ema=steplib.ema_enabled(config),
                                                 log_prior=steplib.log_prior(config, inputs.parts["train"].labels,
                                                                              inputs.train_probs)),
                              mesh)
    progress = {"epochs_done": 0, "best_val_balanced_accuracy": -1.0, "best_epoch": -1, "history": []}
    resumed = ckpts.restore_latest_good(checkpoint.abstract_like(state), log)
    if resumed is not None:
        state, progress = resumed
        log(f"resuming from step {int(state.step)} ({progress['epochs_done']}/{config.num_epochs} epochs done)")
    if jax.process_index() == 0:
        try:
            rundir.write_json(os.path.join(inputs.workdir, rundir.SPLIT), inputs.split_record)
            rundir.write_json(os.path.join(inputs.workdir, rundir.CONFIG), json.loads(inputs.config_json))
        except OSError as e:
            raise InputError(f"cannot write to workdir {inputs.workdir}: {e.strerror or e}") from None
    machinery = Machinery(mesh, model, tx, steplib.parallel_train_step(config, model, tx, mesh),
                          steplib.parallel_eval_step(config, model, mesh))
    return machinery, state, progress


def train_and_evaluate(config, workdir: str, stop: StopRequest | None = None) -> dict:
    """Trains one stage on one fold, or resumes it; returns the test metrics.

    Args:
      config: the run's config (`configs/<stage>.py`).
      workdir: the run folder; rerunning with the same one resumes.
      stop: polled between steps; a CLI installs its handlers at start-up. When None,
        SIGTERM and SIGINT are caught for the duration of this call (one process).

    Raises:
      InputError: bad data or config (the CLI turns it into one line and exit 2).
      Stopped: a stop signal arrived; what there was to save is saved.
      FloatingPointError: a NaN or Inf in the loss or gradients.
    """
    own_handlers = stop is None and jax.process_count() == 1
    if stop is None:
        stop = StopRequest()
    if own_handlers:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        install_stop_handlers(stop)
    try:
        return _run(config, workdir, stop)
    finally:
        if own_handlers:
            for s, h in previous.items():
                signal.signal(s, h)


def _run(config, workdir: str, stop: StopRequest) -> dict:
    inputs = check(config, workdir)
    if isinstance(inputs, dict):
        return inputs
    workdir = inputs.workdir
    if epoch_steps.stop_agreed(stop):
        raise Stopped(stop.signum, None, workdir)
    log(f"stage {config.stage} ({', '.join(inputs.parts['train'].class_names)}), method {method_name(config)}, "
        f"fold {config.fold}: train {len(inputs.parts['train'])}, val {len(inputs.parts['val'])}, "
        f"test {len(inputs.test_records)} images; {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{layers.resolve(config.model.layers)} layers (model.layers={config.model.layers})")
    log(f"workdir {workdir}  (watch it: tensorboard --logdir {workdir})")
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None
    with rundir.locked(workdir):
        checkpoint.remove_temporaries(os.path.join(workdir, "checkpoints"))
        ckpts = checkpoint.RunCheckpoints(workdir)
        try:
            machinery, state, progress = prepare(inputs, ckpts)
            state, progress = train(inputs, machinery, state, progress, ckpts, stop)
            ckpts.wait()
            if epoch_steps.stop_agreed(stop):  # every epoch is saved: the rerun goes straight to the test
                raise Stopped(stop.signum, ckpts.latest_step(), workdir)
            if ckpts.latest_step(checkpoint.BEST) is None:
                raise InputError(f"{workdir} has no best checkpoint although training finished (was "
                                 "checkpoints/best deleted?); delete the workdir to train again")
            best, _ = ckpts.restore(checkpoint.BEST, checkpoint.abstract_like(state))
        except checkpoint.DamagedCheckpoint as e:
            raise InputError(f"{e}; delete {workdir}/checkpoints/best and rerun to retrain") from None
        finally:
            ckpts.close()
        logits = test(inputs, machinery, best)
        rule = fit_decision(inputs, machinery, best)
        return write(inputs, progress, logits, rule)


def train(inputs: Inputs, m: Machinery, state, progress: dict, ckpts, stop: StopRequest):
    """Runs the remaining epochs; each ends with a validation pass and the `latest`/`best` checkpoints.

    Returns:
      (final state, progress).
    """
    config = inputs.config
    spe = inputs.steps_per_epoch
    total = spe * config.num_epochs
    train_x, train_y = inputs.images["train"], inputs.parts["train"].labels
    val_x, val_y = inputs.images["val"], inputs.parts["val"].labels
    writer = SummaryWriter(inputs.workdir, enabled=jax.process_index() == 0)
    writer.run_start(config)
    root_rng = jax.random.key(config.seed)
    per_device = config.batch_size // jax.device_count()
    if config.mix.method != "none" and augment.mixing_is_noop(per_device):
        log(f"WARNING: {per_device} example per device: {config.mix.method} pairs within a device, "
            "so nothing is mixed")
    step = int(state.step)
    meter = Progress(total, start_step=step, batch_size=config.batch_size, log_every=config.log_every_steps)
    loop = epoch_steps.Loop(config, m, spe, root_rng, writer, meter, ckpts, stop, inputs.workdir)
    try:
        if step == 0:
            _log_mixed_batch(config, m.mesh, train_x, train_y, root_rng, writer)
        for epoch in range(progress["epochs_done"], config.num_epochs):
            meter.start_epoch(step)
            batches = pipeline.train_batches(train_x, train_y, config.batch_size, config.seed, epoch,
                                             start=step - epoch * spe,
                                             workers=pipeline.loader_threads(config.data.workers),
                                             probs=inputs.train_probs)
            state, step = epoch_steps.run_steps(loop, state, batches, step, epoch, progress)
            meter.train_done(step)
            logits = steplib.evaluate(m.eval_fn, state, val_x, val_y, config.eval_batch_size, m.mesh)
            val = classification_metrics(val_y, logits.argmax(-1), inputs.parts["val"].class_names)
            writer.evaluation(step, "val", val, loss=summary.cross_entropy(logits, val_y))
            improved = (val["balanced_accuracy"] > progress["best_val_balanced_accuracy"]
                        and steplib.selectable_epoch(config, epoch))  # config.select_from
            progress["epochs_done"] = epoch + 1
            progress["history"].append({"epoch": epoch + 1, "val_balanced_accuracy": val["balanced_accuracy"],
                                        "val_balanced_f1": val["balanced_f1"]})
            if improved:
                progress.update(best_val_balanced_accuracy=val["balanced_accuracy"], best_epoch=epoch)
                ckpts.save(checkpoint.BEST, step, state, progress)
                # `latest` records this best epoch in its progress; a kill between the two commits
                # must not leave a latest that points at a best checkpoint which never reached disk.
                ckpts.wait(checkpoint.BEST)
            ckpts.save(checkpoint.LATEST, step, state, progress)
            img_s = meter.end_epoch(epoch, config.num_epochs, step,
                                    f"val balanced_acc {val['balanced_accuracy']:.4f} f1 {val['balanced_f1']:.4f}"
                                    f"{' *best*' if improved else ''}")
            if img_s:
                writer.scalars(step, {"train/img_per_s": img_s})
            writer.flush()
            if epoch_steps.stop_agreed(stop):
                epoch_steps.save_and_stop(ckpts, step, state, progress, stop, inputs.workdir)
    finally:
        writer.close()
    return state, progress


def test(inputs: Inputs, m: Machinery, best) -> np.ndarray:
    """Logits of the best checkpoint on every image of the test fold."""
    return steplib.evaluate(m.eval_fn, best, inputs.images["test"], inputs.test_records.labels,
                            inputs.config.eval_batch_size, m.mesh)


def fit_decision(inputs: Inputs, m: Machinery, best) -> decision.Rule:
    """The run's decision rule (decision.py), from the best checkpoint's validation logits."""
    config = inputs.config
    if config.eval.decision == "argmax":  # nothing to fit: skip the extra validation pass
        return decision.Rule("argmax", (0.0,) * len(config.classes))
    val_y = inputs.parts["val"].labels
    val_logits = steplib.evaluate(m.eval_fn, best, inputs.images["val"], val_y, config.eval_batch_size, m.mesh)
    return decision.fit(config.eval.decision, val_logits, val_y, inputs.parts["train"].labels, len(config.classes),
                        inputs.train_probs)


def write(inputs: Inputs, progress: dict, logits: np.ndarray, rule: decision.Rule) -> dict:
    """Writes decision.json, test_predictions.csv and metrics.json (which marks the run finished).

    Returns:
      The test metrics: the top-level scores are the plain argmax's (the paper's decision);
      `adjusted` holds the same metrics under the stored decision rule, which predict applies.
    """
    config, workdir = inputs.config, inputs.workdir
    adjusted = decision.apply(rule, logits)
    if jax.process_index() == 0:
        decision.save(os.path.join(workdir, decision.FILENAME), rule)
    _write_predictions(os.path.join(workdir, "test_predictions.csv"), config, inputs.test_records, logits, adjusted)
    to_local = np.full(len(config.class_names), -1)
    to_local[list(config.classes)] = np.arange(len(config.classes))
    local = to_local[inputs.test_records.labels]
    in_stage = local >= 0
    names = inputs.parts["test"].class_names
    metrics = classification_metrics(local[in_stage], logits[in_stage].argmax(-1), names)
    metrics["adjusted"] = classification_metrics(local[in_stage], adjusted[in_stage], names)
    metrics["decision"] = dataclasses.asdict(rule)
    metrics.update(best_epoch=progress["best_epoch"], best_val_balanced_accuracy=progress["best_val_balanced_accuracy"],
                   stage=config.stage, method=method_name(config), fold=config.fold)
    if inputs.split.held_out:
        metrics["test_center"] = inputs.split.held_out
    last_step = inputs.steps_per_epoch * config.num_epochs
    with contextlib.closing(SummaryWriter(workdir, enabled=jax.process_index() == 0)) as w:
        w.evaluation(last_step, "test", metrics, loss=summary.cross_entropy(logits[in_stage], local[in_stage]))
        w.run_end(last_step, final={"val/best_balanced_accuracy": progress["best_val_balanced_accuracy"]})
    if jax.process_index() == 0:
        rundir.write_json(os.path.join(workdir, rundir.METRICS), metrics)
    per_class = "; ".join(f"{n}: recall {v['recall']:.3f} precision {v['precision']:.3f} (n={v['support']})"
                          for n, v in metrics["per_class"].items())
    log(f"TEST fold {config.fold} (best epoch {progress['best_epoch'] + 1}): balanced_accuracy="
        f"{metrics['balanced_accuracy']:.4f} balanced_f1={metrics['balanced_f1']:.4f}; under the decision rule "
        f"'{rule.mode}': balanced_accuracy={metrics['adjusted']['balanced_accuracy']:.4f}\n{per_class}\n"
        f"confusion matrix (rows = truth: {', '.join(names)}):\n{np.array(metrics['confusion_matrix'])}")
    log(f"wrote {workdir}/metrics.json, decision.json, test_predictions.csv, split.json, config.json, "
        "checkpoints/, events")
    did_not_learn = provenance.chance_warning(workdir, progress["best_val_balanced_accuracy"], len(config.classes))
    if did_not_learn:
        log(did_not_learn)
    return metrics


def _log_mixed_batch(config, mesh, images, labels, rng, writer) -> None:
    """One augmented and mixed batch as a TensorBoard image, to check the mixing by eye."""
    n = config.batch_size
    per = n // jax.process_count()  # shard_batch takes this process's slice of the global batch
    own = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    prep = steplib.parallel_prepare(config, mesh)
    batch = steplib.shard_batch({"image": images[own], "label": labels[own].astype(np.int32)}, mesh)
    x, _, _ = prep(batch["image"], batch["label"], rng)
    x = np.asarray(multihost_utils.process_allgather(x, tiled=True))
    writer.image(0, "train/mixed_batch", (np.concatenate(list(x[: min(8, n)]), axis=1) * 255).astype(np.uint8))


def _write_predictions(path: str, config, records, logits: np.ndarray, adjusted: np.ndarray) -> None:
    """Per-image test probabilities over the stage's classes, with global class ids.

    `pred` is the argmax, `pred_adjusted` the prediction under the run's decision rule
    (`adjusted`: local ids).
    """
    if jax.process_index() != 0:
        return
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    classes = np.asarray(config.classes)
    names = tuple(config.class_names[c] for c in config.classes)
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["path", "subject", "label", "pred", "pred_adjusted"] + [f"p_{n}" for n in names])
    for p, s, y, pr, a in zip(records.paths, records.subjects, records.labels, probs, adjusted):
        w.writerow([p, s, int(y), int(classes[pr.argmax()]), int(classes[a])] + [f"{v:.6f}" for v in pr])
    epath.Path(path).write_text(f.getvalue())
