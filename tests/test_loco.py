"""Leave-one-centre-out splits: the held-out centre is the test set, the others split by subject."""

import os

import numpy as np
import pytest

from circlemix_jax import data, rundir
from circlemix_jax.errors import InputError

CENTRES = ("SAS", "SESCAM", "VUHSK")  # sorted: fold k tests on CENTRES[k]


def _manifest(folder, centres=CENTRES, with_center=True, subjects_per_centre=6) -> str:
    """Rows without images (splits never open them): every centre has both classes over several subjects."""
    rows = []
    for c in centres:
        for s in range(subjects_per_centre):
            for i in range(3 + s % 3):
                label = "obsolescent" if (s + i) % 3 == 0 else "normal"
                rows.append((f"{c}/{s}/{i}.png", label, f"{c}_{s}", c))
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as f:
        f.write("path,label,subject" + (",center" if with_center else "") + "\n")
        f.writelines(",".join(r if with_center else r[:3]) + "\n" for r in rows)
    return path


def _records(path):
    return data.read_manifest(path, ("non_sclerotic", "global_sclerosis"),
                              {"normal": "non_sclerotic", "obsolescent": "global_sclerosis"})


@pytest.mark.parametrize("fold", range(3))
def test_each_fold_tests_on_one_whole_centre(tmp_path, fold):
    records = _records(_manifest(str(tmp_path)))
    split = data.make_split(records, fold, num_folds=5, split="leave_one_center_out")
    where = data.centers(records)
    assert split.held_out == CENTRES[fold]
    np.testing.assert_array_equal(split.test, np.flatnonzero(where == CENTRES[fold]))
    train_val = np.concatenate([split.train, split.val])
    assert sorted(train_val.tolist()) == np.flatnonzero(where != CENTRES[fold]).tolist()
    assert not set(records.subjects[split.train]) & set(records.subjects[split.val])
    assert len(split.val) and len(split.train)
    again = data.make_split(records, fold, split="leave_one_center_out")
    np.testing.assert_array_equal(again.val, split.val)  # deterministic given the split seed
    assert rundir.split_record(records, split)["held_out_center"] == CENTRES[fold]


def test_subject_kfold_is_unchanged_and_records_no_centre(tmp_path):
    records = _records(_manifest(str(tmp_path)))
    split = data.make_split(records, 0, num_folds=3)
    assert split.held_out == ""
    assert len(set(data.centers(records)[split.test])) > 1  # k-fold mixes the centres


def test_fold_out_of_range_names_the_centres(tmp_path):
    records = _records(_manifest(str(tmp_path)))
    with pytest.raises(InputError, match=r"fold=3 is out of range 0\.\.2.*VUHSK"):
        data.make_split(records, 3, num_folds=5, split="leave_one_center_out")


def test_manifest_without_center_is_one_line_naming_the_column(tmp_path):
    records = _records(_manifest(str(tmp_path), with_center=False))
    with pytest.raises(InputError) as e:
        data.make_split(records, 0, split="leave_one_center_out")
    assert "'center'" in str(e.value) and "\n" not in str(e.value)


def test_one_centre_or_too_few_subjects_is_an_input_error(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    with pytest.raises(InputError, match="two or more centres"):
        data.make_split(_records(_manifest(str(one), centres=("A",))), 0, split="leave_one_center_out")
    few = tmp_path / "few"
    few.mkdir()
    with pytest.raises(InputError, match="too few"):
        data.make_split(_records(_manifest(str(few), subjects_per_centre=1)), 0, split="leave_one_center_out")
