"""Tagging an unlabelled photo collection with a trained model (`mumic tag`, the asset `catalogue_tags`).

A collection may hold millions of photos and a run may be killed at any moment, so nothing is held whole: images
are listed lazily, decoded while the model scores other batches, and results are committed
in part files under `<out>.parts/`, each written under a temporary name and renamed. A restarted run skips every
image a committed part holds, so none is tagged twice or lost; a record beside the parts (the model's content
hash, its classes, the collection and the settings that shape a row) makes a run that differs refuse the folder
instead of mixing two runs' tags. When every image is done the parts become `<out>` in one rename.

Decoding and preprocessing are `mumic predict`'s (the defensive decoder, shorter side resized, centre crop,
`ImagePreparer`, the model's calibration), so a photo scores the same in both; an image that cannot be read
becomes a row with an error.

Speed (docs/benchmarks.md, "Tagging"): on a CPU, batches are scored in lanes, one thread each (`_Lanes`), which by
default decode their own batches beside the other lanes' forward passes; a batch from a decoding process crosses as
uint8 and is normalised whole in the lane; rows are built a column at a time. On a GPU one lane drives the device
and decoding stays on the CPU, in `tag.workers` processes (by default one per spare core); the uint8 batch
is moved to the device and normalised there. torchvision could also decode JPEG files on the device
(`torchvision.io.decode_jpeg(list_of_file_bytes, device="cuda")`, then resize and crop as tensors), for when CPU
decoding cannot keep a GPU busy. That path is not taken: nvJPEG's and torch's bicubic pixels differ from Pillow's
by a level here and there, so scores would no longer equal `mumic predict`'s, and it would bypass the defensive
decoder (declared-size limit, EXIF orientation, CMYK, palette and 16-bit images), which would have to be applied
to the header first. Add it as its own branch on `predictor.device.type == "cuda"`, used only for files Pillow
reports as plain JPEG, if a GPU run is ever decode-bound.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from mumic_ml.config import TagConfig
from mumic_ml.image_batches import BatchDecoder, DecodedBatch, ImageEntry
from mumic_ml.io import atomic_path, atomic_write_json, file_digest, read_json
from mumic_ml.manifest import read_manifest
from mumic_ml.predict import Predictor

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
# A class without a tuned threshold (a name scored zero-shot, a model exported without tuning) is tagged where the
# model says more likely than not.
UNTUNED_THRESHOLD = 0.5
RUN_RECORD = "run.json"
PART_PATTERN = "part-*.parquet"
# Batches scored at once on a CPU (`_Lanes`), each one more batch in memory; past it, torch's threads split each.
MAX_LANES = 4
# Decoding processes a GPU run starts by default: enough to keep one device lane fed by small files, each a process
# holding two batches.
MAX_DECODING_WORKERS = 4

_T = TypeVar("_T")
_R = TypeVar("_R")


class TaggingError(RuntimeError):
    """A run that must not start: an input that is neither folder nor manifest, or a parts folder of another run."""


def list_images(source: str | os.PathLike) -> Iterator[ImageEntry]:
    """The images of a folder (recursively) or of a manifest, lazily; an unknown input fails here, not mid-run."""
    source = Path(source)
    if source.is_dir():
        return images_in_folder(source)
    if source.is_file():
        return images_in_manifest(source)
    raise TaggingError(f"no such folder or manifest: {source}")


def images_in_folder(folder: Path) -> Iterator[ImageEntry]:
    """Image files by extension, depth first with each folder in name order, so that every run lists them alike.
    Hidden names are other tools' files (`.DS_Store`, `._IMG_0001.jpg`), not photos; linked folders are not
    followed (a link to a parent would never end)."""

    def walk(current: Path) -> Iterator[ImageEntry]:
        with os.scandir(current) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path))
            elif entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                yield ImageEntry(Path(entry.path).relative_to(folder).as_posix(), entry.path)

    return walk(folder)


def images_in_manifest(manifest: Path) -> Iterator[ImageEntry]:
    """The `path` column of a manifest the project reads (CSV, JSONL, Parquet), relative to the manifest's folder,
    each path once; labels are not read. The manifest is parsed before the first image is handed out."""
    sources = read_manifest(manifest)["source"]
    unique = dict.fromkeys(s for s in sources if isinstance(s, str) and s.strip())
    return (ImageEntry(s, str(manifest.parent / s)) for s in unique)


def _batches(entries: Iterable[ImageEntry], size: int) -> Iterator[list[ImageEntry]]:
    batch: list[ImageEntry] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_id(model_dir: Path) -> str:
    """Content hash of a model directory's spec and weights: the same model under any path or registry URI."""
    digest = hashlib.sha256()
    for name in ("model.json", "model.safetensors"):
        digest.update(file_digest(model_dir / name).encode())
    return digest.hexdigest()[:16]


def output_schema(embedding_dim: int | None) -> pa.Schema:
    fields = [
        pa.field("path", pa.string(), nullable=False),
        pa.field("top_labels", pa.list_(pa.string())),
        pa.field("top_scores", pa.list_(pa.float32())),
        pa.field("tags", pa.list_(pa.string())),
        pa.field("tag_scores", pa.list_(pa.float32())),
        pa.field("error", pa.string()),
    ]
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), embedding_dim)))
    return pa.schema(fields)


class _Scorer:
    """The model and the settings that turn a decoded batch into output rows."""

    def __init__(
        self,
        predictor: Predictor,
        extra_classes: Sequence[str],
        *,
        top_k: int,
        threshold: float | None,
        embeddings: bool,
    ) -> None:
        self.predictor = predictor
        try:
            extra_names, self.extra_features = predictor.extra_class_features(extra_classes)
        except ValueError as exc:  # a linear head has no text tower to score a name with
            raise TaggingError(str(exc)) from exc
        self.names = predictor.class_names + extra_names
        self.name_values = pa.array(self.names, pa.string())
        self.top_k = min(top_k, len(self.names))
        self.thresholds = self._thresholds(predictor, threshold, len(extra_names))
        self.embeddings = embeddings
        self.schema = output_schema(predictor.embedding_dim if embeddings else None)

    @staticmethod
    def _thresholds(predictor: Predictor, threshold: float | None, n_extra: int) -> np.ndarray:
        if threshold is not None:
            return np.full(len(predictor.class_names) + n_extra, threshold)
        tuned = predictor.model.calibrated_thresholds
        if tuned is None:
            tuned = np.full(len(predictor.class_names), UNTUNED_THRESHOLD)
        return np.concatenate([tuned, np.full(n_extra, UNTUNED_THRESHOLD)])

    @torch.no_grad()
    def _score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model = self.predictor.model
        out = model.classifier(self.predictor.preparer(torch.from_numpy(pixels)), self.extra_features)
        probs = model.calibration.apply(torch.sigmoid(out.logits.float()).cpu().numpy())
        return probs, out.image_features.float().cpu().numpy()

    def __call__(self, batch: DecodedBatch) -> pa.RecordBatch:
        """The batch's rows, built a column at a time: no Python work per image beyond its key and error."""
        n = len(batch.entries)
        readable = np.ones(n, dtype=bool)
        readable[list(batch.errors)] = False
        features = np.zeros((0, self.predictor.embedding_dim), dtype=np.float32)
        top = np.zeros((0, self.top_k), dtype=np.int64)
        order = np.zeros((0, len(self.names)), dtype=np.int64)
        ranked = np.zeros(order.shape)
        if readable.any():
            probs, features = self._score(batch.pixels)
            # Stable, so ties go to the lower class index, as in `mumic predict`.
            order = np.argsort(-probs, axis=1, kind="stable")
            ranked = np.take_along_axis(probs, order, axis=1)
            top = order[:, : self.top_k]
        above = ranked >= self.thresholds[order]  # in float64, as `mumic predict`'s threshold
        scores = ranked.astype(np.float32)
        columns = {
            "path": pa.array([e.key for e in batch.entries], pa.string()),
            "top_labels": _lists(self.name_values.take(top.ravel()), np.full(len(top), self.top_k), readable),
            "top_scores": _lists(pa.array(scores[:, : self.top_k].ravel()), np.full(len(top), self.top_k), readable),
            "tags": _lists(self.name_values.take(order[above]), above.sum(axis=1), readable),
            "tag_scores": _lists(pa.array(scores[above]), above.sum(axis=1), readable),
            "error": pa.array([batch.errors.get(i) for i in range(n)], pa.string()),
        }
        if self.embeddings:
            # NaN rows for unreadable images, as `mumic embed` writes them (Parquet cannot read back a null
            # fixed-size list).
            matrix = np.full((n, features.shape[1]), np.nan, dtype=np.float32)
            matrix[readable] = features
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), features.shape[1])
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=self.schema)


def _lists(values: pa.Array, lengths: np.ndarray, readable: np.ndarray) -> pa.ListArray:
    """A list per row from the readable rows' `values` laid end to end, `lengths` of them each; null where
    unreadable."""
    per_row = np.zeros(len(readable), dtype=np.int32)
    per_row[readable] = lengths
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~readable))


class _Parts:
    """`<out>.parts/`: the record of the run, and the part files committed so far."""

    def __init__(self, out: Path, schema: pa.Schema) -> None:
        self.dir = out.with_name(out.name + ".parts")
        self.schema = schema
        self.pending: list[pa.RecordBatch] = []
        self.next_index = 0

    def files(self) -> list[Path]:
        return sorted(self.dir.glob(PART_PATTERN))

    def open(self, record: dict[str, Any], replace_other_run: bool) -> set[str]:
        """The keys already committed by an earlier run of the same record; a different run refuses, or with
        `replace_other_run` is discarded."""
        if self.dir.is_dir():
            recorded = read_json(self.dir / RUN_RECORD) if (self.dir / RUN_RECORD).is_file() else None
            if recorded != record and (recorded is not None or self.files()):
                if not replace_other_run:
                    raise TaggingError(_mismatch_message(self.dir, recorded, record))
                log.info("tag: discarding %s, an unfinished run with other settings", self.dir)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp"):  # a write the kill interrupted; its rows were never committed
            stale.unlink()
        atomic_write_json(self.dir / RUN_RECORD, record)
        done: set[str] = set()
        for part in self.files():
            done.update(pq.read_table(part, columns=["path"])["path"].to_pylist())
            self.next_index = max(self.next_index, int(part.stem.removeprefix("part-")) + 1)
        return done

    def add(self, batch: pa.RecordBatch, chunk_size: int) -> None:
        self.pending.append(batch)
        while sum(b.num_rows for b in self.pending) >= chunk_size:
            table = pa.Table.from_batches(self.pending, self.schema)
            self._commit(table.slice(0, chunk_size))
            rest = table.slice(chunk_size)
            self.pending = rest.to_batches() if rest.num_rows else []

    def flush(self) -> None:
        if self.pending:
            self._commit(pa.Table.from_batches(self.pending, self.schema))
            self.pending = []

    def _commit(self, table: pa.Table) -> None:
        with atomic_path(self.dir / f"part-{self.next_index:06d}.parquet") as tmp:
            pq.write_table(table, tmp)
        self.next_index += 1

    def combine(self, out: Path) -> None:
        """Every part, in the order committed, into `out` in one rename; then the parts are no longer needed."""
        with atomic_path(out) as tmp, pq.ParquetWriter(tmp, self.schema) as writer:
            for part in self.files():
                writer.write_table(pq.read_table(part, schema=self.schema))
        shutil.rmtree(self.dir)


def _mismatch_message(folder: Path, recorded: dict[str, Any] | None, record: dict[str, Any]) -> str:
    if recorded is None:
        return f"{folder} holds part files but no {RUN_RECORD}; it is not a tagging run's folder, so it is left alone"
    differences = []
    for key, value in record.items():
        before = recorded.get(key)
        if before == value:
            continue
        if key == "classes":
            added = [c for c in value if c not in before]
            removed = [c for c in before if c not in value]
            differences.append(f"classes (added {added}, removed {removed})" if added or removed else "class order")
        else:
            differences.append(f"{key} ({before!r} there, {value!r} now)")
    return (
        f"{folder} holds an unfinished run that differs in {'; '.join(differences)}; its tags must not be mixed "
        "with these. Finish it with the same model and settings, or delete the folder to start afresh"
    )


@dataclass(frozen=True)
class TagSummary:
    out: Path
    images: int  # rows of the output
    tagged: int  # rows without an error
    errors: int
    resumed: int  # rows an earlier, interrupted run had committed
    seconds: float  # this run, model loading included
    images_per_s: float  # images this run decoded and scored, per second
    tag_counts: dict[str, int]  # images per tag, most frequent first
    top_label_counts: dict[str, int]  # images per first-ranked label, most frequent first

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "images": self.images,
            "tagged": self.tagged,
            "errors": self.errors,
            "resumed": self.resumed,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 1),
        }


def tag_images(
    model_dir: str | os.PathLike,
    images: Iterable[ImageEntry],
    out: str | os.PathLike,
    *,
    source: str,
    config: TagConfig,
    extra_classes: Sequence[str] = (),
    embeddings: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
    replace_other_run: bool = False,
) -> TagSummary:
    """Tag every image of `images` (each key once, as `list_images` gives them) into the Parquet file `out`,
    resuming the run `<out>.parts/` holds.

    `source` names the collection in the run record (its path), so that parts of one collection are never
    continued with another. `replace_other_run` discards an unfinished run with other settings instead of
    refusing it: for a caller that always wants the newest model's tags.
    """
    started = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    with BatchDecoder(decoding_workers(config.workers, torch.device(device))) as decoder:
        predictor = Predictor.from_dir(model_dir, device=str(device), batch_size=config.batch_size)
        scorer = _Scorer(
            predictor, extra_classes, top_k=config.top_k, threshold=config.threshold, embeddings=embeddings
        )
        record = {
            "model": model_id(model_dir),
            "classes": scorer.names,
            "source": source,
            "top_k": config.top_k,
            "threshold": config.threshold,
            "embeddings": embeddings,
        }
        parts = _Parts(out, scorer.schema)
        done = parts.open(record, replace_other_run)
        if done:
            log.info("tag: resuming, %d images already committed in %s", len(done), parts.dir)
        pending = (entry for entry in images if entry.key not in done)
        processed = 0
        decoded = decoder.decode(_batches(pending, config.batch_size), predictor.model.image_norm.size)
        with (
            _Lanes(predictor.device) as lanes,
            tqdm(desc="tag", unit="img", disable=None if progress else True, dynamic_ncols=True) as bar,
        ):
            for rows in lanes.map(lambda batch: scorer(batch()), decoded):
                parts.add(rows, config.chunk_size)
                processed += rows.num_rows
                bar.update(rows.num_rows)
    parts.flush()
    parts.combine(out)
    seconds = time.perf_counter() - started
    return _summary(out, resumed=len(done), seconds=seconds, processed=processed)


def decoding_workers(configured: int | None, device: torch.device) -> int:
    """The decoding processes of a run: as configured, else none on a CPU and one per spare core on a GPU.

    On a CPU the lanes decode their own batches, each beside the other lanes' forward passes, which measured
    faster than a decoding process competing with the lanes for the same cores (docs/benchmarks.md, Tagging). A
    GPU has one lane, which must not wait for decoding between batches.
    """
    if configured is not None:
        return configured
    if device.type == "cpu":
        return 0
    return max(1, min(MAX_DECODING_WORKERS, (os.cpu_count() or 2) - 1))


class _Lanes:
    """Batches scored side by side, each by one thread with an equal share of torch's threads.

    Several batches at once, each on its own core, keep the cores busy where one batch split across them cannot:
    the split waits at a barrier after every operation, so all its cores stall whenever anything else (decoding,
    Parquet, another process) holds one of them. Decoding without worker processes happens in the lanes too, so
    it runs beside the other lanes' forward passes. On a GPU one lane: the device runs one batch at a time, and
    the lane still overlaps the host's Parquet work with it.
    torch's thread count is process-wide, so it is set for the run and restored after.
    """

    def __init__(self, device: torch.device) -> None:
        threads = torch.get_num_threads()
        self.count = min(threads, MAX_LANES) if device.type == "cpu" else 1
        self.threads = threads
        self._pool = ThreadPoolExecutor(self.count, thread_name_prefix="tag-lane")

    def __enter__(self) -> _Lanes:
        torch.set_num_threads(max(1, self.threads // self.count))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(cancel_futures=True)
        torch.set_num_threads(self.threads)

    def map(self, work: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """`work` of each item, in the items' order, with two per lane in flight; if drawing the next item fails,
        the work already begun is handed out before the error, so that a caller commits it."""
        in_flight: deque[Future[_R]] = deque()
        source = iter(items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except Exception:
                while in_flight:
                    yield in_flight.popleft().result()
                raise
            in_flight.append(self._pool.submit(work, item))
            if len(in_flight) >= 2 * self.count:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _summary(out: Path, *, resumed: int, seconds: float, processed: int) -> TagSummary:
    """Counts read back from `out` in record batches, so that rows of an earlier run count too and a large
    output is never held whole."""
    rows = errors = 0
    tag_counts: Counter[str] = Counter()
    top_label_counts: Counter[str] = Counter()
    for batch in pq.ParquetFile(out).iter_batches(columns=["error", "tags", "top_labels"]):
        rows += batch.num_rows
        errors += batch.num_rows - batch.column("error").null_count
        tag_counts.update(pc.list_flatten(batch.column("tags")).to_pylist())
        top_label_counts.update(pc.list_element(batch.column("top_labels"), 0).drop_null().to_pylist())
    return TagSummary(
        out=out,
        images=rows,
        tagged=rows - errors,
        errors=errors,
        resumed=resumed,
        seconds=seconds,
        images_per_s=processed / seconds if seconds > 0 else 0.0,
        tag_counts=_most_frequent_first(tag_counts),
        top_label_counts=_most_frequent_first(top_label_counts),
    )


def _most_frequent_first(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
