"""The retraining loop across time: a promoted project receives a second batch, retrains, and version 2 passes the
gate against champion v1 on a test split that neither trained on, is registered and promoted. Then the rules that
keep the comparison fair: a split that overlaps a model's training images is refused by the gate and by
promotion, and a refused registration logs nothing."""

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402
from test_pipeline import make_project, materialize  # noqa: E402

from mumic_ml import steps  # noqa: E402
from mumic_ml.demo_world import generate_demo_world  # noqa: E402
from mumic_ml.io import read_json  # noqa: E402
from mumic_ml.pipeline.registry import GateFailedError  # noqa: E402
from mumic_ml.project import SPLITS, Project  # noqa: E402

FIRST_BATCH, SECOND_BATCH = 160, 320
PARAMS = {
    "demo": {"n_images": FIRST_BATCH},
    "train": {"epochs": 3, "batch_size": 16, "early_stopping_patience": None},
    "pretrain": {"epochs": 2, "batch_size": 16},
    "gate": {"min_gap_at_10": 0.05},
}

pytestmark = pytest.mark.slow


def split_hashes(project: Project) -> dict[str, set[str]]:
    return {name: set(pd.read_parquet(project.split(name))["sha256"]) for name in SPLITS}


def logged_models(uri: str) -> int:
    client = MlflowClient(uri)
    return len(client.search_logged_models([client.get_experiment_by_name("mumic").experiment_id]))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tracking_store):
    """A project whose first batch was trained, registered and promoted (champion v1)."""
    root = make_project(tmp_path_factory.mktemp("project"), PARAMS)
    loaded = Project.load(root)
    first = materialize(root)
    assert first.success
    promoted = steps.promote_step(loaded)
    assert promoted.moved and promoted.champion_version == 1
    return root, loaded


def test_a_second_batch_is_trained_gated_against_the_champion_registered_and_promoted(project, tracking_store):
    root, loaded = project
    before = split_hashes(loaded)
    foundation = (root / "models" / "foundation" / "mumic-tiny.safetensors").read_bytes()
    generate_demo_world(
        loaded.incoming / "batch-2", n_images=SECOND_BATCH, image_size=64, seed=0, first_index=FIRST_BATCH
    )

    second = materialize(root)
    assert second.success, [e.message for e in second.all_events if e.event_type_value == "STEP_FAILURE"]
    after = split_hashes(loaded)
    for name in SPLITS:
        assert before[name] <= after[name], f"an image left the {name} split"
    assert sum(len(after[name] - before[name]) for name in SPLITS) == SECOND_BATCH

    # The foundation is reused (pretrain.refresh: config), as a real CLIP would be.
    assert (root / "models" / "foundation" / "mumic-tiny.safetensors").read_bytes() == foundation
    events = second.get_asset_materialization_events()
    foundation_event = next(e for e in events if e.asset_key.path == ["foundation_model"])
    assert foundation_event.materialization.metadata["source"].value == "cached"

    gate = read_json(root / "reports" / "gate.json")
    assert gate["passed"] and gate["champion_gap_at_10"] is not None, gate
    assert gate["gap_at_10"] > gate["champion_gap_at_10"], gate
    client = MlflowClient(tracking_store)
    assert int(client.get_model_version_by_alias("mumic", "challenger").version) == 2

    promoted = steps.promote_step(loaded)
    assert promoted.moved and promoted.champion_version == 2, promoted.message
    assert int(client.get_model_version_by_alias("mumic", "previous_champion").version) == 1


def test_a_test_split_that_overlaps_training_images_is_refused_and_nothing_is_logged(project, tracking_store):
    _, loaded = project
    train, test = pd.read_parquet(loaded.split("train")), pd.read_parquet(loaded.split("test"))
    pd.concat([test, train.iloc[:5]], ignore_index=True).to_parquet(loaded.split("test"), index=False)
    models_before = logged_models(tracking_store)

    outcome = steps.evaluate_and_gate_step(loaded)
    assert not outcome.gate.passed
    assert any("5 image(s) that this model trained on" in reason for reason in outcome.gate.reasons)
    assert any("that champion v2 trained on" in reason for reason in outcome.gate.reasons)
    with pytest.raises(GateFailedError, match="did not pass the evaluation gate"):
        steps.register_step(loaded)
    assert logged_models(tracking_store) == models_before

    refused = steps.promote_step(loaded, version="1")
    assert not refused.moved and "trained on" in refused.message
    assert int(MlflowClient(tracking_store).get_model_version_by_alias("mumic", "champion").version) == 2
