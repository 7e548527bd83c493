"""Iterative stratification: determinism, sizes, per-class balance against a random split, and the manifest files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mumic_ml.split import iterative_stratified_split, split_manifest

FRACTIONS = {"train": 0.7, "val": 0.15, "test": 0.15}


def long_tailed_labels(num_rows=4000, num_classes=40, seed=0):
    """Class frequencies falling as a power law, from ~30% of rows down to a handful of rows; some rows unlabelled."""
    rng = np.random.default_rng(seed)
    rates = 0.3 / np.arange(1, num_classes + 1) ** 1.2
    return rng.random((num_rows, num_classes)) < rates


def per_class_deviation(labels, split_of_row, fractions):
    """Mean over (split, class) of |share of the class's positives in the split - the split's fraction|."""
    counts = labels.sum(axis=0)
    deviations = [
        np.abs(labels[split_of_row == name].sum(axis=0) / counts - share) for name, share in fractions.items()
    ]
    return float(np.mean(deviations))


def test_same_seed_same_split_and_seed_matters():
    labels = long_tailed_labels()
    first = iterative_stratified_split(labels, FRACTIONS, seed=3)
    np.testing.assert_array_equal(first, iterative_stratified_split(labels.copy(), FRACTIONS, seed=3))
    assert (first != iterative_stratified_split(labels, FRACTIONS, seed=4)).any()


def test_every_row_gets_exactly_one_known_split():
    labels = long_tailed_labels()
    split_of_row = iterative_stratified_split(labels, FRACTIONS, seed=0)
    assert split_of_row.shape == (labels.shape[0],)
    assert set(split_of_row) == set(FRACTIONS)


def test_split_sizes_follow_fractions():
    labels = long_tailed_labels()
    split_of_row = iterative_stratified_split(labels, FRACTIONS, seed=0)
    for name, share in FRACTIONS.items():
        assert abs(np.sum(split_of_row == name) - share * len(labels)) <= 0.01 * len(labels)


def test_per_class_proportions_much_closer_than_a_random_split():
    labels = long_tailed_labels()
    stratified = per_class_deviation(labels, iterative_stratified_split(labels, FRACTIONS, seed=0), FRACTIONS)
    rng = np.random.default_rng(0)
    random_splits = [rng.choice(list(FRACTIONS), size=len(labels), p=list(FRACTIONS.values())) for _ in range(5)]
    random_deviations = [per_class_deviation(labels, split, FRACTIONS) for split in random_splits]
    assert stratified < 0.5 * min(random_deviations)


def test_rare_class_positives_are_spread_over_splits():
    # 20 positives at 70/15/15 want 14/3/3; a random split often gives val or test none or twice as many.
    labels = np.zeros((1000, 1), dtype=bool)
    labels[::50] = True
    split_of_row = iterative_stratified_split(labels, FRACTIONS, seed=1)
    positives = {name: int(labels[split_of_row == name].sum()) for name in FRACTIONS}
    assert positives == {"train": 14, "val": 3, "test": 3}


def test_unlabelled_rows_follow_the_fractions():
    labels = np.zeros((1000, 3), dtype=int)
    split_of_row = iterative_stratified_split(labels, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert [np.sum(split_of_row == name) for name in "abc"] == [500, 300, 200]


def test_single_split_takes_everything():
    split_of_row = iterative_stratified_split(long_tailed_labels(200, 5), {"all": 1.0}, seed=0)
    assert set(split_of_row) == {"all"}


@pytest.mark.parametrize(
    "fractions",
    [
        {},
        {"train": "most", "val": 0.5},
        {"train": 0.7, "val": 0.2},
        {"train": 0.7, "val": 0.4, "test": -0.1},
        {"train": 1.0, "val": 0.0},
        {"train": float("nan"), "val": 0.5},
        {"../train": 0.5, "val": 0.5},
    ],
)
def test_bad_fractions_raise(fractions):
    with pytest.raises(ValueError, match="fractions|split name"):
        iterative_stratified_split(long_tailed_labels(50, 3), fractions, seed=0)


def test_fractions_sum_tolerance():
    iterative_stratified_split(long_tailed_labels(50, 3), {"a": 0.7, "b": 0.3 + 5e-7}, seed=0)


@pytest.mark.parametrize("labels", [np.zeros(5), np.full((3, 2), 2), np.array([["a", "b"]])])
def test_bad_label_matrix_raises(labels):
    with pytest.raises(ValueError, match="label_matrix"):
        iterative_stratified_split(labels, FRACTIONS, seed=0)


# --- split_manifest -------------------------------------------------------------------------------------------------


def write_manifest(path, num_rows=300, seed=0):
    labels = long_tailed_labels(num_rows, 6, seed)
    names = ["balcony", "bathtub", "bed", "pool", "sea view", "tv"]
    manifest = pd.DataFrame(
        {
            "image_id": [f"img{i:04d}" for i in range(num_rows)],
            "path": [f"images/img{i:04d}.png" for i in range(num_rows)],
            "sha256": [f"{i:064x}" for i in range(num_rows)],
            "labels": [[names[c] for c in np.flatnonzero(row)] for row in labels],
        }
    )
    manifest.to_parquet(path, index=False)
    return manifest


def test_split_manifest_round_trip(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.parquet")
    report = split_manifest(tmp_path / "manifest.parquet", tmp_path / "splits", FRACTIONS, seed=5)

    parts = {name: pd.read_parquet(tmp_path / "splits" / f"{name}.parquet") for name in FRACTIONS}
    for part in parts.values():
        assert list(part.columns) == list(manifest.columns)
        positions = manifest.index[manifest["image_id"].isin(part["image_id"])]
        assert list(part["image_id"]) == list(manifest.loc[positions, "image_id"])  # manifest order kept
    ids = pd.concat([part["image_id"] for part in parts.values()])
    assert sorted(ids) == sorted(manifest["image_id"])
    hashes = pd.concat([part["sha256"] for part in parts.values()])
    assert hashes.is_unique
    assert [list(labels) for labels in parts["val"]["labels"]] == [
        list(labels) for labels in manifest.set_index("image_id").loc[parts["val"]["image_id"], "labels"]
    ]

    assert {k: v for k, v in report.items() if k != "assignment"} == json.loads(
        (tmp_path / "splits" / "split_report.json").read_text()
    )
    assert report["seed"] == 5 and report["fractions"] == FRACTIONS
    assert report["classes"] == sorted({label for labels in manifest["labels"] for label in labels})
    for name, part in parts.items():
        assert report["splits"][name]["n_images"] == len(part)
        expected = {cls: sum(cls in labels for labels in part["labels"]) for cls in report["classes"]}
        assert report["splits"][name]["positives"] == expected

    # Same input and seed give byte-identical files, so DVC sees the same hashes on a rerun.
    again = split_manifest(tmp_path / "manifest.parquet", tmp_path / "again", FRACTIONS, seed=5)
    assert again["splits"] == report["splits"]
    for name in [*FRACTIONS, "split_report"]:
        suffix = "json" if name == "split_report" else "parquet"
        first, second = (tmp_path / folder / f"{name}.{suffix}" for folder in ("splits", "again"))
        assert first.read_bytes() == second.read_bytes()
    assert not list((tmp_path / "splits").glob(".*"))  # no temporary files left behind


def test_split_manifest_uses_taxonomy_order_and_rejects_unknown_labels(tmp_path):
    write_manifest(tmp_path / "manifest.parquet")
    taxonomy = ["tv", "sea view", "pool", "bed", "bathtub", "balcony", "garden"]
    report = split_manifest(tmp_path / "manifest.parquet", tmp_path / "out", FRACTIONS, 0, taxonomy_names=taxonomy)
    assert report["classes"] == taxonomy
    assert all(report["splits"][name]["positives"]["garden"] == 0 for name in FRACTIONS)
    with pytest.raises(ValueError, match="sea view"):
        split_manifest(tmp_path / "manifest.parquet", tmp_path / "out2", FRACTIONS, 0, taxonomy_names=["tv", "bed"])


def test_split_manifest_refuses_duplicate_hashes(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", num_rows=20)
    manifest.loc[7, "sha256"] = manifest.loc[3, "sha256"]
    manifest.to_parquet(tmp_path / "m.parquet", index=False)
    with pytest.raises(ValueError, match=manifest.loc[3, "sha256"]):
        split_manifest(tmp_path / "m.parquet", tmp_path / "out", FRACTIONS, seed=0)
    assert not (tmp_path / "out").exists()


def test_split_manifest_rejects_labels_that_are_not_lists(tmp_path):
    manifest = pd.DataFrame({"image_id": ["a", "b"], "sha256": ["1", "2"], "labels": ["pool", "bed"]})
    manifest.to_parquet(tmp_path / "m.parquet", index=False)
    with pytest.raises(ValueError, match="list of str"):
        split_manifest(tmp_path / "m.parquet", tmp_path / "out", FRACTIONS, seed=0)


def test_split_manifest_requires_columns(tmp_path):
    pd.DataFrame({"image_id": ["a"], "labels": [["x"]]}).to_parquet(tmp_path / "m.parquet", index=False)
    with pytest.raises(ValueError, match="sha256"):
        split_manifest(tmp_path / "m.parquet", tmp_path / "out", FRACTIONS, seed=0)


# --- stable assignments as the collection grows ----------------------------------------------------------------------


def _splits_by_sha(folder) -> dict[str, str]:
    return {sha: name for name in FRACTIONS for sha in pd.read_parquet(folder / f"{name}.parquet")["sha256"]}


def test_a_grown_collection_keeps_every_image_in_its_split_and_deals_only_the_new_ones(tmp_path):
    full = write_manifest(tmp_path / "full.parquet", num_rows=400)
    full.iloc[:300].to_parquet(tmp_path / "first.parquet", index=False)
    split_manifest(tmp_path / "first.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    before = _splits_by_sha(tmp_path / "splits")

    report = split_manifest(tmp_path / "full.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    after = _splits_by_sha(tmp_path / "splits")
    assert {sha: after[sha] for sha in before} == before
    new_per_split = report["assignment"].pop("new_per_split")
    assert report["assignment"] == {"kept": 300, "new": 100, "dropped": 0, "reassigned": False}
    # The new images alone are stratified: each split gets about its share of them.
    for name, share in FRACTIONS.items():
        assert abs(new_per_split[name] - share * 100) <= 3

    # Splitting the whole collection from scratch would have moved earlier images: that is what stability prevents.
    fresh = split_manifest(tmp_path / "full.parquet", tmp_path / "fresh", FRACTIONS, seed=0)
    moved = sum(before[sha] != name for sha, name in _splits_by_sha(tmp_path / "fresh").items() if sha in before)
    assert moved > 0 and fresh["assignment"]["kept"] == 0


def test_a_corrected_label_moves_no_image_and_reaches_the_split_file(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet")
    split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    before = _splits_by_sha(tmp_path / "splits")
    corrected = manifest.copy()
    corrected.at[0, "labels"] = ["pool", "sea view"]
    corrected = corrected.iloc[::-1]  # row order does not matter either
    corrected.to_parquet(tmp_path / "m.parquet", index=False)
    report = split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=7)
    assert _splits_by_sha(tmp_path / "splits") == before and report["assignment"]["new"] == 0
    home = pd.read_parquet(tmp_path / "splits" / f"{before[manifest.at[0, 'sha256']]}.parquet")
    assert list(home.set_index("sha256").loc[manifest.at[0, "sha256"], "labels"]) == ["pool", "sea view"]


def test_removed_images_leave_their_split_and_reassign_deals_everything_afresh(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet")
    split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    manifest.iloc[10:].to_parquet(tmp_path / "m.parquet", index=False)
    report = split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    assert report["assignment"]["dropped"] == 10 and len(_splits_by_sha(tmp_path / "splits")) == 290
    again = split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=3, reassign=True)
    assert {key: again["assignment"][key] for key in ("kept", "new", "dropped", "reassigned")} == {
        "kept": 0,
        "new": 290,
        "dropped": 0,
        "reassigned": True,
    }


def test_a_partial_set_of_split_files_is_refused(tmp_path):
    write_manifest(tmp_path / "m.parquet")
    split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)
    (tmp_path / "splits" / "test.parquet").unlink()
    with pytest.raises(ValueError, match=r"not \['test'\].*--reassign"):
        split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)


def test_split_files_carry_negative_and_unknown_labels_typed_as_lists_of_str(tmp_path):
    """A split where every image has empty negative or unknown lists still stores them as list<string>."""
    manifest = write_manifest(tmp_path / "m.parquet", num_rows=40)
    manifest["negative_labels"] = [["tv"] if i == 0 else [] for i in range(len(manifest))]
    manifest["unknown_labels"] = [[] for _ in range(len(manifest))]
    manifest["caption"] = [f"photo {i}" for i in range(len(manifest))]
    manifest.to_parquet(tmp_path / "m.parquet", index=False)
    split_manifest(tmp_path / "m.parquet", tmp_path / "splits", FRACTIONS, seed=0)

    rows = {}
    for name in FRACTIONS:
        table = pq.read_table(tmp_path / "splits" / f"{name}.parquet")
        assert table.column_names == list(manifest.columns)
        for column in ("labels", "negative_labels", "unknown_labels"):
            assert table.schema.field(column).type == pa.list_(pa.string()), (name, column)
        rows.update({row["image_id"]: row for row in table.to_pylist()})
    assert rows["img0000"]["negative_labels"] == ["tv"] and rows["img0001"]["negative_labels"] == []
    assert rows["img0039"]["caption"] == "photo 39" and rows["img0039"]["unknown_labels"] == []
