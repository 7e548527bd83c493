"""Writing an imported dataset as a batch folder, and the reading helpers every importer shares.

The folder is what `mumic ingest` takes as an incoming batch, self-contained so that it can move or be versioned:

    BATCH_DIR/
      images/...          the dataset's images under their own relative names, hard-linked where the file system
                          allows (no copy of a large benchmark), copied otherwise; never symlinked, because ingest
                          refuses links that leave the batch
      taxonomy.yaml       the dataset's class names with photo prompt templates (point `paths.taxonomy` at it)
      rejected.csv        `source`, `location`, `reason` (a code from REASONS), `detail` for every image of the
                          annotations that was left out, and every annotation that names no listed image
      manifest.parquet    `path`, `labels`, `negative_labels`, `unknown_labels` (lists of class names),
                          `original_id` (the dataset's own image id), and `caption` where the dataset has them

The folder is built under a staging name beside BATCH_DIR (a dot name, which batch discovery skips) with the
manifest written last, and swapped in whole: a watcher never sees half a batch, and a failed import leaves the
previous version in place.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mumic_ml.batches import MANIFEST_NAMES
from mumic_ml.ingest import relative_path_problem
from mumic_ml.io import atomic_directory, atomic_path
from mumic_ml.manifest import LABEL_LIST_TYPE
from mumic_ml.taxonomy import ClassSpec, Taxonomy, normalise_label, save_taxonomy

IMAGES_DIR = "images"
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.csv"
TAXONOMY_FILE = "taxonomy.yaml"
# The benchmarks are photos of objects; CLIP's own zero-shot prompts for them start like this.
PHOTO_PROMPTS = ("a photo of a {}.", "a photo of the {}.")
# How many rejections the error quotes when no image at all can be imported, and problems an image's rejection.
EXAMPLES_IN_ERROR = 3

REASONS = {
    "missing_image": "the annotations name an image file that is not in the images folder",
    "invalid_path": "the image's file name is absolute, empty or climbs out of the images folder",
    "duplicate_image_id": "another entry has the same image id (COCO: all such entries are left out, their "
    "annotations cannot be told apart; VOC image sets: the repeated line is left out)",
    "duplicate_file": "an earlier image entry names the same file",
    "unknown_category": "an annotation names a class id that the dataset's class list does not define",
    "unknown_image": "an annotation names an image id that the dataset does not list",
    "malformed_entry": "an entry lacks a field, or a field has the wrong type or value",
    "missing_annotation": "the image set lists an image that has no annotation file",
    "no_annotations": "the image has no annotation at all",
    "conflicting_labels": "the same class is marked both present and absent",
}


class DatasetImportError(ValueError):
    """The import cannot run at all: an unreadable annotation file (named, with the position where known), or an
    output folder the import must not replace."""


@dataclass
class ImageEntry:
    """One image as the dataset describes it; label sets hold class names of the batch's taxonomy."""

    original_id: str
    file_name: str  # relative to the images folder, as the dataset writes it
    location: str  # where the dataset describes the image, for rejections
    labels: set[str] = field(default_factory=set)
    negative_labels: set[str] = field(default_factory=set)
    unknown_labels: set[str] = field(default_factory=set)
    caption: str | None = None


@dataclass(frozen=True)
class Rejection:
    source: str  # the image (or annotation) as the dataset names it
    location: str  # file and position in the annotations
    reason: str  # a key of REASONS
    detail: str


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    manifest_path: Path
    taxonomy_path: Path
    rejected_path: Path
    n_images: int
    n_classes: int
    # Images written with no present class (only negative or unknown ones): ingest keeps them, but the validation
    # suite's `labels_per_image` counts present classes only, see docs/architecture.md.
    n_without_positives: int
    rejected_by_reason: dict[str, int]

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())


def check_out_dir(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output folder whose replacement would destroy something: the dataset itself, or a folder that is
    not a batch (the import swaps the whole folder, so `--out data/incoming` would replace every batch)."""
    out_real = Path(os.path.realpath(out))
    for path in inputs:
        if Path(os.path.realpath(path)).is_relative_to(out_real):
            raise DatasetImportError(f"the output folder {out} holds the input {path}; write the batch elsewhere")
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetImportError(f"{out} exists and is not a folder")
    if any(out.iterdir()) and not any((out / name).is_file() for name in MANIFEST_NAMES):
        raise DatasetImportError(f"{out} exists and is not a batch (no manifest); choose an empty or new folder")


def require(path: Path, what: str, *, folder: bool = False) -> None:
    """Stop with an error naming the input when the file (or folder) the import needs is not there."""
    if not (path.is_dir() if folder else path.is_file()):
        raise DatasetImportError(f"{what} not found: {path}")


def read_json(path: Path) -> Any:
    """The parsed file; a syntax or encoding error names the file, line and column."""
    data = path.read_bytes()
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise DatasetImportError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} (character {exc.pos})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise DatasetImportError(f"{path}: not UTF-8 text: invalid byte at byte offset {exc.start}") from exc


def csv_records(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank record, streamed (label files run to gigabytes); a syntax or
    encoding error names the file and line."""
    with open(path, "rb") as fh:
        reader = csv.reader(_utf8_lines(path, fh), strict=True)
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DatasetImportError(f"{path}: line {line}: not valid CSV: {exc}") from exc
            if any(value.strip() for value in fields):
                yield line, fields


def _utf8_lines(path: Path, lines: Iterable[bytes]) -> Iterator[str]:
    """Decoded line by line (not by the buffer), so an invalid byte is reported at its line and offset."""
    offset = 0
    for number, raw in enumerate(lines, start=1):
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetImportError(
                f"{path}: line {number}: not UTF-8 text: invalid byte at byte offset {offset + exc.start}"
            ) from exc
        offset += len(raw)


def photo_taxonomy(names: Iterable[str], spoken: Mapping[str, str] | None = None) -> Taxonomy:
    """The dataset's classes in the order given, with photo prompts.

    `spoken` gives a class whose dataset name is not how one would say it (Pascal VOC's `diningtable`) prompts
    made from the spoken form, so the text tower reads words, while labels keep the dataset's spelling.
    """
    spoken = spoken or {}
    specs: dict[str, ClassSpec] = {}
    for name in names:
        words = spoken.get(name)
        prompts = tuple(template.format(words) for template in PHOTO_PROMPTS) if words else ()
        specs.setdefault(normalise_label(name), ClassSpec(name, prompts))
    if not specs:
        raise DatasetImportError("the dataset defines no class, so there is nothing to label")
    return Taxonomy(tuple(specs.values()), PHOTO_PROMPTS)


def rejection_for_problems(entry: ImageEntry, problems: list[tuple[str, str]]) -> Rejection:
    """One rejection for an image with (reason, detail) problems in its annotations: importing the rest of its
    labels would record the classes of the broken annotations as absent."""
    quoted = "; ".join(detail for _, detail in problems[:EXAMPLES_IN_ERROR])
    more = len(problems) - EXAMPLES_IN_ERROR
    detail = quoted + (f"; and {more} more" if more > 0 else "") + " (its labels would be incomplete)"
    return Rejection(entry.file_name, entry.location, problems[0][0], detail)


def require_images_left(kept: list, rejections: list[Rejection]) -> None:
    """Stop, with the reasons, when every image was left out, rather than write a batch that ingest refuses."""
    if not kept:
        by_reason = dict(Counter(r.reason for r in rejections).most_common())
        examples = "; ".join(f"{r.location}: {r.detail}" for r in rejections[:EXAMPLES_IN_ERROR])
        raise DatasetImportError(f"no image could be imported ({by_reason}); for example {examples}")


def locate_image(images_dir: Path, file_name: str) -> Path | tuple[str, str]:
    """The image file a dataset entry names, or (reason, detail) when it names none safely."""
    problem = relative_path_problem(file_name)
    if problem is not None:
        return "invalid_path", problem[1]
    relative = posixpath.normpath(file_name)
    path = images_dir / relative
    if not path.is_file():
        return "missing_image", f"no file {relative} in {images_dir}"
    return path


def write_batch(
    out: Path,
    images_dir: Path,
    entries: Iterable[ImageEntry],
    rejections: list[Rejection],
    taxonomy: Taxonomy,
    *,
    with_captions: bool = False,
) -> ImportResult:
    """Find every entry's image, then write the batch folder whole (see the module docstring)."""
    kept: list[tuple[ImageEntry, Path, str]] = []
    claimed_by: dict[str, str] = {}
    for entry in entries:
        found = locate_image(images_dir, entry.file_name)
        if isinstance(found, tuple):
            rejections.append(Rejection(entry.file_name, entry.location, *found))
            continue
        relative = posixpath.normpath(entry.file_name)
        if relative in claimed_by:
            detail = f"{claimed_by[relative]} already names {relative}"
            rejections.append(Rejection(entry.file_name, entry.location, "duplicate_file", detail))
            continue
        claimed_by[relative] = entry.location
        kept.append((entry, found, relative))
    require_images_left(kept, rejections)

    with atomic_directory(out) as staging:
        staging.chmod(0o755)  # created private; a batch is ordinary shared data
        for _, source, relative in kept:
            _place(source, staging / IMAGES_DIR / relative)
        save_taxonomy(taxonomy, staging / TAXONOMY_FILE)
        _write_rejected(rejections, staging / REJECTED_FILE)
        _write_manifest(kept, taxonomy, with_captions, staging / MANIFEST_FILE)
    return ImportResult(
        out_dir=out,
        manifest_path=out / MANIFEST_FILE,
        taxonomy_path=out / TAXONOMY_FILE,
        rejected_path=out / REJECTED_FILE,
        n_images=len(kept),
        n_classes=len(taxonomy),
        n_without_positives=sum(not entry.labels for entry, _, _ in kept),
        rejected_by_reason=dict(Counter(r.reason for r in rejections).most_common()),
    )


def _place(source: Path, target: Path) -> None:
    """Hard-link the image into the batch, or copy it where a link is impossible (another file system)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(os.path.realpath(source), target)
    except OSError:
        shutil.copyfile(source, target)


def _write_rejected(rejections: list[Rejection], target: Path) -> None:
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["source", "location", "reason", "detail"])
        writer.writerows([r.source, r.location, r.reason, r.detail] for r in rejections)


def _write_manifest(
    kept: list[tuple[ImageEntry, Path, str]], taxonomy: Taxonomy, with_captions: bool, target: Path
) -> None:
    def ordered(names: set[str]) -> list[str]:
        return sorted({taxonomy.classes[taxonomy.index_of(name)].name for name in names}, key=taxonomy.index_of)

    entries = [entry for entry, _, _ in kept]
    columns = {
        "path": pa.array([f"{IMAGES_DIR}/{relative}" for _, _, relative in kept], pa.string()),
        "labels": pa.array([ordered(e.labels) for e in entries], LABEL_LIST_TYPE),
        "negative_labels": pa.array([ordered(e.negative_labels) for e in entries], LABEL_LIST_TYPE),
        "unknown_labels": pa.array([ordered(e.unknown_labels) for e in entries], LABEL_LIST_TYPE),
        "original_id": pa.array([e.original_id for e in entries], pa.string()),
    }
    if with_captions:
        columns["caption"] = pa.array([e.caption for e in entries], pa.string())
    with atomic_path(target) as tmp:
        pq.write_table(pa.table(columns), tmp)
