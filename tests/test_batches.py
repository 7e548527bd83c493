"""Batches accumulate: each is ingested once, duplicates across batches are rejected, changed batches replace."""

import shutil

import pandas as pd
import pytest
from image_fixtures import noise

from mumic_ml.batches import discover_batches, ingest_batches
from mumic_ml.demo_world import generate_demo_world
from mumic_ml.io import atomic_write_json, read_json
from mumic_ml.manifest import ManifestError
from mumic_ml.taxonomy import load_taxonomy


@pytest.fixture()
def incoming(tmp_path):
    world = generate_demo_world(tmp_path / "incoming" / "a-first", n_images=12, image_size=32, seed=0)
    return tmp_path / "incoming", load_taxonomy(world.taxonomy_path)


def _second_batch(incoming, rows, name="b-second"):
    """A batch reusing some images of the first under new names, plus a broken file."""
    first = incoming / "a-first"
    batch = incoming / name
    (batch / "img").mkdir(parents=True)
    manifest = pd.read_csv(first / "manifest.csv")
    lines = ["path,labels"]
    for i in rows:
        shutil.copy(first / manifest["path"][i], batch / "img" / f"copy{i}.png")
        lines.append(f"img/copy{i}.png,{manifest['labels'][i]}")
    (batch / "img" / "broken.png").write_bytes(b"not a png")
    lines.append("img/broken.png,circle")
    (batch / "manifest.csv").write_text("\n".join(lines) + "\n")
    return batch


def test_batches_accumulate_and_are_ingested_once(incoming, tmp_path):
    folder, taxonomy = incoming
    out = tmp_path / "ingested"
    first = ingest_batches(folder, out, taxonomy=taxonomy)
    assert first.ingested == ["a-first"] and first.n_images == 12

    again = ingest_batches(folder, out, taxonomy=taxonomy)
    assert again.ingested == [] and again.skipped == ["a-first"] and again.n_images == 12

    _second_batch(folder, rows=[0, 1])
    grown = ingest_batches(folder, out, taxonomy=taxonomy)
    assert grown.ingested == ["b-second"] and grown.skipped == ["a-first"]
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 12  # the two copies are the same pictures: not counted twice
    assert manifest["sha256"].is_unique
    assert all((out / p).is_file() for p in manifest["path"])
    rejected = pd.read_csv(out / "rejected.csv")
    assert sorted(rejected["reason"]) == ["duplicate_image", "duplicate_image", "not_an_image"]
    assert set(rejected["batch"]) == {"b-second"}
    assert grown.rejected_by_reason == {"duplicate_image": 2, "not_an_image": 1}


def test_a_changed_batch_is_reingested(incoming, tmp_path):
    folder, taxonomy = incoming
    out = tmp_path / "ingested"
    batch = _second_batch(folder, rows=[0])
    ingest_batches(folder, out, taxonomy=taxonomy)
    (batch / "manifest.csv").write_text("path,labels\nimg/copy0.png,circle\n")
    result = ingest_batches(folder, out, taxonomy=taxonomy)
    assert result.ingested == ["b-second"]


def test_discovery_errors_are_clear(tmp_path):
    with pytest.raises(ManifestError, match="incoming folder not found"):
        discover_batches(tmp_path / "nope")
    (tmp_path / "in" / "two").mkdir(parents=True)
    (tmp_path / "in" / "two" / "manifest.csv").write_text("path,labels\n")
    (tmp_path / "in" / "two" / "manifest.jsonl").write_text("")
    with pytest.raises(ManifestError, match="more than one manifest"):
        discover_batches(tmp_path / "in")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "no-manifest-yet").mkdir()
    with pytest.raises(ManifestError, match="no batch with a manifest"):
        ingest_batches(tmp_path / "empty", tmp_path / "out")


@pytest.fixture()
def demo(tmp_path):
    """The user's first batch, named `demo`, ingested alone."""
    world = generate_demo_world(tmp_path / "incoming" / "demo", n_images=12, image_size=32, seed=0)
    taxonomy = load_taxonomy(world.taxonomy_path)
    out = tmp_path / "ingested"
    ingest_batches(tmp_path / "incoming", out, taxonomy=taxonomy)
    return tmp_path / "incoming", out, taxonomy


def _later_batch(incoming, name, copied_rows, n_new):
    """A batch holding copies of some `demo` images (manifest rows 1..) followed by `n_new` new pictures."""
    demo_manifest = pd.read_csv(incoming / "demo" / "manifest.csv")
    batch = incoming / name
    (batch / "img").mkdir(parents=True)
    lines = ["path,labels"]
    for i in copied_rows:
        shutil.copy(incoming / "demo" / demo_manifest["path"][i], batch / "img" / f"copy{i}.png")
        lines.append(f"img/copy{i}.png,{demo_manifest['labels'][i]}")
    for i in range(n_new):
        noise(32, 32, seed=100 + i).save(batch / "img" / f"new{i}.png")
        lines.append(f"img/new{i}.png,circle")
    (batch / "manifest.csv").write_text("\n".join(lines) + "\n")
    return demo_manifest


def _duplicates(out):
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return rejected[rejected["reason"] == "duplicate_image"]


def test_the_batch_that_arrived_first_keeps_its_images_whatever_the_names(demo):
    incoming, out, taxonomy = demo
    before = pd.read_parquet(out / "manifest.parquet")
    demo_manifest = _later_batch(incoming, "batch2", copied_rows=[0, 3, 5], n_new=2)

    result = ingest_batches(incoming, out, taxonomy=taxonomy)

    after = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(after[after["batch"] == "demo"].reset_index(drop=True), before)
    assert result.ingested == ["batch2"] and list(result.per_batch) == ["demo", "batch2"]
    assert list(after.loc[after["batch"] == "batch2", "source"]) == ["img/new0.png", "img/new1.png"]
    assert list(after.loc[after["batch"] == "batch2", "row"]) == [4, 5]
    duplicates = _duplicates(out)
    assert list(zip(duplicates["batch"], duplicates["row"], duplicates["source"])) == [
        ("batch2", "1", "img/copy0.png"),
        ("batch2", "2", "img/copy3.png"),
        ("batch2", "3", "img/copy5.png"),
    ]
    for detail, i in zip(duplicates["detail"], [0, 3, 5]):
        assert f"{demo_manifest['path'][i]!r}" in detail and f"row {i + 1} of batch 'demo'" in detail


def test_a_corrected_early_batch_keeps_its_arrival_position(demo):
    incoming, out, taxonomy = demo
    _later_batch(incoming, "batch2", copied_rows=[0, 3], n_new=1)
    ingest_batches(incoming, out, taxonomy=taxonomy)
    demo_manifest = incoming / "demo" / "manifest.csv"
    demo_manifest.write_text("".join(demo_manifest.read_text().splitlines(keepends=True)[:-1]))  # last row withdrawn

    result = ingest_batches(incoming, out, taxonomy=taxonomy)

    assert result.ingested == ["demo"] and result.skipped == ["batch2"]
    ledger = read_json(out / "batches.json")
    assert (ledger["demo"]["arrival"], ledger["batch2"]["arrival"]) == (1, 2)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest.loc[manifest["batch"] == "demo", "row"]) == list(range(1, 12))
    duplicates = _duplicates(out)
    assert list(zip(duplicates["batch"], duplicates["row"])) == [("batch2", "1"), ("batch2", "2")]
    assert all("of batch 'demo'" in detail for detail in duplicates["detail"])


def test_a_ledger_without_arrival_numbers_is_ordered_by_ingestion_time_then_name(demo):
    """Ledgers and batch manifests written before arrival and row were recorded are still read."""
    incoming, out, taxonomy = demo
    _later_batch(incoming, "batch2", copied_rows=[0], n_new=1)
    _later_batch(incoming, "a-tie", copied_rows=[], n_new=1)  # the same new picture as batch2, the same second
    ingest_batches(incoming, out, taxonomy=taxonomy)
    ledger = read_json(out / "batches.json")
    ingested_at = {"demo": "2026-01-01T09:00:00+00:00", "batch2": "2026-02-01T09:00:00+00:00"}
    ingested_at["a-tie"] = ingested_at["batch2"]
    for batch_id, entry in ledger.items():
        del entry["arrival"]
        entry["ingested_at"] = ingested_at[batch_id]
        batch_manifest = out / "batches" / batch_id / "manifest.parquet"
        pd.read_parquet(batch_manifest).drop(columns="row").to_parquet(batch_manifest, index=False)
    atomic_write_json(out / "batches.json", ledger)

    result = ingest_batches(incoming, out, taxonomy=taxonomy)

    assert result.ingested == [] and list(result.per_batch) == ["demo", "a-tie", "batch2"]
    assert {batch_id: entry["arrival"] for batch_id, entry in read_json(out / "batches.json").items()} == {
        "demo": 1,
        "a-tie": 2,
        "batch2": 3,
    }
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert (manifest["batch"] == "demo").sum() == 12 and manifest["row"].isna().all()
    duplicates = _duplicates(out)
    assert list(zip(duplicates["batch"], duplicates["row"], duplicates["source"])) == [
        ("batch2", "", "img/copy0.png"),
        ("batch2", "", "img/new0.png"),
    ]
    assert "(batch 'demo')" in duplicates["detail"].iloc[0] and "(batch 'a-tie')" in duplicates["detail"].iloc[1]
