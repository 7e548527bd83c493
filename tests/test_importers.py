"""Importers: COCO, Pascal VOC and Open Images files made here in tmp_path, imported as batch folders, then
ingested unchanged, so the labels, the verified negatives and the unknowns are followed into the ingested manifest.

Every fixture is written by the test (tiny JPEGs from PIL, JSON, XML and CSV as text); each bad input has its own
test: malformed files stop the import with the file and position, bad entries reject their image with a reason.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from image_fixtures import noise
from test_ingest import write_csv

from mumic_ml.batches import ingest_batches
from mumic_ml.cli import main
from mumic_ml.importers.batch_folder import REASONS, DatasetImportError
from mumic_ml.importers.coco import import_coco
from mumic_ml.importers.openimages import import_openimages
from mumic_ml.importers.voc import import_voc
from mumic_ml.ingest import ingest
from mumic_ml.taxonomy import load_taxonomy

LIST_OF_STRINGS = pa.list_(pa.string())


def photo(path: Path, seed: int) -> None:
    """A distinct tiny JPEG (ingest rejects a second copy of the same picture), large enough for ingest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise(24, 20, seed=seed).save(path, format="JPEG", quality=95)


def rows_by(path: Path, key: str) -> dict[str, dict]:
    return {row[key]: row for row in pq.read_table(path).to_pylist()}


def rejected(path: Path) -> dict[str, str]:
    """source -> reason of a rejected.csv; every reason must be a documented one."""
    with open(path, encoding="utf-8", newline="") as fh:
        records = list(csv.DictReader(fh))
    assert {r["reason"] for r in records} <= set(REASONS)
    assert all(r["location"] and r["detail"] for r in records)
    return {r["source"]: r["reason"] for r in records}


def ingested(batch: Path, tmp_path: Path) -> dict[str, dict]:
    """Ingest the batch folder exactly as written, against its own taxonomy; rows keyed by the manifest path."""
    result = ingest(
        batch / "manifest.parquet", batch, tmp_path / "ingested", taxonomy=load_taxonomy(batch / "taxonomy.yaml")
    )
    return rows_by(result.manifest_path, "source")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


# --- COCO ---------------------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 44, "name": "traffic light", "supercategory": "outdoor"},
]


def annotation(annotation_id: int, image_id: int, category_id: int | None, crowd: int = 0) -> dict:
    record = {"id": annotation_id, "image_id": image_id, "bbox": [0, 0, 4, 4], "area": 16.0, "iscrowd": crowd}
    if category_id is not None:
        record["category_id"] = category_id
    return record


@pytest.fixture
def coco(tmp_path):
    """An instances file with one of every case, its captions file, and the images that exist."""
    images = tmp_path / "coco" / "val2017"
    entries = [
        {"id": 10, "file_name": "a.jpg"},  # cat, dog and a crowd of people
        {"id": 11, "file_name": "b.jpg"},  # two traffic lights
        {"id": 12, "file_name": "c.jpg"},  # no annotation
        {"id": 13, "file_name": "d.jpg"},  # a cat and an unknown category
        {"id": 14, "file_name": "missing.jpg"},  # no such file
        {"id": 15, "file_name": "e.jpg"},  # two images, one id
        {"id": 15, "file_name": "f.jpg"},
        {"file_name": "g.jpg"},  # no id
        {"id": 16, "file_name": "h.jpg"},  # an annotation without a category
        {"id": 17, "file_name": "../outside.jpg"},  # climbs out of the images folder
    ]
    for seed, name in enumerate("abcdefgh"):
        photo(images / f"{name}.jpg", seed)
    photo(tmp_path / "coco" / "outside.jpg", 50)
    annotations = [
        annotation(1, 10, 2),
        annotation(2, 10, 18),
        annotation(3, 10, 1, crowd=1),
        annotation(4, 11, 44),
        annotation(5, 11, 44),
        annotation(6, 13, 2),
        annotation(7, 13, 99),
        annotation(8, 14, 2),
        annotation(9, 15, 2),
        annotation(10, 999, 2),  # an image the file does not list
        annotation(11, 16, None),
        annotation(12, 17, 2),
    ]
    instances = tmp_path / "coco" / "instances_val2017.json"
    instances.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES}))
    captions = tmp_path / "coco" / "captions_val2017.json"
    caption_list = [
        {"id": 30, "image_id": 10, "caption": "A cat and a dog in front of a crowd."},
        {"id": 3, "image_id": 10, "caption": "Two pets."},
        {"id": 31, "image_id": 11, "caption": "A street with traffic lights."},
        {"id": 32, "image_id": 12, "caption": "An empty room."},
        {"id": 33, "image_id": 999, "caption": "Not in the instances file."},
    ]
    captions.write_text(json.dumps({"images": entries, "annotations": caption_list}))
    return instances, captions, images


COCO_REJECTED = {
    "c.jpg": "no_annotations",
    "d.jpg": "unknown_category",
    "missing.jpg": "missing_image",
    "e.jpg": "duplicate_image_id",
    "f.jpg": "duplicate_image_id",
    "g.jpg": "malformed_entry",
    "h.jpg": "malformed_entry",
    "image id 999": "unknown_image",
    "../outside.jpg": "invalid_path",
}


def test_coco_labels_captions_and_every_rejection(coco, tmp_path):
    instances, captions, images = coco
    out = tmp_path / "incoming" / "coco"
    result = import_coco(instances, images, out, captions=captions)

    assert (result.n_images, result.n_classes, result.n_without_positives) == (2, 4, 0)
    assert rejected(result.rejected_path) == COCO_REJECTED
    assert result.rejected_by_reason["duplicate_image_id"] == 2 and result.n_rejected == len(COCO_REJECTED)
    taxonomy = load_taxonomy(result.taxonomy_path)
    assert taxonomy.names == ["person", "cat", "dog", "traffic light"]
    assert taxonomy.all_prompts()[3] == ["a photo of a traffic light.", "a photo of the traffic light."]
    table = pq.read_table(result.manifest_path)
    assert table.column_names == ["path", "labels", "negative_labels", "unknown_labels", "original_id", "caption"]
    assert all(table.schema.field(c).type == LIST_OF_STRINGS for c in ("labels", "negative_labels", "unknown_labels"))
    rows = rows_by(result.manifest_path, "original_id")
    assert rows["10"] == {
        "path": "images/a.jpg",
        "labels": ["person", "cat", "dog"],
        "negative_labels": [],
        "unknown_labels": [],
        "original_id": "10",
        "caption": "A cat and a dog in front of a crowd.",
    }
    assert rows["11"]["labels"] == ["traffic light"] and rows["11"]["caption"] == "A street with traffic lights."
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a.jpg", "b.jpg"]
    assert (out / "images" / "a.jpg").read_bytes() == (images / "a.jpg").read_bytes()
    assert not (out / "images" / "a.jpg").is_symlink()


def test_coco_keep_unlabelled_makes_every_category_a_verified_negative_and_ingest_keeps_it(coco, tmp_path):
    instances, captions, images = coco
    result = import_coco(instances, images, tmp_path / "batch", captions=captions, keep_unlabelled=True)
    assert result.n_images == 3 and result.n_without_positives == 1
    assert "c.jpg" not in rejected(result.rejected_path)

    rows = ingested(tmp_path / "batch", tmp_path)
    assert rows["images/c.jpg"]["labels"] == []
    assert rows["images/c.jpg"]["negative_labels"] == ["person", "cat", "dog", "traffic light"]
    assert rows["images/c.jpg"]["caption"] == "An empty room."
    assert rows["images/a.jpg"]["labels"] == ["person", "cat", "dog"] and rows["images/a.jpg"]["negative_labels"] == []


def test_coco_batch_beside_a_batch_without_the_new_columns(coco, tmp_path):
    """Ingested as batches: the plain batch's rows get empty negative and unknown lists, typed as lists of str."""
    instances, captions, images = coco
    incoming = tmp_path / "incoming"
    import_coco(instances, images, incoming / "coco", captions=captions)
    plain = incoming / "plain"
    photo(plain / "x.jpg", 77)
    (plain / "manifest.csv").write_text("path,labels\nx.jpg,cat\n", encoding="utf-8")

    taxonomy = load_taxonomy(incoming / "coco" / "taxonomy.yaml")
    result = ingest_batches(incoming, tmp_path / "ingested", taxonomy=taxonomy)
    table = pq.read_table(result.manifest_path)
    assert table.schema.field("negative_labels").type == LIST_OF_STRINGS
    rows = {(r["batch"], r["source"]): r for r in table.to_pylist()}
    assert rows[("plain", "x.jpg")]["negative_labels"] == [] and rows[("plain", "x.jpg")]["unknown_labels"] == []
    assert rows[("plain", "x.jpg")]["caption"] is None
    assert rows[("coco", "images/a.jpg")]["labels"] == ["person", "cat", "dog"]


def test_coco_labels_match_pycocotools_reading_the_same_file(tmp_path):
    from pycocotools.coco import COCO

    rng = random.Random(7)
    images = tmp_path / "images"
    entries, annotations = [], []
    for index in range(12):
        image_id = 1000 + 7 * index
        entries.append({"id": image_id, "file_name": f"{index:03d}.jpg", "width": 24, "height": 20})
        photo(images / f"{index:03d}.jpg", index)
        for _ in range(rng.randrange(0, 5)):
            category = rng.choice(CATEGORIES)["id"]
            annotations.append(annotation(len(annotations) + 1, image_id, category, crowd=rng.randrange(2)))
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": CATEGORIES}))

    result = import_coco(path, images, tmp_path / "batch", keep_unlabelled=True)
    ours = {int(r["original_id"]): set(r["labels"]) for r in pq.read_table(result.manifest_path).to_pylist()}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        reference = COCO(str(path))
    theirs = {}
    for image_id in reference.getImgIds():
        found = reference.loadAnns(reference.getAnnIds(imgIds=[image_id], iscrowd=None))
        theirs[image_id] = {reference.loadCats(a["category_id"])[0]["name"] for a in found}
    assert ours == theirs
    assert any(not names for names in theirs.values()) and any(len(names) > 1 for names in theirs.values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"images": [], "annotations": [}', r"instances\.json: not valid JSON: .* at line 1, column 32"),
        ('{"images": [],\n "annotations": []\n "categories": []}', r"at line 3, column 2"),
        ("[1, 2]", "not a JSON object"),
        ('{"images": [], "annotations": []}', r"no list 'categories'"),
        ('{"images": [], "annotations": [], "categories": [{"id": "1", "name": "cat"}]}', r"categories\[0\]"),
        (
            '{"images": [], "annotations": [], "categories": [{"id": 1, "name": "cat"}, {"id": 1, "name": "dog"}]}',
            "category id 1 is both 'cat' and 'dog'",
        ),
        (b'{"images": [], "note": "caf\xe9"}', "not UTF-8 text: invalid byte at byte offset 27"),
    ],
)
def test_coco_unreadable_files_stop_the_import_naming_file_and_position(tmp_path, content, message):
    path = tmp_path / "instances.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetImportError, match=message):
        import_coco(path, tmp_path / "images", tmp_path / "batch")
    assert not (tmp_path / "batch").exists()


def test_coco_captions_of_another_split_are_refused(coco, tmp_path):
    instances, _, images = coco
    other = tmp_path / "captions_train2017.json"
    other.write_text(json.dumps({"annotations": [{"id": 1, "image_id": 5, "caption": "elsewhere"}]}))
    with pytest.raises(DatasetImportError, match="no caption for any image"):
        import_coco(instances, images, tmp_path / "batch", captions=other)


def test_cli_import_coco(coco, tmp_path):
    instances, captions, images = coco
    out = tmp_path / "incoming" / "coco"
    argv = ["import", "coco", "--annotations", str(instances), "--captions", str(captions)]
    code, stdout, stderr = run_cli([*argv, "--images", str(images), "--out", str(out), "--keep-unlabelled"])
    assert (code, stderr) == (0, "")
    assert f"import coco: 3 images, 4 classes -> {out}" in stdout
    assert "duplicate_image_id: 2" in stdout and "1 images show no class" in stdout
    assert (out / "manifest.parquet").is_file() and (out / "taxonomy.yaml").is_file()


def test_cli_import_of_a_malformed_file_exits_non_zero_without_a_traceback(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    argv = ["import", "coco", "--annotations", str(path), "--images", str(tmp_path / "images")]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "batch")])
    assert code == 2
    assert stderr.startswith(f"mumic import: error: {path}: not valid JSON") and "line 1, column 13" in stderr
    assert "Traceback" not in stderr


# --- Pascal VOC ---------------------------------------------------------------------------------------------------


def voc_xml(file_name: str | None, objects: list[tuple[str | None, str | None]]) -> str:
    """An annotation in VOC's layout; each object is (name, difficult), None leaving the element out."""
    parts = ["<annotation>", "  <folder>VOC2007</folder>"]
    if file_name is not None:
        parts.append(f"  <filename>{file_name}</filename>")
    parts.append("  <size><width>24</width><height>20</height><depth>3</depth></size>")
    for name, difficult in objects:
        parts.append("  <object>")
        if name is not None:
            parts.append(f"    <name>{name}</name>")
        parts.append("    <pose>Unspecified</pose><truncated>0</truncated>")
        if difficult is not None:
            parts.append(f"    <difficult>{difficult}</difficult>")
        parts.append("    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>")
        parts.append("  </object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    annotations = {
        "000001": voc_xml("000001.jpg", [("dog", None), ("person", "1"), ("person", "0")]),
        "000002": voc_xml("000002.jpg", [("cat", "1")]),  # difficult only: unknown
        "000003": voc_xml(None, [("cat", "1"), ("cat", "0"), ("diningtable", "1")]),
        "000004": voc_xml("000004.jpg", [("bird", "0")]),  # no image
        "000006": voc_xml("000006.jpg", [(None, "0")]),  # an object without a name
        "000007": voc_xml("000007.jpg", [("sofa", "maybe")]),
        "000008": voc_xml("000008.jpg", []),
    }
    (root / "Annotations").mkdir(parents=True)
    for image_id, text in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(text, encoding="utf-8")
    for seed, image_id in enumerate(["000001", "000002", "000003", "000006", "000007", "000008"]):
        photo(root / "JPEGImages" / f"{image_id}.jpg", seed)
    main_sets = root / "ImageSets" / "Main"
    main_sets.mkdir(parents=True)
    ids = ["000001", "000002", "000003", "000004", "000005", "000001", "000006", "000007", "000008", "../x"]
    (main_sets / "trainval.txt").write_text("\n".join(ids) + "\n\n", encoding="utf-8")
    (main_sets / "dog_trainval.txt").write_text("000001  1\n", encoding="utf-8")
    return root


VOC_REJECTED = {
    "000004.jpg": "missing_image",
    "000005": "missing_annotation",
    "000001": "duplicate_image_id",
    "000006.jpg": "malformed_entry",
    "000007.jpg": "malformed_entry",
    "000008.jpg": "no_annotations",
    "../x": "malformed_entry",
}


def test_voc_difficult_only_classes_are_unknown_and_survive_ingest(voc, tmp_path):
    result = import_voc(voc, "trainval", tmp_path / "batch")

    assert (result.n_images, result.n_without_positives) == (3, 1)
    assert rejected(result.rejected_path) == VOC_REJECTED
    taxonomy = load_taxonomy(result.taxonomy_path)
    assert taxonomy.names == ["cat", "diningtable", "dog", "person"]
    assert taxonomy.all_prompts()[1] == ["a photo of a dining table.", "a photo of the dining table."]
    manifest = rows_by(result.manifest_path, "original_id")
    assert {image_id: (r["labels"], r["unknown_labels"]) for image_id, r in manifest.items()} == {
        "000001": (["dog", "person"], []),
        "000002": ([], ["cat"]),
        "000003": (["cat"], ["diningtable"]),
    }
    assert manifest["000003"]["path"] == "images/000003.jpg"  # no <filename>: the id names the JPEG

    rows = ingested(tmp_path / "batch", tmp_path)
    assert rows["images/000002.jpg"]["labels"] == [] and rows["images/000002.jpg"]["unknown_labels"] == ["cat"]
    assert rows["images/000003.jpg"]["unknown_labels"] == ["diningtable"]
    assert rows["images/000001.jpg"]["negative_labels"] == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation>\n  <object><name>dog</name>\n</annotation>\n", r"000001\.xml: not well-formed XML: .* line 3"),
        ("<annotation><object>", "no element found at line 1, column 21"),
        ('<!DOCTYPE a [<!ENTITY x "y">]><annotation/>', "declares a DTD"),
    ],
)
def test_voc_unreadable_xml_stops_the_import_naming_file_and_position(voc, tmp_path, text, message):
    (voc / "Annotations" / "000001.xml").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetImportError, match=message):
        import_voc(voc, "trainval", tmp_path / "batch")


def test_voc_unknown_image_set_names_the_sets_there(voc, tmp_path):
    with pytest.raises(DatasetImportError, match=r"'train' not found: .* \(image sets there: \['trainval'\]\)"):
        import_voc(voc, "train", tmp_path / "batch")


def test_cli_import_voc(voc, tmp_path):
    out = tmp_path / "batch"
    code, stdout, stderr = run_cli(["import", "voc", "--root", str(voc), "--image-set", "trainval", "--out", str(out)])
    assert (code, stderr) == (0, "")
    assert f"import voc: 3 images, 4 classes -> {out}" in stdout and "missing_annotation: 1" in stdout

    (voc / "Annotations" / "000002.xml").write_text("<annotation>", encoding="utf-8")
    code, _, stderr = run_cli(["import", "voc", "--root", str(voc), "--image-set", "trainval", "--out", str(out)])
    assert code == 2 and "000002.xml: not well-formed XML" in stderr and "Traceback" not in stderr
    assert rows_by(out / "manifest.parquet", "original_id").keys() == {"000001", "000002", "000003"}


# --- Open Images --------------------------------------------------------------------------------------------------

CLASS_DESCRIPTIONS = [
    ("/m/01yrx", "Cat"),
    ("/m/0bt9lr", "Dog"),
    ("/m/0k4j", "Car"),
    ("/m/0bow1", "Bow"),
    ("/m/0bow2", "Bow"),
    ("/m/0salt", "Salt, pepper"),
]
LABEL_ROWS = [
    ("aaa", "/m/01yrx", "1"),
    ("aaa", "/m/0bt9lr", "0"),
    ("bbb", "/m/0bt9lr", "1"),
    ("bbb", "/m/01yrx", "1"),
    ("bbb", "/m/0k4j", "0"),
    ("ccc", "/m/01yrx", "0"),
    ("ddd", "/m/01yrx", "1"),  # no image
    ("ddd", "/m/0k4j", "1"),
    ("eee", "/m/0nothere", "1"),  # not in the class descriptions
    ("fff", "/m/01yrx", "1"),
    ("fff", "/m/01yrx", "0"),  # confirmed and denied
    ("ggg", "/m/01yrx", "0.5"),
    ("hhh", "/m/0bow1", "1"),
    ("iii", "/m/0bow2", "1"),
    ("jjj", "/m/0salt", "1"),
    ("aaa", "/m/01yrx", "1"),  # repeated with the same verdict: harmless
]
OPENIMAGES_REJECTED = {
    "ddd.jpg": "missing_image",
    "eee.jpg": "unknown_category",
    "fff.jpg": "conflicting_labels",
    "ggg.jpg": "malformed_entry",
}


@pytest.fixture
def openimages(tmp_path):
    folder = tmp_path / "openimages"
    for seed, image_id in enumerate(["aaa", "bbb", "ccc", "eee", "fff", "ggg", "hhh", "iii", "jjj"]):
        photo(folder / "validation" / f"{image_id}.jpg", seed)
    header = ("ImageID", "Source", "LabelName", "Confidence")
    rows = [(image_id, "verification", mid, confidence) for image_id, mid, confidence in LABEL_ROWS]
    first = write_csv(folder / "validation-annotations-human-imagelabels-boxable.csv", rows[:8], header)
    second = write_csv(folder / "validation-annotations-human-imagelabels.csv", rows[8:], header)
    classes = write_csv(folder / "class-descriptions-boxable.csv", CLASS_DESCRIPTIONS, header=None)
    return [first, second], classes, folder / "validation"


def test_openimages_confidence_zero_is_a_verified_negative_that_survives_ingest(openimages, tmp_path):
    labels, classes, images = openimages
    result = import_openimages(labels, classes, images, tmp_path / "batch")

    assert (result.n_images, result.n_without_positives) == (6, 1)
    assert rejected(result.rejected_path) == OPENIMAGES_REJECTED
    taxonomy = load_taxonomy(result.taxonomy_path)
    assert taxonomy.names == ["Bow (/m/0bow1)", "Bow (/m/0bow2)", "Car", "Cat", "Dog", "Salt, pepper"]
    manifest = rows_by(result.manifest_path, "original_id")
    assert {image_id: (r["labels"], r["negative_labels"]) for image_id, r in manifest.items()} == {
        "aaa": (["Cat"], ["Dog"]),
        "bbb": (["Cat", "Dog"], ["Car"]),
        "ccc": ([], ["Cat"]),
        "hhh": (["Bow (/m/0bow1)"], []),
        "iii": (["Bow (/m/0bow2)"], []),
        "jjj": (["Salt, pepper"], []),
    }

    rows = ingested(tmp_path / "batch", tmp_path)
    assert rows["images/aaa.jpg"]["negative_labels"] == ["Dog"] and rows["images/ccc.jpg"]["labels"] == []
    assert rows["images/ccc.jpg"]["negative_labels"] == ["Cat"]
    assert rows["images/bbb.jpg"]["labels"] == ["Cat", "Dog"]


def test_openimages_class_descriptions_with_the_v7_header(openimages, tmp_path):
    labels, _, images = openimages
    classes = write_csv(tmp_path / "oidv7-class-descriptions.csv", CLASS_DESCRIPTIONS, ("LabelName", "DisplayName"))
    result = import_openimages(labels, classes, images, tmp_path / "batch")
    assert "LabelName" not in load_taxonomy(result.taxonomy_path).names and result.n_images == 6


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("labels", 'ImageID,Source,LabelName,Confidence\naaa,verification,"/m/01yrx,1\n', r"line 2: not valid CSV"),
        ("labels", "ImageID,Source,LabelName,Confidence\naaa,v,/m/01yrx,1\nbbb,v,/m/01yrx\n", "line 3: 3 fields"),
        ("labels", "ImageID,LabelName\naaa,/m/01yrx\n", r"line 1: the header lacks \['Confidence'\]"),
        ("labels", "", "the file is empty"),
        ("labels", b"ImageID,Source,LabelName,Confidence\naaa,v,/m/\xff,1\n", "line 2: not UTF-8 .* offset 45"),
        ("classes", "/m/01yrx,Cat\n/m/0bt9lr,Dog,extra\n", r"line 2: expected 'LabelName,DisplayName'"),
        ("classes", "/m/01yrx,Cat\n/m/01yrx,Kitten\n", "line 2: /m/01yrx is both 'Cat' and 'Kitten'"),
    ],
)
def test_openimages_unreadable_csv_stops_the_import_naming_file_and_line(openimages, tmp_path, which, content, message):
    labels, classes, images = openimages
    broken = tmp_path / f"broken-{which}.csv"
    broken.write_bytes(content.encode() if isinstance(content, str) else content)
    arguments = ([broken], classes) if which == "labels" else (labels, broken)
    with pytest.raises(DatasetImportError, match=f"broken-{which}.csv: " + message):
        import_openimages(*arguments, images, tmp_path / "batch")


def test_cli_import_openimages(openimages, tmp_path):
    labels, classes, images = openimages
    out = tmp_path / "incoming" / "openimages"
    argv = ["import", "openimages", "--labels", *map(str, labels), "--classes", str(classes)]
    code, stdout, stderr = run_cli([*argv, "--images", str(images), "--out", str(out)])
    assert (code, stderr) == (0, "")
    assert f"import openimages: 6 images, 6 classes -> {out}" in stdout and "conflicting_labels: 1" in stdout


# --- The batch folder ---------------------------------------------------------------------------------------------


def test_an_import_replaces_its_previous_batch_whole(voc, tmp_path):
    """Unchanged input gives the same manifest bytes, so ingest sees the same batch; changed input replaces it."""
    out = tmp_path / "batch"
    first = import_voc(voc, "trainval", out).manifest_path.read_bytes()
    assert import_voc(voc, "trainval", out).manifest_path.read_bytes() == first
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000002\n", encoding="utf-8")
    result = import_voc(voc, "trainval", out)
    assert result.n_images == 1 and sorted(p.name for p in (out / "images").iterdir()) == ["000002.jpg"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_output_folder_that_is_not_a_batch_or_holds_the_inputs_is_refused(voc, tmp_path):
    (tmp_path / "incoming" / "some-batch").mkdir(parents=True)
    with pytest.raises(DatasetImportError, match="is not a batch"):
        import_voc(voc, "trainval", tmp_path / "incoming")
    with pytest.raises(DatasetImportError, match="holds the input"):
        import_voc(voc, "trainval", voc.parent)
    assert (tmp_path / "incoming" / "some-batch").is_dir() and (voc / "Annotations").is_dir()


def test_nothing_to_import_is_an_error_with_the_reasons(voc, tmp_path):
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000004\n000005\n", encoding="utf-8")
    with pytest.raises(DatasetImportError, match=r"no image could be imported \(\{'missing_image': 1, 'missing_"):
        import_voc(voc, "trainval", tmp_path / "batch")
    assert not (tmp_path / "batch").exists()


def test_the_taxonomy_and_manifest_are_what_the_project_reads(voc, tmp_path):
    """`paths.taxonomy` can point at the batch's taxonomy.yaml as written: a plain YAML of the documented format."""
    result = import_voc(voc, "trainval", tmp_path / "batch")
    data = yaml.safe_load(result.taxonomy_path.read_text(encoding="utf-8"))
    assert data["prompts"] == ["a photo of a {}.", "a photo of the {}."]
    assert data["classes"][0] == "cat" and data["classes"][1]["name"] == "diningtable"
