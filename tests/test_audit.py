"""The label audit: ranking, cross-fitting without leakage, the CSV and HTML a reviewer works through, and a reviewed
list applied as a correction batch that the next ingest lets win over the original labels."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mumic_ml import steps
from mumic_ml.audit import (
    MISSING,
    WRONG,
    AuditError,
    Tower,
    assign_folds,
    candidates,
    cross_fit,
    linear_head,
    rank_suspects,
    run_audit,
)
from mumic_ml.backbone import ImageNorm
from mumic_ml.cli import main
from mumic_ml.config import AuditConfig
from mumic_ml.data import read_split
from mumic_ml.demo_world import generate_demo_world
from mumic_ml.project import Project

REPO = Path(__file__).resolve().parents[1]


def test_suspects_are_ranked_as_computed_by_hand():
    scores = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.6], [0.5, 0.05, 0.95]], dtype=np.float32)
    targets = np.array([[0, 1, 1], [0, 0, 1], [1, 0, 0]], dtype=np.float32)
    rankable = np.ones_like(targets, dtype=bool)
    rankable[1, 0] = False  # a verified negative (or unknown) is never raised
    ranked = rank_suspects(scores, targets, rankable)
    # Labelled absent, highest score first: 0.95, 0.9, 0.7, 0.05 (image 1, class 0 is not rankable).
    assert [(s.image, s.label, s.rank) for s in ranked[MISSING]] == [(2, 2, 1), (0, 0, 2), (1, 1, 3), (2, 1, 4)]
    # Labelled present, lowest score first; the tie at 0.6 goes to the lower image row.
    assert [(s.image, s.label, s.rank) for s in ranked[WRONG]] == [(0, 1, 1), (2, 0, 2), (0, 2, 3), (1, 2, 4)]
    assert ranked[MISSING][0].score == pytest.approx(0.95) and ranked[WRONG][0].kind == WRONG
    top = rank_suspects(scores, targets, rankable, limit=2)
    assert {kind: [(s.image, s.label) for s in top[kind]] for kind in top} == {
        MISSING: [(2, 2), (0, 0)],
        WRONG: [(0, 1), (2, 0)],
    }
    assert candidates(targets, rankable) == {MISSING: 4, WRONG: 4}


def test_cross_fitting_never_scores_an_image_with_a_head_that_saw_it():
    n = 23
    ids = np.arange(n, dtype=np.float32)[:, None]  # the feature is the image's own id, so the spy knows who is who
    targets = (np.arange(n)[:, None] % 2 == np.arange(2)).astype(np.float32)
    fold = assign_folds([f"{i:064x}" for i in range(n)], folds=4, seed=3)
    seen_by_head: list[set[int]] = []
    scored_by: dict[int, int] = {}

    def spy_fit(features, fit_targets, observed):
        head = len(seen_by_head)
        seen_by_head.append({int(i) for i in features[:, 0]})
        assert len(fit_targets) == len(features) == len(observed)

        def predict(rows):
            for i in rows[:, 0]:
                assert int(i) not in scored_by, "an image scored twice"
                scored_by[int(i)] = head
            return np.full((len(rows), 2), 0.5, dtype=np.float32)

        return predict

    scores = cross_fit(ids, targets, np.ones_like(targets, dtype=bool), fold, spy_fit)
    assert len(seen_by_head) == 4 and not np.isnan(scores).any()
    assert sorted(scored_by) == list(range(n))
    for image, head in scored_by.items():
        assert image not in seen_by_head[head]
        assert seen_by_head[head] == set(range(n)) - {i for i in range(n) if fold[i] == fold[image]}


def test_folds_are_balanced_and_do_not_depend_on_row_order():
    shas = [f"{i * 7919 % 1000:064x}" for i in range(100)]
    fold = assign_folds(shas, folds=5, seed=0)
    assert np.bincount(fold).tolist() == [20] * 5
    reversed_fold = assign_folds(shas[::-1], folds=5, seed=0)
    assert reversed_fold[::-1].tolist() == fold.tolist()
    assert assign_folds(shas, folds=5, seed=1).tolist() != fold.tolist()
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(shas, folds=1, seed=0)


def test_the_linear_head_learns_a_separable_label_and_ignores_unknown_entries():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    observed = np.ones_like(y, dtype=bool)
    noisy = y.copy()
    noisy[:20] = 1 - noisy[:20]
    observed[:20] = False  # the flipped labels are marked unknown: the head must not learn them
    predict = linear_head(steps=200, lr=0.05, weight_decay=0.0)(x, noisy, observed)
    assert ((predict(x) > 0.5) == (y > 0.5)).mean() > 0.97


def pooled_tower() -> Tower:
    """A stand-in image tower: mean colour and coarse 2x2 pooling, enough to tell the demo world's scenes apart."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)

    return Tower(encode, ImageNorm(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), torch.device("cpu"), "pooled-test")


def test_the_audit_writes_the_csv_and_the_report_and_reuses_cached_embeddings(tiny_world, tmp_path):
    frame = read_split(tiny_world.splits / "train.parquet")
    names = ["red", "blue", "green", "circle", "square"]
    cfg = AuditConfig(folds=3, head_steps=50, suspects=25, report_rows=5)
    kwargs = dict(
        images_root=tiny_world.ingested,
        preprocess_cache=tiny_world.cache,
        embedding_cache=tmp_path / "embeddings",
        out_dir=tmp_path / "audit",
    )
    first = run_audit(frame, names, pooled_tower(), cfg, **kwargs)
    assert first.embedded_now == len(frame)
    with open(first.csv_path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["image", "class", "kind", "score", "rank", "source", "decision"]
    for kind in (MISSING, WRONG):
        listed = [r for r in rows if r["kind"] == kind]
        assert [int(r["rank"]) for r in listed] == list(range(1, len(listed) + 1))
        assert 0 < len(listed) <= 25 and all(r["decision"] == "" for r in listed)
    missing_scores = [float(r["score"]) for r in rows if r["kind"] == MISSING]
    assert missing_scores == sorted(missing_scores, reverse=True)
    labels = dict(zip(frame["image_id"], frame["labels"]))
    for row in rows:
        assert row["class"] in names and row["image"] in labels
        assert (row["class"] in labels[row["image"]]) == (row["kind"] == WRONG)

    page = first.html_path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 10  # 5 suspects of each kind, each with its picture
    assert page.count("type='radio'") == 20 and "reviewed.csv" in page and "mumic audit --apply" in page

    again = run_audit(frame, names, pooled_tower(), cfg, **kwargs)
    assert again.embedded_now == 0
    assert again.csv_path.read_bytes() == first.csv_path.read_bytes()


# --- applying a review -------------------------------------------------------------------------------------------


def write_params(root: Path, **sections) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def ingested_project(tmp_path) -> Project:
    root = tmp_path / "project"
    write_params(root)
    project = Project.load(root)
    generate_demo_world(project.demo, n_images=16, image_size=32, seed=0)
    steps.ingest_step(project)
    return project


def write_review(path: Path, rows: list[dict], columns=("image", "class", "kind", "score", "rank", "decision")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def labels_by_image(project: Project) -> dict[str, dict[str, list[str]]]:
    manifest = pd.read_parquet(project.manifest)
    columns = [c for c in ("labels", "negative_labels", "unknown_labels") if c in manifest]
    return {
        record["image_id"]: {c: list(record[c]) for c in columns if len(record[c])}
        for record in manifest.to_dict("records")
    }


def audit_cli(project: Project, monkeypatch, *args: str) -> int:
    monkeypatch.chdir(project.root)
    return main(["audit", *args])


def test_a_review_becomes_a_correction_batch_that_wins_on_the_next_ingest(ingested_project, monkeypatch, capsys):
    project = ingested_project
    version_before = steps.split_step(project)["md5"]
    split_of = {
        sha: name for name in ("train", "val", "test") for sha in pd.read_parquet(project.split(name))["sha256"]
    }
    before = labels_by_image(project)
    manifest = pd.read_parquet(project.manifest)
    first, second, third = (manifest.iloc[i] for i in range(3))
    absent = next(name for name in ("circle", "square", "triangle", "star") if name not in first["labels"])
    present = second["labels"][0]
    review = write_review(
        project.root / "reviewed.csv",
        [
            {"image": first["image_id"], "class": absent, "kind": "missing", "decision": "accept"},
            {"image": second["image_id"], "class": present, "kind": "wrong", "decision": " Accept "},
            {"image": third["image_id"], "class": third["labels"][0], "kind": "wrong", "decision": "reject"},
            {"image": third["image_id"], "class": absent, "kind": "missing", "decision": ""},
        ],
    )
    assert audit_cli(project, monkeypatch, "--apply", str(review)) == 0
    batches = [p for p in project.incoming.iterdir() if p.name.startswith("corrections-")]
    assert len(batches) == 1 and "change 2 image(s)" in capsys.readouterr().out
    # The same review again before it is ingested: the same batch, not a second one.
    assert audit_cli(project, monkeypatch, "--apply", str(review)) == 0
    assert "already in" in capsys.readouterr().out
    assert [p for p in project.incoming.iterdir() if p.name.startswith("corrections-")] == batches

    result = steps.ingest_step(project)
    assert result.ingested == [batches[0].name] and result.n_images == len(before)
    after = labels_by_image(project)
    expected = {image: dict(columns) for image, columns in before.items()}
    expected[first["image_id"]]["labels"] = sorted(
        [*before[first["image_id"]]["labels"], absent], key=lambda n: project_taxonomy(project).index_of(n)
    )
    second_labels = [name for name in before[second["image_id"]]["labels"] if name != present]
    expected[second["image_id"]] = {
        "negative_labels": [present],
        **({"labels": second_labels} if second_labels else {}),
    }
    assert after == expected
    combined = pd.read_parquet(project.manifest)
    relabelled = dict(zip(combined["image_id"], combined["relabelled_by"]))
    assert relabelled[first["image_id"]] == batches[0].name and relabelled[third["image_id"]] == ""
    # The corrected image keeps its place, its original batch and its split; the data version moves.
    assert combined.set_index("image_id").loc[first["image_id"], "batch"] == "demo"
    assert steps.split_step(project)["md5"] != version_before
    split = pd.read_parquet(project.split(split_of[first["sha256"]])).set_index("image_id")
    assert list(split.loc[first["image_id"], "labels"]) == expected[first["image_id"]]["labels"]

    # Applied and ingested: the same review changes nothing more.
    assert audit_cli(project, monkeypatch, "--apply", str(review)) == 0
    assert "nothing to write" in capsys.readouterr().out
    assert [p for p in project.incoming.iterdir() if p.name.startswith("corrections-")] == batches

    # A fresh ingest of the same folder, where both batches are new and `corrections-` sorts before `demo`:
    # the correction still wins.
    fresh = project.updated({"paths.ingested": str(project.root / "fresh")})
    steps.ingest_step(fresh)
    assert labels_by_image(fresh) == after


def project_taxonomy(project: Project):
    from mumic_ml.taxonomy import load_taxonomy

    return load_taxonomy(project.taxonomy)


def test_a_correction_of_a_picture_no_batch_holds_is_rejected(ingested_project, tmp_path):
    project = ingested_project
    stranger = project.incoming / "corrections-stranger"
    (stranger / "images").mkdir(parents=True)
    generate_demo_world(tmp_path / "other", n_images=1, image_size=32, seed=7, first_index=500)
    picture = next((tmp_path / "other" / "images").iterdir())
    shutil.copy(picture, stranger / "images" / "x.png")
    (stranger / "manifest.csv").write_text("path,labels,replaces_labels\nimages/x.png,circle,true\n")
    before = labels_by_image(project)
    steps.ingest_step(project)
    assert labels_by_image(project) == before
    rejected = pd.read_csv(project.ingested / "rejected.csv")
    assert rejected[["batch", "reason"]].values.tolist() == [["corrections-stranger", "not_in_collection"]]


@pytest.mark.parametrize(
    ("rows", "columns", "message"),
    [
        (
            [{"image": "x", "class": "sun", "kind": "missing"}],
            ("image", "class", "kind"),
            "missing column(s) ['decision']",
        ),
        ([{"image": "x", "class": "sun", "kind": "missing", "decision": "maybe"}], None, "decision 'maybe' is not one"),
        ([{"image": "x", "class": "sun", "kind": "odd", "decision": "accept"}], None, "kind 'odd' is not one"),
        (
            [{"image": "0000000000000000", "class": "sun", "kind": "missing", "decision": "accept"}],
            None,
            "image '0000000000000000' is not in the ingested manifest",
        ),
        (
            [{"image": "FIRST", "class": "sunn", "kind": "missing", "decision": "accept"}],
            None,
            "class 'sunn' is not in the taxonomy",
        ),
        (
            [
                {"image": "FIRST", "class": "circle", "kind": "missing", "decision": "accept"},
                {"image": "FIRST", "class": "circle", "kind": "missing", "decision": "reject"},
            ],
            None,
            "contradicts line 2",
        ),
    ],
)
def test_a_bad_review_is_refused_with_a_message_and_writes_nothing(
    ingested_project, monkeypatch, capsys, rows, columns, message
):
    project = ingested_project
    first = pd.read_parquet(project.manifest)["image_id"].iat[0]
    rows = [{**row, "image": first if row["image"] == "FIRST" else row["image"]} for row in rows]
    review = write_review(project.root / "reviewed.csv", rows, **({"columns": columns} if columns else {}))
    assert audit_cli(project, monkeypatch, "--apply", str(review)) == 2
    assert message in capsys.readouterr().err
    assert not [p for p in project.incoming.iterdir() if p.name.startswith("corrections-")]
    with pytest.raises(AuditError, match="not found"):
        steps.audit_apply_step(project, project.root / "nowhere.csv")


@pytest.fixture
def audited_project(tiny_world, tmp_path) -> Path:
    """A project on the tiny world whose `model.pretrained` is a local checkpoint (random weights, saved once)."""
    from safetensors.torch import save_file

    from mumic_ml.backbone import create_backbone

    torch.manual_seed(0)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("mumic-tiny", None).clip.state_dict().items()}, weights)
    root = tmp_path / "project"
    paths = {key: str(getattr(tiny_world, key)) for key in ("ingested", "splits", "taxonomy", "cache")}
    write_params(
        root,
        model={"pretrained": str(weights)},
        audit={"folds": 3, "head_steps": 50, "report_rows": 10, "device": "cpu"},
        paths=paths,
    )
    return root


def test_mumic_audit_ranks_the_training_labels_on_the_foundations_embeddings(audited_project, monkeypatch, capsys):
    monkeypatch.chdir(audited_project)
    assert main(["audit"]) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-fitting on the foundation's embeddings" in out and "missing:" in out and "wrong:" in out
    suspects = pd.read_csv(audited_project / "reports" / "audit" / "suspects.csv")
    assert set(suspects["kind"]) == {MISSING, WRONG}


def test_the_label_audit_asset_reports_the_top_suspects(audited_project, tiny_world):
    dg = pytest.importorskip("dagster")
    from mumic_dagster import assets
    from mumic_dagster.resources import ComputeResource, ProjectResource

    result = dg.materialize(
        [assets.label_audit],
        resources={"project": ProjectResource(root=str(audited_project)), "compute": ComputeResource(device="cpu")},
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["backbone"].value == "foundation" and metadata["folds"].value == 3
    assert metadata["training_images"].value == len(read_split(tiny_world.splits / "train.parquet"))
    table = metadata["top_missing"].md_str
    assert table.startswith("| rank | image | class | score | source |") and table.count("\n") == 16
    assert metadata["report"].value == str(audited_project / "reports" / "audit" / "report.html")
