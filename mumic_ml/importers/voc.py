"""Pascal VOC: `ImageSets/Main/<image-set>.txt`, `Annotations/<id>.xml` and `JPEGImages/` under one root.

Image-level labels come from the `<object>`s of each image's annotation. VOC marks an object `difficult` when it
is hard to recognise and leaves it out of its own evaluation; a class whose only instances in an image are
difficult is therefore neither present nor absent there, and is written as an unknown label. Classes without any
object in the image are absent (VOC annotates every instance of its twenty classes).

A file that is not well-formed XML stops the import with its path, line and column: a broken annotation means a
damaged download, and importing around it would give a different benchmark than the one named. An annotation that
parses but lacks what VOC always has (an object's name, a 0/1 `difficult`) rejects only its image. Documents with a
DTD are refused outright: VOC has none, and refusing them rules out entity-expansion tricks.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from mumic_ml.importers.batch_folder import (
    DatasetImportError,
    ImageEntry,
    ImportResult,
    Rejection,
    check_out_dir,
    locate_image,
    photo_taxonomy,
    require,
    require_images_left,
    write_batch,
)

# VOC's class names that run words together; prompts use the spoken form, labels keep VOC's spelling.
SPOKEN_NAMES = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}
_IMAGE_ID = re.compile(r"[A-Za-z0-9_.-]+")


def import_voc(root: str | Path, image_set: str, out: str | Path) -> ImportResult:
    """Write the images that `ImageSets/Main/<image_set>.txt` lists under `root` as a batch folder at `out`."""
    root, out = Path(root), Path(out)
    require(root, "VOC root (the folder with Annotations, ImageSets and JPEGImages)", folder=True)
    set_file = _image_set_file(root, image_set)
    check_out_dir(out, [root])

    images = root / "JPEGImages"
    rejections: list[Rejection] = []
    entries: list[ImageEntry] = []
    for image_id, where in _listed_ids(set_file, rejections):
        annotation = root / "Annotations" / f"{image_id}.xml"
        if not annotation.is_file():
            detail = f"no annotation file Annotations/{image_id}.xml"
            rejections.append(Rejection(image_id, where, "missing_annotation", detail))
            continue
        outcome = _read_annotation(annotation, image_id)
        if isinstance(outcome, Rejection):
            rejections.append(outcome)
            continue
        # Looked for here, not only when writing: the taxonomy holds the classes of the images imported.
        found = locate_image(images, outcome.file_name)
        if isinstance(found, tuple):
            rejections.append(Rejection(outcome.file_name, outcome.location, *found))
        else:
            entries.append(outcome)
    require_images_left(entries, rejections)
    names = sorted({name for entry in entries for name in entry.labels | entry.unknown_labels})
    taxonomy = photo_taxonomy(names, SPOKEN_NAMES)
    return write_batch(out, images, entries, rejections, taxonomy)


def _image_set_file(root: Path, image_set: str) -> Path:
    folder = root / "ImageSets" / "Main"
    path = folder / f"{image_set}.txt"
    if not _IMAGE_ID.fullmatch(image_set) or not path.is_file():
        # Per-class lists (dog_trainval.txt) sit beside the image sets; name only the sets.
        sets = sorted(p.stem for p in folder.glob("*.txt") if "_" not in p.stem) if folder.is_dir() else []
        raise DatasetImportError(f"image set {image_set!r} not found: no {path} (image sets there: {sets})")
    return path


def _listed_ids(set_file: Path, rejections: list[Rejection]) -> list[tuple[str, str]]:
    """(image id, where it is listed) for each line of the image set; a repeated id is rejected, the first kept."""
    listed: dict[str, str] = {}
    location = f"ImageSets/Main/{set_file.name}"
    try:
        text = set_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetImportError(f"{set_file}: not UTF-8 text: invalid byte at byte offset {exc.start}") from exc
    for line_no, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        image_id, where = words[0], f"{location} line {line_no}"
        if not _IMAGE_ID.fullmatch(image_id):
            rejections.append(Rejection(image_id, where, "malformed_entry", "an image id is a plain file name"))
        elif image_id in listed:
            detail = f"{image_id} is already listed at {listed[image_id]}; the repeat is left out"
            rejections.append(Rejection(image_id, where, "duplicate_image_id", detail))
        else:
            listed[image_id] = where
    return [(image_id, where) for image_id, where in listed.items()]


def _read_annotation(path: Path, image_id: str) -> ImageEntry | Rejection:
    """The image's file name and labels, or why the annotation cannot label it; unreadable XML is an error."""
    where = f"Annotations/{path.name}"
    data = path.read_bytes()
    if b"<!DOCTYPE" in data:
        raise DatasetImportError(f"{path}: declares a DTD (<!DOCTYPE>); VOC annotations have none, so it is refused")
    try:
        annotation = ET.fromstring(data)
    except ET.ParseError as exc:
        line, column = exc.position
        problem = str(exc).split(": line")[0]
        raise DatasetImportError(f"{path}: not well-formed XML: {problem} at line {line}, column {column + 1}") from exc
    if annotation.tag != "annotation":
        detail = f"the root element is <{annotation.tag}>, not <annotation>"
        return Rejection(image_id, where, "malformed_entry", detail)
    file_name = (annotation.findtext("filename") or "").strip() or f"{image_id}.jpg"
    entry = ImageEntry(image_id, file_name, where)
    objects = annotation.findall("object")
    if not objects:
        return Rejection(file_name, where, "no_annotations", "the annotation has no <object>")
    only_difficult: set[str] = set()
    for number, obj in enumerate(objects, start=1):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip()
        if not name:
            return Rejection(file_name, where, "malformed_entry", f"<object> #{number} has no <name>")
        if difficult not in ("0", "1"):
            detail = f"<object> #{number} ({name}) has <difficult>{difficult}</difficult>, not 0 or 1"
            return Rejection(file_name, where, "malformed_entry", detail)
        (only_difficult if difficult == "1" else entry.labels).add(name)
    entry.unknown_labels = only_difficult - entry.labels
    return entry
