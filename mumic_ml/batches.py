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
ingested twice; a batch whose manifest changed is re-ingested and replaces its earlier version. An image already
accepted from an earlier batch is rejected as `duplicate_image` in the combined table, so retraining sees each
picture once. Paths in the combined manifest are relative to `out/` (`batches/<id>/images/<sha256>.png`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from mumic_ml.ingest import IngestResult, ingest
from mumic_ml.io import atomic_path, atomic_write_json, read_json, sha256_file
from mumic_ml.manifest import ManifestError
from mumic_ml.taxonomy import Taxonomy

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl", "manifest.parquet")
LEDGER = "batches.json"
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
    """Ready batches (sub-folders with a manifest), sorted by id so older-named batches win duplicates."""
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
        batches.append(Batch(folder.name, folder, manifests[0], sha256_file(manifests[0])))
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
        }
        # The ledger is written after each batch, so a killed run redoes at most the batch it was in.
        atomic_write_json(ledger_path, ledger)
        result.ingested.append(batch.batch_id)
    _combine(out, [b.batch_id for b in batches], result)
    result.per_batch = {b.batch_id: ledger[b.batch_id] for b in batches}
    log.info(
        "batches: %d ingested, %d unchanged; %d images, %d rejected rows",
        len(result.ingested),
        len(result.skipped),
        result.n_images,
        result.n_rejected,
    )
    return result


def _combine(out: Path, batch_ids: list[str], result: BatchIngestResult) -> None:
    """Union of the batch manifests; an image seen in an earlier batch is rejected as a duplicate."""
    accepted, rejected = [], []
    seen: dict[str, str] = {}
    for batch_id in batch_ids:
        folder = out / "batches" / batch_id
        frame = pd.read_parquet(folder / "manifest.parquet")
        frame.insert(0, "batch", batch_id)
        frame["path"] = [f"batches/{batch_id}/{p}" for p in frame["path"]]
        duplicate = frame["sha256"].map(lambda sha: sha in seen)
        for _, row in frame[duplicate].iterrows():
            rejected.append(
                {
                    "batch": batch_id,
                    "row": None,
                    "source": row["source"],
                    "reason": "duplicate_image",
                    "detail": f"same image as {seen[row['sha256']]} (accepted from an earlier batch)",
                }
            )
        kept = frame[~duplicate]
        seen.update({sha: f"{batch_id}/{src}" for sha, src in zip(kept["sha256"], kept["source"])})
        accepted.append(kept)
        batch_rejected = pd.read_csv(folder / "rejected.csv", dtype=str, keep_default_na=False)
        batch_rejected.insert(0, "batch", batch_id)
        rejected.extend(batch_rejected.to_dict("records"))
    manifest = pd.concat(accepted, ignore_index=True)
    rejected_frame = pd.DataFrame(rejected, columns=["batch", "row", "source", "reason", "detail"])
    with atomic_path(result.rejected_path) as tmp:
        rejected_frame.to_csv(tmp, index=False)
    with atomic_path(result.manifest_path) as tmp:
        manifest.to_parquet(tmp, index=False)
    result.n_images = len(manifest)
    result.n_rejected = len(rejected_frame)
    result.rejected_by_reason = dict(Counter(rejected_frame["reason"]).most_common())
