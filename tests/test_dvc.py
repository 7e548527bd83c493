"""`make repro` (the README's command: `dvc repro` of the project's dvc.yaml with the venv's tools) in a fresh
repository on a tiny setting: the lock records the split md5s that the Dagster step reports, metrics and plots
render, the model is registered as `challenger`, a second repro does nothing, outputs travel through the local
remote, a new batch keeps every earlier image in its split, and no failing stage removes the user's data."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from repo_copy import BIN, REPO, copy_repository, make, run_as_written  # noqa: E402

from mumic_ml import steps  # noqa: E402
from mumic_ml.io import file_digest  # noqa: E402
from mumic_ml.project import DVC_DIGEST, SPLITS, Project  # noqa: E402

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


def new_repository(root: Path, overrides: dict) -> Path:
    """A new git + DVC repository holding a copy of the project's pipeline files and code, with small params."""
    copy_repository(root, overrides)
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    dvc(root, "init", "--quiet")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The repository after one `make repro`, which writes the demo world as the first batch."""
    root = new_repository(tmp_path_factory.mktemp("dvc_project"), TINY)
    make_repro(root)
    return root


def _env(root: Path, path: str) -> dict[str, str]:
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}


def make_repro(root: Path) -> str:
    """The README's command, run as written: no activated venv, so nothing of the venv is on PATH."""
    proc = run_as_written(root, make("repro"), {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert proc.returncode == 0, f"make repro failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(root: Path, *args: str) -> str:
    env = _env(root, f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def locked_md5s(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_lock_records_the_split_md5s_that_the_dagster_step_reports(project):
    locked = locked_md5s(project)
    for name in SPLITS:
        path = f"data/splits/{name}.parquet"
        assert locked[path] == file_digest(project / path, DVC_DIGEST)
    # The split asset's own step, run again in the same repository, reproduces the files byte for byte.
    loaded = Project.load(project)
    report = steps.split_step(loaded)
    assert loaded.dvc_lock_matches(report["md5"]) == dict.fromkeys(SPLITS, True)


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
    checkpoint = str(project.resolve() / "models" / "foundation" / "mumic-tiny.safetensors")
    assert model["metadata"]["pretrained"] == foundation["weights"] == checkpoint
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
    assert file_digest(test_split, DVC_DIGEST) == locked_md5s(project)["data/splits/test.parquet"]
    assert json.loads(dvc(project, "status", "--json")) == {}


def _file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_digest(p, DVC_DIGEST) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_batch_keeps_every_image_in_its_split_and_reuses_the_foundation(project):
    """Runs last on the module's repository: it changes its data."""
    splits = project / "data" / "splits"
    before = {name: set(pd.read_parquet(splits / f"{name}.parquet")["sha256"]) for name in SPLITS}
    foundation = (project / "models" / "foundation" / "mumic-tiny.safetensors").read_bytes()
    mumic = subprocess.run(
        [str(BIN / "mumic"), "demo-data", "--first-index", "60", "--n-images", "30", "--out", "data/incoming/more"],
        cwd=project,
        env=_env(project, os.environ.get("PATH", "")),
        capture_output=True,
        text=True,
    )
    assert mumic.returncode == 0, mumic.stderr
    # Up to the foundation: the stages whose outputs DVC must keep in place (persist) for history to survive.
    dvc(project, "repro", "pretrain")
    after = {name: set(pd.read_parquet(splits / f"{name}.parquet")["sha256"]) for name in SPLITS}
    for name in SPLITS:
        assert before[name] <= after[name]
    assert sum(len(after[name] - before[name]) for name in SPLITS) == 30
    report = json.loads((project / "models" / "foundation" / "foundation.json").read_text())
    assert report["source"] == "cached" and "data has changed" in report["decision"]
    assert (project / "models" / "foundation" / "mumic-tiny.safetensors").read_bytes() == foundation


def test_a_failing_repro_removes_none_of_the_users_data(tmp_path):
    """`dvc repro` straight from the venv's bin without the venv on PATH: the stages cannot find `mumic` and fail,
    and every input stays as it was (the demo world used to be a stage output that DVC removed first)."""
    from mumic_ml.demo_world import generate_demo_world

    root = new_repository(tmp_path / "repo", TINY)
    incoming = root / "data" / "incoming"
    generate_demo_world(incoming / "demo", n_images=12, image_size=32, seed=0)
    before = _file_digests(incoming)
    proc = run_as_written(root, [str(BIN / "dvc"), "repro"], {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})
    assert proc.returncode != 0 and "mumic" in proc.stdout + proc.stderr
    assert _file_digests(incoming) == before and (incoming / "demo" / "taxonomy.yaml").is_file()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outs = [next(iter(o)) if isinstance(o, dict) else o for stage in stages.values() for o in stage.get("outs", [])]
    assert not [o for o in outs if o.startswith(("${paths.incoming}", "${paths.demo}", "data/incoming"))]
