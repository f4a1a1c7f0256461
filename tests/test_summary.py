"""TensorBoard events read back with TensorBoard's own reader: hparams, config text, scalars, confusion image."""

import io

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api_pb2, metadata as hp_metadata

from circlemix_jax import defaults, summary
from circlemix_jax.metrics import classification_metrics


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    """A run's event files: start, two validations, the test, the end (two writers, as a resume makes)."""
    logdir = str(tmp_path_factory.mktemp("tb"))
    config = defaults.get_config("binary", "smoke,circlemix")
    names = ["non_sclerotic", "global_sclerosis"]
    val = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], names)
    writer = summary.SummaryWriter(logdir)
    writer.run_start(config)
    writer.scalars(1, {"train/loss": 0.7})
    writer.evaluation(10, "val", val, loss=summary.cross_entropy(np.array([[2.0, 0.0]] * 4), [0, 0, 1, 1]))
    writer.close()
    writer = summary.SummaryWriter(logdir)  # the test phase opens its own writer
    writer.evaluation(20, "test", classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], names))
    writer.run_end(20, final={"val/best_balanced_accuracy": 0.75})
    writer.close()
    acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0,
                                                                    event_accumulator.TENSORS: 0})
    return acc.Reload(), config


def test_scalars_of_evaluations(events):
    acc, _ = events
    scalars = acc.Tags()["scalars"]
    for tag in ("test/balanced_accuracy", "test/balanced_f1", "test/recall/global_sclerosis",
                "test/precision/non_sclerotic", "val/loss", "val/balanced_accuracy", "val/best_balanced_accuracy"):
        assert tag in scalars, tag
    assert acc.Scalars("test/balanced_accuracy")[0].value == pytest.approx(0.8333333, abs=1e-6)
    assert acc.Scalars("test/balanced_accuracy")[0].step == 20
    # log(1 + e^-2) for the two right and log(1 + e^2) for the two wrong examples
    expected = (2 * np.log1p(np.exp(-2.0)) + 2 * np.log1p(np.exp(2.0))) / 4
    assert acc.Scalars("val/loss")[0].value == pytest.approx(expected, rel=1e-6)


def test_confusion_images(events):
    acc, _ = events
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(acc.Tags()["images"])
    event = acc.Images("test/confusion_matrix")[0]
    image = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    assert image.shape == (event.height, event.width, 3) and image.shape[0] > 100
    assert event.step == 20
    assert image.std() > 10  # a drawn figure, not a blank canvas


def test_hparams_and_config_text(events):
    acc, config = events
    tensors = acc.Tags()["tensors"]
    for tag in (hp_metadata.EXPERIMENT_TAG, hp_metadata.SESSION_START_INFO_TAG, hp_metadata.SESSION_END_INFO_TAG,
                "config"):
        assert tag in tensors, tag
    content = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content
    start = hp_metadata.parse_session_start_info_plugin_data(content)
    hparams = {k: v for k, v in start.hparams.items()}
    assert hparams["stage"].string_value == "binary"
    assert hparams["method"].string_value == "circlemix"
    assert hparams["fold"].number_value == 0 and hparams["image_size"].number_value == 32
    assert hparams["lr"].number_value == pytest.approx(config.optim.lr)
    assert hparams["data"].string_value == "synthetic"
    experiment = hp_metadata.parse_experiment_plugin_data(acc.SummaryMetadata(hp_metadata.EXPERIMENT_TAG)
                                                          .plugin_data.content)
    assert "test/balanced_accuracy" in [m.name.tag for m in experiment.metric_infos]
    assert {"stage", "method", "fold", "seed", "lr", "image_size"} <= {h.name for h in experiment.hparam_infos}
    end = hp_metadata.parse_session_end_info_plugin_data(acc.SummaryMetadata(hp_metadata.SESSION_END_INFO_TAG)
                                                         .plugin_data.content)
    assert end.status == api_pb2.STATUS_SUCCESS
    text = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert '"image_size": 32' in text and '"method": "circlemix"' in text


def test_hparams_of_skips_missing_fields():
    config = defaults.get_config("c5", "smoke")
    values = summary.hparams_of(config)
    assert values["method"] == "baseline" and values["init_from"] == "random"
    assert "recipe" not in values  # no such field in this config
    assert all(isinstance(v, (bool, int, float, str)) for v in values.values())
