"""The ingest step (`raw_images`): turn a folder of untrusted images and a manifest into a clean dataset.

Output layout, all under OUT:

- `images/<sha256>.png`: every accepted image, decoded, converted to RGB, downscaled to `max_side` and stored as
  PNG under its content hash. Same picture, same file: rerunning is idempotent and duplicates cost nothing.
- `rejected.csv`: `row`, `source`, `reason` (a code from REASONS), `detail` (words) for every manifest row that
  was left out.
- `manifest.parquet`: one row per accepted image: `image_id` (first 16 hex digits of `sha256`), `source` (the
  manifest's path as given), `path` (the stored image, POSIX and RELATIVE TO OUT, e.g. `images/ab12...png`),
  `sha256` (of the normalised pixels, see images.sha256_of_image), `labels` (list<string>), `width`, `height`,
  `row` (the manifest row it came from, numbered as in `rejected.csv`), then `negative_labels` and `unknown_labels`
  (list<string>) when the manifest has them, then the manifest's extra columns. Written last: it is the commit
  point. All three label columns are checked against the taxonomy and stored in its spelling and order; a label
  in two of them is a contradiction and rejects the row.

Every output file is written to a temporary name and renamed, so a killed run leaves the previous complete output
readable; `rejected.csv` is replaced just before `manifest.parquet`.
"""

from __future__ import annotations

import csv
import difflib
import errno
import functools
import logging
import multiprocessing
import os
import posixpath
import re
import stat
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mumic_ml.images import ImageRejected, decode_image, normalise_image, sha256_of_image
from mumic_ml.io import atomic_path
from mumic_ml.manifest import LABEL_COLUMNS, LABEL_LIST_TYPE, QUALIFIED_LABEL_COLUMNS, ManifestError, read_manifest
from mumic_ml.taxonomy import Taxonomy, normalise_label

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.csv"
# zlib level for stored PNGs: level 1 is several times faster than the default 6 for a few percent more bytes.
PNG_COMPRESS_LEVEL = 1

REASONS = {
    "malformed_row": "the manifest row itself is broken (see detail)",
    "invalid_path": "the path cannot name a file (for example it contains a NUL byte)",
    "absolute_path": "paths must be relative to the images root",
    "path_traversal": "the path climbs out of the images root with '..'",
    "outside_root": "the path resolves, through symlinks, to a file outside the images root",
    "missing_file": "no file at the path",
    "broken_symlink": "the path is a symlink whose target does not exist",
    "not_a_file": "the path names a directory or a special file",
    "unreadable": "the file exists but cannot be opened (permissions)",
    "empty_file": "the file has zero bytes",
    "not_an_image": "the content is not an image in an accepted format",
    "truncated": "the image data ends early",
    "decode_error": "the image is corrupt",
    "decompression_bomb": "the declared pixel count exceeds the limit",
    "too_small": "a side is shorter than min_side",
    "no_labels": "the row names no class at all (no positive, negative or unknown label)",
    "unknown_label": "a label is not in the taxonomy",
    "conflicting_labels": "a label is in more than one of labels, negative_labels and unknown_labels",
    "duplicate_path": "an earlier row already names the same file",
    "duplicate_image": "an earlier accepted row has the same picture (same content hash)",
    "not_in_collection": "a correction batch relabels a picture that no batch holds",
}

_OUTPUT_COLUMNS = ("image_id", "source", "path", "sha256", *LABEL_COLUMNS, "width", "height", "row")
# The columns every accepted row has; downstream readers and tests build manifests against this schema.
MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
# Written after the schema's columns, not part of it: provenance that manifests built by hand need not carry.
_ROW_FIELD = pa.field("row", pa.int64())
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_STORED_IMAGE = re.compile(r"(\.)?[0-9a-f]{64}\.png(\..*\.tmp)?")


@dataclass(frozen=True)
class IngestResult:
    n_rows: int
    n_accepted: int
    n_rejected: int
    rejected_by_reason: dict[str, int]
    manifest_path: Path
    rejected_path: Path
    images_dir: Path


@dataclass
class _Row:
    """One manifest row on its way through the checks; `reason` set means rejected."""

    row: int
    source: str | None
    labels: list[str] = field(default_factory=list)
    # negative_labels / unknown_labels, for the columns the manifest has.
    qualified_labels: dict[str, list[str]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    same_file_as: _Row | None = None
    reason: str | None = None
    detail: str = ""
    sha256: str | None = None
    width: int = 0
    height: int = 0

    def reject(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def ingest(
    manifest_path: str | os.PathLike,
    images_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    taxonomy: Taxonomy | None = None,
    max_side: int = 512,
    min_side: int = 16,
    max_pixels: int = 50_000_000,
    workers: int = 0,
) -> IngestResult:
    """Check, decode and store every image of the manifest; see the module docstring for the outputs.

    Raises ManifestError only when the batch cannot be processed at all (manifest missing, unreadable or empty,
    images root missing). Bad rows are rejected one by one with a reason; if all are rejected the outputs are
    still written. `workers` > 0 decodes in that many processes; output order is manifest order either way.
    """
    root = Path(images_root)
    if not root.is_dir():
        raise ManifestError(f"images root is not a directory: {root}")
    root_real = Path(os.path.realpath(root))
    frame = read_manifest(manifest_path)
    label_columns = [c for c in LABEL_COLUMNS if c in frame.columns]
    extra_columns = [c for c in frame.columns if c not in ("row", "source", "error", *label_columns)]
    clashes = [c for c in extra_columns if c in _OUTPUT_COLUMNS]
    if clashes:
        raise ManifestError(f"{manifest_path}: column(s) {clashes} clash with ingest's output columns; rename them")

    rows = [
        _check_row(record, root_real, taxonomy, label_columns, extra_columns) for record in frame.to_dict("records")
    ]
    _mark_duplicate_paths(rows)

    out = Path(out_dir)
    images_dir = out / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    pending = [r for r in rows if r.reason is None and r.same_file_as is None]
    store = functools.partial(
        _store_image, images_dir=str(images_dir), max_pixels=max_pixels, min_side=min_side, max_side=max_side
    )
    for r, outcome in zip(pending, _map(store, [r.file for r in pending], workers)):
        if isinstance(outcome, ImageRejected):
            r.reject(outcome.reason, str(outcome))
        else:
            r.sha256, r.width, r.height = outcome
    _resolve_duplicates(rows)

    accepted = [r for r in rows if r.reason is None]
    rejected = [r for r in rows if r.reason is not None]
    manifest_file, rejected_file = out / MANIFEST_FILE, out / REJECTED_FILE
    _write_rejected(rejected, rejected_file)
    qualified_columns = [c for c in QUALIFIED_LABEL_COLUMNS if c in label_columns]
    _write_manifest(accepted, qualified_columns, extra_columns, manifest_file)
    _prune_images(images_dir, {r.sha256 for r in accepted})

    by_reason = dict(Counter(r.reason for r in rejected).most_common())
    log.info("ingest: %d rows, %d accepted, %d rejected %s", len(rows), len(accepted), len(rejected), by_reason)
    return IngestResult(len(rows), len(accepted), len(rejected), by_reason, manifest_file, rejected_file, images_dir)


def _check_row(
    record: dict[str, Any], root_real: Path, taxonomy: Taxonomy | None, label_columns: list[str], extras: list[str]
) -> _Row:
    """The checks that need no decoding: manifest errors, path safety, file existence, labels."""
    source = record["source"]
    row = _Row(int(record["row"]), source, extras={c: record[c] for c in extras})
    if record["error"] is not None:
        row.reject("malformed_row", record["error"])
        return row
    problem = _locate(source, root_real)
    if isinstance(problem, tuple):
        row.reject(*problem)
        return row
    row.file = problem
    labels = _canonical_label_columns({c: record[c] for c in label_columns}, taxonomy)
    if isinstance(labels, tuple):
        row.reject(*labels)
    else:
        row.labels = labels.pop("labels")
        row.qualified_labels = labels
    return row


def relative_path_problem(path: str) -> tuple[str, str] | None:
    """(reason, detail) when a path from a manifest or a dataset's annotations cannot name a file inside the images
    root, judged from the text alone (no disk access); None when it can. Ingest and the importers share it."""
    if not path or "\x00" in path:
        return "invalid_path", f"path is empty or contains a NUL byte: {path!r}"
    if path.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(path):
        return "absolute_path", f"path must be relative to the images root: {path!r}"
    relative = posixpath.normpath(path)
    if relative == ".." or relative.startswith("../"):
        return "path_traversal", f"path climbs out of the images root: {path!r}"
    return None


def _locate(source: str, root_real: Path) -> str | tuple[str, str]:
    """The real path of a manifest path inside the images root, or (reason, detail) saying why there is none."""
    problem = relative_path_problem(source)
    if problem is not None:
        return problem
    candidate = root_real / posixpath.normpath(source)
    if not os.path.lexists(candidate):
        return "missing_file", f"no such file under the images root: {source!r}"
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(root_real):
        return "outside_root", f"{source!r} resolves to {real}, outside the images root {root_real}"
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return "broken_symlink", f"{source!r} is a symlink to a missing target"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "broken_symlink", f"{source!r} is a symlink loop"
        return "unreadable", f"cannot stat {source!r}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return "not_a_file", f"{source!r} is not a regular file"
    return str(real)


def _canonical_label_columns(
    columns: dict[str, list[str]], taxonomy: Taxonomy | None
) -> dict[str, list[str]] | tuple[str, str]:
    """Each label column de-duplicated, in canonical spelling and taxonomy order, or (reason, detail) when unusable.

    Without a taxonomy there is no canonical spelling: labels equal up to case and whitespace keep the first
    spelling, in manifest order. A row must name at least one class in some column, and no class in two.
    """
    if not any(columns.values()):
        return "no_labels", "the row has no labels"
    unknown = []
    canonical: dict[str, list[str]] = {}
    for column, labels in columns.items():
        if taxonomy is None:
            unique: dict[str, str] = {}
            for label in labels:
                unique.setdefault(normalise_label(label), label)
            canonical[column] = list(unique.values())
            continue
        names = {label: taxonomy.canonical(label) for label in labels}
        where = "" if column == "labels" else f" (in {column})"
        unknown += [_with_hint(label, taxonomy) + where for label, name in names.items() if name is None]
        canonical[column] = sorted({name for name in names.values() if name is not None}, key=taxonomy.index_of)
    if unknown:
        return "unknown_label", "not in the taxonomy: " + ", ".join(unknown)
    column_of: dict[str, str] = {}
    for column, labels in canonical.items():
        for label in labels:
            first = column_of.setdefault(normalise_label(label), column)
            if first != column:
                return "conflicting_labels", f"{label!r} is in both {first} and {column}"
    return canonical


def _with_hint(label: str, taxonomy: Taxonomy) -> str:
    close = difflib.get_close_matches(normalise_label(label), [normalise_label(n) for n in taxonomy.names], n=1)
    return f"{label!r} (did you mean {taxonomy.canonical(close[0])!r}?)" if close else repr(label)


def _mark_duplicate_paths(rows: list[_Row]) -> None:
    """Link each later row naming an already claimed file to the first row that claimed it."""
    first_by_file: dict[str, _Row] = {}
    for row in rows:
        if row.reason is None and row.file is not None:
            first = first_by_file.setdefault(row.file, row)
            if first is not row:
                row.same_file_as = first


def _resolve_duplicates(rows: list[_Row]) -> None:
    """Reject repeated files and repeated pictures, keeping the first occurrence in manifest order."""
    first_by_hash: dict[str, _Row] = {}
    for row in rows:
        first = row.same_file_as
        if first is not None:
            if first.sha256 is None:
                row.reject(first.reason, first.detail)
            else:
                row.reject("duplicate_path", f"same file as row {first.row} ({first.source!r})")
        elif row.reason is None and row.sha256 is not None:
            kept = first_by_hash.setdefault(row.sha256, row)
            if kept is not row:
                row.reject("duplicate_image", f"same picture as row {kept.row} ({kept.source!r})")


def _store_image(
    file: str, *, images_dir: str, max_pixels: int, min_side: int, max_side: int
) -> tuple[str, int, int] | ImageRejected:
    """Decode, normalise and store one image under its content hash; runs in worker processes."""
    try:
        decoded = decode_image(file, max_pixels=max_pixels, min_side=min_side, draft_side=max_side)
        img = normalise_image(decoded, max_side=max_side)
    except ImageRejected as exc:
        return exc
    sha = sha256_of_image(img)
    target = Path(images_dir) / f"{sha}.png"
    if not target.is_file():
        _write_png(img, target)
    return sha, img.width, img.height


def _write_png(img: Image.Image, target: Path) -> None:
    """Write under a temporary name, then rename: a killed run never leaves a partial file under a final name.

    Unlike the manifest, images are not fsynced one by one: on slow disks that would cost more than decoding
    them, and a killed process (not a power cut) is the failure this guards against.
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _map(fn: functools.partial, items: list[str], workers: int) -> list[Any]:
    if workers <= 0 or len(items) < 2:
        return [fn(item) for item in items]
    # spawn, not fork: the caller may hold threads (torch, Dagster) whose locks a forked child would inherit.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (workers * 8))))


def _write_rejected(rows: list[_Row], target: Path) -> None:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "source", "reason", "detail"])
        writer.writerows([r.row, r.source, r.reason, r.detail] for r in rows)


def _write_manifest(rows: list[_Row], qualified_columns: list[str], extra_columns: list[str], target: Path) -> None:
    data = {
        "image_id": [r.sha256[:16] for r in rows],
        "source": [r.source for r in rows],
        "path": [f"{IMAGES_DIR}/{r.sha256}.png" for r in rows],
        "sha256": [r.sha256 for r in rows],
        "labels": [r.labels for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
    }
    arrays = [pa.array(data[f.name], type=f.type) for f in MANIFEST_SCHEMA]
    arrays.append(pa.array([r.row for r in rows], type=_ROW_FIELD.type))
    fields = [*MANIFEST_SCHEMA, _ROW_FIELD]
    for name in qualified_columns:
        arrays.append(pa.array([r.qualified_labels[name] for r in rows], type=LABEL_LIST_TYPE))
        fields.append(pa.field(name, LABEL_LIST_TYPE))
    for name in extra_columns:
        values = [r.extras[name] for r in rows]
        array = _extra_array(values)
        arrays.append(array)
        fields.append(pa.field(name, array.type))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def _extra_array(values: list[Any]) -> pa.Array:
    """Text columns stay strings even when empty or all null, so the schema does not depend on the batch."""
    if all(v is None or isinstance(v, str) for v in values):
        return pa.array(values, type=pa.string())
    return pa.array(values)


def _prune_images(images_dir: Path, keep: set[str | None]) -> None:
    """Remove stored images the committed manifest no longer references, so OUT matches it exactly."""
    for entry in images_dir.iterdir():
        match = _STORED_IMAGE.fullmatch(entry.name)
        if match and (match.group(1) or entry.name[:64] not in keep):
            entry.unlink(missing_ok=True)
