"""Ingest end to end on a folder holding one of every kind of bad image and bad row, next to good ones."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_fixtures import encode, noise, png_with_declared_size  # noqa: E402
from PIL import Image

from mumic_ml import images
from mumic_ml import ingest as ingest_module
from mumic_ml.images import sha256_of_image
from mumic_ml.ingest import REASONS, ingest
from mumic_ml.manifest import ManifestError
from mumic_ml.taxonomy import Taxonomy

TAXONOMY = Taxonomy.from_names(["Cat", "dog", "sea view"])


def rejections_by_reason(rejected_csv) -> dict[str, int]:
    """Rejected rows per reason, counted from the CSV itself: what `rejected_by_reason` must agree with."""
    with open(rejected_csv, encoding="utf-8", newline="") as fh:
        return dict(Counter(record["reason"] for record in csv.DictReader(fh)))


def write_csv(path, rows, header=("path", "labels", "caption")):
    """A CSV file of `rows` under `header` (None: no header row, as some dataset files have)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def images_root(tmp_path):
    """A source folder with every case; returns the root and the manifest rows (path, labels, caption)."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a_directory").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    noise(seed=99).save(outside / "secret.png")

    noise(seed=1).save(root / "good1.png")
    noise(seed=2).save(root / "good2.jpg", quality=90)
    noise(seed=3).save(root / "sub" / "good3.png")
    noise(seed=4).save(root / "good4.png")
    noise(seed=5).save(root / "good5.png")
    noise(seed=6).save(root / "good6.png")
    noise(seed=1).save(root / "copy_of_good1.bmp")
    noise(300, 150, seed=7).save(root / "big.png")
    (root / "empty.jpg").write_bytes(b"")
    jpeg = encode(noise(seed=8), "JPEG")
    (root / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = encode(noise(seed=9), "PNG")
    (root / "trunc.png").write_bytes(png[: len(png) // 2])
    (root / "text.jpg").write_text("hello, not an image\n")
    (root / "page.png").write_text("<html><body>Not found</body></html>")
    (root / "bomb.png").write_bytes(png_with_declared_size(100_000, 100_000))
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(root / "grey16.png")
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    palette.save(root / "palette.png", transparency=0)
    frames = [Image.new("RGB", (20, 20), c) for c in ("blue", "red")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "white").save(root / "rotated.jpg", exif=exif.tobytes())
    (root / "broken_link.png").symlink_to(root / "does_not_exist.png")
    (root / "escape.png").symlink_to(outside / "secret.png")

    rows = [
        ("good1.png", "cat", "first"),
        ("good2.jpg", "dog|cat", ""),
        ("sub/good3.png", " CAT | Sea  View |cat", "mixed case"),
        ("empty.jpg", "cat", ""),
        ("trunc.jpg", "cat", ""),
        ("trunc.png", "cat", ""),
        ("text.jpg", "cat", ""),
        ("page.png", "cat", ""),
        ("bomb.png", "cat", ""),
        ("tiny.png", "cat", ""),
        ("cmyk.jpg", "dog", ""),
        ("grey16.png", "dog", ""),
        ("palette.png", "dog", ""),
        ("anim.gif", "dog", ""),
        ("rotated.jpg", "dog", ""),
        ("copy_of_good1.bmp", "cat", ""),
        ("./good1.png", "dog", ""),
        ("broken_link.png", "cat", ""),
        ("escape.png", "cat", ""),
        ("../outside/secret.png", "cat", ""),
        (str(root / "good4.png"), "cat", ""),
        ("missing.png", "cat", ""),
        ("a_directory", "cat", ""),
        ("good4.png", "", ""),
        ("good5.png", "cat|fish|sea veiw", ""),
        ("", "cat", ""),
        ("big.png", "sea view", "large"),
        ("sub/../good6.png", "cat", ""),
        ("trunc.png", "dog", ""),
        ("C:\\photos\\a.png", "cat", ""),
    ]
    return root, rows


EXPECTED_REASONS = {
    4: "empty_file",
    5: "truncated",
    6: "truncated",
    7: "not_an_image",
    8: "not_an_image",
    9: "decompression_bomb",
    10: "too_small",
    16: "duplicate_image",
    17: "duplicate_path",
    18: "broken_symlink",
    19: "outside_root",
    20: "path_traversal",
    21: "absolute_path",
    22: "missing_file",
    23: "not_a_file",
    24: "no_labels",
    25: "unknown_label",
    26: "malformed_row",
    29: "truncated",
    30: "absolute_path",
}
ACCEPTED_ROWS = [1, 2, 3, 11, 12, 13, 14, 15, 27, 28]


def run(tmp_path, images_root, **options):
    root, rows = images_root
    tmp_path.mkdir(parents=True, exist_ok=True)
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    return ingest(manifest, root, tmp_path / "out", taxonomy=TAXONOMY, max_side=128, **options), rows


def read_rejected(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def pixel(out, record, xy):
    return Image.open(out / record["path"]).getpixel(xy)


def test_every_case_gets_its_reason_and_good_rows_go_through(tmp_path, images_root):
    result, rows = run(tmp_path, images_root)
    out = tmp_path / "out"
    assert (result.n_rows, result.n_accepted, result.n_rejected) == (30, 10, 20)
    assert result.manifest_path == out / "manifest.parquet" and result.rejected_path == out / "rejected.csv"

    rejected = read_rejected(out / "rejected.csv")
    assert list(rejected[0]) == ["row", "source", "reason", "detail"]
    assert {int(r["row"]): r["reason"] for r in rejected} == EXPECTED_REASONS
    assert set(EXPECTED_REASONS.values()) <= set(REASONS)
    for r in rejected:
        assert r["source"] == rows[int(r["row"]) - 1][0], "rejections name the source exactly as given"
        assert r["detail"]
    details = {int(r["row"]): r["detail"] for r in rejected}
    assert "good1.png" in details[16] and "row 1" in details[16]
    assert "'fish'" in details[25] and "did you mean 'sea view'" in details[25]
    assert details[5].startswith("truncated image data (JPEG)")

    table = pq.read_table(out / "manifest.parquet")
    assert table.schema.field("labels").type == pa.list_(pa.string())
    columns = ["image_id", "source", "path", "sha256", "labels", "width", "height", "row", "caption"]
    assert table.column_names == columns
    records = table.to_pylist()
    assert [r["source"] for r in records] == [rows[i - 1][0] for i in ACCEPTED_ROWS]
    assert [r["row"] for r in records] == list(ACCEPTED_ROWS), "accepted rows are numbered as rejected.csv numbers"
    by_source = {r["source"]: r for r in records}
    assert by_source["good1.png"]["labels"] == ["Cat"]
    assert by_source["good2.jpg"]["labels"] == ["Cat", "dog"]
    assert by_source["sub/good3.png"]["labels"] == ["Cat", "sea view"]
    assert by_source["sub/good3.png"]["caption"] == "mixed case"
    for record in records:
        stored = Image.open(out / record["path"])
        assert record["path"] == f"images/{record['sha256']}.png"
        assert record["image_id"] == record["sha256"][:16]
        assert stored.mode == "RGB" and stored.size == (record["width"], record["height"])
        assert sha256_of_image(stored) == record["sha256"]
    assert (by_source["big.png"]["width"], by_source["big.png"]["height"]) == (128, 64)
    assert (by_source["rotated.jpg"]["width"], by_source["rotated.jpg"]["height"]) == (20, 40)
    assert pixel(out, by_source["cmyk.jpg"], (5, 5)) == pytest.approx((255, 0, 255), abs=3)
    assert pixel(out, by_source["grey16.png"], (5, 5)) == (128, 128, 128)
    assert pixel(out, by_source["palette.png"], (5, 5)) == (255, 255, 255)
    assert pixel(out, by_source["anim.gif"], (5, 5)) == (0, 0, 255)
    assert len(list((out / "images").iterdir())) == 10

    assert result.rejected_by_reason == rejections_by_reason(out / "rejected.csv")
    assert result.rejected_by_reason["truncated"] == 3 and sum(result.rejected_by_reason.values()) == 20


def test_worker_processes_give_the_same_output(tmp_path, images_root):
    serial, _ = run(tmp_path / "serial", images_root)
    parallel, _ = run(tmp_path / "parallel", images_root, workers=2)
    assert serial.rejected_by_reason == parallel.rejected_by_reason
    assert serial.manifest_path.read_bytes() == parallel.manifest_path.read_bytes()
    assert serial.rejected_path.read_bytes() == parallel.rejected_path.read_bytes()


def test_rerun_is_idempotent_and_drops_stale_images(tmp_path, images_root):
    first, _ = run(tmp_path, images_root)
    before = first.manifest_path.read_bytes()
    stale = first.images_dir / f"{'0' * 64}.png"
    stale.write_bytes(b"left by an older run")
    leftover = first.images_dir / f".{'1' * 64}.png.abc.tmp"
    leftover.write_bytes(b"left by a killed run")
    mine = first.images_dir / "notes.txt"
    mine.write_text("not ours to delete")
    second, _ = run(tmp_path, images_root)
    assert second.manifest_path.read_bytes() == before
    assert not stale.exists() and not leftover.exists() and mine.exists()
    assert len(list(second.images_dir.glob("*.png"))) == second.n_accepted


def test_failed_manifest_write_keeps_the_previous_output(tmp_path, images_root, monkeypatch):
    first, _ = run(tmp_path, images_root)
    before = first.manifest_path.read_bytes()

    def crash(table, where, **kwargs):
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("killed while writing")

    monkeypatch.setattr(ingest_module.pq, "write_table", crash)
    with pytest.raises(OSError, match="killed"):
        run(tmp_path, images_root)
    assert first.manifest_path.read_bytes() == before
    assert pq.read_table(first.manifest_path).num_rows == first.n_accepted
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_all_rows_rejected_still_writes_typed_outputs(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "empty.png").write_bytes(b"")
    manifest = write_csv(tmp_path / "m.csv", [("empty.png", "cat", "c"), ("nope.png", "cat", "c")])
    result = ingest(manifest, root, tmp_path / "out")
    assert (result.n_accepted, result.n_rejected) == (0, 2)
    table = pq.read_table(result.manifest_path)
    assert table.num_rows == 0
    assert table.schema.field("labels").type == pa.list_(pa.string())
    assert table.schema.field("caption").type == pa.string()
    assert rejections_by_reason(result.rejected_path) == {"empty_file": 1, "missing_file": 1}


def test_without_taxonomy_labels_are_deduplicated_keeping_first_spelling(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    noise().save(root / "a.png")
    manifest = write_csv(tmp_path / "m.csv", [("a.png", "Sea View|dog|sea  view|DOG")], header=("path", "labels"))
    result = ingest(manifest, root, tmp_path / "out")
    assert pq.read_table(result.manifest_path).column("labels").to_pylist() == [["Sea View", "dog"]]


def test_jsonl_manifest_with_a_broken_line(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    noise(seed=1).save(root / "a.png")
    noise(seed=2).save(root / "b.png")
    lines = [
        json.dumps({"path": "a.png", "labels": ["cat"], "caption": "a cat"}),
        '{"path": "oops.png", "labels": ["cat"',
        json.dumps({"path": "b.png", "labels": "dog|cat"}),
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = ingest(manifest, root, tmp_path / "out", taxonomy=TAXONOMY)
    table = pq.read_table(result.manifest_path).to_pylist()
    assert [(r["source"], r["labels"], r["caption"]) for r in table] == [
        ("a.png", ["Cat"], "a cat"),
        ("b.png", ["Cat", "dog"], None),
    ]
    [rejected] = read_rejected(result.rejected_path)
    assert (rejected["row"], rejected["reason"]) == ("2", "malformed_row")
    assert rejected["detail"].startswith("line is not valid JSON")


def test_parquet_manifest(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    noise().save(root / "001.png")
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["001.png", "002.png"], "labels": [["dog"], ["cat"]]}), manifest)
    result = ingest(manifest, root, tmp_path / "out", taxonomy=TAXONOMY)
    assert pq.read_table(result.manifest_path).column("source").to_pylist() == ["001.png"]
    assert result.rejected_by_reason == {"missing_file": 1}


def test_unreadable_file_is_rejected_and_others_go_through(tmp_path, monkeypatch):
    root = tmp_path / "src"
    root.mkdir()
    noise(seed=1).save(root / "locked.png")
    noise(seed=2).save(root / "open.png")
    manifest = write_csv(tmp_path / "m.csv", [("locked.png", "cat"), ("open.png", "cat")], header=("path", "labels"))
    real_open = open

    def deny_locked(file, *args, **kwargs):
        if str(file).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(images, "open", deny_locked, raising=False)
    result = ingest(manifest, root, tmp_path / "out")
    assert result.rejected_by_reason == {"unreadable": 1} and result.n_accepted == 1


def test_unreadable_permissions_for_real(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    locked = root / "locked.png"
    noise().save(locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with privileges that ignore file permissions")
        manifest = write_csv(tmp_path / "m.csv", [("locked.png", "cat")], header=("path", "labels"))
        result = ingest(manifest, root, tmp_path / "out")
        assert result.rejected_by_reason == {"unreadable": 1}
    finally:
        locked.chmod(0o644)


def test_batches_that_cannot_be_processed(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    with pytest.raises(ManifestError, match="manifest not found"):
        ingest(tmp_path / "missing.csv", root, tmp_path / "out")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ManifestError, match="empty"):
        ingest(empty, root, tmp_path / "out")
    with pytest.raises(ManifestError, match="images root"):
        ingest(empty, tmp_path / "no_such_dir", tmp_path / "out")
    clash = write_csv(tmp_path / "clash.csv", [("a.png", "cat", "x")], header=("path", "labels", "sha256"))
    with pytest.raises(ManifestError, match="clash"):
        ingest(clash, root, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_negative_and_unknown_labels_are_checked_and_stored_like_labels(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for seed, name in enumerate("abcdefg"):
        noise(seed=seed).save(root / f"{name}.png")
    rows = [
        ("a.png", "cat", "DOG", ""),
        ("b.png", "", "sea  view|cat", ""),
        ("c.png", "", "", "dog|Dog"),
        ("d.png", "cat", "Cat", ""),
        ("e.png", "dog", "", "fish"),
        ("f.png", "", "", ""),
        ("g.png", "sea view", "", "cat"),
    ]
    header = ("path", "labels", "negative_labels", "unknown_labels")
    result = ingest(write_csv(tmp_path / "m.csv", rows, header), root, tmp_path / "out", taxonomy=TAXONOMY)

    table = pq.read_table(result.manifest_path)
    assert table.column_names[-3:] == ["row", "negative_labels", "unknown_labels"]
    assert all(table.schema.field(c).type == pa.list_(pa.string()) for c in ("negative_labels", "unknown_labels"))
    stored = {r["source"]: (r["labels"], r["negative_labels"], r["unknown_labels"]) for r in table.to_pylist()}
    assert stored == {
        "a.png": (["Cat"], ["dog"], []),
        "b.png": ([], ["Cat", "sea view"], []),
        "c.png": ([], [], ["dog"]),
        "g.png": (["sea view"], [], ["Cat"]),
    }
    reasons = {r["source"]: (r["reason"], r["detail"]) for r in read_rejected(result.rejected_path)}
    assert reasons["d.png"] == ("conflicting_labels", "'Cat' is in both labels and negative_labels")
    assert reasons["e.png"] == ("unknown_label", "not in the taxonomy: 'fish' (in unknown_labels)")
    assert reasons["f.png"][0] == "no_labels"


def test_without_taxonomy_a_label_in_two_columns_is_a_conflict_whatever_its_spelling(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    noise(seed=1).save(root / "a.png")
    noise(seed=2).save(root / "b.png")
    rows = [("a.png", "Dog", "", "dog "), ("b.png", "Dog", "cat|CAT", "")]
    manifest = write_csv(tmp_path / "m.csv", rows, ("path", "labels", "negative_labels", "unknown_labels"))
    result = ingest(manifest, root, tmp_path / "out")
    assert [r["reason"] for r in read_rejected(result.rejected_path)] == ["conflicting_labels"]
    assert pq.read_table(result.manifest_path).column("negative_labels").to_pylist() == [["cat"]]
