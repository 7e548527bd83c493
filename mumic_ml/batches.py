"""Batches that accumulate: every labelled drop in the incoming folder is ingested once and kept.

Layout of the incoming folder::

    incoming/
      2026-11-01-hotels/            one batch: a manifest plus the images its paths point to
        manifest.csv                (or manifest.jsonl / manifest.parquet); write it LAST, it marks the batch ready
        rooms/001.jpg ...
      2026-11-20-extra/ ...

`ingest_batches` ingests each new batch into `out/batches/<batch_id>/` with `mumic_ml.ingest.ingest` (same checks,
same rejection reasons), remembers it in `out/batches.json` by the hash of its manifest, and rebuilds the combined
`out/manifest.parquet` and `out/rejected.csv` over every batch so far. A batch whose manifest is unchanged is never
ingested twice; a batch whose manifest changed is re-ingested and replaces its earlier version.

Arrival order wins, whatever the folder names: the ledger numbers each batch (`arrival`) when it is first ingested
(batches new in the same run in name order), a re-ingested batch keeps its number, and the combined table walks
the batches by that number. A picture already accepted from a batch that arrived earlier is rejected as
`duplicate_image` with the batch, row and source of the rejected row and, in `detail`, of the copy kept; so a later
drop never takes images away from a collection a model was already trained on, and retraining sees each picture
once. Paths in the combined manifest are relative to `out/` (`batches/<id>/images/<sha256>.png`); its `batch` and
`row` columns say which manifest row each image came from. When any batch has `negative_labels` or
`unknown_labels`, the combined manifest has the column for every row: empty lists for the batches without it,
which is what their rows mean (a class not named is absent).

A correction batch (`mumic audit --apply`) marks its rows with the column `replaces_labels` (true): such a row says
"these are the image's labels now". It is applied after every ordinary row, whatever the arrival numbers or
folder names, and replaces all three label columns of the image already in the collection (a column the
correction lacks becomes empty); of two corrections of one image the later arrival wins. The image keeps its
place, batch and source; `relabelled_by` names the correction batch. A correction of a picture no batch holds is
rejected as `not_in_collection`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mumic_ml.ingest import IngestResult, ingest
from mumic_ml.io import atomic_path, atomic_write_json, file_digest, read_json
from mumic_ml.manifest import QUALIFIED_LABEL_COLUMNS, ManifestError, label_lists_as_strings
from mumic_ml.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
LEDGER = "batches.json"
# A manifest column whose true rows replace the labels of an image already in the collection.
CORRECTION_COLUMN = "replaces_labels"
RELABELLED_BY = "relabelled_by"
_TRUE = frozenset({"true", "yes", "1"})
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Batch:
    batch_id: str
    root: Path
    manifest_path: Path
    fingerprint: str  # sha256 of the manifest bytes


@dataclass
class BatchIngestResult:
    manifest_path: Path
    rejected_path: Path
    ingested: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    n_images: int = 0
    n_rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    per_batch: dict[str, dict] = field(default_factory=dict)


def discover_batches(incoming: str | Path) -> list[Batch]:
    """Ready batches (sub-folders with a manifest), sorted by id: the order in which new ones are numbered."""
    incoming = Path(incoming)
    if not incoming.is_dir():
        raise ManifestError(f"incoming folder not found: {incoming}")
    batches = []
    for folder in sorted(p for p in incoming.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifests = [folder / name for name in MANIFEST_NAMES if (folder / name).is_file()]
        if not manifests:
            continue
        if len(manifests) > 1:
            raise ManifestError(f"batch {folder} has more than one manifest: {[m.name for m in manifests]}")
        if not _BATCH_ID.match(folder.name):
            raise ManifestError(f"batch folder name {folder.name!r} must be letters, digits, '.', '_' or '-'")
        batches.append(Batch(folder.name, folder, manifests[0], file_digest(manifests[0])))
    return batches


def ingest_batches(
    incoming: str | Path,
    out_dir: str | Path,
    *,
    taxonomy: Taxonomy | None = None,
    max_side: int = 512,
    min_side: int = 16,
    max_pixels: int = 50_000_000,
    workers: int = 0,
) -> BatchIngestResult:
    out = Path(out_dir)
    batches = discover_batches(incoming)
    if not batches:
        raise ManifestError(f"no batch with a manifest ({', '.join(MANIFEST_NAMES)}) in {incoming}")
    ledger_path = out / LEDGER
    ledger: dict[str, dict] = read_json(ledger_path) if ledger_path.is_file() else {}
    if _number_unnumbered(ledger):
        atomic_write_json(ledger_path, ledger)
    result = BatchIngestResult(out / "manifest.parquet", out / "rejected.csv")
    for batch in batches:
        batch_out = out / "batches" / batch.batch_id
        known = ledger.get(batch.batch_id)
        if known and known["fingerprint"] == batch.fingerprint and (batch_out / "manifest.parquet").is_file():
            result.skipped.append(batch.batch_id)
            continue
        outcome: IngestResult = ingest(
            batch.manifest_path,
            batch.root,
            batch_out,
            taxonomy=taxonomy,
            max_side=max_side,
            min_side=min_side,
            max_pixels=max_pixels,
            workers=workers,
        )
        ledger[batch.batch_id] = {
            "fingerprint": batch.fingerprint,
            "manifest": str(batch.manifest_path),
            "n_rows": outcome.n_rows,
            "n_accepted": outcome.n_accepted,
            "n_rejected": outcome.n_rejected,
            "ingested_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "arrival": known["arrival"] if known else _next_arrival(ledger),
        }
        # The ledger is written after each batch, so a killed run redoes at most the batch it was in.
        atomic_write_json(ledger_path, ledger)
        result.ingested.append(batch.batch_id)
    in_arrival_order = sorted((b.batch_id for b in batches), key=lambda batch_id: ledger[batch_id]["arrival"])
    _combine(out, in_arrival_order, result)
    result.per_batch = {batch_id: ledger[batch_id] for batch_id in in_arrival_order}
    log.info(
        "batches: %d ingested, %d unchanged; %d images, %d rejected rows",
        len(result.ingested),
        len(result.skipped),
        result.n_images,
        result.n_rejected,
    )
    return result


def _next_arrival(ledger: dict[str, dict]) -> int:
    return 1 + max((entry["arrival"] for entry in ledger.values() if "arrival" in entry), default=0)


def _number_unnumbered(ledger: dict[str, dict]) -> bool:
    """Number entries from ledgers written before arrival was recorded, by when they were ingested, then by name.

    Returns whether any entry was numbered, so the caller writes the numbers back.
    """
    unnumbered = sorted(
        (batch_id for batch_id, entry in ledger.items() if "arrival" not in entry),
        key=lambda batch_id: (ledger[batch_id].get("ingested_at", ""), batch_id),
    )
    for batch_id in unnumbered:
        ledger[batch_id]["arrival"] = _next_arrival(ledger)
    return bool(unnumbered)


def _combine(out: Path, batch_ids: list[str], result: BatchIngestResult) -> None:
    """Union of the batch manifests in the order given; a picture seen in an earlier one is a duplicate."""
    accepted, rejected, corrections = [], [], []
    kept_copy: dict[str, str] = {}
    for batch_id in batch_ids:
        folder = out / "batches" / batch_id
        frame = pd.read_parquet(folder / "manifest.parquet")
        frame.insert(0, "batch", batch_id)
        frame["path"] = [f"batches/{batch_id}/{p}" for p in frame["path"]]
        # Batches ingested before rows were recorded have no row column: their rows stay unnamed, not guessed.
        frame["row"] = frame["row"].astype("Int64") if "row" in frame else pd.Series(pd.NA, frame.index, "Int64")
        if CORRECTION_COLUMN in frame:
            marked = frame[CORRECTION_COLUMN].map(_is_true).astype(bool)
            corrections.append(frame[marked])
            frame = frame[~marked].drop(columns=CORRECTION_COLUMN)
        duplicate = frame["sha256"].isin(kept_copy.keys())
        for sha, row, source in frame.loc[duplicate, ["sha256", "row", "source"]].itertuples(index=False):
            rejected.append(
                {
                    "batch": batch_id,
                    "row": None if pd.isna(row) else int(row),
                    "source": source,
                    "reason": "duplicate_image",
                    "detail": f"same picture as {kept_copy[sha]}, accepted from a batch that arrived earlier",
                }
            )
        kept = frame[~duplicate]
        for sha, row, source in kept[["sha256", "row", "source"]].itertuples(index=False):
            kept_copy[sha] = _where(batch_id, row, source)
        accepted.append(kept)
        batch_rejected = pd.read_csv(folder / "rejected.csv", dtype=str, keep_default_na=False)
        batch_rejected.insert(0, "batch", batch_id)
        rejected.extend(batch_rejected.to_dict("records"))
    manifest = pd.concat(accepted, ignore_index=True)
    for column in QUALIFIED_LABEL_COLUMNS:
        if column in manifest:
            # Rows of batches without the column come out of the concatenation as NaN.
            manifest[column] = [[] if _is_missing(labels) else labels for labels in manifest[column]]
    if corrections:
        manifest = _apply_corrections(manifest, corrections, rejected)
    rejected_frame = pd.DataFrame(rejected, columns=["batch", "row", "source", "reason", "detail"])
    with atomic_path(result.rejected_path) as tmp:
        rejected_frame.to_csv(tmp, index=False)
    with atomic_path(result.manifest_path) as tmp:
        pq.write_table(label_lists_as_strings(pa.Table.from_pandas(manifest, preserve_index=False)), tmp)
    result.n_images = len(manifest)
    result.n_rejected = len(rejected_frame)
    result.rejected_by_reason = dict(Counter(rejected_frame["reason"]).most_common())


def _is_true(value: object) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in _TRUE)


def _apply_corrections(manifest: pd.DataFrame, corrections: list[pd.DataFrame], rejected: list[dict]) -> pd.DataFrame:
    """Each correction row's label columns replace its image's, in arrival order (a later correction wins)."""
    position = {sha: i for i, sha in enumerate(manifest["sha256"])}
    columns = ["labels", *(c for c in QUALIFIED_LABEL_COLUMNS if c in manifest or any(c in f for f in corrections))]
    values = {c: list(manifest[c]) if c in manifest else [[] for _ in range(len(manifest))] for c in columns}
    relabelled_by = list(manifest[RELABELLED_BY]) if RELABELLED_BY in manifest else [""] * len(manifest)
    for frame in corrections:
        for record in frame.to_dict("records"):
            i = position.get(record["sha256"])
            if i is None:
                row = record["row"]
                rejected.append(
                    {
                        "batch": record["batch"],
                        "row": None if pd.isna(row) else int(row),
                        "source": record["source"],
                        "reason": "not_in_collection",
                        "detail": "a correction of a picture that no batch holds",
                    }
                )
                continue
            for column in columns:
                labels = record.get(column)
                values[column][i] = [] if _is_missing(labels) else [str(label) for label in labels]
            relabelled_by[i] = record["batch"]
    for column in columns:
        manifest[column] = values[column]
    manifest[RELABELLED_BY] = relabelled_by
    return manifest


def _is_missing(labels: object) -> bool:
    return labels is None or (isinstance(labels, float) and pd.isna(labels))


def _where(batch_id: str, row: object, source: str) -> str:
    """How a duplicate's detail names the copy that was kept, so a reader can find it in its batch."""
    place = f"batch {batch_id!r}" if pd.isna(row) else f"row {row} of batch {batch_id!r}"
    return f"{source!r} ({place})"
