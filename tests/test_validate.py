"""The Great Expectations suite over the manifest and the split leakage check."""

from __future__ import annotations

import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_ml.config import ExpectationsConfig, IngestConfig, Params
from mumic_ml.ingest import MANIFEST_SCHEMA
from mumic_ml.io import read_json
from mumic_ml.pipeline.expectations import EXPECTATION_NAMES, SPLIT_EXPECTATION_NAMES
from mumic_ml.pipeline.validate import validate_manifest, validate_splits
from mumic_ml.taxonomy import Taxonomy, load_taxonomy

TAXONOMY = Taxonomy.from_names(["cat", "dog", "bird"])
RULES = {
    "expectations": ExpectationsConfig(min_labels_per_image=1, max_labels_per_image=2, min_positives_per_class=2),
    "ingest": IngestConfig(min_side=16, max_side=512),
}
DEFAULTS = {"expectations": Params().expectations, "ingest": Params().ingest}
# Every class has at least 3 images and every image 1 or 2 labels, so one defect trips exactly one check.
CLEAN_LABELS = [["cat"], ["dog"], ["bird"], ["cat", "dog"], ["dog", "bird"], ["bird", "cat"], ["cat"], ["dog"]]


def _rows(n: int = len(CLEAN_LABELS), offset: int = 0) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        sha = f"{i + 1:02x}" * 32
        rows.append(
            {
                "image_id": sha[:16],
                "source": f"img{i}.jpg",
                "path": f"images/{sha}.png",
                "sha256": sha,
                "labels": list(CLEAN_LABELS[i % len(CLEAN_LABELS)]),
                "width": 64,
                "height": 48,
            }
        )
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    return path


def _failed(result) -> set[str]:
    return {o.name for o in result.outcomes if not o.success}


def test_clean_manifest_passes_and_writes_report_and_data_docs(tmp_path):
    result = validate_manifest(_write(tmp_path / "m.parquet", _rows()), TAXONOMY, tmp_path / "out", **RULES)

    assert result.success and _failed(result) == set()
    assert tuple(o.name for o in result.outcomes) == EXPECTATION_NAMES
    assert result.counts == {"images": 8, "label_assignments": 11, "classes": 3}
    assert result.label_counts == {"cat": 4, "dog": 4, "bird": 3}
    assert result.outcome("image_width").description == "image width is 16 to 512 px"

    assert result.report_path == tmp_path / "out" / "validation.json"
    report = read_json(result.report_path)
    assert report["success"] is True
    assert report["summary"] == {"expectations": 10, "passed": 10, "blocking_failed": 0, "warnings": 0}
    assert report["data_docs"] == "data_docs/index.html"
    assert report["label_counts"] == result.label_counts
    assert result.data_docs_path == tmp_path / "out" / "data_docs" / "index.html"
    html = result.data_docs_path.read_text(encoding="utf-8")
    assert "manifest.images" in html and "manifest.classes" in html
    assert len(list((tmp_path / "out" / "data_docs" / "validations").rglob("*.html"))) == 3


def _set(index: int, **values):
    def mutate(rows):
        rows[index].update(values)

    return mutate


def _copy(src: int, dst: int, column: str):
    def mutate(rows):
        rows[dst][column] = rows[src][column]

    return mutate


DEFECTS = {
    "duplicate image_id": (
        _copy(0, 3, "image_id"),
        "unique_image_id",
        lambda d, rows: d["duplicated_values"] == {rows[0]["image_id"]: 2} and d["unexpected_count"] == 2,
    ),
    "duplicate sha256": (
        _copy(1, 5, "sha256"),
        "unique_sha256",
        lambda d, rows: (
            d["duplicated_values"] == {rows[1]["sha256"]: 2} and sorted(e["row"] for e in d["examples"]) == [1, 5]
        ),
    ),
    "missing sha256": (_set(2, sha256=None), "sha256_present", lambda d, rows: d["examples"][0]["row"] == 2),
    "unknown label": (
        _set(4, labels=["dog", "Unicorn"]),
        "labels_in_taxonomy",
        lambda d, rows: (
            d["unexpected_labels"] == {"Unicorn": 1}
            and d["examples"] == [{"label": "Unicorn", "row": 4, "image_id": rows[4]["image_id"]}]
        ),
    ),
    "wrong case is not canonical": (
        _set(4, labels=["DOG"]),
        "labels_in_taxonomy",
        lambda d, rows: d["unexpected_labels"] == {"DOG": 1},
    ),
    "empty labels": (
        _set(6, labels=[]),
        "labels_per_image",
        lambda d, rows: d["examples"] == [{"n_labels": 0, "row": 6, "image_id": rows[6]["image_id"]}],
    ),
    "null labels": (_set(7, labels=None), "labels_per_image", lambda d, rows: d["examples"][0]["n_labels"] == 0),
    "too many labels": (
        _set(0, labels=["cat", "dog", "bird"]),
        "labels_per_image",
        lambda d, rows: d["unexpected_count"] == 1 and d["examples"][0]["n_labels"] == 3,
    ),
    "image too small": (
        _set(3, width=8),
        "image_width",
        lambda d, rows: d["examples"] == [{"width": 8, "row": 3, "image_id": rows[3]["image_id"]}],
    ),
    "image too large": (_set(5, height=4096), "image_height", lambda d, rows: d["examples"][0]["height"] == 4096),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_each_defect_fails_its_own_blocking_check(tmp_path, defect):
    mutate, name, details_ok = DEFECTS[defect]
    rows = _rows()
    mutate(rows)
    result = validate_manifest(_write(tmp_path / "m.parquet", rows), TAXONOMY, tmp_path / "out", **RULES)

    assert _failed(result) == {name}
    outcome = result.outcome(name)
    assert outcome.blocking and not result.success
    assert outcome.observed == outcome.details["unexpected_count"] >= 1
    assert details_ok(outcome.details, rows), outcome.details
    report = read_json(result.report_path)
    assert report["success"] is False and report["summary"]["blocking_failed"] == 1


def test_rare_class_warns_by_default_and_blocks_when_configured(tmp_path):
    manifest = _write(tmp_path / "m.parquet", _rows(4))  # bird: 1 image; fish: none
    taxonomy = Taxonomy.from_names(["cat", "dog", "bird", "fish"])

    warned = validate_manifest(manifest, taxonomy, tmp_path / "warn", **RULES)
    outcome = warned.outcome("min_positives_per_class")
    assert _failed(warned) == {"min_positives_per_class"}
    assert warned.success and not outcome.blocking and warned.warnings == [outcome]
    assert outcome.details["below_minimum"] == {"fish": 0, "bird": 1}
    assert outcome.details["n_classes_below_minimum"] == 2
    assert read_json(warned.report_path)["summary"]["warnings"] == 1

    strict = ExpectationsConfig(
        min_labels_per_image=1, max_labels_per_image=2, min_positives_per_class=2, min_positives_blocking=True
    )
    blocked = validate_manifest(manifest, taxonomy, tmp_path / "block", expectations=strict, ingest=RULES["ingest"])
    assert not blocked.success and blocked.outcome("min_positives_per_class").blocking


def test_empty_manifest_fails_and_missing_columns_are_an_error(tmp_path):
    result = validate_manifest(_write(tmp_path / "empty.parquet", []), TAXONOMY, tmp_path / "out", **RULES)
    assert "non_empty" in _failed(result) and not result.success
    assert result.outcome("non_empty").observed == 0
    assert all(o.observed is not None for o in result.outcomes)

    pq.write_table(pa.table({"image_id": ["a"], "labels": [["cat"]]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        validate_manifest(tmp_path / "bad.parquet", TAXONOMY, tmp_path / "out2", **RULES)


def test_rules_reject_inverted_ranges():
    with pytest.raises(ValueError, match="min_side"):
        IngestConfig(min_side=600, max_side=512)
    with pytest.raises(ValueError, match="labels_per_image"):
        ExpectationsConfig(min_labels_per_image=3, max_labels_per_image=2)


def test_the_suite_checks_the_label_range_params_yaml_sets(tmp_path):
    """The suite has no thresholds of its own: with the configuration's defaults, 30 labels per image pass."""
    assert Params().expectations.max_labels_per_image == 30
    taxonomy = Taxonomy.from_names([f"class {i}" for i in range(31)])
    rows = _rows(2)
    rows[0]["labels"] = list(taxonomy.names[:30])
    passed = validate_manifest(_write(tmp_path / "30.parquet", rows), taxonomy, tmp_path / "a", **DEFAULTS)
    assert passed.outcome("labels_per_image").success
    rows[0]["labels"] = list(taxonomy.names)
    failed = validate_manifest(_write(tmp_path / "31.parquet", rows), taxonomy, tmp_path / "b", **DEFAULTS)
    assert not failed.outcome("labels_per_image").success


def _splits(tmp_path: Path, train: list[dict], val: list[dict], test: list[dict]) -> dict[str, Path]:
    return {
        name: _write(tmp_path / f"{name}.parquet", rows)
        for name, rows in (("train", train), ("val", val), ("test", test))
    }


def test_validate_splits_passes_on_disjoint_splits(tmp_path):
    rows = _rows(8)
    result = validate_splits(_splits(tmp_path, rows[:4], rows[4:6], rows[6:]), tmp_path / "out")
    assert result.success and _failed(result) == set()
    assert tuple(o.name for o in result.outcomes) == SPLIT_EXPECTATION_NAMES
    assert result.counts == {"images": 8, "train_images": 4, "val_images": 2, "test_images": 2}
    assert result.report_path.name == "splits_validation.json" and result.data_docs_path.is_file()


def test_validate_splits_catches_a_leaked_hash(tmp_path):
    rows = _rows(8)
    leaked = dict(rows[1], image_id="other-id", source="copy.jpg")
    # A repeat inside one split is not a leak; the same picture in train and test is.
    result = validate_splits(_splits(tmp_path, rows[:4] + [rows[0]], rows[4:6], rows[6:] + [leaked]), tmp_path / "out")

    assert _failed(result) == {"no_leakage"} and not result.success
    outcome = result.outcome("no_leakage")
    assert outcome.blocking and outcome.observed == 2
    assert outcome.details["leaked"] == {rows[1]["sha256"]: ["test", "train"]}
    assert outcome.details["n_leaked_hashes"] == 1


def test_validate_splits_requires_non_empty_train_val_test(tmp_path):
    rows = _rows(8)
    paths = _splits(tmp_path, rows[:6], [], rows[6:])
    del paths["test"]
    result = validate_splits(paths, tmp_path / "out")
    assert _failed(result) == {"non_empty_splits"} and not result.success
    assert result.outcome("non_empty_splits").details["empty_splits"] == ["val", "test"]
    assert result.counts["test_images"] == 0


def test_cwd_stays_clean_no_network_and_rerun_replaces_outputs(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    manifest = _write(inputs / "m.parquet", _rows())
    rows = _rows(8)
    splits = _splits(inputs, rows[:4], rows[4:6], rows[6:])

    first = validate_manifest(manifest, TAXONOMY, "../out", **RULES)  # a relative out_dir works too
    second = validate_manifest(manifest, TAXONOMY, out, **RULES)
    validate_splits(splits, out)

    assert list(cwd.iterdir()) == []
    assert first.success and second.success
    assert sorted(p.name for p in out.iterdir()) == [
        "data_docs",
        "splits_data_docs",
        "splits_validation.json",
        "validation.json",
    ]
    assert len(list((out / "data_docs" / "validations").rglob("*.html"))) == 3
    assert read_json(out / "validation.json") == second.to_dict()


def test_ingested_demo_world_passes(tiny_world):
    """The real ingest and split output satisfies every blocking check."""
    out = tiny_world.root / "validation"
    taxonomy = load_taxonomy(tiny_world.taxonomy)
    manifest = validate_manifest(tiny_world.ingested / "manifest.parquet", taxonomy, out, **DEFAULTS)
    assert manifest.success, manifest.blocking_failures
    splits = validate_splits({s: tiny_world.splits / f"{s}.parquet" for s in ("train", "val", "test")}, out)
    assert splits.success, splits.blocking_failures


def test_labels_per_image_counts_negative_and_unknown_labels_and_class_counts_only_positives(tmp_path):
    """What the suite makes of the qualified label columns: `labels_per_image` counts every class an image labels,
    so an image with only a negative label passes the minimum of 1, and one with two present classes and a
    negative (three classes labelled) fails the maximum of 2; the per-class counts stay positives only, and a
    negative or unknown label outside the taxonomy is not flagged (ingest refuses those before the suite runs)."""
    rows = _rows()
    rows[6]["labels"] = []
    negatives = [{3: ["bird"], 6: ["dog"]}.get(i, []) for i in range(len(rows))]
    unknowns = [["Unicorn"] if i == 0 else [] for i in range(len(rows))]
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.append_column("negative_labels", pa.array(negatives, pa.list_(pa.string())))
    table = table.append_column("unknown_labels", pa.array(unknowns, pa.list_(pa.string())))
    pq.write_table(table, tmp_path / "m.parquet")

    result = validate_manifest(tmp_path / "m.parquet", TAXONOMY, tmp_path / "out", **RULES)
    assert _failed(result) == {"labels_per_image"}
    assert [e["row"] for e in result.outcome("labels_per_image").details["examples"]] == [3]
    assert result.label_counts == {"cat": 3, "dog": 4, "bird": 3}  # negatives are no positives

    pq.write_table(table.drop_columns(["negative_labels"]), tmp_path / "no_negatives.parquet")
    without = validate_manifest(tmp_path / "no_negatives.parquet", TAXONOMY, tmp_path / "without", **RULES)
    assert [e["row"] for e in without.outcome("labels_per_image").details["examples"]] == [6]
