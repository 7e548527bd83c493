"""Reading image manifests (CSV, JSONL, Parquet) into one uniform table.

A manifest names an image (`path`, relative to the images root) and its labels. Beside `labels` (the classes the
image shows) it may have `negative_labels` (classes verified absent) and `unknown_labels` (classes nobody could
decide, such as Pascal VOC's `difficult` objects), written like `labels`. A class in none of the three columns is
absent: benchmarks that verify their negatives say so explicitly, most collections only list what is there.

Annotation tools export manifests with all kinds of noise, so the reader separates two failures: a file that cannot
be read at all raises `ManifestError`; a single bad row becomes a row with an `error` message, so the rest of the
batch goes through.

Text manifests must be UTF-8 (a byte-order mark is allowed). Other encodings are refused with the byte offset
of the first invalid byte rather than guessed: a wrong guess would silently turn file names into names that do
not exist.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("path", "labels")
# Optional label columns, read and checked exactly like `labels`; a class in none of the three is absent.
QUALIFIED_LABEL_COLUMNS = ("negative_labels", "unknown_labels")
LABEL_COLUMNS = ("labels", *QUALIFIED_LABEL_COLUMNS)
# Arrow's type for every label column; a column whose lists are all empty would otherwise be inferred as list<null>.
LABEL_LIST_TYPE = pa.list_(pa.string())
# The columns the reader parses itself; every other column is carried as an extra.
_NAMED_COLUMNS = ("path", *LABEL_COLUMNS)
# Columns the reader adds itself; a manifest column of the same name would be ambiguous.
RESERVED_COLUMNS = ("row", "source", "error")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class ManifestError(ValueError):
    """The manifest as a whole cannot be processed (missing, unknown format, wrong columns, not UTF-8, empty)."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest into columns `row`, `source`, `labels`, the qualified label columns the manifest has,
    `error`, then any extra columns as given.

    - `row`: 1-based position of the record as a person finds it in the file: for CSV the line on which the
      record starts, counted after the header line; for JSONL the line number; for Parquet the row index + 1.
    - `source`: the `path` value exactly as written (a str; never parsed as a number).
    - `labels`: list of str, each stripped, empty ones dropped. In CSV (and string values in JSONL/Parquet) a
      value starting with `[` is read as a JSON list, otherwise it is split on `|`.
    - `negative_labels`, `unknown_labels`: only when the manifest has the column (in JSONL: when any line has the
      key); read like `labels`, an empty or missing value is an empty list.
    - `error`: None, or a message saying why the row is malformed.
    Extra CSV and JSONL values are read as strings (JSON values that are not strings are kept as JSON text);
    extra Parquet columns keep their values.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ManifestError(f"{path}: unknown manifest format {path.suffix!r}; use one of {', '.join(sorted(FORMATS))}")
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    if fmt == "parquet":
        records, extras = _read_parquet(path)
    else:
        text = _read_utf8(path)
        records, extras = _read_csv(path, text) if fmt == "csv" else _read_jsonl(path, text)
    if not records:
        raise ManifestError(f"{path}: the manifest has no data rows")
    return _to_frame(records, extras)


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, offset) + 1
        raise ManifestError(
            f"{path}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}); "
            "save the manifest as UTF-8"
        ) from exc


def _check_columns(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    for name in columns:
        if name in seen:
            raise ManifestError(f"{path}: column {name!r} appears more than once")
        seen.add(name)
    missing = [c for c in REQUIRED_COLUMNS if c not in seen]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; found columns {columns}")
    reserved = [c for c in RESERVED_COLUMNS if c in seen]
    if reserved:
        raise ManifestError(f"{path}: column name(s) {reserved} are reserved; rename them in the manifest")


def _read_csv(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_end = 0
    records: list[dict[str, Any]] = []
    while True:
        start_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if header is None:
                raise ManifestError(f"{path}: cannot parse the CSV header: {exc}") from exc
            records.append(_error_record(start_line - header_end, None, f"CSV syntax error: {_csv_error(exc)}"))
            continue
        if not any(f.strip() for f in fields):
            continue
        if header is None:
            header = [_header_name(f) for f in fields]
            header_end = reader.line_num
            _check_columns(path, header)
            continue
        row = start_line - header_end
        values = dict(zip(header, fields))
        source = values.get("path")
        if len(fields) != len(header):
            records.append(_error_record(row, source, f"row has {len(fields)} fields but the header has {len(header)}"))
            continue
        record = _parse_record(row, source, values)
        record["extras"] = {k: v for k, v in values.items() if k not in _NAMED_COLUMNS}
        records.append(record)
    if header is None:
        raise ManifestError(f"{path}: the manifest is empty (no header row)")
    return records, list(header)


def _header_name(field: str) -> str:
    name = field.strip()
    return name.lower() if name.lower() in _NAMED_COLUMNS else name


def _csv_error(exc: csv.Error) -> str:
    message = str(exc)
    if "unexpected end of data" in message:
        return "a quoted field is never closed (the quote runs to the end of the file)"
    return message


def _read_jsonl(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str]]:
    records: list[dict[str, Any]] = []
    extras: dict[str, None] = {}
    has_path = has_labels = False
    n_objects = 0
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append(_error_record(line_no, None, f"line is not valid JSON: {exc}"))
            continue
        if not isinstance(obj, dict):
            records.append(_error_record(line_no, None, f"line is a JSON {type(obj).__name__}, not an object"))
            continue
        n_objects += 1
        has_path |= "path" in obj
        has_labels |= "labels" in obj
        reserved = [k for k in RESERVED_COLUMNS if k in obj]
        if reserved:
            raise ManifestError(f"{path}: line {line_no}: key(s) {reserved} are reserved; rename them")
        record = _parse_record(line_no, obj.get("path"), obj)
        record["extras"] = {k: _as_text(v) for k, v in obj.items() if k not in _NAMED_COLUMNS}
        extras.update(dict.fromkeys(k for k in obj if k not in REQUIRED_COLUMNS))
        records.append(record)
    if records and not n_objects:
        raise ManifestError(f"{path}: no line is a valid JSON object; line {records[0]['row']}: {records[0]['error']}")
    if records and not (has_path and has_labels):
        missing = [k for k, seen in (("path", has_path), ("labels", has_labels)) if not seen]
        raise ManifestError(f"{path}: no line has the required key(s) {missing}")
    return records, list(extras)


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{path}: not a readable Parquet file: {exc}") from exc
    _check_columns(path, table.column_names)
    records = []
    for index, values in enumerate(table.to_pylist()):
        record = _parse_record(index + 1, values["path"], values)
        record["extras"] = {k: v for k, v in values.items() if k not in _NAMED_COLUMNS}
        records.append(record)
    return records, table.column_names


def _parse_record(row: int, source: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Validate one row's path and label columns; the first problem found becomes the row's error."""
    if source is not None and not isinstance(source, str):
        return _error_record(row, str(source), f"path must be a string, got {type(source).__name__} {source!r}")
    if source is None or not source.strip():
        return _error_record(row, source, "missing path")
    record: dict[str, Any] = {"row": row, "source": source, "error": None}
    for column in LABEL_COLUMNS:
        try:
            record[column] = parse_labels(values.get(column))
        except ValueError as exc:
            # `labels` keeps its unprefixed messages; the qualified columns say which column is broken.
            return _error_record(row, source, str(exc) if column == "labels" else f"{column}: {exc}")
    return record


def _error_record(row: int, source: str | None, error: str) -> dict[str, Any]:
    return {"row": row, "source": source, **{c: [] for c in LABEL_COLUMNS}, "error": error, "extras": {}}


def parse_labels(value: Any) -> list[str]:
    """Labels from a list, a JSON list string, or a `|`-separated string; ValueError says what is wrong."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [part.strip() for part in text.split("|") if part.strip()]
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"labels look like a JSON list but do not parse: {exc}") from exc
        if not isinstance(value, list):
            raise ValueError("labels look like a JSON list but are not one")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"labels must be a list or a string, got {type(value).__name__}")
    labels = []
    for i, label in enumerate(value, start=1):
        if not isinstance(label, str):
            raise ValueError(f"label #{i} is not a string: {label!r}")
        if label.strip():
            labels.append(label.strip())
    return labels


def _to_frame(records: list[dict[str, Any]], columns_in_file: list[str]) -> pd.DataFrame:
    # object dtype keeps None as None and lists as lists (pandas' string dtype would turn None into NaN).
    columns: dict[str, pd.Series] = {"row": pd.Series([r["row"] for r in records], dtype="int64")}
    qualified = [c for c in QUALIFIED_LABEL_COLUMNS if c in columns_in_file]
    for name in ("source", "labels", *qualified, "error"):
        columns[name] = pd.Series([r[name] for r in records], dtype=object)
    for name in columns_in_file:
        if name not in _NAMED_COLUMNS:
            columns[name] = pd.Series([r["extras"].get(name) for r in records], dtype=object)
    return pd.DataFrame(columns)


def label_lists_as_strings(table: pa.Table) -> pa.Table:
    """The table with every label column typed list<string>, as ingest writes them.

    pandas hands lists to Arrow without a type, so a label column whose lists are all empty (a split without a
    single unknown label, say) would be stored as list<null>, and the same column would change type between files.
    """
    for name in LABEL_COLUMNS:
        if name not in table.column_names:
            continue
        field_type = table.schema.field(name).type
        if pa.types.is_list(field_type) and pa.types.is_null(field_type.value_type):
            table = table.set_column(table.column_names.index(name), name, table[name].cast(LABEL_LIST_TYPE))
    return table
