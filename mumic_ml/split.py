"""Deterministic multi-label train/val/test splits by iterative stratification.

A random split of long-tailed multi-label data leaves rare classes with no positive in val or test, or with all
of them there. Iterative stratification (Sechidis, Tsoumakas & Vlahavas, ECML PKDD 2011) instead deals out the
rows of the rarest remaining label first, each to the split that still wants most positives of that label, so
every class is spread in the requested proportions as far as its count allows.

Assignments are stable: an image keeps its split for life. When the collection grows, the images already in the
split files stay where they are (a corrected label travels with the image, not the image between splits) and only
the new images are dealt, stratified among themselves. So the test split never holds an image that an earlier model
trained on, and a champion and a challenger can be compared on it fairly.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mumic_ml.io import atomic_path, atomic_write_json
from mumic_ml.manifest import label_lists_as_strings

REQUIRED_COLUMNS = ("image_id", "labels", "sha256")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")


def _check_fractions(fractions: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    if not fractions:
        raise ValueError("fractions must name at least one split")
    names = list(fractions)
    for name in names:
        if not isinstance(name, str) or not _SPLIT_NAME.match(name):
            raise ValueError(f"split name {name!r} must be a plain file name (letters, digits, '_', '-', '.')")
    try:
        values = np.array([float(fractions[name]) for name in names])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fractions must be positive numbers, got {dict(fractions)}") from exc
    if not np.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"fractions must be positive numbers, got {dict(fractions)}")
    if abs(values.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {values.sum():.6g} from {dict(fractions)}")
    return names, values


def _check_label_matrix(label_matrix) -> np.ndarray:
    label_matrix = np.asarray(label_matrix)
    if label_matrix.ndim != 2:
        raise ValueError(f"label_matrix must be 2-D (rows x classes), got shape {label_matrix.shape}")
    if label_matrix.dtype.kind == "b":
        return label_matrix
    if label_matrix.dtype.kind not in "iuf" or not ((label_matrix == 0) | (label_matrix == 1)).all():
        raise ValueError("label_matrix must contain only 0/1")
    return label_matrix == 1


def _deal(wanted_for_label: np.ndarray, wanted_total: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Split index for each of `len(noise)` rows dealt one at a time; `wanted_total` is updated in place.

    Each row goes to the split that still wants most rows of the current label, then most rows overall, then the
    one with the largest random tie-break draw. Only these two k-vectors drive the choices, so the per-row loop
    runs on tiny Python lists and the rows' other labels are accounted for afterwards, in bulk.
    """
    for_label = wanted_for_label.tolist()
    total = wanted_total.tolist()
    choices = []
    splits = range(len(total))
    for draws in noise.tolist():
        best = max(splits, key=lambda m: (for_label[m], total[m], draws[m]))
        for_label[best] -= 1
        total[best] -= 1
        choices.append(best)
    wanted_total[:] = total
    return np.array(choices, dtype=np.intp)


def iterative_stratified_split(label_matrix: np.ndarray, fractions: Mapping[str, float], seed: int) -> np.ndarray:
    """Split name for every row of an N x C 0/1 label matrix, stratified per class in the given fractions.

    The seed shuffles the order in which rows are dealt and draws the tie-breaks, so the same matrix, fractions
    and seed always give the same split. Among labels with equally few remaining rows the lowest class index goes
    first. Rows without any label are dealt last, by the remaining wanted size of each split.
    """
    names, shares = _check_fractions(fractions)
    labels = _check_label_matrix(label_matrix)
    num_rows = labels.shape[0]
    rng = np.random.default_rng(seed)

    deal_order = rng.permutation(num_rows)
    labels = labels[deal_order]
    labels_by_class = np.ascontiguousarray(labels.T)
    wanted_total = num_rows * shares
    wanted_per_class = np.outer(shares, labels_by_class.sum(axis=1)).T.copy()
    remaining_per_class = labels_by_class.sum(axis=1)
    assigned = np.full(num_rows, -1, dtype=np.intp)

    while remaining_per_class.any():
        label = int(np.argmin(np.where(remaining_per_class > 0, remaining_per_class, np.iinfo(np.int64).max)))
        rows = np.flatnonzero(labels_by_class[label] & (assigned < 0))
        noise = rng.random((rows.size, len(names)))
        choices = _deal(wanted_per_class[label], wanted_total, noise)
        assigned[rows] = choices
        for split in range(len(names)):
            wanted_per_class[:, split] -= labels[rows[choices == split]].sum(axis=0)
        remaining_per_class -= labels[rows].sum(axis=0)

    unlabelled = np.flatnonzero(assigned < 0)
    noise = rng.random((unlabelled.size, len(names)))
    assigned[unlabelled] = _deal(wanted_total, wanted_total, noise)

    split_of_row = np.empty(num_rows, dtype=object)
    split_of_row[deal_order] = np.array(names, dtype=object)[assigned]
    return split_of_row


def _label_matrix(label_lists: Sequence, class_names: list[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(class_names)}
    matrix = np.zeros((len(label_lists), len(class_names)), dtype=bool)
    unknown: set[str] = set()
    for row, labels in enumerate(label_lists):
        for label in labels:
            if label in index:
                matrix[row, index[label]] = True
            else:
                unknown.add(label)
    if unknown:
        raise ValueError(f"labels not in the taxonomy: {sorted(unknown)}")
    return matrix


def _label_lists(column: pd.Series) -> list[list[str]]:
    """Parquet hands list columns back as numpy arrays (or None for a null); normalise them to lists of str."""
    lists = []
    for position, labels in enumerate(column):
        if labels is None:
            lists.append([])
        elif isinstance(labels, str) or not hasattr(labels, "__iter__"):
            raise ValueError(f"manifest row {position}: labels must be a list of str, got {labels!r}")
        else:
            lists.append([str(label) for label in labels])
    return lists


def previous_assignment(out_dir: str | os.PathLike, names: Sequence[str]) -> dict[str, str]:
    """The split of every image (by sha256) in the split files already in `out_dir`; empty when there are none.

    A partial set (say test.parquet deleted by hand) is an error: dealing its images afresh could move a test
    image into train, which is exactly the leak stable splits exist to prevent.
    """
    out_dir = Path(out_dir)
    present = [name for name in names if (out_dir / f"{name}.parquet").is_file()]
    if not present:
        return {}
    missing = [name for name in names if name not in present]
    if missing:
        raise ValueError(
            f"{out_dir} holds the split files {present} but not {missing}; restore them (`dvc checkout`) or "
            "re-deal every image with `mumic split --reassign`"
        )
    assignment: dict[str, str] = {}
    for name in names:
        for sha in pd.read_parquet(out_dir / f"{name}.parquet", columns=["sha256"])["sha256"]:
            if assignment.setdefault(sha, name) != name:
                raise ValueError(f"image {sha} is in both {assignment[sha]} and {name} in {out_dir}")
    return assignment


def split_manifest(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    fractions: Mapping[str, float],
    seed: int,
    taxonomy_names: Sequence[str] | None = None,
    *,
    reassign: bool = False,
) -> dict:
    """Write `OUT/<split>.parquet` for every split and `OUT/split_report.json`; return the report.

    Images already in OUT's split files keep their split; the others are dealt by iterative stratification among
    themselves with `seed`. `reassign` ignores the existing files and deals every image afresh (models trained
    before then are no longer comparable on the new test split; the evaluation gate refuses such comparisons).
    Each split file holds the manifest's rows for that split, with the same columns in the same order (negative
    and unknown labels, captions and every other column travel with their image; label columns stay list<string>
    even in a split where they are all empty), written atomically so a reader never sees half a split. Identical
    images (same sha256) in two splits would leak test data into training, so duplicate hashes are refused rather
    than split.
    """
    names, _ = _check_fractions(fractions)
    manifest = pd.read_parquet(manifest_path)
    missing = [column for column in REQUIRED_COLUMNS if column not in manifest.columns]
    if missing:
        raise ValueError(f"manifest {manifest_path} lacks columns {missing}")
    duplicated = manifest["sha256"][manifest["sha256"].duplicated(keep=False)]
    if not duplicated.empty:
        raise ValueError(f"manifest has duplicate sha256 values, would leak across splits: {sorted(set(duplicated))}")

    label_lists = _label_lists(manifest["labels"])
    if taxonomy_names is None:
        class_names = sorted({label for labels in label_lists for label in labels})
    else:
        class_names = list(taxonomy_names)
    labels = _label_matrix(label_lists, class_names)

    out_dir = Path(out_dir)
    assignment = {} if reassign else previous_assignment(out_dir, names)
    split_of_row = manifest["sha256"].map(assignment).to_numpy(dtype=object)
    is_new = pd.isna(split_of_row)
    if is_new.any():
        split_of_row[is_new] = iterative_stratified_split(labels[is_new], fractions, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    splits_report = {}
    # Every split file is written under a temporary name before any is renamed: a failure while writing one
    # leaves the previous set whole, never a new train split beside an old test split.
    with contextlib.ExitStack() as files:
        for name in names:
            tmp = files.enter_context(atomic_path(out_dir / f"{name}.parquet"))
            part = pa.Table.from_pandas(manifest[split_of_row == name], preserve_index=False)
            pq.write_table(label_lists_as_strings(part), tmp)
    for name in names:
        in_split = split_of_row == name
        positives = labels[in_split].sum(axis=0)
        splits_report[name] = {
            "n_images": int(in_split.sum()),
            "positives": {cls: int(count) for cls, count in zip(class_names, positives)},
        }
    report = {
        "seed": int(seed),
        "fractions": {name: float(fractions[name]) for name in names},
        "n_images": len(manifest),
        "classes": class_names,
        "splits": splits_report,
    }
    # The file describes the split files only, so rerunning on the same data rewrites it byte for byte; what this
    # run changed (which images were new) is returned, not stored.
    atomic_write_json(out_dir / "split_report.json", report)
    assignment = {
        "kept": int((~is_new).sum()),
        "new": int(is_new.sum()),
        "new_per_split": {name: int(((split_of_row == name) & is_new).sum()) for name in names},
        "dropped": len(set(assignment) - set(manifest["sha256"])),
        "reassigned": bool(reassign),
    }
    return {**report, "assignment": assignment}
