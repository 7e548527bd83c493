"""What a reviewer sees of the data without access to the server's files: contact sheets of accepted images and of
rejected manifest rows, the first rejected rows, and positives per class by split (PNG bytes from `plots`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from mumic_ml.images import ImageRejected, decode_image
from mumic_ml.plots import Tile, contact_sheet
from mumic_ml.project import Project

SAMPLE_TILES = 12
REJECTED_TILES = 12
REJECTED_ROWS = 20
THUMBNAIL_SIDE = 128
REJECTED_COLUMNS = ("batch", "row", "source", "reason", "detail")


def _thumbnail(path: Path, max_pixels: int):
    """The picture at `path` shrunk to a thumbnail, or None when it cannot be decoded safely."""
    try:
        image = decode_image(path, max_pixels=max_pixels, min_side=1, draft_side=THUMBNAIL_SIDE)
    except ImageRejected:
        return None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return image


def sample_images_sheet(project: Project, n_tiles: int = SAMPLE_TILES) -> bytes | None:
    """Accepted images spread evenly over the manifest (every batch shows), each with its labels."""
    manifest = pd.read_parquet(project.manifest, columns=["path", "labels"])
    if manifest.empty:
        return None
    rows = np.unique(np.linspace(0, len(manifest) - 1, min(n_tiles, len(manifest))).round().astype(int))
    tiles = [
        Tile(
            _thumbnail(project.ingested / manifest["path"].iat[i], project.params.ingest.max_pixels),
            ", ".join(manifest["labels"].iat[i]),
        )
        for i in rows
    ]
    return contact_sheet(tiles, f"{len(tiles)} of {len(manifest)} accepted images and their labels")


def rejected_rows(rejected_csv: Path, limit: int = REJECTED_ROWS) -> list[dict[str, str]]:
    """The first `limit` rows of ingest's rejected.csv, in arrival order: batch, row, source, reason, detail."""
    if not rejected_csv.is_file():
        return []
    frame = pd.read_csv(rejected_csv, dtype=str, keep_default_na=False, nrows=limit)
    return [{column: record.get(column, "") for column in REJECTED_COLUMNS} for record in frame.to_dict("records")]


def _source_in_batch(project: Project, batch: str, source: str) -> Path | None:
    """The rejected row's file if it lies inside its batch folder; a manifest may name any path, and a picture from
    elsewhere on the server must never reach the UI."""
    if not batch or not source:
        return None
    folder = os.path.realpath(project.incoming / batch)
    real = os.path.realpath(os.path.join(folder, source))
    return Path(real) if os.path.commonpath([folder, real]) == folder else None


def rejected_row_tiles(project: Project, rows: list[Mapping[str, str]]) -> list[Tile]:
    """A tile per rejected row with its reason; a row whose file cannot be decoded (or lies outside its batch
    folder) is a tile with the reason and detail instead of a picture."""
    max_pixels = project.params.ingest.max_pixels
    tiles = []
    for row in rows:
        path = _source_in_batch(project, row["batch"], row["source"])
        image = None if path is None else _thumbnail(path, max_pixels)
        where = f"row {row['row']} of {row['batch']}: {row['source']}"
        tiles.append(Tile(image, f"{row['reason']}, {where}", placeholder=f"{row['reason']}: {row['detail']}"))
    return tiles


def rejected_rows_sheet(project: Project, rows: list[Mapping[str, str]]) -> bytes | None:
    """The contact sheet of the first rejected rows (None when nothing was rejected)."""
    if not rows:
        return None
    return contact_sheet(rejected_row_tiles(project, rows[:REJECTED_TILES]), "Rejected rows and why")


def split_positives(frames: Mapping[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    """Images per class in each split's `labels` column."""
    return {
        name: dict(Counter(label for labels in frame["labels"] for label in labels)) for name, frame in frames.items()
    }
