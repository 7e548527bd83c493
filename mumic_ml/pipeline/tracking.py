"""MLflow experiment tracking for MuMIC: where runs go and what every run records.

The embedded default is a SQLite store with artifacts in a local folder; `MLFLOW_TRACKING_URI` in the environment
wins, so a team points every entry point (CLI, DVC stages, Dagster) at a shared server by environment alone, and a
store the caller names explicitly (the Dagster `mlflow` resource) wins over both.
Every function takes the tracking URI as an argument (None: MLflow's current one) and talks to the store through
an `MlflowClient` bound to it, so nothing here leaks into MLflow's process-global state; `tracking_scope` is the one
exception, for the MLflow APIs that exist only in fluent form.

Runs record the flattened parameters, the data version and the git commit; the training step adds the splits as
dataset inputs, figures as image artifacts and the orchestrator's run id. Nothing is read from the environment
into a run: secrets in environment variables never reach the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import mlflow.data
import pandas as pd
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from mumic_ml.pipeline import TRACKING_URI_ENV
from mumic_ml.project import Project

PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
TAG_DATA_VERSION = "data_version"
TAG_GIT_COMMIT = "git_commit"
TAG_DAGSTER_RUN_ID = "dagster_run_id"
UNKNOWN = "unknown"
SQLITE_PREFIX = "sqlite:///"


def tracking_location(project: Project) -> tuple[str, Path | None]:
    """The project's MLflow tracking URI and where new experiments keep their artifacts.

    The store is the one the caller chose (`project.tracking_uri`), else MLFLOW_TRACKING_URI, else params.yaml's
    `mlflow.tracking_uri`; a relative SQLite path is taken under the project root. Artifacts of a SQLite store live
    beside the database file (params.yaml's `mlflow.artifact_location` for the project's own store); a tracking
    server decides for itself.
    """
    configured = project.params.mlflow
    chosen = project.tracking_uri or os.environ.get(TRACKING_URI_ENV)
    uri = chosen or configured.tracking_uri
    if not uri.startswith(SQLITE_PREFIX):
        return uri, None
    database = Path(uri[len(SQLITE_PREFIX) :])
    if not database.is_absolute():
        database = (project.root / database).resolve()
    # A store chosen outside params.yaml keeps its artifacts beside it, never in the project.
    artifacts = database.parent / "mlartifacts" if chosen else (project.root / configured.artifact_location).resolve()
    return SQLITE_PREFIX + str(database), artifacts


def public_uri(uri: str) -> str:
    """`uri` without user:password, query and fragment: what messages, logs and UIs may show."""
    parts = urlsplit(uri)
    if not parts.netloc:  # a file store (sqlite:////path): nothing to hide, and rebuilding would drop a slash
        return uri
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def run_url(uri: str, run_id: str) -> str:
    """Where the run shows in the MLflow UI: the server itself, or `mlflow ui` on its default port."""
    if not uri.startswith(("http://", "https://")):
        return f"http://127.0.0.1:5000/#/runs/{run_id}"
    # Without user:password: the URL is shown in the Dagster UI and its event log.
    return public_uri(uri) + f"/#/runs/{run_id}"


@contextlib.contextmanager
def tracking_scope(tracking_uri: str | None) -> Iterator[None]:
    """Point MLflow's global tracking URI at `tracking_uri` for the block, then restore what was there.

    Needed for MLflow's fluent-only APIs (`mlflow.pyfunc.log_model`, `mlflow.register_model`, `models:/` downloads).
    MLflow mirrors the global URI into the environment variable, so restoring the variable restores both. Unless
    the environment says otherwise, artifact progress bars are off inside the block: a model download would flood
    the log of every asset and CLI step that touches the registry.
    """
    quiet = PROGRESS_BAR_ENV not in os.environ
    if quiet:
        os.environ[PROGRESS_BAR_ENV] = "false"
    before = os.environ.get(TRACKING_URI_ENV)
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        yield
    finally:
        if tracking_uri is not None:
            mlflow.set_tracking_uri(before)
        if quiet:
            os.environ.pop(PROGRESS_BAR_ENV, None)


def _artifact_uri(location: str | os.PathLike) -> str:
    """A local folder becomes an absolute file URI, so artifacts land there whatever the cwd of later readers."""
    text = str(location)
    if "://" in text:
        return text
    return Path(text).expanduser().resolve().as_uri()


def ensure_experiment(
    name: str, *, artifact_location: str | os.PathLike | None = None, tracking_uri: str | None = None
) -> str:
    """The id of experiment `name`, created with its artifacts under `artifact_location` when it is new.

    A fresh SQLite store would otherwise put artifacts in `./mlruns` relative to whatever the cwd happens to be.
    An existing experiment keeps the location it was created with (MLflow cannot move it).
    """
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if artifact_location is None else _artifact_uri(artifact_location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # another process created it between our look-up and create
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts as dotted keys (`train.lr_head`), the spelling `--set` and DVC use; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(list(value), default=str)
        else:
            flat[name] = str(value)
    return flat


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD of the repository at `cwd`, or "unknown" outside a repository or without git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else UNKNOWN


@contextlib.contextmanager
def start_run(
    *,
    experiment: str,
    tracking_uri: str | None = None,
    artifact_location: str | os.PathLike | None = None,
    params: Mapping[str, Any] | None = None,
    data_version: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
    repo_dir: str | os.PathLike | None = None,
    source: str | None = None,
    source_type: str = "LOCAL",
) -> Iterator[str]:
    """Open a run that records params, data version and git commit; yield its id; close it FINISHED or FAILED.

    `source` is what started the run (the MLflow UI's Source column; `source_type` one of MLflow's source types,
    LOCAL for a command, JOB for an orchestrated run).

    The run is created through the client rather than `mlflow.start_run`, so it is not the process's "active run"
    and several pipelines in one process (Dagster) cannot log into each other's runs.
    """
    client = MlflowClient(tracking_uri)
    experiment_id = ensure_experiment(experiment, artifact_location=artifact_location, tracking_uri=tracking_uri)
    commit = git_commit(repo_dir)
    all_tags = {
        TAG_DATA_VERSION: data_version or UNKNOWN,
        TAG_GIT_COMMIT: commit,
        **({"mlflow.source.git.commit": commit} if commit != UNKNOWN else {}),
        **({"mlflow.source.name": source, "mlflow.source.type": source_type} if source else {}),
        **(tags or {}),
    }
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    run_id = run.info.run_id
    flat = flatten_params(params or {})
    items = [Param(k, v) for k, v in flat.items()]
    for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[start : start + 100])
    try:
        yield run_id
    except BaseException:
        # A store that has gone away cannot record the failure; the error that broke the run is the one to raise.
        with contextlib.suppress(MlflowException):
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_epoch(run_id: str, step: int, metrics: Mapping[str, Any], *, tracking_uri: str | None = None) -> None:
    """Per-epoch metrics at `step`; values that are not numbers (None, strings) are left out."""
    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, step) for key, value in metrics.items() if isinstance(value, int | float)]
    if rows:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=rows)


def log_artifacts(
    run_id: str, path: str | os.PathLike, *, artifact_path: str | None = None, tracking_uri: str | None = None
) -> None:
    """A file or a whole folder (plots, taxonomy, reports) into the run's artifacts."""
    client = MlflowClient(tracking_uri)
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_png(run_id: str, png: bytes, artifact_file: str, *, tracking_uri: str | None = None) -> None:
    """A rendered figure (PNG bytes) as the image artifact `artifact_file` ("figures/training_curves.png")."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="mumic-figure-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(png)
        MlflowClient(tracking_uri).log_artifact(run_id, str(path), folder or None)


def set_tags(run_id: str, tags: Mapping[str, str | None], *, tracking_uri: str | None = None) -> None:
    """Set each tag; a None value removes the tag, so a re-evaluated run shows no stale verdict."""
    client = MlflowClient(tracking_uri)
    present = client.get_run(run_id).data.tags
    for key, value in tags.items():
        if value is not None:
            client.set_tag(run_id, key, value)
        elif key in present:
            client.delete_tag(run_id, key)


# How the MLflow UI labels what each split was used for (the input tag `mlflow.data.context`).
DATASET_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}
DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")


def log_split_datasets(
    run_id: str,
    frames: Mapping[str, pd.DataFrame],
    *,
    sources: Mapping[str, Path],
    digests: Mapping[str, str],
    tracking_uri: str | None = None,
) -> None:
    """Each split as an MLflow dataset input of the run (its Datasets column): the split file as the source and
    its md5, the hash dvc.lock records, as the digest; the context says what the split was used for."""
    inputs = []
    for name, frame in frames.items():
        with warnings.catch_warnings():
            # MLflow warns that a local path matches two equivalent source types and that integer columns cannot
            # hold missing values; neither applies to a split file, and both would repeat in every training log.
            warnings.simplefilter("ignore", UserWarning)
            described = mlflow.data.from_pandas(frame, source=str(sources[name]), name=name, digest=digests[name])
            dataset = Dataset(**{key: described.to_dict().get(key) for key in DATASET_FIELDS})
        context = DATASET_CONTEXTS.get(name, name)
        inputs.append(DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)
