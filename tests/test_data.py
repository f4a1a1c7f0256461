"""Manifests and subject-level folds."""

import csv
import os

import numpy as np
import pytest

from circlemix_jax import data
from circlemix_jax.defaults import BINARY_CLASSES, FIVE_CLASSES, get_config
from circlemix_jax.errors import InputError


def _folds_ok(records, num_folds=5):
    test_count = {}
    for fold in range(num_folds):
        split = data.make_split(records, fold, num_folds, 0.25, seed=0)
        again = data.make_split(records, fold, num_folds, 0.25, seed=0)
        for name in ("train", "val", "test"):
            np.testing.assert_array_equal(getattr(split, name), getattr(again, name))
        subj = {n: set(records.subjects[getattr(split, n)]) for n in ("train", "val", "test")}
        assert not subj["train"] & subj["val"] and not subj["train"] & subj["test"] and not subj["val"] & subj["test"]
        everything = np.sort(np.concatenate([split.train, split.val, split.test]))
        np.testing.assert_array_equal(everything, np.arange(len(records)))
        for s in subj["test"]:
            test_count[s] = test_count.get(s, 0) + 1
        # 75/25 by subject among the non-test subjects (whole subjects, so approximately).
        rest = len(subj["train"]) + len(subj["val"])
        assert 0.1 < len(subj["val"]) / rest < 0.45
    assert sorted(test_count) == sorted(set(records.subjects)) and set(test_count.values()) == {1}


def test_folds_synthetic(synthetic_manifest):
    _folds_ok(data.read_manifest(synthetic_manifest, FIVE_CLASSES))


def test_folds_real_data(shared_manifest):
    records = data.read_manifest(shared_manifest, BINARY_CLASSES)
    assert len(records) == 946 and len(set(records.subjects)) == 31
    _folds_ok(records)


def test_seed_changes_split(synthetic_manifest):
    records = data.read_manifest(synthetic_manifest, FIVE_CLASSES)
    a = data.make_split(records, 0, seed=0).test
    b = data.make_split(records, 0, seed=1).test
    assert not np.array_equal(a, b)


def test_binary_label_map_and_relative_paths(synthetic_manifest):
    cfg = get_config("binary")
    records = data.read_manifest(synthetic_manifest, cfg.class_names, cfg.data.label_map.to_dict())
    five = data.read_manifest(synthetic_manifest, FIVE_CLASSES)
    np.testing.assert_array_equal(records.labels, (five.labels >= 2).astype(np.int32))
    assert all(os.path.isabs(p) and os.path.exists(p) for p in records.paths[:5])


def test_restrict_relabels_child_classes(synthetic_manifest):
    records = data.read_manifest(synthetic_manifest, FIVE_CLASSES)
    split = data.make_split(records, 0)
    _, parts = data.restrict(records, split, (3, 4))
    assert parts["train"].class_names == ("solidified", "disappearing")
    assert set(parts["train"].labels) == {0, 1}
    full = records.take(split.train)
    assert len(parts["train"]) == int(np.isin(full.labels, [3, 4]).sum())


def _write(path, rows, header=("path", "label", "subject")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.mark.parametrize("case, rows, header, match", [
    ("missing column", [("a.png", "normal")], ("path", "label"), "missing column.*subject"),
    ("empty", [], ("path", "label", "subject"), "no rows"),
    ("bad label", [("a.png", "normal", "s1"), ("b.png", "weird", "s1")], None, "line 3: 'weird'"),
    ("duplicate", [("a.png", "normal", "s1"), ("a.png", "normal", "s2")], None, "duplicate image paths"),
    ("blank", [("a.png", "", "s1")], None, r"line 2: empty \['label'\]"),
])
def test_manifest_errors_name_the_culprit(tmp_path, case, rows, header, match):
    path = _write(tmp_path / "m.csv", rows, header or ("path", "label", "subject"))
    with pytest.raises(InputError, match=match) as e:
        data.read_manifest(path, FIVE_CLASSES)
    assert "m.csv" in str(e.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(InputError, match="manifest not found: .*nope.csv"):
        data.read_manifest(str(tmp_path / "nope.csv"), FIVE_CLASSES)


def test_fold_out_of_range(synthetic_manifest):
    records = data.read_manifest(synthetic_manifest, FIVE_CLASSES)
    with pytest.raises(InputError, match="fold=7"):
        data.make_split(records, 7)


def test_class_without_training_images(tmp_path):
    rows = [(f"{i}.png", "normal" if i % 2 else "periglomerular_fibrosis", f"s{i % 6}") for i in range(30)]
    rows += [("x.png", "solidified", "s0")]  # one subject holds the only solidified image
    records = data.read_manifest(_write(tmp_path / "m.csv", rows), FIVE_CLASSES)
    fold = next(k for k in range(5) if "s0" in set(records.subjects[data.make_split(records, k).test]))
    with pytest.raises(InputError, match="solidified.*no training images"):
        data.restrict(records, data.make_split(records, fold), (0, 1, 3))


def test_read_csv_names_the_line_that_is_not_utf8_or_not_csv(tmp_path):
    from circlemix_jax.data.manifest import read_csv

    good = tmp_path / "good.csv"
    good.write_bytes("\ufeffpath,subject\na.png,Schön\n".encode())  # a byte-order mark is fine
    assert read_csv(str(good)) == (["path", "subject"], [{"path": "a.png", "subject": "Schön"}])
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path,subject\na.png,s1\nb.png,Schön\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin.csv: line 3 is not UTF-8 text \(byte 0xf6\)"):
        read_csv(str(latin))
    quote = tmp_path / "quote.csv"  # an unclosed quote swallows the rest of the file into one field
    quote.write_text("path,subject\na.png,s1\n\"b.png,s2\n" + "c.png,s3\n" * 20000)
    with pytest.raises(InputError, match=r"quote.csv: line \d+ is not CSV \(field larger than field limit"):
        read_csv(str(quote))
    with pytest.raises(InputError, match="manifest is not a file"):
        read_csv(str(tmp_path))
    with pytest.raises(InputError, match="manifest not found"):
        read_csv(str(tmp_path / "none.csv"))


def test_paths_resolve_beside_the_manifest_or_else_from_the_current_directory(tmp_path, monkeypatch):
    from circlemix_jax import predict

    sub = tmp_path / "external"
    (sub / "img").mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (sub / "img" / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    # A script run in tmp_path wrote paths relative to tmp_path, not to the manifest's folder.
    rows = [("external/img/a.png", "normal", "s1"), ("external/img/b.png", "normal", "s2")]
    manifest = _write(sub / "m.csv", rows)
    expected = [str(sub / "img" / "a.png"), str(sub / "img" / "b.png")]
    assert list(data.read_manifest(manifest, FIVE_CLASSES).paths) == expected
    assert predict.read_inputs(manifest, None)[0] == expected
    # A file beside the manifest wins over one of the same name in the current directory.
    (sub / "external" / "img").mkdir(parents=True)
    (sub / "external" / "img" / "a.png").write_bytes(b"")
    assert data.read_manifest(manifest, FIVE_CLASSES).paths[0] == str(sub / "external" / "img" / "a.png")
    # Found nowhere: the manifest-relative path, for the decoder to report as missing.
    missing = _write(sub / "n.csv", [("nowhere.png", "normal", "s1")])
    assert data.read_manifest(missing, FIVE_CLASSES).paths[0] == str(sub / "nowhere.png")
