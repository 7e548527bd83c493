"""Batches accumulate: each is ingested once, duplicates across batches are rejected, changed batches replace."""

import shutil

import pandas as pd
import pytest

from mumic_ml.batches import discover_batches, ingest_batches
from mumic_ml.demo_world import generate_demo_world
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
