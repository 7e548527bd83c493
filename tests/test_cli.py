"""The `mumic` CLI end to end on a tiny generated world, plus its error contract."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mumic_ml.cli import main
from mumic_ml.pipeline import EXTRA_MODULES

REPO = Path(__file__).resolve().parents[1]


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
    for key in ("gap_at_10", "gap", "map_macro", "per_class_ap", "ece_raw", "ece_calibrated"):
        assert key in report
    assert len(report["per_class_ap"]) == report["num_classes"]
    calibration = report["calibration"]
    assert calibration["method"] == "shared_platt" and calibration["fitted_on"] == "val"
    assert calibration["raw"]["ece"] == report["ece_raw"] and 0 <= report["ece_calibrated"] <= 1


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
    shutil.copy(REPO / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_command_outside_the_project_names_the_missing_params_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert f"parameter file not found: {tmp_path / 'params.yaml'}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--model", "m"], ["--split", "s.parquet"], ["--out", "o.json"], ["--device", "cpu"]])
def test_evaluate_gate_refuses_the_flags_it_would_ignore(flag, capsys, tmp_path, monkeypatch):
    shutil.copy(REPO / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--gate", *flag]) == 2
    err = capsys.readouterr().err
    assert "--gate measures the project's model" in err and f"takes no {flag[0]}" in err


@pytest.fixture
def plain_install(monkeypatch):
    """As after `pip install mumic` without the pipeline extra: none of its packages can be imported, nor the
    modules of mumic_ml.pipeline that import them."""
    for name in [name for name in sys.modules if name.startswith("mumic_ml.pipeline.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in EXTRA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["validate"], "great_expectations"),
        (["train"], "mlflow"),
        (["evaluate", "--gate"], "mlflow"),
        (["register"], "mlflow"),
        (["promote"], "mlflow"),
        (["status"], "mlflow"),
        (["predict", "--model", "models:/mumic@champion", "x.png"], "mlflow"),
    ],
)
def test_a_command_that_needs_the_pipeline_extra_says_so_in_one_line(
    argv, missing, plain_install, capsys, tmp_path, monkeypatch
):
    shutil.copy(REPO / "params.yaml", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    expected = f"mumic {argv[0]} needs the pipeline extra: pip install 'mumic[pipeline]' (missing: {missing})\n"
    assert capsys.readouterr().err == expected


def test_shared_services_without_the_services_extra_say_so_in_one_line(capsys, tmp_path, monkeypatch):
    """PostgreSQL storage in dagster.yaml (deploy/dagster.yaml) on an install without `mumic[services]`."""
    shutil.copy(REPO / "params.yaml", tmp_path)
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    for name, value in {"HOST": "127.0.0.1", "PORT": "5432", "USER": "u", "PASSWORD": "p", "DB": "d"}.items():
        monkeypatch.setenv(f"DAGSTER_PG_{name}", value)
    monkeypatch.setitem(sys.modules, "psycopg", None)
    assert main(["check-services"]) == 2
    expected = "mumic check-services needs the services extra: pip install 'mumic[services]' (missing: psycopg)\n"
    assert capsys.readouterr().err == expected


def test_the_core_imports_without_the_pipeline_extra():
    """Every module of mumic_ml outside mumic_ml.pipeline imports in a process where the extra's packages cannot."""
    core = sorted(path.stem for path in (REPO / "mumic_ml").glob("*.py") if path.stem != "__main__")
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(EXTRA_MODULES)!r}: sys.modules[name] = None\n"
        f"for name in {core!r}: importlib.import_module('mumic_ml.' + name)\n"
        "import mumic_ml.pipeline\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


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
