"""Manifests: the CSV that lists a data set's images, and the reading of it.

A manifest is a CSV with at least `path,label,subject`; extra columns (`center`,
`mask`) are kept out of the way. Relative paths resolve against the manifest's
folder, or else the current directory (`resolve_path`). Every problem is
reported as an `InputError` that names the file, row or field.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import os

import numpy as np

from circlemix_jax.data import synthetic
from circlemix_jax.errors import InputError, first_few

REQUIRED_COLUMNS = ("path", "label", "subject")
# How the test fold is chosen (config field `split`): subject-level k-fold, or one centre held out.
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


def read_csv(path: str, what: str = "manifest") -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows) of a CSV file in UTF-8; a byte-order mark is allowed.

    Spreadsheets save CSV in the system's code page unless told otherwise, so a
    manifest in Latin-1 or cp1252 is a common first mistake; it gets one line
    that names the line of the file, not a UnicodeDecodeError.

    Args:
      path: the file.
      what: what the file is, for the messages ("manifest").

    Raises:
      InputError: no such file, not UTF-8, or not CSV (an unclosed quote), naming the line.
    """
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}" if not os.path.exists(path) else f"{what} is not a file: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise InputError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the {what} "
                         "as UTF-8 (in Excel: 'CSV UTF-8')") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:
        raise InputError(f"{path}: line {reader.line_num} is not CSV ({e})") from None
    return list(reader.fieldnames or []), rows


def resolve_path(manifest: str, path: str) -> str:
    """The absolute path of a file a manifest names.

    A relative path resolves against the manifest's folder, as the shipped
    manifests are written. A manifest written by a script run elsewhere often
    holds paths relative to where the script ran instead; so a path missing
    beside the manifest but present relative to the current directory resolves
    there. Where neither exists the manifest-relative path is returned, for the
    reader to report as missing.
    """
    path = path.strip()
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest)), path))
    if os.path.isabs(path) or os.path.exists(beside):
        return beside
    here = os.path.abspath(path)
    return here if os.path.exists(here) else beside


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
    header, rows = read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; the header is {header}")
    if not rows:
        raise InputError(f"{path}: the manifest has no rows")

    names = tuple(class_names)
    label_map = dict(label_map or {})
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
        paths.append(resolve_path(path, values["path"]))
        labels.append(idx)
        raw.append(values["label"])
        subjects.append(values["subject"])
    if blank:
        raise InputError(f"{path}: blank required fields at {first_few(blank)}")
    if bad_label:
        raise InputError(f"{path}: label not among the classes {list(names)} at {first_few(bad_label)}")
    seen, dupes = set(), []
    for p in paths:
        if p in seen:
            dupes.append(p)
        seen.add(p)
    if dupes:
        raise InputError(f"{path}: duplicate image paths {first_few(dupes)}")
    return Records(np.array(paths), np.array(labels, np.int32), np.array(raw), np.array(subjects), names, path)


def _checked_centers(path: str, header: list[str], rows: list[dict[str, str]], needed_for: str) -> None:
    if CENTER_COLUMN not in header:
        raise InputError(f"{path}: {needed_for} needs a '{CENTER_COLUMN}' column; "
                         f"the header is {header}")
    blank = [f"line {i}" for i, r in enumerate(rows, start=2) if not (r.get(CENTER_COLUMN) or "").strip()]
    if blank:
        raise InputError(f"{path}: empty '{CENTER_COLUMN}' at {first_few(blank)}")


def center_names(path: str, needed_for: str = "split='leave_one_center_out'") -> list[str]:
    """The sorted distinct values of a manifest's `center` column: fold k of a
    leave-one-centre-out split tests on centre k.

    `needed_for` names, in the error, the setting that reads the column.

    Raises:
      InputError: no such column, or a row without a centre.
    """
    header, rows = read_csv(path)
    _checked_centers(path, header, rows, needed_for)
    return sorted({r[CENTER_COLUMN].strip() for r in rows})


def path_centers(path: str, needed_for: str = "split='leave_one_center_out'") -> dict[str, str]:
    """{absolute image path: centre} of a manifest (paths resolved as `read_manifest` does).

    Raises:
      InputError: as `center_names`.
    """
    header, rows = read_csv(path)
    _checked_centers(path, header, rows, needed_for)
    return {resolve_path(path, r["path"]): r[CENTER_COLUMN].strip() for r in rows if (r.get("path") or "").strip()}


def centers(records: Records, needed_for: str = "split='leave_one_center_out'") -> np.ndarray:
    """The `center` of every record, read again from its manifest and matched by path."""
    by_path = path_centers(records.source, needed_for)
    return np.array([by_path[p] for p in records.paths])
