"""The decoded cache on disk: same pixels as in memory, reused, rebuilt when an image changes, never half-written."""

import os

import numpy as np
import pytest
from PIL import Image

from circlemix_jax import defaults, rundir, train
from circlemix_jax.data import image_cache, pipeline
from circlemix_jax.errors import InputError


def _images(folder, n=6, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = str(folder / f"im{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def test_disk_cache_holds_the_decoded_pixels_and_is_reused(tmp_path, monkeypatch):
    paths = _images(tmp_path)
    cache = str(tmp_path / "cache")
    store, row_of, built = image_cache.open_or_build(paths[::-1] + paths[:2], 16, 2, cache)  # repeats stored once
    assert built and isinstance(store, np.memmap) and store.shape == (6, 16, 16, 3)
    rows = image_cache.ImageRows(store, [row_of[p] for p in paths])
    np.testing.assert_array_equal(np.asarray(rows), pipeline.decode_all(paths, 16, 2))

    def no_decoding(*args, **kwargs):
        raise AssertionError("a valid cache was decoded again")

    monkeypatch.setattr(pipeline, "decode_all", no_decoding)
    again, _, built = image_cache.open_or_build(paths, 16, 2, cache)
    assert not built
    np.testing.assert_array_equal(again, store)


def test_a_changed_image_gets_a_new_cache_and_the_stale_one_goes(tmp_path):
    paths = _images(tmp_path)
    cache = str(tmp_path / "cache")
    old, _, _ = image_cache.open_or_build(paths, 16, 2, cache)
    old = np.array(old)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(paths[3])  # same path and size, new pixels
    new, row_of, built = image_cache.open_or_build(paths, 16, 2, cache)
    assert built and new[row_of[paths[3]]].max() == 0
    assert not np.array_equal(np.array(new), old)
    assert len(os.listdir(cache)) == 1  # the stale file of the same paths and size is gone
    image_cache.open_or_build(paths[:4], 16, 2, cache)  # another manifest: its own file, the first one kept
    assert len(os.listdir(cache)) == 2


def test_a_failed_decode_leaves_no_cache(tmp_path):
    paths = _images(tmp_path)
    (tmp_path / "im2.png").write_bytes(b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="im2.png"):
        image_cache.open_or_build(paths, 16, 2, str(cache))
    assert os.listdir(cache) == []


def test_rows_index_like_an_array_and_fingerprint_the_same():
    store = np.random.default_rng(0).integers(0, 255, (9, 4, 4, 3), np.uint8)
    order = [7, 2, 2, 0, 5]
    rows, array = image_cache.ImageRows(store, order), store[order]
    assert len(rows) == 5 and rows.shape == array.shape and rows.nbytes == array.nbytes
    for index in (np.array([4, 0, 3]), slice(1, 4), 2):
        np.testing.assert_array_equal(rows[index], array[index])
    assert rundir.pixels_sha256(rows) == rundir.pixels_sha256(array)
    labels = np.arange(5)
    for a, b in zip(pipeline.train_batches(rows, labels, 2, 0, 0), pipeline.train_batches(array, labels, 2, 0, 0)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_auto_goes_to_disk_above_the_memory_budget():
    one = 256 * 256 * 3
    assert image_cache.choose("auto", 100, 256, 100 * one / 2**20) == "memory"
    assert image_cache.choose("auto", 101, 256, 100 * one / 2**20) == "disk"
    assert image_cache.choose("memory", 10**6, 256, 1) == "memory"
    assert image_cache.choose("disk", 1, 32, 8192) == "disk"


def test_a_run_reads_the_same_pixels_from_disk(synthetic_manifest, tmp_path):
    def inputs(cache):
        config = defaults.get_config("c5", "smoke")
        with config.unlocked():
            config.data.manifest = synthetic_manifest
            config.data.cache = cache
            config.data.cache_dir = str(tmp_path / "cache")
        return train.check(config, str(tmp_path / cache))

    memory, disk = inputs("memory"), inputs("disk")
    assert isinstance(disk.images["train"], image_cache.ImageRows)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(np.asarray(disk.images[name]), memory.images[name])
        assert disk.split_record[name]["pixels_sha256"] == memory.split_record[name]["pixels_sha256"]


def test_bad_cache_fields_are_one_line_errors(tmp_path):
    config = defaults.get_config("c5", "smoke")
    with config.unlocked():
        config.data.cache = "ssd"
    with pytest.raises(InputError, match="data.cache='ssd'"):
        train.check(config, str(tmp_path / "run"))


def test_a_damaged_cache_file_is_a_one_line_error(tmp_path):
    paths = _images(tmp_path)
    cache = tmp_path / "cache"
    image_cache.open_or_build(paths, 16, 2, str(cache))
    (file,) = cache.iterdir()
    file.write_bytes(file.read_bytes()[:1000])  # cut short behind the cache's back
    with pytest.raises(InputError, match="damaged.*delete it"):
        image_cache.open_or_build(paths, 16, 2, str(cache))
