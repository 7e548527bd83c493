"""`dvc repro` of the project's dvc.yaml in a fresh repository on a tiny setting: the lock records the split md5s
that the Dagster step reports, metrics and plots render, the model is registered as `challenger`, a second repro
does nothing, and outputs travel through the local remote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from mumic_ml import steps  # noqa: E402
from mumic_ml.config import load_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's bin folder: `dvc` and the `mumic` command of the stages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("git") is None or not (BIN / "dvc").is_file(), reason="needs git and DVC"),
]
TINY = {
    "demo": {"n_images": 60},
    "train": {"epochs": 1, "batch_size": 16},
    "pretrain": {"epochs": 1, "batch_size": 16},
    "gate": {"min_gap_at_10": 0.0},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A new git + DVC repository holding the project's pipeline files and code, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("dvc_project")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root)
    # The stages list the code among their deps; the `mumic` they run imports the same files from the install.
    shutil.copytree(REPO / "mumic_ml", root / "mumic_ml", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    dvc(root, "init", "--quiet")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(REPO / ".dvcignore", root)
    dvc(root, "repro")
    return root


def dvc(root: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def locked_md5s(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_lock_records_the_split_md5s_that_the_dagster_step_reports(project):
    locked = locked_md5s(project)
    for name in steps.SPLITS:
        path = f"data/splits/{name}.parquet"
        assert locked[path] == steps.md5_file(project / path)
    # The split asset's own step, run again in the same repository, reproduces the files byte for byte.
    params = load_params(project / "params.yaml")
    report = steps.split_step(params, project)
    assert steps.dvc_lock_matches(steps.ProjectPaths(project, params), report["md5"]) == dict.fromkeys(
        steps.SPLITS, True
    )


def test_metrics_and_plots_render(project, tmp_path):
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    shown = json.loads(dvc(project, "metrics", "show", "--json"))
    assert shown[""]["data"]["reports/summary.json"]["data"]["gap_at_10"] == metrics["gap_at_10"]
    dvc(project, "plots", "show", "--out", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "Per-class AP on the test split" in html
    assert "Validation GAP@10 per epoch" in html
    assert {p.name for p in (tmp_path / "plots" / "static").iterdir()} >= {
        "workspace_reports_plots_pr_curves.png",
        "workspace_reports_plots_per_class_ap.png",
    }


def test_the_model_is_registered_as_challenger_with_its_data_version(project):
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("mumic", "challenger")
    assert int(version.version) == 1
    assert version.tags["split_md5.test"] == locked_md5s(project)["data/splits/test.parquet"]
    registration = json.loads((project / "reports" / "registration.json").read_text())
    assert registration["version"] == 1


def test_training_started_from_the_demo_foundation_of_the_pretrain_stage(project):
    foundation = json.loads((project / "models" / "foundation" / "foundation.json").read_text())
    assert foundation["pretrained"] == "demo-foundation" and foundation["source"] == "pretrained"
    assert 0.0 <= foundation["zero_shot_test"]["gap_at_10"] <= 1.0
    model = json.loads((project / "models" / "mumic" / "model.json").read_text())
    assert model["metadata"]["pretrained"] == foundation["weights"] == "models/foundation/mumic-tiny.safetensors"
    assert "models/foundation" in locked_md5s(project)


def test_a_second_repro_runs_nothing(project):
    lock = (project / "dvc.lock").read_bytes()
    assert "Data and pipelines are up to date." in dvc(project, "repro")
    assert (project / "dvc.lock").read_bytes() == lock


def test_push_then_pull_restores_outputs_from_the_local_remote(project):
    dvc(project, "push")
    assert any((project / ".dvc-storage").rglob("*"))
    test_split = project / "data" / "splits" / "test.parquet"
    test_split.unlink()
    shutil.rmtree(project / ".dvc" / "cache")
    dvc(project, "pull")
    assert steps.md5_file(test_split) == locked_md5s(project)["data/splits/test.parquet"]
    assert json.loads(dvc(project, "status", "--json")) == {}
