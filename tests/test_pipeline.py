"""Host pipeline: decoding, conversion of odd image modes, batching."""

import numpy as np
import pytest
from PIL import Image

from circlemix_jax.data import pipeline
from circlemix_jax.errors import InputError


def test_eval_sees_every_example_once():
    n, bs = 37, 8
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    labels = np.arange(n) % 5
    seen = []
    for b in pipeline.eval_batches(images, labels, bs):
        assert b["image"].shape == (bs, 4, 4, 3)
        seen.extend(b["image"][b["mask"], 0, 0, 0].tolist())
        assert np.array_equal(b["label"][b["mask"]], labels[b["image"][b["mask"], 0, 0, 0]])
    assert sorted(seen) == list(range(n))


def test_train_batches_deterministic_and_resumable():
    n, bs = 50, 8
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(n)

    def order(epoch, start=0):
        return [b["label"].tolist() for b in pipeline.train_batches(images, labels, bs, 0, epoch, start=start)]

    e0 = order(0)
    assert len(e0) == n // bs and all(len(b) == bs for b in e0)
    assert len({x for b in e0 for x in b}) == (n // bs) * bs  # no repeats within an epoch
    assert e0 == order(0) and e0 != order(1)
    assert order(0, start=3) == e0[3:]  # resuming mid-epoch replays the same tail


def test_decode_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "16bit.png")
    out = pipeline.decode_all([str(tmp_path / f) for f in ("rgb.png", "gray.png", "rgba.png", "16bit.png")], 16)
    assert out.shape == (4, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], out[2])  # opaque alpha changes nothing
    assert np.abs(out[1, ..., 0].astype(int) - out[3, ..., 0]).max() <= 2


def test_decode_lists_every_bad_file(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.png").write_text("not an image")
    paths = [str(tmp_path / f) for f in ("ok.png", "trunc.png", "gone.png", "text.png")]
    with pytest.raises(InputError) as e:
        pipeline.decode_all(paths, 8)
    msg = str(e.value)
    assert "3 image(s)" in msg and "trunc.png" in msg and "gone.png (missing)" in msg and "text.png" in msg
    assert "ok.png" not in msg


def test_prefetch_puts_ahead_in_order():
    put, seen = [], []

    def record(b):
        put.append(b)
        return b * 10

    for out in pipeline.prefetch(range(5), record, depth=2):
        seen.append((out, len(put)))
    # Each batch is used while the next two are already put; at the end nothing is left behind.
    assert seen == [(0, 3), (10, 4), (20, 5), (30, 5), (40, 5)]


def test_loader_threads_rise_to_the_cores(monkeypatch):
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 16)
    assert pipeline.loader_threads(4) == pipeline.MAX_LOADER_THREADS
    assert pipeline.loader_threads(12) == 12
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    assert pipeline.loader_threads(4) == 4


@pytest.mark.parametrize("workers", [1, 4, pipeline.MAX_LOADER_THREADS, 12])
def test_loaders_keep_every_thread_busy_without_grain_warnings(caplog, workers):
    # grain warns at every epoch (and may later refuse) when fewer batches may be
    # in flight than there are threads, as on a 16-core GPU host.
    images = np.zeros((40, 4, 4, 3), np.uint8)
    labels = np.arange(40) % 2
    with caplog.at_level("WARNING"):
        train = list(pipeline.train_batches(images, labels, 4, seed=0, epoch=0, workers=workers))
        evals = list(pipeline.eval_batches(images, labels, 6, workers=workers))
    assert len(train) == 10 and sum(b["mask"].sum() for b in evals) == 40
    assert "prefetch_buffer_size" not in caplog.text


@pytest.mark.parametrize("seed", range(5))
def test_balanced_probs_give_every_centre_and_class_cell_the_same_weight(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    groups = rng.choice(["SAS", "SESCAM", "VUHSK", "X"], n, p=[0.2, 0.3, 0.45, 0.05])
    labels = (rng.random(n) < np.where(groups == "VUHSK", 0.04, 0.4)).astype(int)  # the class mix varies
    probs = pipeline.balanced_probs(labels, groups)
    cells = {(g, y) for g, y in zip(groups, labels)}
    assert probs.min() > 0 and np.isclose(probs.sum(), 1.0)
    for g, y in cells:  # present cells weigh the same; within a cell every image the same
        inside = probs[(groups == g) & (labels == y)]
        assert np.isclose(inside.sum(), 1 / len(cells)) and np.allclose(inside, inside[0])


def test_weighted_batches_draw_by_the_probabilities_and_replay_on_resume():
    n, bs = 40, 8
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.arange(n)
    probs = np.zeros(n)
    probs[:4] = 0.2  # four examples carry 80% of the mass, the rest 20%
    probs[4:] = 0.2 / (n - 4)

    def order(epoch, start=0):
        return [b["label"].tolist() for b in
                pipeline.train_batches(images, labels, bs, 0, epoch, start=start, probs=probs)]

    e0 = order(0)
    assert len(e0) == n // bs and all(len(b) == bs for b in e0)  # an epoch keeps its length
    assert e0 == order(0) and e0 != order(1) and order(0, start=2) == e0[2:]
    drawn = np.array([x for epoch in range(50) for b in order(epoch) for x in b])
    assert abs(np.isin(drawn, np.arange(4)).mean() - 0.8) < 0.03  # 2,000 draws: ±0.03 is >3 sigma


def test_a_manifest_without_centres_balances_the_classes_only(synthetic_manifest, capsys):
    from circlemix_jax import data, train
    from circlemix_jax.defaults import get_config

    config = get_config("binary", "scratch")
    records = data.read_manifest(synthetic_manifest, config.class_names, config.data.label_map.to_dict())
    config.data.balance_centers = True
    probs = train.sampling_probs(config, records)
    assert "has no 'center' column, so the training batches balance the classes only" in capsys.readouterr().out
    for k in (0, 1):
        assert np.isclose(probs[records.labels == k].sum(), 0.5)
    config.data.balance_centers = False
    assert train.sampling_probs(config, records) is None
