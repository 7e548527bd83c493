"""MLflow tracking, the pyfunc model and the registry life cycle, on a SQLite store inside tmp_path.

Registry state is per registered-model name: each test that moves aliases uses its own name, so the tests do not
depend on their order (or on running in one pytest-xdist worker). The cwd is an empty folder that must stay empty:
nothing may fall back to `./mlruns` or `./mlflow.db`.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("mlflow")

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from mumic_ml.config import Params  # noqa: E402
from mumic_ml.evaluate import evaluate_model  # noqa: E402
from mumic_ml.pipeline.registry import (  # noqa: E402
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    GateFailedError,
    RegistryError,
    current_champion,
    log_model,
    promote,
    promotion_candidate,
    register_model,
    resolve_model_uri,
    rollback,
)
from mumic_ml.pipeline.tracking import (  # noqa: E402
    flatten_params,
    log_artifacts,
    log_epoch,
    start_run,
    tracking_location,
    tracking_scope,
)
from mumic_ml.predict import Predictor  # noqa: E402
from mumic_ml.project import Project  # noqa: E402
from mumic_ml.train import train  # noqa: E402


@dataclass(frozen=True)
class Store:
    uri: str
    cwd: Path
    model_dir: Path
    images: list[Path]
    report: dict
    runs: list[tuple[str, str]]  # (run id, logged model URI), two runs logging the same model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny trained model, its test report, and two runs that logged it into a fresh SQLite store."""
    from conftest import build_tiny_world

    root = tmp_path_factory.mktemp("registry")
    world = build_tiny_world(root / "world", n_images=60)
    params = Params().updated({"train.epochs": 1, "train.batch_size": 16, "train.early_stopping_patience": None})
    model_dir = root / "model"
    train(
        params,
        splits_dir=world.splits,
        images_root=world.ingested,
        taxonomy_path=world.taxonomy,
        run_dir=root / "run",
        model_dir=model_dir,
        cache_dir=world.cache,
        progress=False,
    )
    report = evaluate_model(
        model_dir, world.splits / "test.parquet", world.ingested, root / "metrics.json", cache_dir=world.cache
    )
    cwd = root / "cwd"
    cwd.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs = []
        for attempt in range(2):
            with start_run(
                experiment="mumic",
                tracking_uri=uri,
                artifact_location=root / "mlartifacts",
                params=params.model_dump(mode="json"),
                data_version="data-v1",
                run_name=f"attempt-{attempt}",
            ) as run_id:
                log_epoch(
                    run_id,
                    0,
                    {"train_loss": 0.9, "val_gap_at_k": 0.2, "is_best": True, "note": None},
                    tracking_uri=uri,
                )
                log_epoch(run_id, 1, {"train_loss": 0.8, "val_gap_at_k": 0.3}, tracking_uri=uri)
                log_artifacts(run_id, world.taxonomy, tracking_uri=uri)
            runs.append((run_id, log_model(run_id, model_dir, tracking_uri=uri)))
        images = sorted((world.raw / "images").glob("*.png"))[:3]
        yield Store(uri, cwd, model_dir, images, report, runs)
        assert os.environ.get("MLFLOW_TRACKING_URI") is None, "tracking_scope must restore the environment"


@pytest.fixture(autouse=True)
def _cwd_stays_clean(store):
    yield
    assert Path.cwd() == store.cwd
    assert list(store.cwd.iterdir()) == [], "MLflow wrote into the cwd"


def _register(store, name, run=0, **kwargs):
    run_id, model_uri = store.runs[run]
    kwargs.setdefault("metrics", store.report)
    kwargs.setdefault("tags", {"data_version": "data-v1"})
    return register_model(run_id, model_uri, name=name, gate_passed=True, tracking_uri=store.uri, **kwargs)


def test_tracking_uri_chosen_then_environment_then_params(monkeypatch, tmp_path):
    project = Project(Params(), tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_location(project) == (f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_location(project) == ("http://tracking.example:5000", None)
    chosen = tmp_path / "elsewhere" / "store.db"
    expected = (f"sqlite:///{chosen}", chosen.parent / "mlartifacts")
    assert tracking_location(project.with_tracking_uri(f"sqlite:///{chosen}")) == expected


def test_flatten_params_uses_dotted_keys():
    assert flatten_params({"train": {"epochs": 1, "asl": {"clip": 0.05}}, "held": ["a", "b"], "x": None}) == {
        "train.epochs": "1",
        "train.asl.clip": "0.05",
        "held": '["a", "b"]',
        "x": "None",
    }


def test_run_records_params_tags_metrics_and_artifacts(store):
    client = MlflowClient(store.uri)
    run_id, _ = store.runs[0]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1" and run.data.params["model.backbone"] == "mumic-tiny"
    assert run.data.tags["data_version"] == "data-v1"
    assert run.data.tags["git_commit"]  # a commit hash inside a repository, "unknown" outside one
    history = client.get_metric_history(run_id, "val_gap_at_k")
    assert [(m.step, m.value) for m in history] == [(0, 0.2), (1, 0.3)]
    assert "note" not in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "taxonomy.yaml" in artifacts
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location.startswith("file://") and "mlartifacts" in experiment.artifact_location


def test_register_tags_the_version_and_points_challenger_once_per_run(store):
    first = _register(store, "mumic")
    again = _register(store, "mumic")
    assert again.version == first.version and not again.created
    versions = MlflowClient(store.uri).search_model_versions("name = 'mumic'")
    assert len(versions) == 1
    assert CHALLENGER in again.aliases
    assert again.run_id == store.runs[0][0]
    assert again.tags["gate"] == "passed"
    assert again.tags["data_version"] == "data-v1"
    assert float(again.tags["gap_at_10"]) == pytest.approx(store.report["gap_at_10"])
    assert again.tags["test_split"] == store.report["split_sha256"]


def test_gate_failure_registers_nothing(store):
    run_id, model_uri = store.runs[1]
    with pytest.raises(GateFailedError, match="gate"):
        register_model(run_id, model_uri, name="mumic-gate", tags={}, gate_passed=False, tracking_uri=store.uri)
    client = MlflowClient(store.uri)
    assert client.search_model_versions("name = 'mumic-gate'") == []
    assert current_champion("mumic-gate", tracking_uri=store.uri) is None


def test_pyfunc_from_the_registry_takes_paths_bytes_and_params(store):
    _register(store, "mumic")
    with tracking_scope(store.uri):
        model = mlflow.pyfunc.load_model("models:/mumic@challenger")
    image = store.images[0]
    frame = pd.DataFrame({"image": [str(image), image.read_bytes(), b"<html>404</html>"]})
    out = model.predict(frame)
    assert list(out.columns) == ["labels", "scores", "error"] and len(out) == 3
    assert out["error"][0] is None and out["error"][1] is None
    assert out["error"][2].startswith("not_an_image") and out["labels"][2] == []
    assert len(out["labels"][0]) == 5 and out["labels"][0] == out["labels"][1]
    assert out["scores"][0] == sorted(out["scores"][0], reverse=True)
    expected = Predictor.from_dir(store.model_dir).predict([str(image)], top_k=5)[0]
    assert out["labels"][0] == expected.labels and out["scores"][0] == expected.scores

    many = model.predict(pd.DataFrame({"image": [str(image)]}), params={"top_k": 100, "extra_classes": ["hexagon"]})
    n_classes = len(Predictor.from_dir(store.model_dir).class_names)
    assert "hexagon" in many["labels"][0] and len(many["labels"][0]) == n_classes + 1
    kept = model.predict(pd.DataFrame({"image": [str(image)]}), params={"top_k": 100, "threshold": 0.5})
    assert all(score >= 0.5 for score in kept["scores"][0])
    for top_k in (0, -3):
        with pytest.raises(MlflowException, match="top_k must be at least 1"):
            model.predict(pd.DataFrame({"image": [str(image)]}), params={"top_k": top_k})


def test_a_served_model_reads_no_server_paths_unless_given_an_image_root(store, monkeypatch):
    _register(store, "mumic-served")
    with tracking_scope(store.uri):
        model = mlflow.pyfunc.load_model("models:/mumic-served@challenger")
    monkeypatch.delenv("MUMIC_IMAGE_ROOT", raising=False)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")  # what MLflow's scoring server sets
    image = store.images[0]
    passwd_line = Path("/etc/passwd").read_text().splitlines()[0]
    out = model.predict(pd.DataFrame({"image": [str(image), "/etc/passwd", image.read_bytes()]}))
    assert out["error"][0].startswith("path_input_disabled") and out["error"][1].startswith("path_input_disabled")
    assert passwd_line not in out["error"][1] and out["labels"][1] == []
    assert out["error"][2] is None and len(out["labels"][2]) == 5

    monkeypatch.setenv("MUMIC_IMAGE_ROOT", str(image.parent))
    out = model.predict(pd.DataFrame({"image": [str(image), image.name, "/etc/passwd"]}))
    assert out["error"][0] is None and out["labels"][0] == out["labels"][1]
    assert out["error"][2].startswith("path_outside_image_root") and passwd_line not in out["error"][2]


def test_promotion_moves_champion_keeps_the_previous_one_and_rolls_back(store):
    """The aliases only: whether a version deserves promotion is the gate's comparison (tests/test_gate.py)."""
    name = "mumic-promo"
    with pytest.raises(RegistryError, match="challenger"):
        promotion_candidate(name, tracking_uri=store.uri)
    first = _register(store, name, run=0)
    assert promotion_candidate(name, tracking_uri=store.uri).version == first.version
    result = promote(name, version=first.version, reason="first", tracking_uri=store.uri)
    assert result.moved and result.champion == first.version and result.previous_champion is None

    second = _register(store, name, run=1)
    assert second.version == first.version + 1
    assert promotion_candidate(name, first.version, tracking_uri=store.uri).version == first.version
    forced = promote(name, version=second.version, reason="forced", forced=True, tracking_uri=store.uri)
    assert forced.moved and forced.forced and forced.champion == second.version
    assert forced.previous_champion == first.version and forced.reason == "forced"
    client = MlflowClient(store.uri)
    assert int(client.get_model_version_by_alias(name, PREVIOUS_CHAMPION).version) == first.version

    back = rollback(name, tracking_uri=store.uri)
    assert back.moved and back.champion == first.version
    assert current_champion(name, tracking_uri=store.uri).version == first.version
    assert int(client.get_model_version_by_alias(name, PREVIOUS_CHAMPION).version) == second.version
    again = promote(name, version=first.version, reason="again", tracking_uri=store.uri)
    assert not again.moved and "already the champion" in again.reason


def test_rollback_without_a_previous_champion_is_an_error(store):
    _register(store, "mumic-lonely")
    promote("mumic-lonely", version=1, reason="first", tracking_uri=store.uri)
    with pytest.raises(RegistryError, match="previous_champion"):
        rollback("mumic-lonely", tracking_uri=store.uri)


def test_resolve_model_uri_gives_a_loadable_model_directory(store, tmp_path):
    name = "mumic-resolve"
    _register(store, name)
    promote(name, version=1, reason="first", tracking_uri=store.uri)
    cache = tmp_path / "cache"
    model_dir = resolve_model_uri(f"models:/{name}@{CHAMPION}", cache_dir=cache, tracking_uri=store.uri)
    assert (model_dir / "model.safetensors").is_file()
    assert Predictor.from_dir(model_dir).class_names == Predictor.from_dir(store.model_dir).class_names
    stamp = (model_dir / "model.json").stat().st_mtime_ns
    again = resolve_model_uri(f"models:/{name}/1", cache_dir=cache, tracking_uri=store.uri)
    assert again == model_dir and (again / "model.json").stat().st_mtime_ns == stamp  # cached per version
    assert resolve_model_uri(str(store.model_dir)) == store.model_dir
    with pytest.raises(RegistryError, match="no alias"):
        resolve_model_uri(f"models:/{name}@nobody", cache_dir=cache, tracking_uri=store.uri)
