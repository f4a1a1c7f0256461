"""Folds: which subjects train, validate and test (subject-level k-fold, or one centre held out)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from circlemix_jax.data.manifest import CENTER_COLUMN, Records, center_names, centers
from circlemix_jax.errors import InputError

SPLITS = ("subject_kfold", "leave_one_center_out")


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into `Records` for one fold.

    Attributes:
      held_out: the test centre of a leave-one-centre-out split; '' otherwise.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    held_out: str = ""


def make_split(records: Records, fold: int, num_folds: int = 5, val_fraction: float = 0.25,
               seed: int = 0, split: str = "subject_kfold") -> Split:
    """The test fold, and the other subjects 75/25 train/val.

    With split='subject_kfold' the test set is fold `fold` of `num_folds`
    subject-level folds. With split='leave_one_center_out' it is every image of
    centre number `fold` (sorted `center` names; `num_folds` is unused), the
    honest test of robustness to another lab's stain and scanner. Both levels use
    sklearn's StratifiedGroupKFold, so classes are balanced as far as whole
    subjects allow, and the result depends only on the manifest and seed.

    Raises:
      InputError: fold out of range, fewer subjects than folds, or (leave one
        centre out) no `center` column or fewer than two centres.
    """
    n_inner = max(2, round(1 / val_fraction))
    with warnings.catch_warnings():
        # Rare classes in few subjects cannot be stratified exactly; "as far as subjects allow" is the goal.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        if split == "leave_one_center_out":
            names = center_names(records.source)
            if len(names) < 2:
                raise InputError(f"{records.source}: split='leave_one_center_out' needs two or more centres in "
                                 f"column '{CENTER_COLUMN}', found {names}")
            if not 0 <= fold < len(names):
                raise InputError(f"config field fold={fold} is out of range 0..{len(names) - 1}: "
                                 f"{records.source} has the centres {names}")
            held_out = names[fold]
            where = centers(records)
            rest, test = np.flatnonzero(where != held_out), np.flatnonzero(where == held_out)
            if len(np.unique(records.subjects[rest])) < n_inner:
                raise InputError(f"{records.source}: the centres other than {held_out} hold fewer than {n_inner} "
                                 "subjects, too few to split into train and validation")
        else:
            if not 0 <= fold < num_folds:
                raise InputError(f"config field fold={fold} is out of range 0..{num_folds - 1}")
            n_subjects = len(np.unique(records.subjects))
            if n_subjects < num_folds:
                raise InputError(f"{records.source}: {n_subjects} subjects cannot make {num_folds} subject-level folds")
            outer = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
            rest, test = list(outer.split(records.paths, records.raw_labels, records.subjects))[fold]
            held_out = ""
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1)
        tr, va = next(inner.split(rest, records.raw_labels[rest], records.subjects[rest]))
    return Split(train=np.sort(rest[tr]), val=np.sort(rest[va]), test=np.sort(test), held_out=held_out)


def restrict(records: Records, split: Split, classes) -> tuple[Records, dict[str, Records]]:
    """Keeps only a stage's classes and relabels them 0..len(classes)-1.

    Args:
      records: all images.
      split: the fold's indices.
      classes: the stage's global class ids (e.g. (3, 4) for C2).

    Returns:
      (records relabelled to local ids, {'train','val','test': subset}).

    Raises:
      InputError: a class of the stage has no training image in this fold.
    """
    classes = tuple(int(c) for c in classes)
    local = np.full(len(records.class_names), -1, np.int32)
    local[list(classes)] = np.arange(len(classes))
    names = tuple(records.class_names[c] for c in classes)
    relabelled = dataclasses.replace(records, labels=local[records.labels], class_names=names)
    parts = {}
    for name in ("train", "val", "test"):
        idx = getattr(split, name)
        parts[name] = relabelled.take(idx[relabelled.labels[idx] >= 0])
    counts = np.bincount(parts["train"].labels, minlength=len(classes))
    empty = [names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(f"{records.source}: class(es) {empty} have no training images in this fold; "
                         "choose another fold or add subjects with these classes")
    return relabelled, parts
