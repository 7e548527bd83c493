"""How the assets show their results in the Dagster UI, for a user who is not on the machine that ran the job:
figures inline as Markdown images (the PNG in a data URI, never a server path), numbers as numbers so the Plots
tab charts them across materializations, tables, and no empty rows."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from mumic_ml.plots import fit_png

# Per figure, before base64: the event log stores every materialization's metadata, so a few figures stay well
# under a few hundred KB per materialization.
MAX_INLINE_IMAGE_BYTES = 120_000
DECIMALS = 4


def markdown_image(title: str, png: bytes) -> dg.MarkdownMetadataValue:
    """A PNG shown inline on the asset page, scaled down first if it would exceed MAX_INLINE_IMAGE_BYTES."""
    encoded = base64.b64encode(fit_png(png, MAX_INLINE_IMAGE_BYTES)).decode("ascii")
    return dg.MetadataValue.md(f"![{title}](data:image/png;base64,{encoded})")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dg.MarkdownMetadataValue:
    """A small table that reads as a table in the UI even with words in its cells (a Dagster table shows raw)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: _number(row.get(c)) for c in columns}) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in columns]),
    )


def _number(value: Any) -> Any:
    return round(value, DECIMALS) if isinstance(value, float) else value


def _is_empty(value: Any) -> bool:
    if isinstance(value, dg.TableMetadataValue):
        return not value.records
    if isinstance(value, dg.MarkdownMetadataValue):
        return not value.md_str
    return value is None or (isinstance(value, str | list | dict) and not value)


def clean(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata without empty rows (None, "", empty lists and tables), floats rounded, lists and dicts as JSON."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        if _is_empty(value):
            continue
        kept[key] = dg.MetadataValue.json(value) if isinstance(value, list | dict) else _number(value)
    return kept
