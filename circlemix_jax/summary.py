"""TensorBoard event files without TensorFlow.

`flax.metrics.tensorboard` and clu import TensorFlow; the `tensorboard` package's
own `EventFileWriter` and protos write the same files with no TF installed.
Besides scalars and images a run writes:

- hparams (the HParams plugin's protos): the experiment's columns and this
  run's values at the start, its status at the end, so the HParams tab lists
  runs side by side with their final metrics (`HPARAM_FIELDS`, `HPARAM_METRICS`);
- the resolved config as text (the text plugin), so a curve can be traced to
  the exact settings;
- per evaluation: balanced accuracy and F1, per-class recall and precision,
  the loss, and the confusion matrix as an image (`report.confusion_figure`).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.hparams import api_pb2, metadata as hp_metadata, plugin_data_pb2, summary_v2 as hp
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

# (HParams column, dotted config field). Fields a config lacks are left out, so
# configs from before and after a new option both work.
HPARAM_FIELDS = (
    ("stage", "stage"), ("method", "mix.method"), ("fold", "fold"), ("num_folds", "num_folds"),
    ("seed", "seed"), ("split_seed", "split_seed"), ("recipe", "recipe"), ("lr", "optim.lr"),
    ("image_size", "data.image_size"), ("epochs", "num_epochs"), ("batch_size", "batch_size"),
    ("init_from", "model.init_from"), ("data", "data.manifest"), ("mix_sampler", "mix.sampler"),
    ("schedule", "optim.schedule"), ("weight_decay", "optim.weight_decay"), ("ema_decay", "optim.ema_decay"),
    ("label_smoothing", "mix.label_smoothing"), ("tta", "eval.tta"), ("decision", "eval.decision"),
)
# Scalar tags the HParams tab shows as metric columns.
HPARAM_METRICS = (
    ("test/balanced_accuracy", "test balanced accuracy"), ("test/balanced_f1", "test balanced F1"),
    ("test/accuracy", "test accuracy"), ("val/best_balanced_accuracy", "best val balanced accuracy"),
    ("val/balanced_accuracy", "val balanced accuracy"), ("val/loss", "val loss"), ("train/loss", "train loss"),
)


def _field(config, dotted: str):
    """The value of a dotted config field, or None when the config lacks it."""
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node


def hparams_of(config) -> dict:
    """The run's HParams values: numbers, booleans and strings (tuples as text).

    `method` is 'baseline' when nothing is mixed; `data` is 'synthetic' for the
    built-in set, else the manifest path; `init_from` is 'random' without ImageNet weights.
    """
    values = {}
    for name, dotted in HPARAM_FIELDS:
        v = _field(config, dotted)
        if v is None:
            continue
        if name == "method" and v == "none":
            v = "baseline"
        if name == "data":
            v = v or "synthetic"
        if name == "init_from":
            v = v or "random"
        values[name] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return values


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels, in float64.

    For the validation loss: the same loss the train step minimises, without mixing.
    """
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    labels = np.asarray(labels, np.int64)
    return float(-log_p[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan")


def config_markdown(config) -> str:
    """The resolved config as markdown for the text plugin: a JSON block, keys sorted."""
    text = config.to_json_best_effort(indent=2, sort_keys=True) if hasattr(config, "to_json_best_effort") \
        else json.dumps(config, indent=2, sort_keys=True, default=str)
    # Four leading spaces make a markdown code block, which keeps the indentation.
    return "\n".join("    " + line for line in text.splitlines())


class SummaryWriter:
    """Writes scalars and images to `logdir` (only on process 0 in multi-host runs)."""

    def __init__(self, logdir: str, enabled: bool = True):
        self._writer = EventFileWriter(logdir) if enabled else None

    def _write(self, step: int, value: summary_pb2.Summary.Value) -> None:
        if self._writer is not None:
            event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary_pb2.Summary(value=[value]))
            self._writer.add_event(event)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Logs each {tag: value} at `step`."""
        for tag, v in values.items():
            self._write(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(v)))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Logs one (H, W, 3) uint8 image as PNG."""
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
        h, w = image.shape[:2]
        img = summary_pb2.Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self._write(step, summary_pb2.Summary.Value(tag=tag, image=img))

    def text(self, step: int, tag: str, markdown: str) -> None:
        """Logs markdown text (the text plugin renders it)."""
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[markdown.encode("utf-8")],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        meta = text_metadata.create_summary_metadata(display_name=tag, description="")
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor))

    def run_start(self, config, start_time: float | None = None) -> None:
        """Logs the run's hparams and its resolved config; call once when a run (or a resume) starts.

        Writes the experiment's columns (`HPARAM_FIELDS` the config has, and
        `HPARAM_METRICS`), this run's values, and the config as text at step 0.
        """
        values = hparams_of(config)
        columns = [hp.HParam(name) for name in values]
        metrics = [hp.Metric(tag, display_name=name) for tag, name in HPARAM_METRICS]
        for summary in (hp.hparams_config_pb(columns, metrics, time_created_secs=start_time),
                        hp.hparams_pb(values, trial_id=None, start_time_secs=start_time)):
            self._write_summary(0, summary)
        self.text(0, "config", config_markdown(config))

    def run_end(self, step: int, succeeded: bool = True, final: dict[str, float] | None = None) -> None:
        """Logs the end of the run for the HParams tab (status success or failure).

        Args:
          step: the last train step.
          succeeded: False for a run that ended in an error.
          final: scalars to log at `step` first, e.g. {'val/best_balanced_accuracy': ...}.
        """
        if final:
            self.scalars(step, final)
        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS if succeeded else api_pb2.STATUS_FAILURE,
                                             end_time_secs=time.time())
        meta = hp_metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=end))
        self._write(step, summary_pb2.Summary.Value(tag=hp_metadata.SESSION_END_INFO_TAG, metadata=meta,
                                                    tensor=hp_metadata.NULL_TENSOR))

    def evaluation(self, step: int, split: str, metrics: dict, loss: float | None = None) -> None:
        """Logs one evaluation: scores, per-class recall and precision, loss and the confusion image.

        Args:
          step: the train step evaluated.
          split: 'val' or 'test', the tag prefix.
          metrics: `metrics.classification_metrics`'s dict.
          loss: the mean cross-entropy (`cross_entropy`), if computed.
        """
        from circlemix_jax import report  # matplotlib only when a figure is drawn

        values = {f"{split}/{k}": metrics[k] for k in ("balanced_accuracy", "balanced_f1", "accuracy")}
        for name, v in metrics["per_class"].items():
            values[f"{split}/recall/{name}"] = v["recall"]
            values[f"{split}/precision/{name}"] = v["precision"]
        if loss is not None:
            values[f"{split}/loss"] = loss
        self.scalars(step, values)
        if self._writer is not None:
            image = report.confusion_figure(metrics["confusion_matrix"], metrics["class_names"],
                                            f"{split}, step {step}")
            self.image(step, f"{split}/confusion_matrix", image)

    def _write_summary(self, step: int, summary: summary_pb2.Summary) -> None:
        for value in summary.value:
            self._write(step, value)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
