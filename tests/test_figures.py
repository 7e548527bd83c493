"""Figures for the UIs without training anything: a figure is bounded in bytes, a rejected row never shows a
picture from outside its batch folder, and asset metadata leaves out empty rows and rounds its numbers."""

import io

import dagster as dg
import numpy as np
from image_fixtures import inline_png, noise
from PIL import Image

from mumic_dagster.metadata import MAX_INLINE_IMAGE_BYTES, clean, markdown_image, table
from mumic_ml import plots, previews
from mumic_ml.config import Params
from mumic_ml.metrics import calibration_summary
from mumic_ml.project import Project


def test_a_figure_too_large_for_the_metadata_is_scaled_down_until_it_fits():
    photo_like = plots.compact_png(noise(800, 600, seed=1))
    assert len(photo_like) > 2 * MAX_INLINE_IMAGE_BYTES
    png, image = inline_png(markdown_image("noise", photo_like).md_str)
    assert len(png) <= MAX_INLINE_IMAGE_BYTES
    assert image.width < 800 and abs(image.width / image.height - 800 / 600) < 0.01

    chart = plots.label_histogram({"circle": 30, "square": 12, "red circle": 1})
    assert len(chart) < MAX_INLINE_IMAGE_BYTES
    assert plots.fit_png(chart, MAX_INLINE_IMAGE_BYTES) == chart


def test_the_training_curves_are_a_small_png():
    history = [
        {"epoch": epoch, "train_loss": 1 / (epoch + 1), "val_gap_at_k": 0.3 + 0.02 * epoch, "val_map": 0.2}
        for epoch in range(15)
    ]
    png = plots.training_curves(history, gap_k=10, best_epoch=14)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.mode == "P" and min(image.size) > 200
    assert len(png) < 30_000


def test_a_rejected_row_shows_its_picture_only_from_inside_its_batch_folder(tmp_path):
    project = Project(Params(), tmp_path)
    batch = project.incoming / "b1"
    batch.mkdir(parents=True)
    noise(seed=1).save(batch / "inside.png")
    noise(seed=2).save(tmp_path / "elsewhere.png")
    (batch / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    rows = [
        {"batch": "b1", "row": "1", "source": "inside.png", "reason": "unknown_label", "detail": "unicorn"},
        {"batch": "b1", "row": "2", "source": "../../../elsewhere.png", "reason": "outside_root", "detail": "x"},
        {"batch": "b1", "row": "3", "source": str(tmp_path / "elsewhere.png"), "reason": "outside_root", "detail": ""},
        {"batch": "b1", "row": "4", "source": "broken.jpg", "reason": "decode_error", "detail": "truncated"},
        {"batch": "b1", "row": "5", "source": "missing.png", "reason": "missing_file", "detail": "no such file"},
    ]
    tiles = previews.rejected_row_tiles(project, rows)
    assert [tile.image is not None for tile in tiles] == [True, False, False, False, False]
    assert max(tiles[0].image.size) <= previews.THUMBNAIL_SIDE
    assert tiles[3].placeholder == "decode_error: truncated"
    assert tiles[4].caption == "missing_file, row 5 of b1: missing.png"
    sheet = Image.open(io.BytesIO(previews.rejected_rows_sheet(project, rows)))
    assert sheet.format == "PNG"
    assert previews.rejected_rows_sheet(project, []) is None


def test_metadata_leaves_out_empty_rows_and_rounds_numbers_to_four_decimals():
    metadata = clean(
        {
            "gap_at_10": 0.123456789,
            "best_epoch": 3,
            "passed": False,
            "resumed_from": None,
            "note": "",
            "batches": [],
            "details": {},
            "rejected": table([], ["reason"]),
            "card": dg.MetadataValue.md(""),
            "split": {"train": 1},
            "per_class": table([{"class": "circle", "ap": np.float64(0.987654321)}], ["class", "ap"]),
        }
    )
    assert set(metadata) == {"gap_at_10", "best_epoch", "passed", "split", "per_class"}
    assert metadata["gap_at_10"] == 0.1235 and metadata["best_epoch"] == 3 and metadata["passed"] is False
    assert isinstance(metadata["split"], dg.JsonMetadataValue)
    assert metadata["per_class"].records[0].data["ap"] == 0.9877


def test_the_reliability_diagram_is_a_png_small_enough_to_show_inline(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.random((200, 10))
    targets = rng.random(probs.shape) < probs**2
    path = plots.reliability_diagram(
        calibration_summary(probs, targets), calibration_summary(probs**2, targets), tmp_path / "reliability.png"
    )
    image = Image.open(path)
    assert image.format == "PNG" and min(image.size) > 200
    png, _ = inline_png(markdown_image("reliability diagram", path.read_bytes()).md_str)
    assert png == path.read_bytes()
