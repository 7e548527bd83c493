"""Open Images: human-verified image-level labels, the class descriptions, and a folder of `<ImageID>.jpg`.

The labels files (`*-human-imagelabels*.csv`: `ImageID,Source,LabelName,Confidence`) hold one row per image and
verified class: Confidence 1 means a person confirmed the class is in the image, 0 that a person confirmed it is
not. So Open Images, unlike most collections, has verified negatives: they become `negative_labels`. A class the
labels do not mention for an image was never checked there; the manifest contract reads it as absent, as for any
collection without negatives.

Classes are Freebase MIDs (`/m/0bt9lr`), named by the class descriptions file: `LabelName,DisplayName` rows, with
that header (v7) or without one (the boxable lists of v4 to v6). The taxonomy holds the classes the imported
images mention, by display name; two classes that share a display name keep their MID in brackets.

Users often download a subset of the images with the full labels file, so the labels of an image that is not in
the folder are not kept: the image is rejected as `missing_image` once, at the first row that names it. A row that
cannot be read (wrong number of fields, a missing column in the header) stops the import with its file and line; a
row with an unknown MID, a Confidence other than 0 or 1, or a class both confirmed and denied rejects its image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

from mumic_ml.importers.batch_folder import (
    DatasetImportError,
    ImageEntry,
    ImportResult,
    Rejection,
    check_out_dir,
    csv_records,
    locate_image,
    photo_taxonomy,
    rejection_for_problems,
    require,
    require_images_left,
    write_batch,
)
from mumic_ml.taxonomy import normalise_label

LABEL_COLUMNS = ("ImageID", "LabelName", "Confidence")
CLASS_HEADER = ("labelname", "displayname")
IMAGE_SUFFIX = ".jpg"
_CONFIDENCE = {"1": 1, "1.0": 1, "0": 0, "0.0": 0}


def import_openimages(
    labels: Sequence[str | Path], classes: str | Path, images: str | Path, out: str | Path
) -> ImportResult:
    """Write the images of the `labels` files found under `images` as a batch folder at `out`."""
    label_files, classes, images, out = [Path(p) for p in labels], Path(classes), Path(images), Path(out)
    for path in label_files:
        require(path, "Open Images labels file")
    require(classes, "Open Images class descriptions file")
    require(images, "images folder", folder=True)
    check_out_dir(out, [*label_files, classes, images])

    names = _class_names(classes)
    rejections: list[Rejection] = []
    entries: dict[str, ImageEntry] = {}
    verdicts: dict[str, dict[str, tuple[int, str]]] = defaultdict(dict)
    problems: dict[str, list[tuple[str, str]]] = defaultdict(list)
    missing: set[str] = set()
    for path in label_files:
        for image_id, mid, confidence, where in _label_rows(path):
            if image_id in missing:
                continue
            if image_id not in entries:
                file_name = image_id + IMAGE_SUFFIX
                found = locate_image(images, file_name)
                if isinstance(found, tuple):
                    missing.add(image_id)
                    rejections.append(Rejection(file_name, where, *found))
                    continue
                entries[image_id] = ImageEntry(image_id, file_name, where)
            verdict = _CONFIDENCE.get(confidence)
            if mid not in names:
                problems[image_id].append(("unknown_category", f"{where}: {mid} is not in {classes.name}"))
            elif verdict is None:
                problems[image_id].append(("malformed_entry", f"{where}: Confidence {confidence!r} is not 0 or 1"))
            else:
                earlier = verdicts[image_id].setdefault(mid, (verdict, where))
                if earlier[0] != verdict:
                    detail = f"{mid} ({names[mid]}) is {earlier[0]} at {earlier[1]} and {verdict} at {where}"
                    problems[image_id].append(("conflicting_labels", detail))

    kept = []
    for image_id, entry in entries.items():
        if image_id in problems:
            rejections.append(rejection_for_problems(entry, problems[image_id]))
        else:
            kept.append(entry)
    require_images_left(kept, rejections)
    used = sorted({mid for e in kept for mid in verdicts[e.original_id]}, key=lambda mid: (names[mid].lower(), mid))
    class_name = _unique_names(used, names)
    for entry in kept:
        for mid, (verdict, _) in verdicts[entry.original_id].items():
            (entry.labels if verdict == 1 else entry.negative_labels).add(class_name[mid])
    taxonomy = photo_taxonomy(class_name[mid] for mid in used)
    return write_batch(out, images, kept, rejections, taxonomy)


def _label_rows(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """(ImageID, LabelName, Confidence, where) for each row of a labels file; a broken row stops the import."""
    records = csv_records(path)
    first = next(records, None)
    if first is None:
        raise DatasetImportError(f"{path}: the file is empty; expected a header with {', '.join(LABEL_COLUMNS)}")
    _, header = first
    header = [name.strip() for name in header]
    missing = [name for name in LABEL_COLUMNS if name not in header]
    if missing:
        raise DatasetImportError(f"{path}: line 1: the header lacks {missing}; found {header}")
    positions = [header.index(name) for name in LABEL_COLUMNS]
    for line, fields in records:
        if len(fields) != len(header):
            raise DatasetImportError(f"{path}: line {line}: {len(fields)} fields, but the header has {len(header)}")
        image_id, mid, confidence = (fields[i].strip() for i in positions)
        if not image_id or not mid:
            raise DatasetImportError(f"{path}: line {line}: empty ImageID or LabelName")
        yield image_id, mid, confidence, f"{path.name} line {line}"


def _class_names(path: Path) -> dict[str, str]:
    """MID -> display name, from a class descriptions file with or without its `LabelName,DisplayName` header."""
    names: dict[str, str] = {}
    for line, fields in csv_records(path):
        if not names and tuple(f.strip().lower() for f in fields) == CLASS_HEADER:
            continue
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise DatasetImportError(f"{path}: line {line}: expected 'LabelName,DisplayName', got {fields}")
        mid, name = fields[0].strip(), fields[1].strip()
        if names.setdefault(mid, name) != name:
            raise DatasetImportError(f"{path}: line {line}: {mid} is both {names[mid]!r} and {name!r}")
    if not names:
        raise DatasetImportError(f"{path}: no class descriptions")
    return names


def _unique_names(mids: list[str], names: dict[str, str]) -> dict[str, str]:
    """The class name of each MID: its display name, with the MID added where two classes share a display name."""
    uses = Counter(normalise_label(names[mid]) for mid in mids)
    return {mid: names[mid] if uses[normalise_label(names[mid])] == 1 else f"{names[mid]} ({mid})" for mid in mids}
