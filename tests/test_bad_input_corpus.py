"""A generated corpus of bad and unusual inputs, pushed through the `mumic ingest` CLI contract in one batch.

Every file is made here in tmp_path (no binary fixtures). The corpus proves three things at once: each bad row is
rejected with its own reason code and a detail a person can act on, each unusual-but-valid image is converted and
accepted, and the good rows of the same batch go through with `source` kept exactly as the manifest gave it. The
manifest-level cases (encodings, line endings, quoting, empty files) run separately because each needs its own
manifest file. The last test checks that the Dagster `raw_images` asset reports the rejection counts by reason.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from image_fixtures import encode, inline_png, noise, png_with_declared_size  # noqa: E402
from PIL import Image

from mumic_ml.cli import main
from mumic_ml.images import sha256_of_image
from mumic_ml.ingest import REASONS

CLASSES = ["cat", "dog", "sea view", "salt, pepper"]
INGEST = {"max_side": 128, "min_side": 24, "max_pixels": 1_000_000, "workers": 0}
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def write_params(folder: Path) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"ingest": INGEST}), encoding="utf-8")
    return path


def write_taxonomy(folder: Path) -> Path:
    path = folder / "taxonomy.yaml"
    path.write_text(yaml.safe_dump({"classes": CLASSES}), encoding="utf-8")
    return path


def run_cli(manifest: Path, root: Path, out: Path, params: Path, taxonomy: Path) -> tuple[int, str, str]:
    """`mumic ingest` in-process; returns (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["ingest", "--params", str(params), "--manifest", str(manifest), "--images-root", str(root)]
    argv += ["--out", str(out), "--taxonomy", str(taxonomy)]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


def read_rejected(out: Path) -> list[dict[str, str]]:
    with open(out / "rejected.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def stored_pixels(out: Path, record: dict) -> np.ndarray:
    return np.asarray(Image.open(out / record["path"]), dtype=int)


# --- the corpus --------------------------------------------------------------------------------------------------
# Each builder gets (images root, a folder outside the root) and creates what its row needs.
Builder = Callable[[Path, Path], None]


def _nothing(root: Path, outside: Path) -> None:
    """For rows whose point is the manifest text, not a file."""


def _save(name: str, img: Image.Image, **options) -> Builder:
    def build(root: Path, outside: Path) -> None:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        img.save(target, **options)

    return build


def _bytes(name: str, data: bytes) -> Builder:
    def build(root: Path, outside: Path) -> None:
        (root / name).write_bytes(data)

    return build


def _symlink(name: str, target: Callable[[Path, Path], Path]) -> Builder:
    def build(root: Path, outside: Path) -> None:
        (root / name).symlink_to(target(root, outside))

    return build


def _locked(root: Path, outside: Path) -> None:
    locked = root / "locked.png"
    noise(seed=40).save(locked)
    locked.chmod(0)


def _symlink_loop(root: Path, outside: Path) -> None:
    (root / "loop_a.png").symlink_to(root / "loop_b.png")
    (root / "loop_b.png").symlink_to(root / "loop_a.png")


def _exif_rotated() -> tuple[Image.Image, bytes]:
    """Stored 48x24, left half red and right half blue, tagged 'rotate 90 degrees clockwise to display'."""
    stored = Image.new("RGB", (48, 24), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 24, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    return stored, exif.tobytes()


def _grey16() -> Image.Image:
    values = np.zeros((32, 32), dtype=np.uint16)
    values[:, 16:] = 65535
    return Image.fromarray(values)


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([0, 0, 0, 0, 160, 0] + [0] * 762)
    img.paste(1, (16, 0, 32, 32))
    return img


def _animated_gif(root: Path, outside: Path) -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ("blue", "red", "lime")]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _inside_link(root: Path, outside: Path) -> None:
    (root / "real").mkdir()
    noise(seed=10).save(root / "real" / "target.png")
    (root / "inside_link.png").symlink_to(root / "real" / "target.png")


def _exif_jpeg(root: Path, outside: Path) -> None:
    stored, exif = _exif_rotated()
    stored.save(root / "rotated.jpg", quality=95, exif=exif)


_JPEG = encode(noise(seed=20), "JPEG", quality=90)
_PNG = encode(noise(seed=21), "PNG")
_HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


@dataclass(frozen=True)
class Case:
    """One manifest row: `expect` is a reason code, or None for an image that must be accepted."""

    kind: str
    path: str | Callable[[Path], str]
    labels: str
    build: Builder
    expect: str | None
    detail: str = ""
    needs_non_root: bool = False


# Rows in manifest order. The three good rows come first, in the middle and last, so a crash or a loss anywhere
# in the batch shows up on them.
GOOD = [
    Case("good_png", "good/cat.png", "cat", _save("good/cat.png", noise(seed=1)), None),
    Case("good_jpeg", "good/dog.jpg", "dog", _save("good/dog.jpg", noise(seed=2), quality=92), None),
    Case("good_png_in_subfolder", "good/deep/sea.png", "sea view", _save("good/deep/sea.png", noise(seed=3)), None),
]

BAD = [
    Case("zero_byte_file", "empty.jpg", "cat", _bytes("empty.jpg", b""), "empty_file", "file is empty (0 bytes)"),
    Case(
        "truncated_jpeg",
        "truncated.jpg",
        "cat",
        _bytes("truncated.jpg", _JPEG[: len(_JPEG) // 2]),
        "truncated",
        "truncated image data (JPEG)",
    ),
    Case(
        "truncated_png",
        "truncated.png",
        "cat",
        _bytes("truncated.png", _PNG[: len(_PNG) // 2]),
        "truncated",
        "truncated image data (PNG)",
    ),
    Case(
        "text_file_named_jpg",
        "notes.jpg",
        "cat",
        _bytes("notes.jpg", b"path,labels\nthis is a text file\n"),
        "not_an_image",
        "not a recognised image format",
    ),
    Case(
        "html_error_page_named_jpg",
        "download.jpg",
        "cat",
        _bytes("download.jpg", _HTML),
        "not_an_image",
        "looks like an HTML page",
    ),
    Case(
        "decompression_bomb_over_pillow_guard",
        "bomb.png",
        "cat",
        _bytes("bomb.png", png_with_declared_size(100_000, 100_000)),
        "decompression_bomb",
        "declared image size is too large",
    ),
    Case(
        "decompression_bomb_over_max_pixels",
        "huge_declared.png",
        "cat",
        _bytes("huge_declared.png", png_with_declared_size(2_000, 2_000)),
        "decompression_bomb",
        "declared size 2000x2000 (4000000 pixels) exceeds the limit of 1000000",
    ),
    Case(
        "one_by_one_pixel",
        "pixel.png",
        "cat",
        _save("pixel.png", Image.new("RGB", (1, 1))),
        "too_small",
        "image is 1x1; both sides must be >= 24",
    ),
    Case(
        "below_configured_min_side",
        "narrow.png",
        "cat",
        _save("narrow.png", noise(100, 20, seed=4)),
        "too_small",
        "image is 100x20; both sides must be >= 24",
    ),
    Case(
        "unreadable_permissions",
        "locked.png",
        "cat",
        _locked,
        "unreadable",
        "cannot read file: Permission denied",
        needs_non_root=True,
    ),
    Case(
        "broken_symlink",
        "dangling.png",
        "cat",
        _symlink("dangling.png", lambda root, outside: root / "gone.png"),
        "broken_symlink",
        "'dangling.png' is a symlink to a missing target",
    ),
    Case("symlink_loop", "loop_a.png", "cat", _symlink_loop, "broken_symlink", "'loop_a.png' is a symlink loop"),
    Case(
        "symlink_to_file_outside_root",
        "escape.png",
        "cat",
        _symlink("escape.png", lambda root, outside: outside / "secret.png"),
        "outside_root",
        "outside the images root",
    ),
    Case(
        "dangling_symlink_outside_root",
        "escape_dangling.png",
        "cat",
        _symlink("escape_dangling.png", lambda root, outside: outside / "not_there.png"),
        "outside_root",
        "outside the images root",
    ),
    Case(
        "symlinked_dir_escaping_root",
        "linked_dir/secret.png",
        "cat",
        _symlink("linked_dir", lambda root, outside: outside),
        "outside_root",
        "outside the images root",
    ),
    Case(
        "dot_dot_path",
        "../outside/secret.png",
        "cat",
        _nothing,
        "path_traversal",
        "path climbs out of the images root: '../outside/secret.png'",
    ),
    Case(
        "dot_dot_inside_path",
        "good/../../outside/secret.png",
        "cat",
        _nothing,
        "path_traversal",
        "path climbs out of the images root",
    ),
    Case(
        "absolute_path",
        lambda root: str(root / "good" / "cat.png"),
        "cat",
        _nothing,
        "absolute_path",
        "path must be relative to the images root",
    ),
    Case(
        "windows_drive_path",
        "C:\\photos\\cat.png",
        "cat",
        _nothing,
        "absolute_path",
        "path must be relative to the images root",
    ),
    Case(
        "missing_file",
        "nowhere.png",
        "cat",
        _nothing,
        "missing_file",
        "no such file under the images root: 'nowhere.png'",
    ),
    Case("directory", "good", "cat", _nothing, "not_a_file", "'good' is not a regular file"),
    Case(
        "duplicate_content_other_name",
        "copy_of_cat.bmp",
        "cat",
        _save("copy_of_cat.bmp", noise(seed=1)),
        "duplicate_image",
        "same picture as row 1 ('good/cat.png')",
    ),
    Case(
        "two_rows_one_path",
        "good/dog.jpg",
        "dog|cat",
        _nothing,
        "duplicate_path",
        "same file as row 2 ('good/dog.jpg')",
    ),
    Case(
        "same_path_spelled_with_dot",
        "./good/cat.png",
        "cat",
        _nothing,
        "duplicate_path",
        "same file as row 1 ('good/cat.png')",
    ),
    Case(
        "symlink_inside_root_to_listed_file",
        "alias_of_cat.png",
        "cat",
        _symlink("alias_of_cat.png", lambda root, outside: root / "good" / "cat.png"),
        "duplicate_path",
        "same file as row 1 ('good/cat.png')",
    ),
    Case(
        "label_not_in_taxonomy",
        "unicorn.png",
        "cat|unicorn",
        _save("unicorn.png", noise(seed=5)),
        "unknown_label",
        "not in the taxonomy: 'unicorn'",
    ),
    Case(
        "misspelt_label",
        "typo.png",
        "sea veiw",
        _save("typo.png", noise(seed=6)),
        "unknown_label",
        "'sea veiw' (did you mean 'sea view'?)",
    ),
    Case("no_labels", "unlabelled.png", "", _save("unlabelled.png", noise(seed=7)), "no_labels", "no labels"),
    Case(
        "only_separators_as_labels",
        "separators.png",
        " | |",
        _save("separators.png", noise(seed=8)),
        "no_labels",
        "no labels",
    ),
    Case("empty_path", "", "cat", _nothing, "malformed_row", "missing path"),
]

UNUSUAL = [
    Case("cmyk_jpeg", "cmyk.jpg", "dog", _save("cmyk.jpg", Image.new("CMYK", (32, 32), (0, 255, 0, 0))), None),
    Case("grayscale_16_bit_png", "grey16.png", "dog", _save("grey16.png", _grey16()), None),
    Case(
        "palette_png_with_transparency",
        "palette.png",
        "dog",
        _save("palette.png", _palette_with_transparency(), transparency=0),
        None,
    ),
    Case("animated_gif_first_frame", "animated.gif", "dog", _animated_gif, None),
    Case("exif_rotated_jpeg", "rotated.jpg", "dog", _exif_jpeg, None),
    Case(
        "labels_differing_in_case_and_whitespace",
        "mixed_labels.png",
        " CAT |  Sea   View |cat|SEA VIEW ",
        _save("mixed_labels.png", noise(seed=9)),
        None,
    ),
    Case("symlink_inside_root", "inside_link.png", "cat", _inside_link, None),
]


ROWS = [GOOD[0], GOOD[1], *BAD[:12], GOOD[2], *BAD[12:], *UNUSUAL]
BY_KIND = {case.kind: case for case in ROWS}
assert len(BY_KIND) == len(ROWS), "kinds are unique"


@dataclass
class Corpus:
    root: Path
    out: Path
    code: int
    stdout: str
    stderr: str
    row_of: dict[str, int]  # kind -> 1-based manifest row
    source_of: dict[str, str]  # kind -> the path string written to the manifest
    rejected: dict[int, dict[str, str]]  # manifest row -> rejected.csv record
    accepted: dict[str, dict]  # source -> manifest.parquet record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    """Build every file, write one CSV manifest over all rows, run `mumic ingest` once."""
    base = tmp_path_factory.mktemp("corpus")
    root, outside, out = base / "images", base / "outside", base / "out"
    (root / "good").mkdir(parents=True)
    outside.mkdir()
    noise(seed=99).save(outside / "secret.png")
    rows = [case for case in ROWS if not (case.needs_non_root and IS_ROOT)]
    for case in rows:
        case.build(root, outside)
    source_of = {case.kind: case.path(root) if callable(case.path) else case.path for case in rows}
    manifest = base / "manifest.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels"])
        writer.writerows([source_of[case.kind], case.labels] for case in rows)
    try:
        code, stdout, stderr = run_cli(manifest, root, out, write_params(base), write_taxonomy(base))
    finally:
        if (root / "locked.png").exists():
            (root / "locked.png").chmod(0o644)
    rejected = {int(r["row"]): r for r in read_rejected(out)} if (out / "rejected.csv").exists() else {}
    accepted = {r["source"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    row_of = {case.kind: i for i, case in enumerate(rows, start=1)}
    return Corpus(root, out, code, stdout, stderr, row_of, source_of, rejected, accepted)


def _param(case: Case):
    marks = [pytest.mark.skipif(IS_ROOT, reason="root reads any file whatever its permissions")]
    return pytest.param(case, id=case.kind, marks=marks if case.needs_non_root else [])


@pytest.mark.parametrize("case", [_param(c) for c in BAD])
def test_bad_row_is_rejected_with_a_specific_reason(corpus, case):
    row = corpus.row_of[case.kind]
    assert row in corpus.rejected, f"{case.kind} was not rejected"
    record = corpus.rejected[row]
    assert record["source"] == corpus.source_of[case.kind], "rejected.csv names the path as the manifest gave it"
    assert record["reason"] == case.expect and record["reason"] in REASONS
    assert case.detail in record["detail"]


def test_symlink_escapes_are_caught_after_resolving_links(corpus):
    """The escaping symlinks are real paths under the root; only resolving them shows they leave it."""
    for kind in ("symlink_to_file_outside_root", "dangling_symlink_outside_root", "symlinked_dir_escaping_root"):
        detail = corpus.rejected[corpus.row_of[kind]]["detail"]
        outside = (corpus.root.parent / "outside").resolve()
        assert f"resolves to {outside}" in detail
    assert not any("secret" in source for source in corpus.accepted)


def test_cmyk_jpeg_is_converted_to_rgb(corpus):
    pixels = stored_pixels(corpus.out, corpus.accepted["cmyk.jpg"])
    assert pixels[16, 16].tolist() == pytest.approx([255, 0, 255], abs=4)


def test_16_bit_grayscale_is_scaled_not_clipped(corpus):
    pixels = stored_pixels(corpus.out, corpus.accepted["grey16.png"])
    assert pixels[16, 4].tolist() == [0, 0, 0] and pixels[16, 28].tolist() == [255, 255, 255]


def test_palette_transparency_becomes_white(corpus):
    pixels = stored_pixels(corpus.out, corpus.accepted["palette.png"])
    assert pixels[16, 4].tolist() == [255, 255, 255] and pixels[16, 28].tolist() == [0, 160, 0]


def test_animated_gif_keeps_its_first_frame(corpus):
    pixels = stored_pixels(corpus.out, corpus.accepted["animated.gif"])
    assert pixels[16, 16].tolist() == [0, 0, 255]


def test_exif_rotation_is_applied_before_storing(corpus):
    """Orientation 6 turns the stored 48x24 (red left, blue right) into a 24x48 picture, red on top."""
    record = corpus.accepted["rotated.jpg"]
    assert (record["width"], record["height"]) == (24, 48)
    pixels = stored_pixels(corpus.out, record)
    assert pixels.shape[:2] == (48, 24)
    assert pixels[8, 12].tolist() == pytest.approx([255, 0, 0], abs=30)
    assert pixels[40, 12].tolist() == pytest.approx([0, 0, 255], abs=30)


def test_labels_differing_in_case_and_whitespace_are_normalised_not_rejected(corpus):
    """With a taxonomy, labels are matched up to case and whitespace, spelt as the taxonomy spells them,
    de-duplicated and put in taxonomy order."""
    assert corpus.accepted["mixed_labels.png"]["labels"] == ["cat", "sea view"]


def test_symlink_inside_root_is_followed(corpus):
    record = corpus.accepted["inside_link.png"]
    target = Image.open(corpus.root / "real" / "target.png").convert("RGB")
    assert record["sha256"] == sha256_of_image(target)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.kind) for c in UNUSUAL + GOOD])
def test_valid_row_is_accepted_with_source_kept(corpus, case):
    record = corpus.accepted.get(corpus.source_of[case.kind])
    assert record is not None, f"{case.kind} was rejected: {corpus.rejected.get(corpus.row_of[case.kind])}"
    assert record["path"] == f"images/{record['sha256']}.png"
    stored = Image.open(corpus.out / record["path"])
    assert stored.mode == "RGB" and stored.size == (record["width"], record["height"])
    assert sha256_of_image(stored) == record["sha256"]
    assert min(stored.size) >= INGEST["min_side"] and max(stored.size) <= INGEST["max_side"]


def test_every_row_is_accounted_for_exactly_once(corpus):
    assert corpus.code == 0, corpus.stderr
    assert "Traceback" not in corpus.stderr
    records = pq.read_table(corpus.out / "manifest.parquet").to_pylist()
    kept = [kind for kind in corpus.row_of if corpus.row_of[kind] not in corpus.rejected]
    assert {BY_KIND[kind].expect for kind in kept} == {None}, "only the valid rows are missing from rejected.csv"
    assert [r["source"] for r in records] == [corpus.source_of[kind] for kind in kept], "accepted, in manifest order"
    assert set(corpus.rejected) <= set(corpus.row_of.values())
    n_rows, n_accepted = len(corpus.row_of), len(records)
    assert n_accepted + len(corpus.rejected) == n_rows
    assert f"ingest: {n_rows} rows, {n_accepted} accepted, {n_rows - n_accepted} rejected" in corpus.stdout


def test_cli_prints_the_counts_by_reason(corpus):
    expected: dict[str, int] = {}
    for kind in corpus.row_of:
        reason = BY_KIND[kind].expect
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    for reason, count in expected.items():
        assert f"  {reason}: {count}\n" in corpus.stdout


# --- manifest-level cases ----------------------------------------------------------------------------------------


@pytest.fixture
def small_batch(tmp_path):
    """Two good images (one with a comma in its name), a taxonomy and params; returns a runner for a manifest."""
    root = tmp_path / "images"
    root.mkdir()
    noise(seed=31).save(root / "a.png")
    noise(seed=32).save(root / "with, comma.png")
    params, taxonomy = write_params(tmp_path), write_taxonomy(tmp_path)

    def run(name: str, content: bytes) -> tuple[int, str, str, Path]:
        manifest = tmp_path / name
        manifest.write_bytes(content)
        out = tmp_path / "out"
        return (*run_cli(manifest, root, out, params, taxonomy), out)

    return run


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            b"\xef\xbb\xbfpath,labels\na.png,cat\n",
            [("a.png", ["cat"])],
            id="utf8_bom",
        ),
        pytest.param(
            b"path,labels\r\na.png,dog|cat\r\nwith, comma.png,dog\r\n",
            [("a.png", ["cat", "dog"])],
            id="windows_line_endings",
        ),
        pytest.param(
            b'path,labels\r\n"with, comma.png","salt, pepper|dog"\r\n"a.png","[""salt, pepper""]"\r\n',
            [("with, comma.png", ["dog", "salt, pepper"]), ("a.png", ["salt, pepper"])],
            id="quoted_delimiters",
        ),
        pytest.param(
            b'\xef\xbb\xbfpath,labels\r\n"with, comma.png",sea view\r\n',
            [("with, comma.png", ["sea view"])],
            id="bom_crlf_and_quotes_together",
        ),
    ],
)
def test_manifest_encoding_variants_are_read_exactly(small_batch, content, expected):
    """No BOM in the header, no stray carriage return in a path or label, quoted commas kept inside the field."""
    code, stdout, stderr, out = small_batch("manifest.csv", content)
    assert code == 0, stderr
    records = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["source"], r["labels"]) for r in records] == expected
    for record in read_rejected(out):
        assert "\r" not in record["source"] and record["reason"] in REASONS


def test_windows_line_endings_keep_the_malformed_row_source_clean(small_batch):
    """The unquoted comma splits the row into three fields; the row is rejected, its source has no CR."""
    code, _, stderr, out = small_batch("manifest.csv", b"path,labels\r\na.png,cat\r\nwith, comma.png,dog\r\n")
    assert code == 0, stderr
    [record] = read_rejected(out)
    assert (record["source"], record["reason"]) == ("with", "malformed_row")
    assert record["detail"] == "row has 3 fields but the header has 2"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param(
            "manifest.csv",
            "path,labels\ncaf\u00e9.png,cat\n".encode("latin-1"),
            "not valid UTF-8: byte 0xe9 at byte offset 15 (line 2); save the manifest as UTF-8",
            id="non_utf8_manifest",
        ),
        pytest.param("manifest.csv", b"", "the manifest is empty (no header row)", id="empty_manifest"),
        pytest.param("manifest.csv", b"path,labels\r\n", "the manifest has no data rows", id="header_only_manifest"),
        pytest.param("manifest.jsonl", b"", "the manifest has no data rows", id="empty_jsonl_manifest"),
    ],
)
def test_unprocessable_manifest_exits_non_zero_without_traceback(small_batch, name, content, message):
    """A non-UTF-8 manifest is refused as a whole rather than guessed at: a wrong guess would rename every file."""
    code, stdout, stderr, out = small_batch(name, content)
    assert code == 2
    assert stderr.startswith("mumic ingest: error: ") and message in stderr
    assert "Traceback" not in stderr
    assert not (out / "manifest.parquet").exists()


# --- Dagster ------------------------------------------------------------------------------------------------------


def test_raw_images_asset_reports_rejections_by_reason(tmp_path):
    """Materialize only `raw_images` over one batch in data/incoming/ and read its `rejections_by_reason` table."""
    dg = pytest.importorskip("dagster")
    from mumic_dagster import assets
    from mumic_dagster.resources import ProjectResource

    batch = tmp_path / "data" / "incoming" / "2026-01-01-corpus"
    batch.mkdir(parents=True)
    noise(seed=51).save(batch / "a.png")
    noise(seed=52).save(batch / "b.png")
    noise(seed=53).save(batch / "c.png")
    noise(seed=51).save(batch / "a_again.bmp")
    (batch / "empty.jpg").write_bytes(b"")
    (batch / "page.jpg").write_bytes(_HTML)
    paths = {"incoming": "data/incoming", "ingested": "data/ingested", "taxonomy": "taxonomy.yaml"}
    params = {"ingest": INGEST, "paths": paths}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    write_taxonomy(tmp_path)
    rows = ["a.png,cat", "empty.jpg,cat", "page.jpg,dog", "b.png,dog", "a_again.bmp,cat", "missing.png,cat"]
    rows += ["b.png,cat", "c.png,unicorn"]
    (batch / "manifest.csv").write_text("path,labels\n" + "\n".join(rows) + "\n", encoding="utf-8")

    result = dg.materialize([assets.raw_images], resources={"project": ProjectResource(root=str(tmp_path))})
    assert result.success
    [event] = result.asset_materializations_for_node("raw_images")
    table = event.metadata["rejections_by_reason"]
    counts = {record.data["reason"]: record.data["rows"] for record in table.records}
    expected = {
        "empty_file": 1,
        "not_an_image": 1,
        "duplicate_image": 1,
        "missing_file": 1,
        "duplicate_path": 1,
        "unknown_label": 1,
    }
    assert counts == expected
    assert event.metadata["images"].value == 2
    assert event.metadata["rejected_rows"].value == sum(expected.values())

    # The rejected rows themselves, readable without the server's files: a table and a contact sheet.
    first = [record.data for record in event.metadata["first_rejected_rows"].records]
    assert [list(row) for row in first] == [["batch", "row", "source", "reason", "detail"]] * len(first)
    assert {(row["source"], row["reason"]) for row in first} == {
        ("empty.jpg", "empty_file"),
        ("page.jpg", "not_an_image"),
        ("a_again.bmp", "duplicate_image"),
        ("missing.png", "missing_file"),
        ("b.png", "duplicate_path"),
        ("c.png", "unknown_label"),
    }
    assert {row["batch"] for row in first} == {"2026-01-01-corpus"}
    _, sheet = inline_png(event.metadata["rejected_images"].md_str)
    assert sheet.height > 100
    _, sample = inline_png(event.metadata["sample_images"].md_str)
    assert sample.width > 100
