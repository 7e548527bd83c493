"""Reliability under faults: kills, crashes between write and rename, failing stores, planted pickles and secrets,
and servers that must listen on loopback only. docs/reliability.md lists one row per fault.

Registration idempotency at the registry level (same run registered twice -> one version) is
tests/test_registry.py::test_register_tags_the_version_and_points_challenger_once_per_run; here it is checked one
level up, through `register_step`, and after a registration that failed half-way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mumic_ml.checkpoint import (
    CheckpointError,
    discard_partial_writes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mumic_ml.config import Params
from mumic_ml.data import read_split
from mumic_ml.io import atomic_directory, atomic_path, atomic_write_bytes, atomic_write_json, read_json
from mumic_ml.train import train

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from mumic_ml import steps  # noqa: E402
from mumic_ml.pipeline import ServiceUnavailable, registry  # noqa: E402
from mumic_ml.pipeline.tracking import run_url  # noqa: E402
from mumic_ml.project import Project  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_BATCH = 16


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def _stop_then_kill(proc: subprocess.Popen, ready, what: str, timeout: float = 240.0) -> None:
    """SIGSTOP the process as soon as `ready()` holds, then SIGKILL it: the kill lands exactly in that state."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}; make its work longer")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _read_json_or_none(path: Path):
    try:
        return read_json(path)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- 1. training killed mid-epoch ---------------------------------------------------------------------------------

_TRAIN_DRIVER = """
import json, sys
from pathlib import Path
from mumic_ml.config import Params
from mumic_ml.train import train
spec = json.loads(sys.argv[1])
train(Params().updated(spec["overrides"]), progress=False, **{k: Path(v) for k, v in spec["paths"].items()})
"""

_KILL_OVERRIDES = {
    "train.batch_size": TRAIN_BATCH,
    "train.epochs": 2,
    "train.early_stopping_patience": None,
    "train.checkpoint_every_steps": 2,
    "train.device": "cpu",
}


def _train_paths(world, out: Path) -> dict[str, Path]:
    return {
        "splits_dir": world.splits,
        "images_root": world.ingested,
        "taxonomy_path": world.taxonomy,
        "cache_dir": world.cache,
        "run_dir": out / "run",
        "model_dir": out / "model",
    }


def _comparable(history: list[dict]) -> list[dict]:
    """Epoch reports without the one timing-dependent field."""
    return [{k: v for k, v in epoch.items() if k != "images_per_second"} for epoch in history]


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_weights_and_metrics(tiny_world, tmp_path):
    """SIGKILL after a mid-epoch checkpoint; the resumed run skips the kill's leftovers, continues from the last
    complete checkpoint and ends bitwise equal to an uninterrupted run, epoch metrics included."""
    params = Params().updated(_KILL_OVERRIDES)
    straight = train(params, progress=False, **_train_paths(tiny_world, tmp_path / "straight"))

    steps_per_epoch = len(read_split(tiny_world.splits / "train.parquet")) // TRAIN_BATCH
    killed = tmp_path / "killed"
    paths = _train_paths(tiny_world, killed)
    spec = {"overrides": _KILL_OVERRIDES, "paths": {k: str(v) for k, v in paths.items()}}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "killed.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", _TRAIN_DRIVER, json.dumps(spec)], env=env, stdout=log_file, stderr=log_file
        )

        def second_epoch_checkpointed() -> bool:
            pointer = _read_json_or_none(paths["run_dir"] / "latest.json")
            return pointer is not None and pointer["global_step"] > steps_per_epoch

        _stop_then_kill(proc, second_epoch_checkpointed, "a checkpoint inside the second epoch")

    run_dir = paths["run_dir"]
    assert not paths["model_dir"].exists()
    resume_from = latest_checkpoint(run_dir)
    progress = read_json(resume_from / "state.json")["train_state"]
    assert 0 < progress["step_in_epoch"] < steps_per_epoch, "the kill should land mid-epoch"

    # What a kill can leave behind: a checkpoint folder still being built and a pointer not yet renamed.
    staging = run_dir / "checkpoints" / ".step-000000999.planted.staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes((resume_from / "model.safetensors").read_bytes()[:64])
    (staging / "state.json").write_text('{"format": "mumic-checkpoint", "train_state": {"global_st')
    pointer_tmp = run_dir / ".latest.json.planted.tmp"
    pointer_tmp.write_text(json.dumps({"checkpoint": staging.name, "global_step": 999}))

    resumed = train(params, progress=False, resume=True, **paths)
    assert resumed.resumed_from == str(resume_from)
    assert not staging.exists() and not pointer_tmp.exists()

    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(paths["model_dir"] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _comparable(resumed.history) == _comparable(straight.history)
    assert (resumed.best_epoch, resumed.best_val_gap_at_k) == (straight.best_epoch, straight.best_val_gap_at_k)
    spec_a = read_json(tmp_path / "straight" / "model" / "model.json")
    spec_b = read_json(paths["model_dir"] / "model.json")
    assert spec_a["thresholds"] == spec_b["thresholds"]


def _small_checkpoint(run_dir: Path, step: int) -> Path:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return save_checkpoint(
        run_dir,
        global_step=step,
        model_state=model.state_dict(),
        optimizer_state=optimizer.state_dict(),
        state={"train_state": {"global_step": step}},
    )


@pytest.mark.parametrize("damage", ["truncated_weights", "truncated_state", "truncated_pointer"])
def test_a_damaged_checkpoint_is_refused_with_its_path_never_loaded(tmp_path, damage):
    """Readers follow latest.json only; a damaged file under it is an error naming the checkpoint, not garbage."""
    _small_checkpoint(tmp_path, 1)
    path = _small_checkpoint(tmp_path, 2)
    target = {
        "truncated_weights": path / "model.safetensors",
        "truncated_state": path / "state.json",
        "truncated_pointer": tmp_path / "latest.json",
    }[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(latest_checkpoint(tmp_path))
    assert str(tmp_path) in str(caught.value)


def test_leftovers_of_a_killed_writer_are_discarded_and_checkpoints_kept(tmp_path):
    good = _small_checkpoint(tmp_path, 1)
    leftovers = [
        tmp_path / "checkpoints" / ".step-000000002.abc.staging",
        tmp_path / "checkpoints" / ".step-000000001.123.retired",
        tmp_path / ".latest.json.xyz.tmp",
        tmp_path / ".best.safetensors.xyz.tmp",
    ]
    for path in leftovers[:2]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    for path in leftovers[2:]:
        path.write_bytes(b"half")
    assert sorted(discard_partial_writes(tmp_path)) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert latest_checkpoint(tmp_path) == good and load_checkpoint(good).state["train_state"] == {"global_step": 1}


# --- 2. ingestion killed mid-batch --------------------------------------------------------------------------------


def _incoming_with_three_batches(root: Path) -> tuple[Path, Path]:
    """Three demo batches; the last repeats two pictures of the first, the second names a file that is missing."""
    from mumic_ml.demo_world import generate_demo_world

    incoming = root / "incoming"
    worlds = [generate_demo_world(incoming / f"b{i}", n_images=250, image_size=64, seed=i) for i in range(3)]
    first, second, third = worlds
    extra = []
    for name in ("img_000000.png", "img_000001.png"):
        shutil.copy(first.images_dir / name, third.images_dir / f"again_{name}")
        extra.append(f"images/again_{name},circle,a copy\n")
    with open(third.manifest_path, "a", encoding="utf-8") as fh:
        fh.writelines(extra)
    with open(second.manifest_path, "a", encoding="utf-8") as fh:
        fh.write("images/not_there.png,circle,a missing file\n")
    return incoming, first.taxonomy_path


def _combined(out: Path) -> tuple[set, list, set]:
    manifest = pd.read_parquet(out / "manifest.parquet")
    rows = {(r.batch, r.source, r.sha256, tuple(r.labels)) for r in manifest.itertuples()}
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return rows, list(manifest["sha256"]), {(r.batch, r.source, r.reason) for r in rejected.itertuples()}


@pytest.mark.slow
def test_ingest_killed_mid_batch_then_rerun_loses_and_duplicates_nothing(tmp_path):
    """`mumic ingest` over several batches, SIGKILLed while writing the second; a rerun gives exactly the output of
    an uninterrupted run, and the folder holds no image that the manifest does not name."""
    from mumic_ml.batches import ingest_batches
    from mumic_ml.taxonomy import load_taxonomy

    incoming, taxonomy_path = _incoming_with_three_batches(tmp_path)
    reference = tmp_path / "reference"
    ingest_batches(incoming, reference, taxonomy=load_taxonomy(taxonomy_path))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mumic_ml", "ingest", "--incoming", str(incoming), "--out", str(out)]
    cmd += ["--taxonomy", str(taxonomy_path)]
    proc = subprocess.Popen(cmd, cwd=_project_folder(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def inside_second_batch() -> bool:
        ledger = _read_json_or_none(out / "batches.json")
        images = out / "batches" / "b1" / "images"
        return ledger is not None and list(ledger) == ["b0"] and images.is_dir() and any(images.iterdir())

    _stop_then_kill(proc, inside_second_batch, "ingest to write images of the second batch")
    assert not (out / "manifest.parquet").exists() and not (out / "batches" / "b1" / "manifest.parquet").exists()

    result = ingest_batches(incoming, out, taxonomy=load_taxonomy(taxonomy_path))
    assert result.skipped == ["b0"] and result.ingested == ["b1", "b2"]
    rows, hashes, rejected = _combined(out)
    expected_rows, _, expected_rejected = _combined(reference)
    assert rows == expected_rows and rejected == expected_rejected
    assert len(hashes) == len(set(hashes)) == result.n_images == 750
    assert ("b1", "images/not_there.png", "missing_file") in rejected
    assert sum(reason == "duplicate_image" for *_, reason in rejected) == 2
    assert set(read_json(out / "batches.json")) == {"b0", "b1", "b2"}
    for batch in ("b0", "b1", "b2"):
        folder = out / "batches" / batch
        named = {Path(p).name for p in pd.read_parquet(folder / "manifest.parquet")["path"]}
        assert {p.name for p in (folder / "images").iterdir()} == named, f"stray or missing files in {batch}"
    for path in pd.read_parquet(out / "manifest.parquet")["path"]:
        assert (out / path).is_file()


# --- 3. crash between write and rename ----------------------------------------------------------------------------


class _Crash(OSError):
    pass


def _crash_on_call(monkeypatch, target: str, which: int):
    """Make the `which`-th call (1-based) of `target` raise, as if the process died right there."""
    original = _resolve(target)
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == which:
            raise _Crash(f"simulated crash in {target}")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, patched)
    return calls


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    obj = __import__(module.split(".")[0])
    for part in module.split(".")[1:]:
        obj = getattr(obj, part)
    return getattr(obj, attr)


def _write_json(path: Path, value) -> None:
    atomic_write_json(path, value)


def _write_bytes(path: Path, value) -> None:
    atomic_write_bytes(path, json.dumps(value).encode())


def _write_through_atomic_path(path: Path, value) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh)


@pytest.mark.parametrize("writer", [_write_json, _write_bytes, _write_through_atomic_path])
def test_crash_between_write_and_rename_keeps_the_previous_file_and_no_litter(tmp_path, monkeypatch, writer):
    path = tmp_path / "report.json"
    writer(path, {"version": 1})
    _crash_on_call(monkeypatch, "os.replace", 1)
    with pytest.raises(_Crash):
        writer(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.parametrize("which", [1, 2], ids=["retiring_the_old", "renaming_the_new"])
def test_crash_while_swapping_a_directory_keeps_the_previous_one_whole(tmp_path, monkeypatch, which):
    """atomic_directory renames twice (old away, new in); a crash at either leaves the old version at its name."""
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("v1")
    _crash_on_call(monkeypatch, "os.replace", which)
    with pytest.raises(_Crash), atomic_directory(target) as staging:
        (staging / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize(
    "crash", [("pyarrow.parquet.write_table", 2), ("os.replace", 1)], ids=["writing_val", "renaming_train"]
)
def test_crash_while_writing_splits_keeps_the_previous_set(tiny_world, tmp_path, monkeypatch, crash):
    """The split files are one set: a crash mid-way never pairs a new train split with an old test split."""
    from mumic_ml.split import split_manifest

    out = tmp_path / "splits"
    args = (tiny_world.ingested / "manifest.parquet", out, {"train": 0.6, "val": 0.2, "test": 0.2})
    split_manifest(*args, seed=0)
    before = {p.name: _md5(p) for p in out.iterdir()}
    with monkeypatch.context() as patch:
        _crash_on_call(patch, *crash)
        with pytest.raises(_Crash):
            split_manifest(*args, seed=1, reassign=True)
    assert {p.name: _md5(p) for p in out.iterdir()} == before
    split_manifest(*args, seed=1, reassign=True)
    assert {p.name: _md5(p) for p in out.iterdir()} != before  # the crashed write would have changed the set


# --- a trained, evaluated and registered project, with planted secrets in the environment -------------------------

SECRET = f"planted-secret-{uuid.uuid4().hex}"
PLANTED_ENV = {
    "MLFLOW_TRACKING_TOKEN": SECRET + "-token",
    "MLFLOW_TRACKING_PASSWORD": SECRET + "-password",
    "AWS_SECRET_ACCESS_KEY": SECRET + "-aws",
    "MUMIC_PLANTED_API_KEY": SECRET + "-api",
    "DATABASE_URL": f"postgresql://user:{SECRET}-db@db.internal/mumic",
}


@dataclass(frozen=True)
class RegisteredProject:
    """A project trained, gated and registered through the steps, with everything it logged."""

    root: Path
    params: Params
    uri: str
    run_id: str
    version: int
    logs: str


def _project_params(world, root: Path) -> Params:
    return Params().updated(
        {
            "paths.ingested": str(world.ingested),
            "paths.splits": str(world.splits),
            "paths.taxonomy": str(world.taxonomy),
            "paths.cache": str(world.cache),
            "paths.run": str(root / "run"),
            "paths.model": str(root / "model"),
            "paths.reports": str(root / "reports"),
            "train.epochs": 1,
            "train.batch_size": TRAIN_BATCH,
            "train.early_stopping_patience": None,
            "train.device": "cpu",
            "gate.min_gap_at_10": 0.0,
            "mlflow.registered_model": "mumic-reliability",
        }
    )


@pytest.fixture(scope="module")
def project(tiny_world, tmp_path_factory):
    """train -> evaluate + gate -> register through `mumic_ml.steps`, with secrets planted in the environment and
    every log record and line of output captured."""
    root = tmp_path_factory.mktemp("reliability_project")
    params = _project_params(tiny_world, root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("mlflow"), logging.getLogger("mumic_ml")]
    levels = [logger.level for logger in loggers]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for key, value in PLANTED_ENV.items():
            mp.setenv(key, value)
        for logger in loggers:
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG if logger.name == "mumic_ml" else logging.INFO)
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                project = Project(params, root)
                outcome = steps.train_step(project, progress=False)
                steps.evaluate_and_gate_step(project)
                info = steps.register_step(project)
        finally:
            for logger, level in zip(loggers, levels):
                logger.removeHandler(handler)
                logger.setLevel(level)
        assert info.created
        yield RegisteredProject(root, params, uri, outcome.run_id, info.version, captured.getvalue())


def _versions(project: RegisteredProject) -> list[int]:
    name = project.params.mlflow.registered_model
    return sorted(int(v.version) for v in MlflowClient(project.uri).search_model_versions(f"name = '{name}'"))


def _aliases(project: RegisteredProject) -> dict[str, int]:
    name = project.params.mlflow.registered_model
    found = MlflowClient(project.uri).get_registered_model(name).aliases
    return {alias: int(version) for alias, version in found.items()}


def _new_run_with_logged_model(project: RegisteredProject) -> tuple[str, str]:
    from mumic_ml.pipeline.tracking import start_run

    with start_run(experiment=project.params.mlflow.experiment, tracking_uri=project.uri, run_name="retry") as run:
        pass
    return run, registry.log_model(run, project.root / "model", tracking_uri=project.uri)


# --- 7. secrets ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_planted_secrets_reach_no_store_artifact_metadata_or_log(project):
    """The values of secret-bearing environment variables appear in no MLflow param, tag or artifact, in no file
    the pipeline wrote (model.json, reports, the SQLite store itself) and in no log line or output."""
    secrets = list(PLANTED_ENV.values()) + [SECRET]
    client = MlflowClient(project.uri)
    run = client.get_run(project.run_id)
    version = client.get_model_version(project.params.mlflow.registered_model, str(project.version))
    recorded = json.dumps(
        [run.data.params, run.data.tags, run.data.metrics, version.tags, version.source, run.info.artifact_uri]
    )
    assert run.data.params["train.epochs"] == "1"
    assert "epoch 1: loss" in project.logs and "Created version" in project.logs  # the capture did capture
    assert "model.json" in {p.name for p in project.root.rglob("*")}
    files = [p for p in project.root.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in files) and any(p.suffix == ".db" for p in files)
    for secret in secrets:
        assert secret not in recorded
        assert secret not in project.logs
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret} leaked into {path}"


def test_the_run_url_shown_in_dagster_carries_no_credentials():
    url = run_url(f"https://alice:{SECRET}@mlflow.example.com:8443/base/", "0123")
    assert url == "https://mlflow.example.com:8443/base/#/runs/0123"


# --- 5. registration idempotency ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerunning_register_step_adds_no_version_and_logs_no_second_model(project):
    before = _versions(project)
    again = steps.register_step(Project(project.params, project.root))
    assert not again.created and again.version == project.version
    assert _versions(project) == before
    client = MlflowClient(project.uri)
    name = project.params.mlflow.registered_model
    assert len(client.search_model_versions(f"name = '{name}' and run_id = '{project.run_id}'")) == 1
    experiment = client.get_experiment_by_name(project.params.mlflow.experiment)
    logged = client.search_logged_models(
        experiment_ids=[experiment.experiment_id], filter_string=f"source_run_id = '{project.run_id}'"
    )
    assert len(logged) == 1


# --- 4. MLflow and DVC failures -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_training_fast_before_it_starts(tiny_world, tmp_path, monkeypatch):
    """An unreachable MLflow server is one line naming the server, the cause and the setting, raised before any
    training time is spent, with MLflow's own retries left at their default."""
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    params = _project_params(tiny_world, tmp_path)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        steps.train_step(Project(params, tmp_path), progress=False)
    assert str(caught.value) == (
        f"MLflow tracking server at {url} is unreachable (connection refused): check MLFLOW_TRACKING_URI"
    )
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists() and not (tmp_path / "model").exists()


def test_metrics_store_failing_mid_training_fails_the_run_visibly(tiny_world, tmp_path, monkeypatch):
    """The store failing after training has begun: the exception says why, the MLflow run is marked FAILED and no
    model is exported; the checkpoints stay for `--resume`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    original = MlflowClient.log_batch

    def disk_full_for_metrics(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", disk_full_for_metrics)
    params = _project_params(tiny_world, tmp_path)
    with pytest.raises(OSError, match="No space left on device"):
        steps.train_step(Project(params, tmp_path), progress=False)
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("mumic").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "model").exists() and latest_checkpoint(tmp_path / "run") is not None


@pytest.mark.slow
def test_disk_full_while_logging_a_model_leaves_the_registry_untouched(project, monkeypatch):
    registry.promote(
        project.params.mlflow.registered_model, version=project.version, reason="first", tracking_uri=project.uri
    )
    aliases, versions = _aliases(project), _versions(project)
    assert {"champion", "challenger"} <= set(aliases)
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", disk_full)
    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        _new_run_with_logged_model(project)
    assert _aliases(project) == aliases and _versions(project) == versions


@pytest.mark.slow
def test_failure_while_moving_the_alias_is_repaired_by_rerunning_register(project, monkeypatch):
    """A registration that dies after the version exists but before `challenger` moves: aliases stay where they
    were, and running it again finishes the job without a second version."""
    name = project.params.mlflow.registered_model
    run_id, model_uri = _new_run_with_logged_model(project)
    aliases, versions = _aliases(project), _versions(project)

    def store_down(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_registered_model_alias", store_down)
        with pytest.raises(OSError, match="No space left on device"):
            registry.register_model(run_id, model_uri, name=name, tags={}, gate_passed=True, tracking_uri=project.uri)
    assert _aliases(project) == aliases
    half_done = _versions(project)
    assert len(half_done) == len(versions) + 1

    info = registry.register_model(run_id, model_uri, name=name, tags={}, gate_passed=True, tracking_uri=project.uri)
    assert not info.created and _versions(project) == half_done
    assert _aliases(project) == {**aliases, "challenger": info.version}


def _project_folder(folder: Path) -> Path:
    """`folder` as a project a stage command runs in: the repository's params.yaml and nothing else yet."""
    shutil.copy(REPO / "params.yaml", folder)
    return folder


def _mumic(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mumic_ml", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_stage_command_with_a_missing_input_exits_nonzero_naming_it(tiny_world, tmp_path):
    """What `dvc repro` sees when an upstream output is gone: the stage fails and says which file."""
    args = ["split", "--ingested", str(tmp_path / "gone"), "--taxonomy", str(tiny_world.taxonomy)]
    done = _mumic(args, _project_folder(tmp_path))
    assert done.returncode != 0
    assert "manifest.parquet" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()


def _file_size_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_stage_command_whose_disk_write_fails_exits_nonzero_and_keeps_the_last_output(tiny_world, tmp_path):
    """A write that the file system refuses (here: the file-size limit, which even root cannot pass) fails the
    stage with the OS error on stderr, and the previous output stays whole."""
    raw_manifest = next(tiny_world.raw.glob("manifest.*"))
    out = tmp_path / "ingested"
    args = ["ingest", "--manifest", str(raw_manifest), "--images-root", str(tiny_world.raw), "--out", str(out)]
    first = _mumic(args, _project_folder(tmp_path))
    assert first.returncode == 0, first.stderr
    before = _md5(out / "manifest.parquet")
    failed = _mumic(args, tmp_path, preexec_fn=_file_size_limit(1024))
    assert failed.returncode != 0
    assert "File too large" in failed.stderr
    assert _md5(out / "manifest.parquet") == before
    assert not [p for p in out.rglob(".*") if p.is_file()], "temporary files left behind"


# --- 6. model loading never unpickles -----------------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, as_torch: bool = True) -> Path:
    payload = {"state_dict": {"weight": _Exploit(marker)}}
    if as_torch:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("name", ["evil.pt", "evil.pth", "evil.bin", "evil.ckpt", "evil.safetensors"])
def test_a_malicious_pretrained_file_is_refused_not_unpickled(tmp_path, name):
    from mumic_ml.backbone import BackboneError, create_backbone

    marker = tmp_path / "pwned"
    evil = _plant(tmp_path / name, marker, as_torch=not name.endswith(".safetensors"))
    with pytest.raises(BackboneError, match="never unpickled") as caught:
        create_backbone("mumic-tiny", str(evil))
    assert "weights_only=False" not in str(caught.value)
    assert not marker.exists()


def test_a_malicious_pretrained_file_in_params_fails_the_train_command(tiny_world, tmp_path, monkeypatch, capsys):
    from mumic_ml import cli

    marker = tmp_path / "pwned"
    evil = _plant(tmp_path / "evil.pt", marker)
    monkeypatch.chdir(_project_folder(tmp_path))
    paths = _train_paths(tiny_world, tmp_path)
    flags = {
        "--splits": "splits_dir",
        "--images-root": "images_root",
        "--taxonomy": "taxonomy_path",
        "--cache-dir": "cache_dir",
        "--run-dir": "run_dir",
        "--model-dir": "model_dir",
    }
    where = [arg for flag, key in flags.items() for arg in (flag, str(paths[key]))]
    code = cli.main(["train", "--no-progress", *where, "--set", f"model.pretrained={evil}"])
    assert code == 2
    assert "never unpickled" in capsys.readouterr().err
    assert not marker.exists() and not paths["model_dir"].exists()


def test_a_malicious_checkpoint_is_refused_on_resume(tiny_world, tmp_path):
    """The resume path of `train`: a checkpoint whose weights were swapped for a pickle stops the run."""
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    checkpoint = _small_checkpoint(run_dir, 3)
    _plant(checkpoint / "model.safetensors", marker)
    params = Params().updated({"train.epochs": 1, "train.batch_size": TRAIN_BATCH, "train.device": "cpu"})
    with pytest.raises(CheckpointError, match="damaged"):
        train(params, progress=False, resume=True, **_train_paths(tiny_world, tmp_path))
    assert not marker.exists() and not (tmp_path / "model").exists()


@pytest.fixture
def clean_model_dir(tmp_path) -> Path:
    """An untrained but complete model directory: enough to test what loading it accepts."""
    from mumic_ml.backbone import create_backbone
    from mumic_ml.model_io import build_classifier, save_model_dir
    from mumic_ml.taxonomy import Taxonomy

    params = Params()
    backbone = create_backbone(params.model.backbone, None)
    classifier = build_classifier(params.model, [["a circle."], ["a square."]], backbone)
    return save_model_dir(
        tmp_path / "model",
        classifier=classifier,
        backbone_name=params.model.backbone,
        backbone_config=backbone.model_config,
        model_cfg=params.model,
        image_norm=backbone.image_norm,
        taxonomy=Taxonomy.from_names(["circle", "square"]),
        class_names=["circle", "square"],
        class_prompts=[["a circle."], ["a square."]],
        thresholds=None,
        metadata={},
    )


@pytest.mark.parametrize("planting", ["weights_replaced", "pickle_beside_no_weights"])
def test_a_malicious_model_directory_is_refused_not_unpickled(clean_model_dir, tmp_path, planting, capsys):
    from mumic_ml import cli
    from mumic_ml.model_io import ModelDirError, load_model_dir
    from mumic_ml.predict import Predictor

    load_model_dir(clean_model_dir)  # the untouched directory loads
    marker = tmp_path / "pwned"
    weights = clean_model_dir / "model.safetensors"
    if planting == "weights_replaced":
        _plant(weights, marker)
    else:
        weights.unlink()
        _plant(clean_model_dir / "model.pt", marker)
        _plant(clean_model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ModelDirError):
        load_model_dir(clean_model_dir)
    with pytest.raises(ModelDirError):
        Predictor.from_dir(clean_model_dir)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    assert cli.main(["predict", "--model", str(clean_model_dir), str(image)]) == 2
    assert str(clean_model_dir) in capsys.readouterr().err
    assert not marker.exists()


# --- 8. servers listen on loopback only ---------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_SERVER = re.compile(
    r"(?P<tool>(?:dagster|\$\(DAGSTER\))\s+dev|dagster-webserver|mlflow\s+(?:ui|server)|mlflow\s+models\s+serve)\b"
    r"(?P<args>[^`'\"\n]*)"
)
_HOST = re.compile(r"(?:^|\s)(?:-h|--host)(?:\s+|=)(?P<host>\S+)")


def _option_default(command, name: str):
    return next(p.default for p in command.params if p.name == name)


def _default_host(tool: str) -> str | None:
    """The address the installed tool binds when the command names none."""
    tool = " ".join(tool.replace("$(DAGSTER)", "dagster").split())
    from dagster_webserver.cli import dagster_webserver

    webserver_default = _option_default(dagster_webserver, "host")
    if tool == "dagster dev":
        from dagster._cli.dev import dev_command

        own = _option_default(dev_command, "host")
        return own if isinstance(own, str) else webserver_default  # unset: the webserver's own default applies
    if tool == "dagster-webserver":
        return webserver_default
    if tool == "mlflow models serve":
        from mlflow.models.cli import commands

        return _option_default(commands.commands["serve"], "host")
    from mlflow.cli import cli as mlflow_cli

    return _option_default(mlflow_cli.get_command(None, tool.split()[1]), "host")


def _host_docs() -> list[Path]:
    """The docs about servers on this host. docs/deployment.md describes servers inside containers, which listen on
    their container's interface; tests/test_deploy_files.py checks that compose publishes each on loopback only."""
    return [path for path in (REPO / "docs").glob("*.md") if path.name != "deployment.md"]


def _server_commands() -> list[tuple[str, str, str]]:
    """(file, tool, arguments) for every server start written in the Makefile, the docs or the code."""
    files = [REPO / "Makefile", REPO / "README.md", *_host_docs()]
    files += [*(REPO / "mumic_ml").rglob("*.py"), *(REPO / "mumic_dagster").glob("*.py")]
    found = []
    for path in files:
        text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))  # join shell line continuations
        found += [(path.name, m["tool"], m["args"]) for m in _SERVER.finditer(text)]
    return found


def test_every_server_the_project_starts_or_documents_binds_loopback():
    commands = _server_commands()
    tools = {" ".join(tool.replace("$(DAGSTER)", "dagster").split()) for _, tool, _ in commands}
    assert {"dagster dev", "mlflow ui", "mlflow models serve"} <= tools  # the Makefile `ui` target and the README
    for name, tool, args in commands:
        given = _HOST.search(args)
        host = given["host"] if given else _default_host(tool)
        assert host in LOOPBACK, f"{name}: `{tool}{args}` listens on {host}"
    for path in [REPO / "Makefile", REPO / "README.md", *_host_docs(), *REPO.glob("mumic_*/**/*.py")]:
        assert "0.0.0.0" not in path.read_text(encoding="utf-8"), f"{path} mentions binding all interfaces"
