"""The `mumic` CLI end to end on a tiny generated world, plus its error contract."""

import json

import numpy as np
import pandas as pd
import pytest

from mumic_ml.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """demo-data -> ingest -> split -> pretrain -> train -> evaluate through the CLI, as `dvc repro` runs it."""
    root = tmp_path_factory.mktemp("cli")
    fast = ["--set", "train.epochs=1", "--set", "train.batch_size=16"]
    training_data = ["--splits", str(root / "splits"), "--images-root", str(root / "ingested")]
    training_data += ["--taxonomy", str(root / "raw" / "taxonomy.yaml")]
    steps = [
        ["demo-data", "--out", str(root / "raw"), "--n-images", "160"],
        [
            "ingest",
            "--manifest",
            str(root / "raw" / "manifest.csv"),
            "--images-root",
            str(root / "raw"),
            "--taxonomy",
            str(root / "raw" / "taxonomy.yaml"),
            "--out",
            str(root / "ingested"),
        ],
        [
            "split",
            "--set",
            f"paths.validation={root / 'validation'}",
            "--ingested",
            str(root / "ingested"),
            "--out",
            str(root / "splits"),
            "--taxonomy",
            str(root / "raw" / "taxonomy.yaml"),
        ],
        [
            "pretrain",
            *training_data,
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(root / "foundation"),
            "--no-progress",
            *["--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=16"],
        ],
        [
            "train",
            "--set",
            f"paths.foundation={root / 'foundation'}",
            *training_data,
            "--run-dir",
            str(root / "run"),
            "--model-dir",
            str(root / "model"),
            "--cache-dir",
            str(root / "cache"),
            "--no-progress",
            *fast,
        ],
        [
            "evaluate",
            "--model",
            str(root / "model"),
            "--split",
            str(root / "splits" / "test.parquet"),
            "--images-root",
            str(root / "ingested"),
            "--out",
            str(root / "metrics.json"),
            "--cache-dir",
            str(root / "cache"),
        ],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return root


def test_ingest_contract(pipeline):
    manifest = pd.read_parquet(pipeline / "ingested" / "manifest.parquet")
    assert {"image_id", "source", "path", "sha256", "labels"} <= set(manifest.columns)
    assert len(manifest) == 160
    assert (pipeline / "ingested" / manifest["path"].iloc[0]).is_file()
    rejected = pd.read_csv(pipeline / "ingested" / "rejected.csv")
    assert {"source", "reason"} <= set(rejected.columns)


def test_evaluate_writes_the_named_keys(pipeline):
    report = json.loads((pipeline / "metrics.json").read_text())
    for key in ("gap_at_10", "gap", "map_macro", "per_class_ap"):
        assert key in report
    assert len(report["per_class_ap"]) == report["num_classes"]


def test_predict_prints_one_json_object_per_image(pipeline, capsys):
    images = sorted((pipeline / "raw" / "images").glob("*.png"))[:2]
    broken = pipeline / "broken.jpg"
    broken.write_text("<html>404</html>")
    capsys.readouterr()
    code = main(
        [
            "predict",
            "--model",
            str(pipeline / "model"),
            *map(str, images),
            str(broken),
            "--top-k",
            "3",
            "--extra-class",
            "purple hexagon",
        ]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [*map(str, images), str(broken)]
    for line in lines[:2]:
        assert len(line["labels"]) == 3 and line["scores"] == sorted(line["scores"], reverse=True)
    assert lines[2]["error"].startswith("not_an_image")


def test_predict_extra_class_appears_when_ranked(pipeline, capsys):
    image = sorted((pipeline / "raw" / "images").glob("*.png"))[0]
    capsys.readouterr()
    main(["predict", "--model", str(pipeline / "model"), str(image), "--top-k", "100", "--extra-class", "hexagon"])
    line = json.loads(capsys.readouterr().out)
    assert "hexagon" in line["labels"]


def test_embed_exports_normalised_vectors(pipeline):
    images = sorted((pipeline / "raw" / "images").glob("*.png"))[:3]
    out = pipeline / "embeddings.npy"
    assert main(["embed", "--model", str(pipeline / "model"), "--out", str(out), *map(str, images)]) == 0
    matrix = np.load(out)
    assert matrix.shape[0] == 3
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ingest", "--manifest", "nope.csv", "--images-root", "."], "nope.csv"),
        (["train", "--set", "train.epoch=3"], "unknown parameter 'train.epoch'"),
        (["train", "--set", "train.epochs"], "key=value"),
        (["predict", "--model", "no/such/dir", "x.png"], "model directory not found"),
        (["predict", "--model", "models:/mumic@champion", "x.png"], "has no alias 'champion'"),
        (["demo-data", "--params", "missing-params.yaml"], "parameter file not found"),
    ],
)
def test_errors_exit_non_zero_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_predictor_accepts_raw_bytes_and_thresholds(pipeline):
    from mumic_ml.predict import Predictor

    predictor = Predictor.from_dir(pipeline / "model")
    image = sorted((pipeline / "raw" / "images").glob("*.png"))[0]
    from_path, from_bytes = predictor.predict([str(image), image.read_bytes()], top_k=5)
    assert from_bytes.image == "<bytes>"
    assert from_bytes.labels == from_path.labels and from_bytes.scores == from_path.scores
    kept = predictor.predict([image.read_bytes()], top_k=50, threshold=0.5)[0]
    assert all(score >= 0.5 for score in kept.scores)
    names, probs, errors = predictor.probabilities([b"not an image"])
    assert np.isnan(probs).all() and errors[0].startswith("not_an_image")
