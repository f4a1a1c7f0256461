"""The training loop: data, folds, epochs, checkpoints, TensorBoard, test metrics.

`train_and_evaluate(config, workdir)` is the whole run. It resumes from the
workdir's latest checkpoint, keeps the best epoch by validation balanced
accuracy, and evaluates that best checkpoint once on the test fold.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from circlemix_jax import augment, checkpoint, data, defaults, masks, pipeline, step as steplib
from circlemix_jax.defaults import method_name
from circlemix_jax.errors import InputError
from circlemix_jax.metrics import classification_metrics
from circlemix_jax.summary import SummaryWriter

# Fields that change how a run is executed, not what it computes: a rerun may differ in these.
RESUMABLE_FIELDS = ("data.workers", "log_every_steps", "checkpoint_every_steps", "eval_batch_size")


class Preempted(Exception):
    """Raised internally after SIGTERM once the checkpoint is saved."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def _validate(config) -> None:
    n = jax.device_count()
    if config.batch_size % n:
        raise InputError(f"config field batch_size={config.batch_size} is not divisible by the {n} devices")
    if not 0 <= config.fold < config.num_folds:
        raise InputError(f"config field fold={config.fold} is out of range 0..{config.num_folds - 1}")
    bad = [c for c in config.classes if not 0 <= c < len(config.class_names)]
    if bad or len(set(config.classes)) != len(config.classes):
        raise InputError(f"config field classes={tuple(config.classes)} must be distinct ids into class_names")


def load_fold(config):
    """Reads the manifest, makes the fold split and restricts it to the stage's classes.

    Returns:
      (all records, fold split, {'train','val','test'} records of the stage).
    """
    records = data.read_manifest(data.manifest_path(config), config.class_names, config.data.label_map.to_dict())
    if not config.data.manifest:
        log("DATA: the built-in SYNTHETIC glomerulus set (set --config.data.manifest=PATH for real data)")
    split = data.make_split(records, config.fold, config.num_folds, config.val_fraction,
                             config.split_seed)
    _, parts = data.restrict(records, split, config.classes)
    return records, split, parts


def initial_variables(config, model, image_size: int) -> dict:
    """Random init, then the converted ImageNet backbone or the parent stage, if configured."""
    dummy = np.zeros((1, image_size, image_size, 3), np.float32)
    variables = jax.jit(lambda k: model.init(k, dummy, train=False))(jax.random.key(config.seed))
    if config.model.init_from:
        from circlemix_jax import convert  # noqa: PLC0415 - optional torch/h5 readers

        variables = convert.init_backbone(config.model.init_from, variables, log=log)
    if config.parent_workdir or config.stage in ("nc2", "c3", "c2"):
        from circlemix_jax import hierarchy  # noqa: PLC0415 - children only

        variables = hierarchy.init_from_parent(config, variables, log=log)
    return variables


def evaluate(eval_fn, state, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Logits for every example exactly once (padding masked out), gathered on the host."""
    outs = []
    for batch in pipeline.eval_batches(images, labels, batch_size):
        mask = batch.pop("mask")
        logits = eval_fn(state, steplib.shard_batch({"image": batch["image"]}, mesh)["image"])
        logits, mask = multihost_utils.process_allgather((logits, steplib.shard_batch({"m": mask}, mesh)["m"]),
                                                         tiled=True)
        outs.append(np.asarray(logits)[np.asarray(mask)])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _progress(epoch: int, num_epochs: int, i: int, total: int, img_s: float) -> None:
    if jax.process_index() == 0 and sys.stdout.isatty():
        done = int(30 * i / max(total, 1))
        print(f"\repoch {epoch + 1}/{num_epochs} [{'#' * done}{'.' * (30 - done)}] "
              f"{i}/{total} {img_s:.1f} img/s", end="", flush=True)


def _write_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        tmp = epath.Path(path + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(path)  # atomic on a local disk: a kill never leaves half a file (a GCS object appears whole)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains one stage on one fold, or resumes it; returns the test metrics.

    Raises:
      InputError: bad data or config (the CLI turns it into one line and exit 2).
    """
    if config.model.init_from:
        from circlemix_jax import convert  # noqa: PLC0415 - optional weight readers

        convert.override_config(config, log=log)  # padding, eps and mean/std must match the weights
    _validate(config)
    defaults.check(config)  # the recipe's fields (optimiser, geometry, colour)
    workdir = checkpoint.absolute(workdir)
    config_json = config.to_json_best_effort(indent=1, sort_keys=True)
    checkpoint.check_config(workdir, config_json, RESUMABLE_FIELDS)
    metrics_path = os.path.join(workdir, "metrics.json")
    if epath.Path(metrics_path).exists():
        metrics = json.loads(epath.Path(metrics_path).read_text())
        log(f"{workdir} is already finished; test balanced_accuracy={metrics['balanced_accuracy']:.4f} "
            f"balanced_f1={metrics['balanced_f1']:.4f} (delete metrics.json to re-evaluate)")
        return metrics

    records, split, parts = load_fold(config)  # bad input fails before the workdir is touched
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            data.write_split(os.path.join(workdir, "split.json"), records, split)
            _write_json(os.path.join(workdir, "config.json"), json.loads(config_json))
    except OSError as e:
        raise InputError(f"cannot write to workdir {workdir}: {e.strerror or e}") from None
    size, workers = config.data.image_size, config.data.workers
    log(f"stage {config.stage} ({', '.join(parts['train'].class_names)}), method {method_name(config)}, "
        f"fold {config.fold}: train {len(parts['train'])}, val {len(parts['val'])}, test {len(parts['test'])} images; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
    train_x = pipeline.decode_all(parts["train"].paths, size, workers, "decoding train")
    val_x = pipeline.decode_all(parts["val"].paths, size, workers, "decoding val")
    train_y, val_y = parts["train"].labels, parts["val"].labels
    if config.mix.lam_mode == "mask":  # glomerulus masks ride along as a 4th channel (see masks.py)
        train_x = masks.with_mask_channel(train_x, masks.mask_paths(data.manifest_path(config), parts["train"].paths),
                                          workers)

    spe = pipeline.steps_per_epoch(len(train_y), config.batch_size)
    if spe == 0:
        raise InputError(f"config field batch_size={config.batch_size} exceeds the {len(train_y)} training images")
    total_steps = spe * config.num_epochs
    per_device = config.batch_size // jax.device_count()
    if config.mix.method != "none" and augment.mixing_is_noop(per_device):
        log(f"WARNING: {per_device} example per device: {config.mix.method} pairs within a device, so nothing is mixed")

    mesh = steplib.make_mesh()
    model = steplib.make_model(config)
    tx = steplib.make_optimizer(config)
    state = steplib.replicate(steplib.init_state(initial_variables(config, model, size), tx,
                                                 ema=steplib.ema_enabled(config),
                                                 log_prior=steplib.log_prior(config, train_y)), mesh)
    ckpts = checkpoint.RunCheckpoints(workdir)
    progress = {"epochs_done": 0, "best_val_balanced_accuracy": -1.0, "best_epoch": -1, "history": []}
    if ckpts.latest_step() is not None:
        state, progress = ckpts.restore(checkpoint.LATEST, checkpoint.abstract_like(state))
        log(f"resuming from step {int(state.step)} ({progress['epochs_done']}/{config.num_epochs} epochs done)")

    train_fn = steplib.parallel_train_step(config, model, tx, mesh)
    eval_fn = steplib.parallel_eval_step(config, model, mesh)
    writer = SummaryWriter(workdir, enabled=jax.process_index() == 0)
    root_rng = jax.random.key(config.seed)
    stop = {"sigterm": False}
    # With several processes all must stop at one step: the preemption service that
    # jax.distributed.initialize starts catches SIGTERM and agrees on it (see _run_epochs);
    # a Python handler would replace its handler.
    single = jax.process_count() == 1
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(sigterm=True)) if single else None
    try:
        if int(state.step) == 0:
            _log_mixed_batch(config, mesh, train_x, train_y, root_rng, writer)
        state, progress = _run_epochs(config, state, progress, train_fn, eval_fn, mesh, ckpts, writer, root_rng,
                                      (train_x, train_y, val_x, val_y), spe, total_steps, stop)
    except Preempted as e:
        ckpts.wait()  # `state` was donated to the step: the saved step travels in the exception
        log(f"SIGTERM: saved a checkpoint at step {e.args[0]} in {workdir}; rerun the same command to resume")
        raise SystemExit(0) from None
    except FloatingPointError:
        ckpts.wait()  # the last good checkpoint may still be writing in the background
        raise
    finally:
        if single:
            signal.signal(signal.SIGTERM, previous_handler)
        writer.close()

    # Test the best epoch once, on every image of the test fold (children need them all to merge).
    ckpts.wait()
    if ckpts.latest_step(checkpoint.BEST) is None:
        raise InputError(f"{workdir} has no best checkpoint although training finished (was checkpoints/best "
                         "deleted?); delete the workdir to train again")
    best, _ = ckpts.restore(checkpoint.BEST, checkpoint.abstract_like(state))
    ckpts.close()
    test_records = records.take(split.test)
    test_x = pipeline.decode_all(test_records.paths, size, workers, "decoding test")
    logits = evaluate(eval_fn, best, test_x, test_records.labels, config.eval_batch_size, mesh)
    _write_predictions(os.path.join(workdir, "test_predictions.csv"), config, test_records, logits)
    to_local = np.full(len(config.class_names), -1)
    to_local[list(config.classes)] = np.arange(len(config.classes))
    local = to_local[test_records.labels]
    in_stage = local >= 0
    metrics = classification_metrics(local[in_stage], logits[in_stage].argmax(-1), parts["test"].class_names)
    metrics.update(best_epoch=progress["best_epoch"], best_val_balanced_accuracy=progress["best_val_balanced_accuracy"],
                   stage=config.stage, method=method_name(config), fold=config.fold)
    _write_json(metrics_path, metrics)
    log(f"TEST fold {config.fold} (best epoch {progress['best_epoch'] + 1}): balanced_accuracy="
        f"{metrics['balanced_accuracy']:.4f} balanced_f1={metrics['balanced_f1']:.4f}\n"
        f"confusion matrix (rows = truth: {', '.join(metrics['class_names'])}):\n{np.array(metrics['confusion_matrix'])}")
    return metrics


def _run_epochs(config, state, progress, train_fn, eval_fn, mesh, ckpts, writer, root_rng, arrays, spe,
                total_steps, stop):
    train_x, train_y, val_x, val_y = arrays
    start_time, start_step = time.time(), int(state.step)
    for epoch in range(progress["epochs_done"], config.num_epochs):
        first = int(state.step) - epoch * spe
        t0, seen, pending = time.time(), 0, []
        for i, batch in enumerate(pipeline.train_batches(train_x, train_y, config.batch_size, config.seed, epoch,
                                                         start=first, workers=config.data.workers), start=first + 1):
            lr = np.float32(steplib.learning_rate(config, spe, epoch * spe + i - 1))  # no sync with the device
            state, m = train_fn(state, steplib.shard_batch(batch, mesh), root_rng, lr)
            pending.append(m)
            seen += config.batch_size
            step_now = epoch * spe + i
            if i % config.log_every_steps == 0 or i == spe:
                _flush_metrics(config, pending, step_now, spe, writer, seen / (time.time() - t0))
                pending = []
                _progress(epoch, config.num_epochs, i, spe, seen / (time.time() - t0))
            if jax.process_count() > 1:
                stop["sigterm"] = multihost_utils.reached_preemption_sync_point(step_now)
            if stop["sigterm"] or (config.checkpoint_every_steps and step_now % config.checkpoint_every_steps == 0
                                   and i < spe):
                _flush_metrics(config, pending, step_now, spe, writer, 0.0)
                ckpts.save(checkpoint.LATEST, step_now, state, progress)
                if stop["sigterm"]:
                    raise Preempted(step_now)
        train_img_s = seen / max(time.time() - t0, 1e-9)
        logits = evaluate(eval_fn, state, val_x, val_y, config.eval_batch_size, mesh)
        val = classification_metrics(val_y, logits.argmax(-1), _names(config))
        improved = (val["balanced_accuracy"] > progress["best_val_balanced_accuracy"]
                    and steplib.selectable_epoch(config, epoch))  # recipe: config.select_from
        progress["epochs_done"] = epoch + 1
        progress["history"].append({"epoch": epoch + 1, "val_balanced_accuracy": val["balanced_accuracy"],
                                    "val_balanced_f1": val["balanced_f1"]})
        if improved:
            progress.update(best_val_balanced_accuracy=val["balanced_accuracy"], best_epoch=epoch)
            ckpts.save(checkpoint.BEST, int(state.step), state, progress)
            # `latest` records this best epoch in its progress; a kill between the two commits
            # must not leave a latest that points at a best checkpoint which never reached disk.
            ckpts.wait(checkpoint.BEST)
        ckpts.save(checkpoint.LATEST, int(state.step), state, progress)
        writer.scalars(int(state.step), {"val/balanced_accuracy": val["balanced_accuracy"],
                                         "val/balanced_f1": val["balanced_f1"], "train/img_per_s": train_img_s})
        writer.flush()
        done = int(state.step) - start_step
        eta = (time.time() - start_time) / max(done, 1) * (total_steps - int(state.step))
        if sys.stdout.isatty() and jax.process_index() == 0:
            print("\r", end="")
        log(f"epoch {epoch + 1}/{config.num_epochs}  val balanced_acc {val['balanced_accuracy']:.4f} "
            f"f1 {val['balanced_f1']:.4f}{' *best*' if improved else ''}  {train_img_s:.1f} img/s  "
            f"ETA {eta / 60:.1f} min")
    return state, progress


def _names(config) -> tuple[str, ...]:
    return tuple(config.class_names[c] for c in config.classes)


def _flush_metrics(config, pending: list, step_now: int, spe: int, writer, img_s: float) -> None:
    """Pulls step metrics to the host, stops loudly on NaN/Inf, logs means to TensorBoard."""
    if not pending:
        return
    host = jax.device_get(pending)
    first_bad = next((step_now - len(host) + 1 + k for k, m in enumerate(host) if m["nonfinite"]), None)
    if first_bad is not None:
        raise FloatingPointError(
            f"non-finite loss or gradient at step {first_bad} (loss={host[first_bad - step_now + len(host) - 1]['loss']}); "
            "the update was skipped and the last good checkpoint is kept; lower --config.optim.lr or check the data")
    means = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if k != "nonfinite"}
    means["train/lr"] = steplib.learning_rate(config, spe, step_now)
    if img_s:
        means["train/img_per_s_running"] = img_s
    writer.scalars(step_now, means)


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


def _write_predictions(path: str, config, records, logits: np.ndarray) -> None:
    """Per-image test probabilities over the stage's classes, with global class ids."""
    if jax.process_index() != 0:
        return
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    classes = np.asarray(config.classes)
    names = _names(config)
    f = io.StringIO(newline="")
    w = csv.writer(f)
    w.writerow(["path", "subject", "label", "pred"] + [f"p_{n}" for n in names])
    for p, s, y, pr in zip(records.paths, records.subjects, records.labels, probs):
        w.writerow([p, s, int(y), int(classes[pr.argmax()])] + [f"{v:.6f}" for v in pr])
    epath.Path(path).write_text(f.getvalue())
