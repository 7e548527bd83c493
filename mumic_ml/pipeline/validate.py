"""The `validated_labels` step: a Great Expectations suite over the ingested manifest, and the split leakage check.

GX validates flat tables, so the manifest is first turned into the tables each rule is naturally a column rule on:

- `images`: one row per manifest row (`row`, `image_id`, `sha256`, `n_labels`, `width`, `height`), where
  `n_labels` counts every class the row labels: present, verified negative or unknown;
- `labels`: one row per (image, label), for the taxonomy check;
- `classes`: one row per taxonomy class with its number of images, zero included, so a class nobody labelled fails
  the minimum-positives rule instead of being absent from the table.

Each table is a dataframe asset of a pandas data source with its own suite, validation definition and checkpoint.
Every expectation carries a stable short name in `meta["name"]` and its blocking flag as GX severity (critical
blocks, warning does not); results come back as `ExpectationOutcome`s that the CLI and the Dagster asset checks show.

Outputs, all inside `out_dir` (nothing in the cwd or the home directory: the GX context is ephemeral, in memory):

- manifest: `validation.json` (outcomes and counts) and `data_docs/index.html` (GX Data Docs);
- splits: `splits_validation.json` and `splits_data_docs/index.html`, so both can share one out_dir.

The JSON reports hold no timestamps, so the same data gives the same report bytes (DVC-friendly); the Data Docs
site is rebuilt in a staging folder and swapped in whole, so a rerun replaces it instead of accumulating old runs.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from great_expectations.data_context import EphemeralDataContext
from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

from mumic_ml.config import ExpectationsConfig, IngestConfig
from mumic_ml.io import atomic_directory, atomic_write_json
from mumic_ml.taxonomy import Taxonomy

MANIFEST_REPORT = "validation.json"
MANIFEST_DOCS = "data_docs"
SPLITS_REPORT = "splits_validation.json"
SPLITS_DOCS = "splits_data_docs"
REQUIRED_SPLITS = ("train", "val", "test")
# Offending values listed per outcome; the full counts are always reported beside them.
DETAIL_LIMIT = 20

_MANIFEST_COLUMNS = ("image_id", "sha256", "labels", "width", "height")
# Counted with `labels` by `labels_per_image` when the manifest has them: an image labelled only negative or
# unknown still says something about its classes.
_QUALIFIED_COLUMNS = ("negative_labels", "unknown_labels")
_DOCS_SITE = "local_site"


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's verdict. `observed` is the number of offending rows (or, for a table expectation, the
    measured value); `details` names the offenders, capped at DETAIL_LIMIT, with the full counts."""

    name: str
    description: str
    success: bool
    blocking: bool
    observed: int | float | None
    details: dict[str, Any]


@dataclass(frozen=True)
class ValidationResult:
    """`label_counts` is images per taxonomy class (manifest only), the histogram a reviewer wants beside the checks."""

    outcomes: tuple[ExpectationOutcome, ...]
    counts: dict[str, int]
    report_path: Path
    data_docs_path: Path
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every blocking expectation passed; failed warnings do not stop the run."""
        return all(o.success or not o.blocking for o in self.outcomes)

    @property
    def blocking_failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if o.blocking and not o.success]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.blocking and not o.success]

    def outcome(self, name: str) -> ExpectationOutcome:
        for o in self.outcomes:
            if o.name == name:
                return o
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "counts": dict(self.counts),
            "label_counts": dict(self.label_counts),
            "summary": {
                "expectations": len(self.outcomes),
                "passed": sum(o.success for o in self.outcomes),
                "blocking_failed": len(self.blocking_failures),
                "warnings": len(self.warnings),
            },
            "outcomes": [asdict(o) for o in self.outcomes],
            "data_docs": self.data_docs_path.relative_to(self.report_path.parent).as_posix(),
        }


Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class _Check:
    """An expectation, tagged with its outcome name, and how its unexpected rows summarise into details."""

    expectation: gxe.Expectation
    summarise: Callable[[Rows], dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.expectation.meta["name"]


@dataclass(frozen=True)
class _Table:
    name: str
    frame: pd.DataFrame
    index_columns: list[str]
    checks: list[_Check]


def _expect(
    kind: type[gxe.Expectation], name: str, description: str, blocking: bool = True, **kwargs
) -> gxe.Expectation:
    return kind(
        meta={"name": name},
        description=description,
        severity="critical" if blocking else "warning",
        **kwargs,
    )


def validate_manifest(
    manifest_path: str | os.PathLike,
    taxonomy: Taxonomy,
    out_dir: str | os.PathLike,
    *,
    expectations: ExpectationsConfig,
    ingest: IngestConfig,
) -> ValidationResult:
    """Run the manifest suite, write `validation.json` and Data Docs into `out_dir`, and return the outcomes.

    The thresholds are params.yaml's `expectations`, and the image sides `ingest` accepts; the suite has none of its
    own, so it checks exactly what the pipeline is configured with. Failed expectations are reported, not raised:
    the caller decides what a failed blocking check stops. Raises ValueError only when the manifest lacks a column
    the suite needs.
    """
    images, labels = _manifest_tables(manifest_path)
    classes = _class_counts(labels, taxonomy.names)
    tables = _manifest_suite(images, labels, classes, taxonomy, expectations, ingest)
    counts = {"images": len(images), "label_assignments": len(labels), "classes": len(taxonomy.names)}
    label_counts = dict(zip(classes["class"], classes["n_images"].tolist()))
    return _run("manifest", tables, counts, Path(out_dir), MANIFEST_REPORT, MANIFEST_DOCS, label_counts)


def _manifest_suite(
    images: pd.DataFrame,
    labels: pd.DataFrame,
    classes: pd.DataFrame,
    taxonomy: Taxonomy,
    expectations: ExpectationsConfig,
    ingest: IngestConfig,
) -> list[_Table]:
    """The manifest's expectations, table by table: one declarative list, read top to bottom."""
    return [
        _Table(
            "images",
            images,
            ["row", "image_id"],
            [
                _Check(
                    _expect(gxe.ExpectTableRowCountToBeBetween, "non_empty", "the manifest has images", min_value=1)
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToNotBeNull,
                        "image_id_present",
                        "every row has an image_id",
                        column="image_id",
                    )
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeUnique, "unique_image_id", "image_id is unique", column="image_id"
                    ),
                    _duplicates("image_id"),
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToNotBeNull,
                        "sha256_present",
                        "every row has a content hash",
                        column="sha256",
                    )
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeUnique,
                        "unique_sha256",
                        "no picture appears twice (sha256)",
                        column="sha256",
                    ),
                    _duplicates("sha256"),
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeBetween,
                        "labels_per_image",
                        f"every image labels {expectations.min_labels_per_image} to "
                        f"{expectations.max_labels_per_image} classes (present, negative or unknown)",
                        column="n_labels",
                        min_value=expectations.min_labels_per_image,
                        max_value=expectations.max_labels_per_image,
                    )
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeBetween,
                        "image_width",
                        f"image width is {ingest.min_side} to {ingest.max_side} px",
                        column="width",
                        min_value=ingest.min_side,
                        max_value=ingest.max_side,
                    )
                ),
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeBetween,
                        "image_height",
                        f"image height is {ingest.min_side} to {ingest.max_side} px",
                        column="height",
                        min_value=ingest.min_side,
                        max_value=ingest.max_side,
                    )
                ),
            ],
        ),
        _Table(
            "labels",
            labels,
            ["row", "image_id"],
            [
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeInSet,
                        "labels_in_taxonomy",
                        "every label is a taxonomy class (exact spelling)",
                        column="label",
                        value_set=list(taxonomy.names),
                    ),
                    _value_counts("label", "unexpected_labels"),
                )
            ],
        ),
        _Table(
            "classes",
            classes,
            ["class"],
            [
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeBetween,
                        "min_positives_per_class",
                        f"every class has at least {expectations.min_positives_per_class} images",
                        blocking=expectations.min_positives_blocking,
                        column="n_images",
                        min_value=expectations.min_positives_per_class,
                    ),
                    _below_minimum,
                )
            ],
        ),
    ]


def validate_splits(
    split_paths: Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    required_splits: Sequence[str] = REQUIRED_SPLITS,
) -> ValidationResult:
    """The leakage check: no picture (sha256) in two splits, and every required split non-empty.

    Hashes are de-duplicated within each split first, so uniqueness over the concatenated table means exactly
    "no hash in two splits". Writes `splits_validation.json` and `splits_data_docs/` into `out_dir`.
    """
    frames = []
    for split, path in split_paths.items():
        frame = pq.read_table(path, columns=["image_id", "sha256"]).to_pandas()
        frames.append(frame.assign(split=split))
    hashes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "sha256", "split"])
    sizes = hashes.groupby("split").size().to_dict()
    split_names = list(dict.fromkeys([*required_splits, *split_paths]))
    size_table = pd.DataFrame({"split": split_names, "n_images": [int(sizes.get(s, 0)) for s in split_names]})
    tables = [
        _Table(
            "hashes",
            hashes.drop_duplicates(["split", "sha256"]).reset_index(drop=True),
            ["split", "image_id"],
            [
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeUnique,
                        "no_leakage",
                        "no picture (sha256) is in two splits",
                        column="sha256",
                    ),
                    _leaked,
                )
            ],
        ),
        _Table(
            "sizes",
            size_table,
            ["split"],
            [
                _Check(
                    _expect(
                        gxe.ExpectColumnValuesToBeBetween,
                        "non_empty_splits",
                        f"splits {', '.join(split_names)} each have images",
                        column="n_images",
                        min_value=1,
                    ),
                    lambda rows: {"empty_splits": [row["split"] for row in rows]},
                )
            ],
        ),
    ]
    counts = {"images": len(hashes), **{f"{s}_images": int(n) for s, n in zip(split_names, size_table["n_images"])}}
    return _run("splits", tables, counts, Path(out_dir), SPLITS_REPORT, SPLITS_DOCS)


def _manifest_tables(manifest_path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `images` and `labels` tables, built with Arrow list kernels rather than a Python loop over rows."""
    schema = pq.read_schema(manifest_path)
    missing = [c for c in _MANIFEST_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"manifest {manifest_path} lacks columns {missing}")
    qualified = [c for c in _QUALIFIED_COLUMNS if c in schema.names]
    table = pq.read_table(manifest_path, columns=[*_MANIFEST_COLUMNS, *qualified])
    labels = table["labels"].combine_chunks()
    if not pa.types.is_list(labels.type) and not pa.types.is_large_list(labels.type):
        raise ValueError(f"manifest {manifest_path}: labels must be a list column, got {labels.type}")
    images = pd.DataFrame(
        {
            "row": np.arange(table.num_rows),
            "image_id": table["image_id"].to_pandas(),
            "sha256": table["sha256"].to_pandas(),
            # A null label list is an image without labels: count it as 0 so the cardinality rule catches it.
            "n_labels": sum(
                pc.fill_null(pc.list_value_length(table[c]), 0).to_numpy(zero_copy_only=False)
                for c in ("labels", *qualified)
            ),
            # A missing size would be skipped by a range rule; 0 px makes it fail instead.
            "width": pc.fill_null(table["width"], 0).to_numpy(),
            "height": pc.fill_null(table["height"], 0).to_numpy(),
        }
    )
    parents = pc.list_parent_indices(labels)
    exploded = pd.DataFrame(
        {
            "row": parents.to_numpy(zero_copy_only=False),
            "image_id": pc.take(table["image_id"], parents).to_pandas(),
            # A null inside a label list would be skipped by the set rule; "" is reported as an unknown label.
            "label": pc.fill_null(pc.list_flatten(labels), "").to_pandas(),
        }
    )
    return images, exploded


def _class_counts(labels: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Images per taxonomy class, zero for classes no image has; a label repeated in one row counts once."""
    per_class = labels.drop_duplicates(["row", "label"])["label"].value_counts()
    counts = [int(per_class.get(name, 0)) for name in class_names]
    return pd.DataFrame({"class": list(class_names), "n_images": counts})


def _run(
    prefix: str,
    tables: list[_Table],
    counts: dict[str, int],
    out: Path,
    report_name: str,
    docs_name: str,
    label_counts: dict[str, int] | None = None,
) -> ValidationResult:
    """Validate every table through its own checkpoint, build Data Docs, then write the JSON report.

    One checkpoint per table because a checkpoint hands the same batch parameters to all its validation
    definitions, and a dataframe asset takes its frame from them.
    """
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[ExpectationOutcome] = []
    with atomic_directory(out / docs_name) as staging:
        context = _context(staging)
        source = context.data_sources.add_pandas(prefix)
        for table in tables:
            batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe(table.name)
            suite = context.suites.add(
                gx.ExpectationSuite(name=f"{prefix}.{table.name}", expectations=[c.expectation for c in table.checks])
            )
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{prefix}.{table.name}", data=batch, suite=suite)
            )
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"{prefix}.{table.name}",
                    validation_definitions=[definition],
                    result_format={
                        "result_format": "COMPLETE",
                        "unexpected_index_column_names": table.index_columns,
                        "return_unexpected_index_query": False,
                    },
                )
            )
            run = checkpoint.run(batch_parameters={"dataframe": table.frame})
            (suite_result,) = run.run_results.values()
            by_name = {r.expectation_config.meta["name"]: r for r in suite_result.results}
            outcomes.extend(_outcome(check, by_name[check.name]) for check in table.checks)
        context.build_data_docs()
    report_path = out / report_name
    result = ValidationResult(tuple(outcomes), counts, report_path, out / docs_name / "index.html", label_counts or {})
    atomic_write_json(report_path, result.to_dict())
    return result


def _context(docs_dir: Path) -> EphemeralDataContext:
    """An in-memory GX context whose one on-disk output is a Data Docs site in `docs_dir`; no analytics, no bars."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars={"globally": False, "metric_calculations": False},
        data_docs_sites={
            _DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _outcome(check: _Check, result: Any) -> ExpectationOutcome:
    measured = result.result
    rows = [{k: _plain(v) for k, v in row.items()} for row in measured.get("unexpected_index_list") or []]
    details: dict[str, Any] = {
        key: _plain(measured[key]) for key in ("element_count", "unexpected_count") if key in measured
    }
    if rows:
        details["examples"] = rows[:DETAIL_LIMIT]
        if check.summarise is not None:
            details.update(check.summarise(rows))
    observed = measured.get("observed_value", measured.get("unexpected_count"))
    expectation = check.expectation
    return ExpectationOutcome(
        name=check.name,
        description=expectation.description,
        success=bool(result.success),
        blocking=expectation.severity == "critical",
        observed=_plain(observed),
        details=details,
    )


def _plain(value: Any) -> Any:
    """GX hands back pandas' scalars: numpy numbers become Python ones and NaN/NA None, so the report is JSON."""
    if pd.api.types.is_scalar(value) and pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _duplicates(column: str) -> Callable[[Rows], dict[str, Any]]:
    def summarise(rows: Rows) -> dict[str, Any]:
        counts = Counter(row[column] for row in rows)
        return {"n_duplicated_values": len(counts), "duplicated_values": dict(counts.most_common(DETAIL_LIMIT))}

    return summarise


def _value_counts(column: str, key: str) -> Callable[[Rows], dict[str, Any]]:
    def summarise(rows: Rows) -> dict[str, Any]:
        return {key: dict(Counter(row[column] for row in rows).most_common(DETAIL_LIMIT))}

    return summarise


def _below_minimum(rows: Rows) -> dict[str, Any]:
    rarest = sorted(rows, key=lambda row: (row["n_images"], row["class"]))
    return {
        "n_classes_below_minimum": len(rows),
        "below_minimum": {row["class"]: row["n_images"] for row in rarest[:DETAIL_LIMIT]},
    }


def _leaked(rows: Rows) -> dict[str, Any]:
    splits_of: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        splits_of[row["sha256"]].add(row["split"])
    leaked = {sha: sorted(splits) for sha, splits in sorted(splits_of.items())}
    return {"n_leaked_hashes": len(leaked), "leaked": dict(list(leaked.items())[:DETAIL_LIMIT])}
