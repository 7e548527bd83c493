"""The orchestrated pipeline: definitions load, the schedule and sensor fire, the whole graph materializes into a
registered and promotable model, and a model that fails the gate is never registered."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from mumic_dagster import assets  # noqa: E402
from mumic_dagster.automation import new_data_sensor, retrain_schedule  # noqa: E402
from mumic_dagster.definitions import defs  # noqa: E402
from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource  # noqa: E402
from mumic_ml import steps  # noqa: E402
from mumic_ml.config import load_params  # noqa: E402
from mumic_ml.demo_world import generate_demo_world  # noqa: E402
from mumic_ml.project import Project, combined_version  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSET_NAMES = {
    "raw_images",
    "validated_labels",
    "dataset_splits",
    "foundation_model",
    "trained_model",
    "model_evaluation",
    "registered_model",
}
SMALL = {
    "demo": {"n_images": 200},
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": None},
    "pretrain": {"epochs": 1, "batch_size": 16},
    "gate": {"min_gap_at_10": 0.05},
}


def make_project(root: Path, overrides: dict) -> Path:
    """A project folder laid out like the repository, with a small params.yaml and the demo world as batch one."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    generate_demo_world(root / loaded.paths.demo, n_images=loaded.demo.n_images, image_size=64, seed=0)
    return root


def resources(root: Path) -> dict:
    return {"project": ProjectResource(root=str(root)), "mlflow": MlflowResource(), "compute": ComputeResource()}


def materialize(root: Path, selection=None) -> dg.ExecuteInProcessResult:
    all_assets = dg.load_assets_from_modules([assets])
    return dg.materialize(all_assets, resources=resources(root), selection=selection, raise_on_error=False)


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tracking_store):
    root = make_project(tmp_path_factory.mktemp("project"), SMALL)
    result = materialize(root)
    return root, result


def test_definitions_load_and_resolve():
    dg.Definitions.validate_loadable(defs)
    retrain = defs.resolve_job_def("retrain_job")
    assert retrain.name == "retrain_job"
    assert {key.to_user_string() for key in retrain.asset_layer.selected_asset_keys} == ASSET_NAMES
    promote = defs.resolve_job_def("promote_job")
    assert [node.name for node in promote.nodes] == ["promote_challenger"]
    assert not promote.asset_layer.selected_asset_keys
    schedule = defs.resolve_schedule_def("retrain_schedule")
    assert schedule.job_name == "retrain_job"
    assert schedule.cron_schedule == load_params(REPO / "params.yaml").schedule.retrain_cron
    assert defs.resolve_sensor_def("new_data_sensor").job_name == "retrain_job"
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == ASSET_NAMES


def test_schedule_requests_a_retrain_run():
    context = dg.build_schedule_context(scheduled_execution_time=pd.Timestamp("2026-11-30 03:00", tz="UTC"))
    requests = list(retrain_schedule.evaluate_tick(context).run_requests or [])
    assert len(requests) == 1
    # A request without a job name runs the schedule's own job.
    assert (requests[0].job_name or retrain_schedule.job_name) == "retrain_job"


def test_the_code_location_refuses_to_load_without_the_projects_params_yaml(tmp_path):
    """The schedule's cron comes from the project's params.yaml when Dagster loads the code location; without the
    file the load fails and names it, instead of scheduling the default cron."""
    proc = subprocess.run(
        [sys.executable, "-c", "import mumic_dagster.definitions"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"parameter file not found: {tmp_path / 'params.yaml'}" in proc.stderr


def test_the_mlflow_resource_sends_the_run_to_its_store_and_leaves_the_environment_alone(tiny_world, tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"]["pretrained"] = None
    params["train"].update(epochs=1, batch_size=16, early_stopping_patience=None)
    for key in ("ingested", "splits", "taxonomy", "cache"):
        params["paths"][key] = str(getattr(tiny_world, key))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "chosen").mkdir()
    chosen = f"sqlite:///{tmp_path / 'chosen' / 'mlflow.db'}"
    # Training itself sets torch's own variables; what must not move is MLflow's configuration.
    mlflow_environment = {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")}

    result = dg.materialize(
        dg.load_assets_from_modules([assets]),
        resources={
            "project": ProjectResource(root=str(root)),
            "mlflow": MlflowResource(tracking_uri=chosen),
            "compute": ComputeResource(device="cpu"),
        },
        selection=["trained_model"],
        raise_on_error=False,
    )
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert {key: value for key, value in os.environ.items() if key.startswith("MLFLOW_")} == mlflow_environment
    event = next(e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trained_model"])
    run_id = event.materialization.metadata["mlflow_run_id"].value
    run = MlflowClient(chosen).get_run(run_id)
    assert run.info.artifact_uri.startswith((tmp_path / "chosen" / "mlartifacts").as_uri())
    with pytest.raises(mlflow.exceptions.MlflowException):
        MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)


def test_sensor_fires_once_per_new_batch(tmp_path):
    root = make_project(tmp_path / "p", {"demo": {"n_images": 12}})
    project = ProjectResource(root=str(root))
    first = new_data_sensor(dg.build_sensor_context(cursor=None, resources={"project": project}))
    assert len(first.run_requests) == 1
    cursor = first.cursor
    again = new_data_sensor(dg.build_sensor_context(cursor=cursor, resources={"project": project}))
    assert not again.run_requests and again.skip_reason is not None
    incoming = root / "data" / "incoming"
    shutil.copytree(incoming / "demo", incoming / "second")
    grown = new_data_sensor(dg.build_sensor_context(cursor=cursor, resources={"project": project}))
    assert len(grown.run_requests) == 1
    assert grown.run_requests[0].tags["mumic/new_batches"] == "second"
    assert json.loads(grown.cursor).keys() == {"demo", "second"}


def sensor_tick(project: ProjectResource, cursor: str | None) -> dg.SensorResult:
    return new_data_sensor(dg.build_sensor_context(cursor=cursor, resources={"project": project}))


def test_sensor_skips_batches_already_ingested_even_with_an_empty_cursor(tmp_path):
    # As after `make demo`: its run ingested the demo batch, then the sensor is switched on with no cursor.
    root = make_project(tmp_path / "p", {"demo": {"n_images": 12}})
    steps.ingest_step(Project.load(root))
    project = ProjectResource(root=str(root))
    fresh = sensor_tick(project, cursor=None)
    assert not fresh.run_requests and fresh.skip_reason is not None

    incoming = root / "data" / "incoming"
    shutil.copytree(incoming / "demo", incoming / "second")
    grown = sensor_tick(project, cursor=None)
    assert len(grown.run_requests) == 1
    assert grown.run_requests[0].tags["mumic/new_batches"] == "second"
    assert not sensor_tick(project, cursor=grown.cursor).run_requests

    manifest = incoming / "demo" / "manifest.csv"
    manifest.write_text(manifest.read_text() + "\n")
    changed = sensor_tick(project, cursor=grown.cursor)
    assert len(changed.run_requests) == 1
    assert changed.run_requests[0].tags["mumic/new_batches"] == "demo"
    assert not sensor_tick(project, cursor=changed.cursor).run_requests


@pytest.mark.slow
def test_whole_graph_registers_a_servable_model(pipeline_run, tracking_store):
    root, result = pipeline_run
    assert result.success, [e.message for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert materialized(result) == ASSET_NAMES
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["evaluation_gate"] and checks["no_leakage"] and checks["labels_in_taxonomy"]

    client = MlflowClient(tracking_store)
    version = client.get_model_version_by_alias("mumic", "challenger")
    assert int(version.version) == 1
    split_md5 = Project.load(root).data_version()
    assert version.tags["data_version"] == combined_version(split_md5)
    assert version.tags["gate_passed"] == "True"
    run = client.get_run(version.run_id)
    assert run.data.tags["data_version"] == combined_version(split_md5)
    assert "val_gap_at_k" in run.data.metrics and "test_gap_at_10" in run.data.metrics

    image = next((root / "data" / "incoming" / "demo" / "images").glob("*.png"))
    model = mlflow.pyfunc.load_model("models:/mumic@challenger")
    frame = model.predict(pd.DataFrame({"image": [str(image), image.read_bytes()]}), params={"top_k": 3})
    assert list(frame["labels"].map(len)) == [3, 3]
    assert frame["labels"][0] == frame["labels"][1]


@pytest.mark.slow
def test_promote_then_a_broken_model_fails_the_gate_and_is_not_registered(pipeline_run, tracking_store):
    root, _ = pipeline_run
    promoted = steps.promote_step(Project.load(root))
    assert promoted.moved and promoted.champion_version == 1
    champion = mlflow.pyfunc.load_model("models:/mumic@champion")
    image = next((root / "data" / "incoming" / "demo" / "images").glob("*.png"))
    assert len(champion.predict(pd.DataFrame({"image": [str(image)]}))["labels"][0]) == 5

    # A model that never learns (all learning rates 0): below the champion on the same split.
    broken = yaml.safe_load((root / "params.yaml").read_text())
    broken["train"].update({"lr_image": 0.0, "lr_text": 0.0, "lr_head": 0.0, "epochs": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    result = materialize(root, selection=["trained_model", "model_evaluation", "registered_model"])
    gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "evaluation_gate"]
    assert gate and not gate[0].passed
    assert "registered_model" not in materialized(result)
    client = MlflowClient(tracking_store)
    assert [int(v.version) for v in client.search_model_versions("name = 'mumic'")] == [1]
    assert int(client.get_model_version_by_alias("mumic", "champion").version) == 1
