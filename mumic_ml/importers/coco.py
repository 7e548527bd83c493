"""COCO: an instances file (`instances_*.json`), optionally a captions file (`captions_*.json`), and the images.

Image-level labels are the category names of an image's object annotations (crowd regions included: they are
instances of the category too). COCO annotates every instance of its categories, so an image without any
annotation shows none of them; it is left out unless `keep_unlabelled`, and then imported with every category as a
verified negative, which says "checked, nothing there" where an empty `labels` alone would read as a forgotten
annotation (ingest rejects a row that names no class at all).

Captions: COCO has about five per image; the first one listed becomes the `caption` column, which the demo
foundation's pretraining reads.

A file that is not valid JSON, or lacks the `images`, `annotations` or `categories` list, stops the import; so
does a broken category list, since every label depends on it. A broken image or annotation entry rejects only its
image. Two image entries with the same id are both rejected (`duplicate_image_id`): their annotations cannot be
told apart, so either image could get the other's labels.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from mumic_ml.importers.batch_folder import (
    DatasetImportError,
    ImageEntry,
    ImportResult,
    Rejection,
    check_out_dir,
    photo_taxonomy,
    read_json,
    rejection_for_problems,
    require,
    write_batch,
)


def import_coco(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    captions: str | Path | None = None,
    keep_unlabelled: bool = False,
) -> ImportResult:
    """Write the COCO images of `annotations` found under `images` as a batch folder at `out`."""
    annotations, images, out = Path(annotations), Path(images), Path(out)
    captions = Path(captions) if captions is not None else None
    require(annotations, "COCO annotations file")
    require(images, "images folder", folder=True)
    if captions is not None:
        require(captions, "COCO captions file")
    check_out_dir(out, [annotations, images, *([captions] if captions else [])])

    data = read_json(annotations)
    lists = _top_level_lists(annotations, data, ("images", "annotations", "categories"), "instances")
    categories = _categories(annotations, lists["categories"])
    taxonomy = photo_taxonomy(categories.values())
    rejections: list[Rejection] = []
    entries = _images(annotations.name, lists["images"], rejections)
    problems = _annotate(annotations.name, lists["annotations"], entries, categories, rejections)

    kept: list[ImageEntry] = []
    for image_id, entry in entries.items():
        if entry is None:
            continue
        if image_id in problems:
            rejections.append(rejection_for_problems(entry, problems[image_id]))
        elif entry.labels:
            kept.append(entry)
        elif keep_unlabelled:
            entry.negative_labels = set(taxonomy.names)
            kept.append(entry)
        else:
            detail = "the image has no annotation (import with --keep-unlabelled to keep it as a negative)"
            rejections.append(Rejection(entry.file_name, entry.location, "no_annotations", detail))
    if captions is not None:
        _add_captions(captions, annotations, {int(e.original_id): e for e in kept})
    return write_batch(out, images, kept, rejections, taxonomy, with_captions=captions is not None)


def _top_level_lists(path: Path, data: Any, keys: tuple[str, ...], kind: str) -> dict[str, list]:
    expected = f"a COCO {kind} file is a JSON object with the list(s) {', '.join(map(repr, keys))}"
    if not isinstance(data, dict):
        raise DatasetImportError(f"{path}: not a JSON object; {expected}")
    missing = [key for key in keys if not isinstance(data.get(key), list)]
    if missing:
        raise DatasetImportError(f"{path}: no list {', '.join(map(repr, missing))}; {expected}")
    return {key: data[key] for key in keys}


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _categories(path: Path, categories: list) -> dict[int, str]:
    """Category id -> name; any broken entry stops the import, because every label is read through this map."""
    names: dict[int, str] = {}
    for i, category in enumerate(categories):
        where = f"{path}: categories[{i}]"
        if not isinstance(category, dict) or not _is_id(category.get("id")):
            raise DatasetImportError(f"{where}: expected an object with an integer 'id'")
        name = category.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DatasetImportError(f"{where}: category {category['id']} has no name")
        previous = names.setdefault(category["id"], name.strip())
        if previous != name.strip():
            raise DatasetImportError(f"{where}: category id {category['id']} is both {previous!r} and {name!r}")
    return names


def _images(file: str, images: list, rejections: list[Rejection]) -> dict[int, ImageEntry | None]:
    """Image id -> entry, in file order; None for an id that several entries share (all of them rejected)."""
    entries: dict[int, ImageEntry | None] = {}
    first_place: dict[int, str] = {}
    for i, image in enumerate(images):
        where = f"{file}: images[{i}]"
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            rejections.append(Rejection(_describe(image), where, "malformed_entry", "no integer 'id'"))
            continue
        image_id, file_name = image["id"], image.get("file_name")
        if not isinstance(file_name, str):
            rejections.append(Rejection(f"image id {image_id}", where, "malformed_entry", "no 'file_name' string"))
            continue
        if image_id in entries:
            earlier = entries[image_id]
            if earlier is not None:
                rejections.append(_duplicate(earlier.file_name, first_place[image_id], image_id, where))
            rejections.append(_duplicate(file_name, where, image_id, first_place[image_id]))
            entries[image_id] = None
            continue
        entries[image_id] = ImageEntry(str(image_id), file_name, where)
        first_place[image_id] = where
    return entries


def _duplicate(file_name: str, where: str, image_id: int, other: str) -> Rejection:
    detail = f"{other} has the same id {image_id}, so the annotations of the two cannot be told apart"
    return Rejection(file_name, where, "duplicate_image_id", detail)


def _describe(entry: Any) -> str:
    if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
        return entry["file_name"]
    return ""


def _annotate(
    file: str,
    annotations: list,
    entries: dict[int, ImageEntry | None],
    categories: dict[int, str],
    rejections: list[Rejection],
) -> dict[int, list[tuple[str, str]]]:
    """Add each annotation's category to its image; returns the problems found per image id."""
    problems: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for i, annotation in enumerate(annotations):
        where = f"{file}: annotations[{i}]"
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if not _is_id(image_id):
            rejections.append(Rejection("", where, "malformed_entry", "annotation without an integer 'image_id'"))
            continue
        if image_id not in entries:
            detail = f"annotation for image id {image_id}, which 'images' does not list"
            rejections.append(Rejection(f"image id {image_id}", where, "unknown_image", detail))
            continue
        entry = entries[image_id]
        if entry is None:
            continue  # the id is shared by several images, all rejected already
        category_id = annotation.get("category_id")
        if not _is_id(category_id):
            problems[image_id].append(("malformed_entry", f"{where} has no integer 'category_id'"))
        elif category_id not in categories:
            problems[image_id].append(("unknown_category", f"{where}: category_id {category_id} is not in categories"))
        else:
            entry.labels.add(categories[category_id])
    return problems


def _add_captions(path: Path, annotations: Path, kept: dict[int, ImageEntry]) -> None:
    """Each kept image's first listed caption; a captions file that covers none of them is the wrong file."""
    data = read_json(path)
    lists = _top_level_lists(path, data, ("annotations",), "captions")
    for i, annotation in enumerate(lists["annotations"]):
        if not isinstance(annotation, dict) or not _is_id(annotation.get("image_id")):
            raise DatasetImportError(f"{path}: annotations[{i}]: expected an object with an integer 'image_id'")
        caption = annotation.get("caption")
        if not isinstance(caption, str):
            raise DatasetImportError(f"{path}: annotations[{i}]: 'caption' is not a string")
        entry = kept.get(annotation["image_id"])
        if entry is not None and entry.caption is None and caption.strip():
            entry.caption = caption.strip()
    if kept and all(entry.caption is None for entry in kept.values()):
        raise DatasetImportError(
            f"{path} has no caption for any image of {annotations}; are the two files from the same split?"
        )
