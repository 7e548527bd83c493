"""benchmarks/quality.py: the summary arithmetic by hand, and the quick mode end to end (what CI runs)."""

import json

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def quality(load_benchmark):
    return load_benchmark("quality")


def test_summary_is_the_mean_and_spread_over_seeds(quality):
    budget = quality.Budget(n_images=10, pretrain_epochs=1, train_epochs=1, seeds=(0, 1), noise=(0.0,))
    scores = {m: 0.5 for m in quality.METRICS}
    runs = [
        {"variant": quality.MUMIC, "noise": 0.0, "scores": {**scores, "gap_at_10": 0.6}},
        {"variant": quality.MUMIC, "noise": 0.0, "scores": {**scores, "gap_at_10": 0.8}},
        {"variant": "linear + BCE", "noise": 0.0, "scores": {**scores, "gap_at_10": 0.65, "held_out_map": None}},
    ]
    zero_shot = {"scores": {**scores, "gap_at_10": 0.3}}
    rows = {r["variant"]: r for r in quality.summarise(runs, zero_shot, budget)}
    assert rows[quality.MUMIC]["gap_at_10"] == pytest.approx(0.7)
    assert rows[quality.MUMIC]["gap_at_10_sd"] == pytest.approx(0.1414213562)  # sample sd of 0.6, 0.8
    assert rows["linear + BCE"]["n"] == 1 and rows["linear + BCE"]["gap_at_10_sd"] == 0.0
    assert rows["linear + BCE"]["held_out_map"] is None
    assert rows[quality.ZERO_SHOT]["gap_at_10"] == 0.3

    table = quality.markdown_table(list(rows.values()), budget)
    assert "| MuMIC | **0.700 ± 0.141** |" in table
    linear_row = next(line for line in table.splitlines() if line.startswith("| linear + BCE |"))
    assert linear_row.startswith("| linear + BCE | 0.650 | **0.500** |") and "| – |" in linear_row
    assert "hidden as unknown" not in table  # no partial-labels run, no table for them

    masked, negative = quality.PARTIAL_VARIANTS
    runs += [
        {"variant": masked, "noise": 0.0, "hidden": 0.3, "scores": {**scores, "gap_at_10": 0.8}},
        {"variant": negative, "noise": 0.0, "hidden": 0.3, "scores": {**scores, "gap_at_10": 0.7}},
    ]
    rows = quality.summarise(runs, zero_shot, budget)
    partial = {r["variant"]: r for r in rows if r["hidden"]}
    assert set(partial) == {masked, negative} and partial[masked]["gap_at_10"] == pytest.approx(0.8)
    assert rows[0]["hidden"] == 0.0 and quality.MUMIC not in partial
    table = quality.markdown_table(rows, budget)
    section = table[table.index("**30% of the training entries hidden as unknown**") :]
    assert f"| {masked} | **0.800** |" in section and f"| {negative} | 0.700 |" in section
    assert "| MuMIC |" not in section and f"| {masked} |" not in table[: table.index(section)]


def test_hiding_entries_moves_them_to_unknown_labels_seeded(quality):
    names = ["cat", "dog", "bird", "fish"]
    rng = np.random.default_rng(0)
    labels = [[n for n in names if rng.random() < 0.4] for _ in range(500)]
    negatives = [[n for n in names if n not in row and rng.random() < 0.5] for row in labels]
    frame = pd.DataFrame({"path": [f"{i}.png" for i in range(500)], "labels": labels, "negative_labels": negatives})
    hidden = quality.hide_entries(frame, names, 0.3, seed=1)
    assert hidden.equals(quality.hide_entries(frame, names, 0.3, seed=1))
    assert not hidden.equals(quality.hide_entries(frame, names, 0.3, seed=2))
    assert frame["labels"].tolist() == labels  # the input is not changed
    n_hidden = sum(len(u) for u in hidden["unknown_labels"])
    assert 0.27 < n_hidden / (500 * len(names)) < 0.33
    for row in hidden.itertuples():
        unknown = set(row.unknown_labels)
        assert not unknown & set(row.labels) and not unknown & set(row.negative_labels)
        assert set(row.labels) == set(labels[row.Index]) - unknown
        assert set(row.negative_labels) == set(negatives[row.Index]) - unknown
    untouched = quality.hide_entries(frame, names, 0.0, seed=1)
    assert untouched["labels"].tolist() == labels and all(u == [] for u in untouched["unknown_labels"])


@pytest.mark.slow
def test_quick_mode_measures_every_variant_and_resumes_from_its_results(quality, tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "out"
    assert quality.main(["--quick", "--workdir", str(work), "--out", str(out)]) == 0
    results = json.loads((out / "quality.json").read_text())
    budget = quality.QUICK
    trained = [name for name, overrides in quality.VARIANTS.items() if overrides is not None]
    partial = len(quality.PARTIAL_VARIANTS) * len(budget.seeds)
    assert len(results["runs"]) == len(trained) * len(budget.noise) * len(budget.seeds) + partial
    assert {r["variant"] for r in results["summary"]} == set(quality.VARIANTS) | set(quality.PARTIAL_VARIANTS)
    for run in results["runs"]:
        for metric in ("gap_at_10", "gap", "map_macro", "map_top_n", "retrieval_map"):
            assert 0.0 <= run["scores"][metric] <= 1.0, (run["variant"], metric)
        assert run["gap_k"] == results["params"]["evaluate"]["k"] and run["val_gap_at_k"], run["variant"]
        has_text_tower = not run["variant"].startswith("linear")
        assert (run["scores"]["held_out_map"] is not None) == has_text_tower, run["variant"]
    assert results["foundation"]["source"] == "pretrained"
    assert results["zero_shot"]["scores"]["held_out_map"] is not None
    assert (out / "quality_table.md").read_text().count("| MuMIC |") == len(budget.noise)
    assert all(f"| {name} |" in (out / "quality_table.md").read_text() for name in quality.PARTIAL_VARIANTS)
    hidden = [r for r in results["runs"] if r["variant"] in quality.PARTIAL_VARIANTS]
    assert {r["overrides"]["train.partial_labels"] for r in hidden} == {True, False}
    assert all(r["hidden"] == budget.hidden for r in hidden)
    assert (out / "quality_gap_at_10.png").stat().st_size > 0
    by_name = {r["variant"]: r for r in results["runs"] if not r["hidden"]}
    assert by_name[quality.PAPER]["overrides"]["train.loss"] == "tempered_sigmoid_bce"
    # The published recipes fine-tune as published; params.yaml's MuMIC fits its head first.
    for name in (quality.PAPER, quality.LINEAR_ASL, quality.NO_PROBE):
        assert by_name[name]["linear_probe"] is None, name
    for name in (quality.MUMIC, quality.LINEAR_ASL_PROBE):
        assert by_name[name]["linear_probe"]["loss_after"] < by_name[name]["linear_probe"]["loss_before"], name
    for name in (quality.LL_REJECT, quality.LL_CORRECT):
        assert len(by_name[name]["val_gap_at_k"]) == budget.train_epochs >= 2  # the loss is modified from epoch 2
    wise_ft = by_name[quality.WISE_FT]
    assert wise_ft["resumed_from"] is not None  # MuMIC's finished run, exported again
    assert wise_ft["wise_ft"]["alpha"] in wise_ft["overrides"]["train.wise_ft.alpha_grid"]
    assert by_name[quality.MUMIC]["wise_ft"] is None
    assert not any((work / "runs").iterdir())  # the shared run is removed once re-exported

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(quality, "run_variant", no_training)
    assert quality.main(["--quick", "--workdir", str(work), "--out", str(out)]) == 0
    assert json.loads((out / "quality.json").read_text())["runs"] == results["runs"]

    combined = tmp_path / "combined"
    assert quality.main(["--combine", str(out), str(out), "--out", str(combined)]) == 0
    summary = (combined / "worlds_table.md").read_text()
    contenders = [name for name in trained if not name.startswith("linear")]
    # 2 tables of scores with a row per world, then per world each MuMIC row's lead over each of 2 baselines
    assert summary.count("| seed 0, 300 images | 40% |") == 2 * 2 + 2 * 2 * len(contenders)
    assert "**Lead over linear + ASL**" in summary and "**Lead over linear + ASL + linear probe**" in summary
