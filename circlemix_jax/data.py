"""Manifests and subject-level folds.

A manifest is a CSV with at least `path,label,subject`; extra columns are kept
out of the way. Relative paths resolve against the manifest's folder. Every
problem is reported as an `InputError` that names the file, row or field.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import warnings

import numpy as np
from etils import epath
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

    def take(self, idx: np.ndarray) -> "Records":
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
    """Indices into `Records` for one fold."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def make_split(records: Records, fold: int, num_folds: int = 5, val_fraction: float = 0.25,
               seed: int = 0) -> Split:
    """Subject-level split: test = fold `fold`; the other subjects 75/25 train/val.

    Both levels use sklearn's StratifiedGroupKFold, so classes are balanced as far
    as whole subjects allow, and the result depends only on the manifest and seed.

    Raises:
      InputError: fold out of range, or fewer subjects than folds.
    """
    if not 0 <= fold < num_folds:
        raise InputError(f"config field fold={fold} is out of range 0..{num_folds - 1}")
    n_subjects = len(np.unique(records.subjects))
    if n_subjects < num_folds:
        raise InputError(f"{records.source}: {n_subjects} subjects cannot make {num_folds} subject-level folds")
    outer = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    inner = StratifiedGroupKFold(n_splits=max(2, round(1 / val_fraction)), shuffle=True, random_state=seed + 1)
    with warnings.catch_warnings():
        # Rare classes in few subjects cannot be stratified exactly; "as far as subjects allow" is the goal.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        rest, test = list(outer.split(records.paths, records.raw_labels, records.subjects))[fold]
        tr, va = next(inner.split(rest, records.raw_labels[rest], records.subjects[rest]))
    return Split(train=np.sort(rest[tr]), val=np.sort(rest[va]), test=np.sort(test))


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


def write_split(path: str, records: Records, split: Split) -> None:
    """Writes the fold's subjects and image paths as JSON (for audit and predict)."""
    out = {name: {"subjects": sorted(set(records.subjects[getattr(split, name)].tolist())),
                  "paths": records.paths[getattr(split, name)].tolist()}
           for name in ("train", "val", "test")}
    epath.Path(path).write_text(json.dumps(out, indent=1))  # also gs://
