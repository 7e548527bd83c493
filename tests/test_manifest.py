"""Manifest reading: whole-file problems raise ManifestError, single bad rows become error rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_ml.manifest import ManifestError, parse_labels, read_manifest


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def by_row(frame) -> dict:
    return {r["row"]: r for r in frame.to_dict("records")}


def test_csv_basic_and_everything_stays_a_string(tmp_path):
    path = write(
        tmp_path,
        "m.csv",
        'path,labels,caption\n001.jpg,cat|dog,two pets\nb.png," sea view | | balcony ",\nc.png,"[""1"", ""2""]",x\n',
    )
    frame = read_manifest(path)
    assert list(frame.columns) == ["row", "source", "labels", "error", "caption"]
    rows = by_row(frame)
    assert rows[1]["source"] == "001.jpg" and rows[1]["labels"] == ["cat", "dog"]
    assert rows[1]["caption"] == "two pets"
    assert rows[2]["labels"] == ["sea view", "balcony"] and rows[2]["caption"] == ""
    assert rows[3]["labels"] == ["1", "2"]
    assert all(r["error"] is None for r in rows.values())


def test_csv_with_bom_and_windows_line_endings(tmp_path):
    path = write(tmp_path, "m.csv", b"\xef\xbb\xbfpath,labels\r\na.png,cat\r\nb.png,dog|cat\r\n")
    frame = read_manifest(path)
    assert frame["source"].tolist() == ["a.png", "b.png"]
    assert frame["labels"].tolist() == [["cat"], ["dog", "cat"]]


def test_csv_quoted_delimiters_and_multiline_fields(tmp_path):
    content = 'Path , LABELS,caption\n"x, y.png","a|b",plain\n"z.png",c,"line one\nline two"\nlast.png,d,\n'
    rows = by_row(read_manifest(write(tmp_path, "m.csv", content)))
    assert rows[1]["source"] == "x, y.png" and rows[1]["labels"] == ["a", "b"]
    assert rows[2]["caption"] == "line one\nline two"
    assert rows[4]["source"] == "last.png", "rows are counted in file lines after the header"


def test_csv_json_labels_with_pipes_inside(tmp_path):
    path = write(tmp_path, "m.csv", 'path,labels\na.png,"[""a|b"", ""c, d""]"\n')
    assert read_manifest(path)["labels"].tolist() == [["a|b", "c, d"]]


def test_csv_malformed_rows_are_flagged_and_others_kept(tmp_path):
    content = (
        "path,labels\n"
        "good.png,cat\n"
        ",cat\n"
        'bad_json.png,"[""cat"", "\n'
        "number.png,[1]\n"
        "extra.png,cat,surplus\n"
        "short.png\n"
        '"x"y.png,cat\n'
        "good2.png,dog\n"
    )
    rows = by_row(read_manifest(write(tmp_path, "m.csv", content)))
    assert rows[1]["error"] is None and rows[8]["error"] is None
    assert rows[2]["error"] == "missing path"
    assert "JSON list" in rows[3]["error"] and rows[3]["source"] == "bad_json.png"
    assert rows[4]["error"] == "label #1 is not a string: 1"
    assert rows[5]["error"] == "row has 3 fields but the header has 2"
    assert rows[6]["error"] == "row has 1 fields but the header has 2"
    assert rows[7]["error"].startswith("CSV syntax error")


def test_csv_unclosed_quote_is_an_error_row(tmp_path):
    rows = by_row(read_manifest(write(tmp_path, "m.csv", 'path,labels\na.png,cat\n"b.png,dog\nc.png,cat\n')))
    assert rows[1]["error"] is None
    assert "never closed" in rows[2]["error"]


def test_non_utf8_manifest_names_file_and_offset(tmp_path):
    path = write(tmp_path, "m.csv", "path,labels\ncaf\u00e9.png,cat\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"m\.csv: not valid UTF-8: byte 0xe9 at byte offset 15 \(line 2\)"):
        read_manifest(path)


def test_non_utf8_offset_counts_the_bom(tmp_path):
    path = write(tmp_path, "m.csv", b"\xef\xbb\xbfpath,labels\nx\xff.png,cat\n")
    with pytest.raises(ManifestError, match="byte 0xff at byte offset 16"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("m.csv", "", "empty"),
        ("m.csv", "\n\n", "empty"),
        ("m.csv", "path,labels\n", "no data rows"),
        ("m.jsonl", "\n  \n", "no data rows"),
        ("m.csv", "file,tags\na.png,cat\n", r"missing required column\(s\) \['path', 'labels'\]"),
        ("m.csv", "path,labels,path\na,b,c\n", "more than once"),
        ("m.csv", "path,labels,source\na,b,c\n", "reserved"),
        ("m.txt", "path,labels\na,b\n", "unknown manifest format"),
        ("m.jsonl", "not json\n{broken\n", "no line is a valid JSON object"),
        ("m.jsonl", '{"file": "a.png", "labels": ["x"]}\n', r"required key\(s\) \['path'\]"),
        ("m.parquet", "path,labels\na,b\n", "not a readable Parquet file"),
    ],
)
def test_unprocessable_manifests(tmp_path, name, content, message):
    with pytest.raises(ManifestError, match=message):
        read_manifest(write(tmp_path, name, content))


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_jsonl_rows_and_broken_lines(tmp_path):
    lines = [
        json.dumps({"path": "a.png", "labels": ["cat", " dog "], "caption": "hi"}),
        "",
        json.dumps({"path": "b.png", "labels": "cat|dog", "score": 0.5}),
        '{"path": "c.png", "labels": [',
        json.dumps(["not", "an", "object"]),
        json.dumps({"path": 7, "labels": ["cat"]}),
        json.dumps({"path": "d.png", "labels": ["cat", 3]}),
        json.dumps({"path": "e.png"}),
    ]
    frame = read_manifest(write(tmp_path, "m.jsonl", "\r\n".join(lines) + "\r\n"))
    rows = by_row(frame)
    assert sorted(rows) == [1, 3, 4, 5, 6, 7, 8]
    assert rows[1]["labels"] == ["cat", "dog"] and rows[1]["caption"] == "hi" and rows[1]["error"] is None
    assert rows[3]["labels"] == ["cat", "dog"] and rows[3]["score"] == "0.5"
    assert rows[4]["error"].startswith("line is not valid JSON")
    assert rows[5]["error"] == "line is a JSON list, not an object"
    assert rows[6]["error"] == "path must be a string, got int 7"
    assert rows[7]["error"] == "label #2 is not a string: 3"
    assert rows[8]["error"] is None and rows[8]["labels"] == []


def test_parquet_with_list_and_string_labels(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png", None], "labels": [["x", "y"], ["z"], []]}), path)
    rows = by_row(read_manifest(path))
    assert rows[1]["labels"] == ["x", "y"] and rows[2]["labels"] == ["z"]
    assert rows[3]["error"] == "missing path"

    pq.write_table(pa.table({"path": ["a.png"], "labels": ["x|y"], "caption": ["c"], "w": [3]}), path)
    frame = read_manifest(path)
    assert frame["labels"].tolist() == [["x", "y"]]
    assert frame["caption"].tolist() == ["c"] and frame["w"].tolist() == [3]


def test_parquet_with_no_rows(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "labels": pa.array([], pa.string())}), path)
    with pytest.raises(ManifestError, match="no data rows"):
        read_manifest(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("a", ["a"]),
        (" a | b ||", ["a", "b"]),
        ('["a", " b ", ""]', ["a", "b"]),
        (["a", "  "], ["a"]),
        ("[]", []),
    ],
)
def test_parse_labels(value, expected):
    assert parse_labels(value) == expected


@pytest.mark.parametrize(("value", "message"), [("[1,", "do not parse"), (5, "must be a list"), (["a", None], "#2")])
def test_parse_labels_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_labels(value)


def test_negative_and_unknown_label_columns_are_read_like_labels(tmp_path):
    content = (
        "path,labels,Negative_Labels,unknown_labels,caption\n"
        'a.png,cat,"[""dog"", "" bird ""]",,x\n'
        "b.png,,dog | cat,fish,\n"
        'c.png,cat,"[broken",,\n'
    )
    frame = read_manifest(write(tmp_path, "m.csv", content))
    assert list(frame.columns) == ["row", "source", "labels", "negative_labels", "unknown_labels", "error", "caption"]
    rows = by_row(frame)
    assert (rows[1]["labels"], rows[1]["negative_labels"], rows[1]["unknown_labels"]) == (["cat"], ["dog", "bird"], [])
    assert (rows[2]["labels"], rows[2]["negative_labels"], rows[2]["unknown_labels"]) == ([], ["dog", "cat"], ["fish"])
    assert rows[3]["error"].startswith("negative_labels: labels look like a JSON list but do not parse")
    assert rows[3]["negative_labels"] == [] and rows[1]["error"] is None


def test_label_columns_in_jsonl_and_parquet(tmp_path):
    lines = [
        json.dumps({"path": "a.png", "labels": ["cat"]}),
        json.dumps({"path": "b.png", "labels": [], "unknown_labels": ["dog"], "note": "checked"}),
        json.dumps({"path": "c.png", "labels": ["cat"], "unknown_labels": 5}),
    ]
    frame = read_manifest(write(tmp_path, "m.jsonl", "\n".join(lines) + "\n"))
    assert list(frame.columns) == ["row", "source", "labels", "unknown_labels", "error", "note"]
    rows = by_row(frame)
    assert rows[1]["unknown_labels"] == [] and rows[2]["unknown_labels"] == ["dog"] and rows[2]["labels"] == []
    assert rows[3]["error"] == "unknown_labels: labels must be a list or a string, got int"

    path = tmp_path / "m.parquet"
    negatives = pa.array([["dog"], None], pa.list_(pa.string()))
    table = pa.table({"path": ["a.png", "b.png"], "labels": [["cat"], ["dog"]], "negative_labels": negatives})
    pq.write_table(table, path)
    frame = read_manifest(path)
    assert "unknown_labels" not in frame.columns
    assert frame["negative_labels"].tolist() == [["dog"], []]
