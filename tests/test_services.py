"""The pipeline on shared services, configured by the environment alone, against real servers on loopback
(tests/services.py): PostgreSQL for Dagster's instance and MLflow's backend store, S3 for MLflow's artifacts and
DVC's `shared` remote, an MLflow tracking server that proxies the artifacts.

The Dagster instance is deploy/dagster.yaml as it is, with its DAGSTER_PG_* variables set; `dagster-daemon run`
drains its queue. Runs go through the queue and train, register, promote and serve through the server; two runs
queued at once train one after the other; a tracking server killed during training fails the run in one line
and a rerun resumes from the checkpoint; PostgreSQL restarted between runs loses no history; DVC's `shared`
remote round-trips; and each service, misconfigured, stops things with one line naming what to fix.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dagster_postgres")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow

import dagster as dg  # noqa: E402
from dagster._core.storage.tags import PARENT_RUN_ID_TAG  # noqa: E402
from dagster._core.workspace.context import BaseWorkspaceRequestContext  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from repo_copy import BIN, REPO  # noqa: E402
from services import (  # noqa: E402
    DVC_BUCKET,
    HOST,
    MLFLOW_BUCKET,
    ServerProcess,
    SharedServices,
    free_port,
    shared_services,
)
from test_pipeline import make_project  # noqa: E402

from mumic_dagster import launch  # noqa: E402
from mumic_ml import cli  # noqa: E402
from mumic_ml.io import file_digest  # noqa: E402
from mumic_ml.pipeline.services import SERVER_ARTIFACT_SETTINGS  # noqa: E402

PARAMS = {
    "demo": {"n_images": 80},
    "train": {"epochs": 2, "batch_size": 16, "early_stopping_patience": None},
    "pretrain": {"epochs": 1, "batch_size": 16},
    "audit": {"folds": 2, "head_steps": 20, "suspects": 10, "report_rows": 10},
    # Every retrain here must register: these tests are about the services, not about the gate.
    "gate": {"min_gap_at_10": 0.0, "champion_tolerance": 1.0},
}
MODEL = "mumic"
LOCATION = "mumic"
RUN_TIMEOUT_S = 900.0
# Every run here executes its steps in the run worker's process: a process per step would only add start-up time.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}
# A client gives up on a lost server at once here (the default retries for minutes, which a real blip deserves).
QUICK_CLIENT = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The servers, a small project served by one code location over gRPC (as deployed: the daemon, the launcher
    and this test all talk to the same server), the instance of deploy/dagster.yaml and its daemon; this process
    sees the same environment as the daemon and the run workers."""
    with ExitStack() as stack, pytest.MonkeyPatch.context() as patch:
        services = stack.enter_context(shared_services())
        root = make_project(tmp_path_factory.mktemp("project"), PARAMS)
        home = tmp_path_factory.mktemp("dagster_home")
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        env = {**services.client_env(), **QUICK_CLIENT, "DAGSTER_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        for name, value in env.items():
            patch.setenv(name, value)
        patch.chdir(root)
        server_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        port = free_port()
        code_server = ServerProcess(
            "code location",
            [str(BIN / "dagster"), "api", "grpc", "-m", "mumic_dagster.definitions", "-d", str(root)]
            + ["-h", HOST, "-p", str(port), "--location-name", LOCATION],
            home / "code_server.log",
            env=server_env,
            cwd=root,
        )
        stack.callback(code_server.stop)
        code_server.start(lambda: _grpc_answers(port))
        workspace_file = root / "workspace.yaml"
        location = {"host": HOST, "port": port, "location_name": LOCATION}
        workspace_file.write_text(yaml.safe_dump({"load_from": [{"grpc_server": location}]}))
        instance = stack.enter_context(dg.DagsterInstance.get())
        daemon = ServerProcess(
            "dagster-daemon",
            [str(BIN / "dagster-daemon"), "run", "-w", str(workspace_file)],
            home / "daemon.log",
            env=server_env,
            cwd=root,
        )
        stack.callback(daemon.stop)
        daemon.start(lambda: _daemon_heartbeat(instance))
        workspace = stack.enter_context(launch.open_workspace(instance, str(workspace_file)))
        yield Stack(services, root, home, instance, workspace, daemon)


def _grpc_answers(port: int) -> bool:
    from dagster._grpc.client import DagsterGrpcClient

    try:
        DagsterGrpcClient(port=port, host=HOST).ping("ready")
    except Exception:  # not listening yet, or still loading the code
        return False
    return True


@dataclass(frozen=True)
class Stack:
    services: SharedServices
    root: Path  # the project, the code location's working directory
    home: Path  # DAGSTER_HOME: deploy/dagster.yaml and the servers' logs
    instance: dg.DagsterInstance
    workspace: BaseWorkspaceRequestContext
    daemon: ServerProcess

    def submit(self, job_name: str) -> str:
        """A run of `job_name` created as the UI creates one and put in the queue; its id."""
        run = launch.create_run(self.workspace, launch.find_job(self.workspace, job_name), IN_PROCESS)
        self.instance.submit_run(run.run_id, self.workspace)
        return run.run_id

    def wait(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dg.DagsterRun:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.instance.get_run_by_id(run_id)
            if run.is_finished:
                return run
            assert self.daemon.running, f"the daemon died:\n{_tail(self.home / 'daemon.log')}"
            time.sleep(0.5)
        pytest.fail(f"run {run_id} did not finish within {timeout:.0f} s:\n{_tail(self.home / 'daemon.log')}")

    def succeeded(self, run_id: str) -> dg.DagsterRun:
        run = self.wait(run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS, launch.failure_messages(self.instance, run_id)
        return run

    @property
    def registry(self) -> MlflowClient:
        return MlflowClient(self.services.mlflow.url)

    def versions(self) -> list[int]:
        return sorted(int(v.version) for v in self.registry.search_model_versions(f"name = '{MODEL}'"))

    def alias(self, name: str) -> int:
        return int(self.registry.get_model_version_by_alias(MODEL, name).version)


def _daemon_heartbeat(instance: dg.DagsterInstance) -> bool:
    """Every daemon the instance needs (the run queue's included) has reported in."""
    statuses = instance.get_daemon_statuses()
    return bool(statuses) and all(status.healthy for status in statuses.values())


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


def _materialization(instance: dg.DagsterInstance, run_id: str, asset: str) -> dict:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    [event] = [r.event_log_entry for r in records if r.event_log_entry.asset_materialization.asset_key.path == [asset]]
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


def test_retrain_and_promote_through_the_queue_then_serve_the_champion_from_the_server(stack, capsys):
    assert "Postgres" in type(stack.instance.run_storage).__name__
    run_config = stack.home / "in_process.yaml"
    run_config.write_text(yaml.safe_dump(IN_PROCESS))
    workspace = str(stack.root / "workspace.yaml")
    assert launch.main(["-w", workspace, "--queue", "-c", str(run_config), "retrain_job", "promote_job"]) == 0
    runs = stack.instance.get_runs()
    assert {run.job_name for run in runs} == {"retrain_job", "promote_job"}
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    assert stack.alias("champion") == 1
    assert "queued for code location" in capsys.readouterr().out

    # The artifacts went through the server into the bucket, and nowhere onto this machine's disk.
    keys = stack.services.s3.keys(MLFLOW_BUCKET)
    assert any(key.endswith("model.safetensors") for key in keys), keys
    assert any(key.endswith("figures/training_curves.png") for key in keys), keys
    assert not list(stack.root.glob("**/mlartifacts")) and not list(stack.root.glob("**/mlruns"))

    image = next((stack.root / "data" / "incoming").rglob("*.png"))
    predicted = subprocess.run(
        [str(BIN / "mumic"), "predict", "--model", "models:/mumic@champion", str(image)],
        cwd=stack.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout.splitlines()[0])["labels"]

    port = free_port()
    serve = ServerProcess(
        "mlflow models serve",
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/mumic@champion", "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port)],
        stack.home / "serve.log",
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
        cwd=stack.root,
    )
    try:
        serve.start(lambda: _answers(f"http://127.0.0.1:{port}/ping"), timeout=300)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[{"b64": base64.b64encode(image.read_bytes()).decode()}]],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            [row] = json.loads(response.read())["predictions"]
        assert row["labels"] and row["error"] is None
    finally:
        serve.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_two_retrains_queued_at_once_train_one_after_the_other(stack):
    versions_before = stack.versions()
    first, second = stack.submit("retrain_job"), stack.submit("retrain_job")
    seen_waiting = False
    while not all(stack.instance.get_run_by_id(run_id).is_finished for run_id in (first, second)):
        statuses = {stack.instance.get_run_by_id(run_id).status for run_id in (first, second)}
        seen_waiting |= statuses == {dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED}
        assert statuses != {dg.DagsterRunStatus.STARTED}, "both runs trained at once"
        time.sleep(0.5)
    records = [stack.instance.get_run_record_by_id(run_id) for run_id in (first, second)]
    for record in records:
        assert record.dagster_run.status == dg.DagsterRunStatus.SUCCESS, launch.failure_messages(
            stack.instance, record.dagster_run.run_id
        )
    earlier, later = sorted(records, key=lambda record: record.start_time)
    assert later.start_time >= earlier.end_time, "the second run started before the first ended"
    assert seen_waiting
    versions = stack.versions()
    assert len(versions) == len(versions_before) + 2
    assert stack.alias("challenger") == versions[-1]
    assert stack.alias("champion") == 1


def test_a_tracking_server_killed_during_training_fails_the_run_in_one_line_and_a_rerun_resumes(stack):
    # One more epoch than before: a new training signature, so this run trains from the start.
    params = yaml.safe_load((stack.root / "params.yaml").read_text())
    params["train"]["epochs"] = 3
    (stack.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    versions_before = stack.versions()
    url = stack.services.mlflow.url

    killed = stack.submit("retrain_job")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any("epoch 1:" in (entry.user_message or "") for entry in stack.instance.all_logs(killed)):
        assert time.monotonic() < deadline and not stack.instance.get_run_by_id(killed).is_finished
        time.sleep(0.2)
    stack.services.mlflow.kill()
    assert stack.wait(killed).status == dg.DagsterRunStatus.FAILURE
    [message] = launch.failure_messages(stack.instance, killed)
    assert f"MLflow tracking server at {url} is unreachable (connection refused)" in message
    assert "check MLFLOW_TRACKING_URI" in message and "\n" not in message

    # The instance retries a failed run once; with the server still down the retry fails at once, in one line.
    retry = _retry_of(stack, killed)
    assert stack.wait(retry).status == dg.DagsterRunStatus.FAILURE
    assert any(
        f"MLflow tracking server at {url} is unreachable (connection refused)" in m
        for m in launch.failure_messages(stack.instance, retry)
    )

    stack.services.mlflow.restart()
    rerun = stack.succeeded(stack.submit("retrain_job"))
    trained = _materialization(stack.instance, rerun.run_id, "trained_model")
    assert trained["resumed_from"] and trained["epochs_run"] == 3
    assert len(stack.versions()) == len(versions_before) + 1


def _retry_of(stack, run_id: str) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        runs = stack.instance.get_runs(dg.RunsFilter(tags={PARENT_RUN_ID_TAG: run_id}))
        if runs:
            return runs[0].run_id
        time.sleep(0.5)
    pytest.fail(f"run {run_id} was not retried:\n{_tail(stack.home / 'daemon.log')}")


def test_postgres_restarted_between_runs_keeps_the_history_and_the_next_run_works(stack):
    before = {run.run_id: run.status for run in stack.instance.get_runs()}
    stack.services.postgres.restart()
    promoted = stack.succeeded(stack.submit("promote_job"))
    after = {run.run_id: run.status for run in stack.instance.get_runs()}
    assert after == {**before, promoted.run_id: dg.DagsterRunStatus.SUCCESS}
    assert stack.alias("champion") == stack.versions()[-1]


def dvc(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dvc"), *args], cwd=root, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )


def test_dvc_outputs_round_trip_through_the_shared_s3_remote(stack):
    root = stack.root
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)
    assert dvc(root, "init", "--quiet").returncode == 0
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    tracked = ["data/splits", "models/mumic"]
    added = dvc(root, "add", *tracked)
    assert added.returncode == 0, added.stderr
    before = {p: file_digest(p, "md5") for folder in tracked for p in sorted((root / folder).rglob("*")) if p.is_file()}

    pushed = dvc(root, "push", "-r", "shared")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert any(key.startswith("files/md5/") for key in stack.services.s3.keys(DVC_BUCKET))
    for folder in tracked:
        shutil.rmtree(root / folder)
    shutil.rmtree(root / ".dvc" / "cache")
    pulled = dvc(root, "pull", "-r", "shared")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert {p: file_digest(p, "md5") for p in before} == before
    status = dvc(root, "status", "--json")
    assert json.loads(status.stdout) == {}
    cloud = dvc(root, "status", "-c", "-r", "shared", "--json")
    assert json.loads(cloud.stdout) == {}


def check_services(capsys, **env: str) -> tuple[int, list[str]]:
    """`mumic check-services` in the project with `env` on top of the stack's environment: exit code, lines."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code = cli.main(["check-services"])
    return code, capsys.readouterr().out.splitlines()


def test_each_service_misconfigured_stops_in_one_line_naming_what_to_fix(stack, capsys):
    services = stack.services
    code, lines = check_services(capsys)
    assert code == 0 and len(lines) == 3 and all(line.startswith("ok: ") for line in lines), lines

    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = f"MLflow tracking server at {dead} is unreachable (connection refused): check MLFLOW_TRACKING_URI"
    code, lines = check_services(capsys, MLFLOW_TRACKING_URI=dead)
    assert code == 2 and f"error: {unreachable}" in lines
    # The same line stops training before it starts, and nothing falls back to a local store.
    checkpoint = (stack.root / "runs" / "train" / "latest.json").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", dead)
        assert cli.main(["train"]) == 2
    assert capsys.readouterr().err.strip() == f"mumic train: error: {unreachable}"
    assert (stack.root / "runs" / "train" / "latest.json").read_bytes() == checkpoint
    assert not (stack.root / "mlflow.db").exists() and not (stack.root / "mlruns").exists()

    # The tracking server's own bucket refusing it: the line names the server's settings, not the client's.
    with services.s3.access_revoked():
        code, lines = check_services(capsys)
    [line] = [line for line in lines if "MLflow" in line]
    assert line.startswith(f"error: MLflow tracking server at {services.mlflow.url} cannot use its artifact store")
    assert line.endswith(f"check the server's {SERVER_ARTIFACT_SETTINGS}")

    postgres = f"Dagster's PostgreSQL storage at 127.0.0.1:{services.postgres.port}"
    code, lines = check_services(capsys, DAGSTER_PG_PASSWORD="wrong")
    refused = "refused user 'mumic' (password authentication failed): check DAGSTER_PG_USER and DAGSTER_PG_PASSWORD"
    assert code == 2 and f"error: {postgres} {refused}" in lines
    port = str(free_port())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_PG_PORT", port)
        assert launch.main(["retrain_job"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: Dagster's PostgreSQL storage at 127.0.0.1:{port} is unreachable (connection refused): check "
        "DAGSTER_PG_HOST and DAGSTER_PG_PORT"
    )

    remote = f"DVC remote 'shared' (s3://{DVC_BUCKET})"
    code, lines = check_services(capsys, AWS_SECRET_ACCESS_KEY="wrong")
    refused = "refused the credentials (SignatureDoesNotMatch): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    assert code == 2 and f"error: {remote} at {services.s3.endpoint} {refused}" in lines
    code, lines = check_services(capsys, AWS_ENDPOINT_URL=dead)
    assert code == 2
    assert f"error: {remote} at {dead} is unreachable (connection refused): check AWS_ENDPOINT_URL" in lines
