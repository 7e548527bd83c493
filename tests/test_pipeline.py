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
from image_fixtures import inline_png
from PIL import Image

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from mumic_dagster import assets  # noqa: E402
from mumic_dagster.automation import new_data_sensor, retrain_schedule  # noqa: E402
from mumic_dagster.definitions import defs  # noqa: E402
from mumic_dagster.metadata import MAX_INLINE_IMAGE_BYTES  # noqa: E402
from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource  # noqa: E402
from mumic_ml import steps  # noqa: E402
from mumic_ml.config import load_params  # noqa: E402
from mumic_ml.demo_world import generate_demo_world  # noqa: E402
from mumic_ml.project import Project, combined_version, data_version_fields  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSET_NAMES = {
    "raw_images",
    "validated_labels",
    "dataset_splits",
    "foundation_model",
    "trained_model",
    "model_evaluation",
    "registered_model",
    "label_audit",
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


def materialize(root: Path, selection=None, instance: dg.DagsterInstance | None = None) -> dg.ExecuteInProcessResult:
    all_assets = dg.load_assets_from_modules([assets])
    return dg.materialize(
        all_assets, resources=resources(root), selection=selection, raise_on_error=False, instance=instance
    )


def materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {event.asset_key.to_user_string() for event in result.get_asset_materialization_events()}


@pytest.fixture(scope="module")
def dagster_instance():
    """The Dagster instance this module's runs record into, so that a test can read their log messages."""
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tracking_store, dagster_instance):
    root = make_project(tmp_path_factory.mktemp("project"), SMALL)
    result = materialize(root, instance=dagster_instance)
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
    assert keys == ASSET_NAMES | {"catalogue_tags"}  # the catalogue follows the champion, not a retrain


def test_every_asset_and_asset_check_tells_a_newcomer_what_it_is():
    specs = [spec for asset in dg.load_assets_from_modules([assets]) for spec in asset.specs]
    assert {spec.key.to_user_string() for spec in specs} == ASSET_NAMES
    assert not [spec.key for spec in specs if len(spec.description or "") < 200]
    checks = [check for asset in dg.load_assets_from_modules([assets]) for check in asset.check_specs]
    assert {check.name for check in checks} >= {"labels_in_taxonomy", "no_leakage", "evaluation_gate"}
    assert not [check.name for check in checks if len(check.description or "") < 20]


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


@pytest.mark.slow
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
    # params.yaml fits the head before fine-tuning: the run shows what that fit did
    assert run.data.metrics["linear_probe_loss_after"] < run.data.metrics["linear_probe_loss_before"]

    image = next((root / "data" / "incoming" / "demo" / "images").glob("*.png"))
    model = mlflow.pyfunc.load_model("models:/mumic@challenger")
    frame = model.predict(pd.DataFrame({"image": [str(image), image.read_bytes()]}), params={"top_k": 3})
    assert list(frame["labels"].map(len)) == [3, 3]
    assert frame["labels"][0] == frame["labels"][1]


# The figures each asset shows inline on its page, as Markdown images with the PNG in a data URI.
FIGURES = {
    "raw_images": ["sample_images"],
    "validated_labels": ["label_histogram"],
    "dataset_splits": ["positives_per_split"],
    "trained_model": ["training_curves"],
    "model_evaluation": ["per_class_ap_plot", "pr_curves_plot", "reliability_plot"],
}
# All of one materialization's metadata, figures included: the event log keeps every materialization.
MAX_METADATA_CHARS = 400_000


def is_empty(value: dg.MetadataValue) -> bool:
    if isinstance(value, dg.TableMetadataValue):
        return not value.records
    return value.value is None or value.value in ("", [], {})


def materialization_metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, dg.MetadataValue]]:
    return {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}


@pytest.mark.slow
def test_asset_pages_show_figures_inline_numbers_as_numbers_and_no_empty_rows(pipeline_run):
    root, result = pipeline_run
    metadata = materialization_metadata(result)
    for asset, keys in FIGURES.items():
        for key in keys:
            png, image = inline_png(metadata[asset][key].md_str)
            assert len(png) <= MAX_INLINE_IMAGE_BYTES and min(image.size) >= 150, (asset, key, len(png), image.size)
    for asset, values in metadata.items():
        assert not [key for key, value in values.items() if is_empty(value)], asset
        assert sum(len(str(value.value)) for value in values.values()) < MAX_METADATA_CHARS, asset
        floats = {key: value.value for key, value in values.items() if isinstance(value, dg.FloatMetadataValue)}
        assert floats == {key: round(value, 4) for key, value in floats.items()}, asset

    evaluation = metadata["model_evaluation"]
    for key in ("gap_at_10", "gap", "map_macro", "ece_raw", "ece_calibrated"):
        assert isinstance(evaluation[key], dg.FloatMetadataValue), key
    assert "blue circle" in evaluation["zero_shot_held_out_classes"].value
    assert {"zero_shot_held_out_map", "zero_shot_note"} & evaluation.keys()
    trained = metadata["trained_model"]
    assert isinstance(trained["best_epoch"], dg.IntMetadataValue)
    assert isinstance(trained["best_val_gap_at_k"], dg.FloatMetadataValue)
    assert "resumed_from" not in trained
    assert trained["linear_probe"].data["steps"] == 100
    assert isinstance(metadata["raw_images"]["images"], dg.IntMetadataValue)
    assert "first_rejected_rows" not in metadata["raw_images"]  # nothing was rejected: no empty table

    expectations = metadata["validated_labels"]["expectations"].md_str
    assert expectations.startswith("| expectation | passed | observed |")
    assert "`labels_in_taxonomy`" in expectations and "| yes |" in expectations

    # One data-version format on every page that names the data.
    fields = data_version_fields(Project.load(root).data_version())
    for asset in ("dataset_splits", "trained_model", "registered_model"):
        assert {key: metadata[asset][key].value for key in fields} == fields, asset
    assert fields["data_version"] in metadata["registered_model"]["model_card"].md_str


@pytest.mark.slow
def test_the_label_audit_of_the_trained_project_lists_suspects_to_review(pipeline_run):
    root, result = pipeline_run
    metadata = materialization_metadata(result)["label_audit"]
    train_images = len(pd.read_parquet(Project.load(root).split("train")))
    assert metadata["training_images"].value == train_images
    assert metadata["top_missing"].md_str.startswith("| rank | image | class | score | source |")
    suspects = pd.read_csv(root / "reports" / "audit" / "suspects.csv")
    assert set(suspects["kind"]) == {"missing", "wrong"} and (root / "reports" / "audit" / "report.html").is_file()


@pytest.mark.slow
def test_the_run_logs_each_pretraining_and_training_epoch(pipeline_run, dagster_instance):
    _, result = pipeline_run
    messages = [entry.user_message for entry in dagster_instance.all_logs(result.run_id)]
    pretrain_epochs = SMALL["pretrain"]["epochs"]
    assert [m for m in messages if m.startswith("pretrain epoch ")][-1].startswith(
        f"pretrain epoch {pretrain_epochs}/{pretrain_epochs}: loss "
    )
    assert len([m for m in messages if m.startswith("epoch ") and "val GAP@" in m]) == SMALL["train"]["epochs"]


@pytest.mark.slow
def test_the_mlflow_run_and_the_model_version_explain_themselves(pipeline_run, tracking_store):
    root, result = pipeline_run
    project = Project.load(root)
    client = MlflowClient(tracking_store)
    version = client.get_model_version_by_alias("mumic", "challenger")
    run = client.get_run(version.run_id)
    run_id = run.info.run_id
    md5s = project.data_version()
    fields = data_version_fields(md5s)
    assert fields.items() <= run.data.tags.items() and fields.items() <= version.tags.items()
    assert run.data.tags["dagster_run_id"] == version.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["gate"] == "passed" and "gate_reasons" not in run.data.tags
    assert run.info.run_name.startswith(f"train {project.params.model.backbone} 20")
    assert run.data.tags["mlflow.source.name"] == "dagster asset trained_model"  # the UI's Source column
    assert run.data.tags["mlflow.source.type"] == "JOB"
    assert run.info.run_name.endswith(f" data {fields['data_version'][:6]}")

    history = sorted(client.get_metric_history(run_id, "val_gap_at_k"), key=lambda metric: metric.step)
    assert [metric.step for metric in history] == list(range(SMALL["train"]["epochs"]))

    inputs = {dataset_input.dataset.name: dataset_input for dataset_input in run.inputs.dataset_inputs}
    contexts = {name: {tag.key: tag.value for tag in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"train": "training", "val": "validation", "test": "testing"}
    assert {name: i.dataset.digest for name, i in inputs.items()} == md5s
    assert json.loads(inputs["train"].dataset.profile)["num_rows"] == len(pd.read_parquet(project.split("train")))

    figures = {a.path for folder in ("figures", "evaluation/plots") for a in client.list_artifacts(run_id, folder)}
    assert figures >= {
        "figures/training_curves.png",
        "figures/label_histogram.png",
        "figures/positives_per_split.png",
        "evaluation/plots/per_class_ap.png",
        "evaluation/plots/pr_curves.png",
        "evaluation/plots/reliability.png",
    }
    curves = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="figures/training_curves.png", tracking_uri=tracking_store
    )
    assert Image.open(curves).format == "PNG"

    card = version.description
    for expected in (
        fields["data_version"],
        fields["split_md5.test"],
        "GAP@10",
        "gate**: passed",
        "circle",
        'mlflow.pyfunc.load_model("models:/mumic@champion")',
        "make serve",
    ):
        assert expected in card, expected


@pytest.mark.slow
def test_promote_then_a_broken_model_fails_the_gate_and_is_not_registered(pipeline_run, tracking_store):
    root, _ = pipeline_run
    promoted = steps.promote_step(Project.load(root))
    assert promoted.moved and promoted.champion_version == 1
    champion = mlflow.pyfunc.load_model("models:/mumic@champion")
    image = next((root / "data" / "incoming" / "demo" / "images").glob("*.png"))
    assert len(champion.predict(pd.DataFrame({"image": [str(image)]}))["labels"][0]) == 5

    # A model that never learns (all learning rates 0, no head fitted first): below the champion on the same split.
    broken = yaml.safe_load((root / "params.yaml").read_text())
    broken["train"].update({"lr_image": 0.0, "lr_text": 0.0, "lr_head": 0.0, "epochs": 1})
    broken["train"]["linear_probe"]["steps"] = 0
    (root / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    result = materialize(root, selection=["trained_model", "model_evaluation", "registered_model"])
    gate = [e for e in result.get_asset_check_evaluations() if e.check_name == "evaluation_gate"]
    assert gate and not gate[0].passed
    assert "registered_model" not in materialized(result)
    client = MlflowClient(tracking_store)
    assert [int(v.version) for v in client.search_model_versions("name = 'mumic'")] == [1]
    assert int(client.get_model_version_by_alias("mumic", "champion").version) == 1
    # The refused model's run says so, and why; it stays FINISHED, since its training did finish.
    trained = next(e for e in result.get_asset_materialization_events() if e.asset_key.path == ["trained_model"])
    refused = client.get_run(trained.materialization.metadata["mlflow_run_id"].value)
    assert refused.data.tags["gate"] == "failed" and "below" in refused.data.tags["gate_reasons"]
    assert refused.info.status == "FINISHED"
