"""Manifests and subject-level folds.

A manifest is a CSV with at least `path,label,subject`; extra columns are kept
out of the way. Relative paths resolve against the manifest's folder. Every
problem is reported as an `InputError` that names the file, row or field.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from circlemix_jax import synthetic
from circlemix_jax.errors import InputError

REQUIRED_COLUMNS = ("path", "label", "subject")
# How the test fold is chosen (config field `split`): subject-level k-fold, or one centre held out.
SPLITS = ("subject_kfold", "leave_one_center_out")
CENTER_COLUMN = "center"


@dataclasses.dataclass(frozen=True)
class Records:
    """The images of one manifest, in manifest order.

    Attributes:
      paths: absolute image paths.
      labels: class ids into `class_names` (after the config's label map).
      raw_labels: the manifest's label strings; folds stratify on these, so every
        stage (C5, children, binary) of one manifest shares the same split.
      subjects: subject (patient or slide) ids; folds never split a subject.
      class_names: the label space.
      source: the manifest path, for messages.
    """

    paths: np.ndarray
    labels: np.ndarray
    raw_labels: np.ndarray
    subjects: np.ndarray
    class_names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray) -> Records:
        """The subset at `idx`."""
        return dataclasses.replace(self, paths=self.paths[idx], labels=self.labels[idx],
                                   raw_labels=self.raw_labels[idx], subjects=self.subjects[idx])


def manifest_path(config) -> str:
    """The configured manifest, or the built-in synthetic set's (generated on first use)."""
    if config.data.manifest:
        return config.data.manifest
    return synthetic.ensure(config.data.synthetic_count, seed=0)


def read_manifest(path: str, class_names, label_map=None) -> Records:
    """Reads and validates a manifest.

    Args:
      path: CSV file with columns path, label, subject (extra columns allowed).
      class_names: the label space; a label may be a class name or an integer id.
      label_map: optional {manifest label: class name}, e.g. five classes onto binary.
        Labels that already are class names pass through unchanged.

    Returns:
      The records, with absolute paths.

    Raises:
      InputError: missing file, missing column, empty manifest, duplicate paths,
        blank fields, or labels outside `class_names` (all offending rows listed).
    """
    if not os.path.isfile(path):
        raise InputError(f"manifest not found: {path} (set --config.data.manifest=PATH)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise InputError(f"{path}: missing column(s) {missing}; the header is {header}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise InputError(f"{path}: the manifest has no rows")

    names = tuple(class_names)
    label_map = dict(label_map or {})
    root = os.path.dirname(os.path.abspath(path))
    paths, labels, raw, subjects, bad_label, blank = [], [], [], [], [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        values = {c: (row.get(c) or "").strip() for c in REQUIRED_COLUMNS}
        if not all(values.values()):
            blank.append(f"line {line}: empty {[c for c, v in values.items() if not v]}")
            continue
        label = label_map.get(values["label"], values["label"])
        if label in names:
            idx = names.index(label)
        elif label.isdigit() and int(label) < len(names):
            idx = int(label)
        else:
            bad_label.append(f"line {line}: {values['label']!r}")
            continue
        paths.append(os.path.normpath(os.path.join(root, values["path"])))
        labels.append(idx)
        raw.append(values["label"])
        subjects.append(values["subject"])
    if blank:
        raise InputError(f"{path}: blank required fields at {_few(blank)}")
    if bad_label:
        raise InputError(f"{path}: label not among the classes {list(names)} at {_few(bad_label)}")
    seen, dupes = set(), []
    for p in paths:
        if p in seen:
            dupes.append(p)
        seen.add(p)
    if dupes:
        raise InputError(f"{path}: duplicate image paths {_few(dupes)}")
    return Records(np.array(paths), np.array(labels, np.int32), np.array(raw), np.array(subjects), names, path)


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


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


def center_names(path: str) -> list[str]:
    """The sorted distinct values of a manifest's `center` column: fold k of a
    leave-one-centre-out split tests on centre k.

    Raises:
      InputError: no such column, or a row without a centre.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if CENTER_COLUMN not in header:
            raise InputError(f"{path}: split='leave_one_center_out' needs a '{CENTER_COLUMN}' column; "
                             f"the header is {header}")
        rows = list(reader)
    blank = [f"line {i}" for i, r in enumerate(rows, start=2) if not (r.get(CENTER_COLUMN) or "").strip()]
    if blank:
        raise InputError(f"{path}: empty '{CENTER_COLUMN}' at {_few(blank)}")
    return sorted({r[CENTER_COLUMN].strip() for r in rows})


def path_centers(path: str) -> dict[str, str]:
    """{absolute image path: centre} of a manifest (paths resolved as `read_manifest` does).

    Raises:
      InputError: as `center_names`.
    """
    center_names(path)  # the column checks
    root = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8-sig") as f:
        return {os.path.normpath(os.path.join(root, r["path"].strip())): r[CENTER_COLUMN].strip()
                for r in csv.DictReader(f) if (r.get("path") or "").strip()}


def centers(records: Records) -> np.ndarray:
    """The `center` of every record, read again from its manifest and matched by path."""
    by_path = path_centers(records.source)
    return np.array([by_path[p] for p in records.paths])


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
