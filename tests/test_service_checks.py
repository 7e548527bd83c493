"""The preflight checks of the shared services, without the services: what each kind of refusal turns into (one
line naming the service, the cause and the setting to fix), against stub servers and closed ports on loopback,
and the deployment files that name those settings (deploy/env.example, deploy/dagster.yaml, .dvc/config). The
real servers are in test_services.py."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")

from mlflow.exceptions import MlflowException  # noqa: E402
from repo_copy import REPO, free_port  # noqa: E402

from mumic_dagster import launch  # noqa: E402
from mumic_dagster.definitions import defs  # noqa: E402
from mumic_dagster.jobs import GPU_TAG, TRAIN  # noqa: E402
from mumic_ml import cli, steps  # noqa: E402
from mumic_ml.pipeline import ServiceUnavailable  # noqa: E402
from mumic_ml.pipeline import services as checks  # noqa: E402
from mumic_ml.project import Project  # noqa: E402

DAGSTER_PG = {
    "DAGSTER_PG_HOST": "127.0.0.1",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_DB": "dagster",
}


@contextlib.contextmanager
def stub_server(answers: dict[str, tuple[int, dict]]) -> Iterator[str]:
    """An HTTP server on loopback answering GET paths (without the query) with (status, JSON body); 404 else."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            status, body = answers.get(self.path.split("?")[0], (404, {"message": "no such endpoint"}))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


SEARCH = "/api/2.0/mlflow/experiments/search"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


def test_a_refused_connection_is_named_from_the_innermost_error():
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as inner:
            raise OSError("HTTPConnectionPool: max retries exceeded") from inner
    except OSError as outer:
        assert checks.cause_of(outer) == "connection refused"
    assert checks.cause_of(socket.gaierror(-2, "Name or service not known")) == "host name not found"
    assert checks.cause_of(RuntimeError("something else entirely")) == "something else entirely"


def test_a_tracking_server_that_answers_passes():
    with stub_server({SEARCH: (200, {"experiments": []}), ARTIFACTS: (200, {"files": []})}) as url:
        assert checks.tracking_server_problem(url) is None


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ({SEARCH: (401, {})}, "refused the credentials (HTTP 401): check MLFLOW_TRACKING_USERNAME and "),
        ({}, "is not an MLflow tracking server (HTTP 404 for its REST API): check MLFLOW_TRACKING_URI"),
        (
            {SEARCH: (500, {"message": "could not connect to server"})},
            "cannot use its backend store (HTTP 500: could not connect to server): check the server's "
            "MLFLOW_BACKEND_STORE_URI",
        ),
        (
            {SEARCH: (200, {}), ARTIFACTS: (500, {"message": "InvalidAccessKeyId"})},
            f"cannot use its artifact store (HTTP 500: InvalidAccessKeyId): check the server's "
            f"{checks.SERVER_ARTIFACT_SETTINGS}",
        ),
    ],
)
def test_each_refusal_of_a_tracking_server_is_one_line_naming_what_to_fix(answers, expected):
    with stub_server(answers) as url:
        problem = checks.tracking_server_problem(url)
    assert problem.startswith(f"MLflow tracking server at {url} ") and expected in problem
    assert "\n" not in problem


def test_a_closed_port_is_unreachable_and_credentials_never_show():
    port = free_port()
    problem = checks.tracking_server_problem(f"http://user:hunter2@127.0.0.1:{port}", "MLFLOW_TRACKING_URI")
    assert problem == (
        f"MLflow tracking server at http://127.0.0.1:{port} is unreachable (connection refused): check "
        "MLFLOW_TRACKING_URI"
    )


def test_stores_that_are_files_have_nothing_to_check_and_postgres_stores_are_checked(tmp_path):
    assert checks.tracking_store_problem(f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_TRACKING_URI") is None
    port = free_port()
    problem = checks.tracking_store_problem(f"postgresql://u:p@127.0.0.1:{port}/mlflow", "MLFLOW_TRACKING_URI")
    assert problem == (
        f"MLflow's PostgreSQL store at 127.0.0.1:{port} is unreachable (connection refused): check MLFLOW_TRACKING_URI"
    )


@pytest.fixture
def project_root(tmp_path, monkeypatch) -> Path:
    """A project folder with the repository's params.yaml and nothing else, as the working directory."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_setting_named_is_the_one_that_chose_the_store(project_root, monkeypatch):
    project = Project.load(project_root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert checks.tracking_setting(project) == "mlflow.tracking_uri in params.yaml"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert checks.tracking_setting(project) == "MLFLOW_TRACKING_URI"
    # The Dagster resource reads MLFLOW_TRACKING_URI through EnvVar: the same value is still the variable's.
    assert checks.tracking_setting(project.with_tracking_uri("http://127.0.0.1:1")) == "MLFLOW_TRACKING_URI"
    named = project.with_tracking_uri("http://127.0.0.1:2")
    assert checks.tracking_setting(named) == "the tracking_uri of the Dagster mlflow resource"


def test_an_unreachable_tracking_server_stops_a_step_and_the_cli_in_one_line(project_root, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    line = f"MLflow tracking server at {url} is unreachable (connection refused): check MLFLOW_TRACKING_URI"
    with pytest.raises(ServiceUnavailable) as raised:
        steps.promote_step(Project.load(project_root))
    assert str(raised.value) == line
    assert cli.main(["promote"]) == 2
    assert capsys.readouterr().err.strip() == f"mumic promote: error: {line}"
    assert not (project_root / "mlflow.db").exists() and not (project_root / "mlruns").exists()


def test_a_store_lost_during_a_step_becomes_one_line_and_other_failures_pass_unchanged(project_root, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"
    project = Project.load(project_root)
    lost = pytest.raises(ServiceUnavailable, match="It stopped answering during the step; rerun")
    with lost as raised, checks.tracking_store_guard(project, url, after="rerun"):
        raise MlflowException(f"API request to {url}/api/2.0/mlflow/runs/log-batch failed")
    assert isinstance(raised.value.__cause__, MlflowException)
    local = f"sqlite:///{project_root / 'x.db'}"
    with pytest.raises(ValueError, match="not the store"), checks.tracking_store_guard(project, local, after="rerun"):
        raise ValueError("not the store")


def test_dagster_postgres_settings_come_from_deploy_dagster_yaml_and_its_variables(tmp_path, monkeypatch):
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    for name, value in DAGSTER_PG.items():
        monkeypatch.setenv(name, value)
    target = checks.dagster_postgres_target(tmp_path)
    assert (target.host, target.port, target.user, target.password, target.database) == (
        "127.0.0.1",
        5432,
        "dagster",
        "secret",
        "dagster",
    )
    assert target.setting("host", "port") == "DAGSTER_PG_HOST and DAGSTER_PG_PORT"
    assert target.setting("user", "password") == "DAGSTER_PG_USER and DAGSTER_PG_PASSWORD"
    monkeypatch.delenv("DAGSTER_PG_PASSWORD")
    assert checks.dagster_storage_problem(tmp_path) == (
        f"Dagster's PostgreSQL storage: DAGSTER_PG_PASSWORD is not set ({tmp_path / 'dagster.yaml'} reads it)"
    )
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert checks.dagster_storage_problem(tmp_path) is None


def test_the_launcher_refuses_an_unreachable_instance_storage_in_one_line(tmp_path, monkeypatch, capsys):
    shutil.copy(REPO / "deploy" / "dagster.yaml", tmp_path / "dagster.yaml")
    port = str(free_port())
    for name, value in {**DAGSTER_PG, "DAGSTER_PG_PORT": port, "DAGSTER_HOME": str(tmp_path)}.items():
        monkeypatch.setenv(name, value)
    assert launch.main(["retrain_job"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: Dagster's PostgreSQL storage at 127.0.0.1:{port} is unreachable (connection refused): check "
        "DAGSTER_PG_HOST and DAGSTER_PG_PORT"
    )


def test_an_s3_remote_names_the_endpoint_setting_dvc_uses(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    problem = checks.dvc_remote_problem("shared", {"url": "s3://mumic-dvc"})
    assert problem == (
        f"DVC remote 'shared' (s3://mumic-dvc) at {dead} is unreachable (connection refused): check AWS_ENDPOINT_URL"
    )
    other = f"http://127.0.0.1:{free_port()}"
    problem = checks.dvc_remote_problem("shared", {"url": "s3://mumic-dvc", "endpointurl": other})
    assert problem.endswith(
        "is unreachable (connection refused): check the remote's endpointurl "
        "(dvc remote modify --local shared endpointurl)"
    )
    assert f"at {other} " in problem


def test_the_shared_s3_remote_is_checked_only_where_s3_is_set_up(tmp_path, monkeypatch):
    """A fresh clone on the embedded default has the `shared` remote in .dvc/config and no S3 settings at all."""
    subprocess.run(["git", "init", "--quiet"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", tmp_path / ".dvc" / "config")
    for name in (*checks.S3_ENVIRONMENT, "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert checks.dvc_s3_remotes(tmp_path) == {}

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert list(checks.dvc_s3_remotes(tmp_path)) == ["shared"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    (tmp_path / ".dvc" / "config.local").write_text(f"['remote \"shared\"']\n    endpointurl = {dead}\n")
    assert list(checks.dvc_s3_remotes(tmp_path)) == ["shared"]


def test_the_deployment_files_name_the_same_settings():
    lines = (REPO / "deploy" / "env.example").read_text().splitlines()
    names = {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}
    assert names == {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD",
        "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD",
        "MLFLOW_BACKEND_STORE_URI",
        "MLFLOW_ARTIFACTS_DESTINATION",
        "MLFLOW_S3_ENDPOINT_URL",
        *DAGSTER_PG,
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        checks.S3_ENDPOINT_ENV,
    }
    # Each setting has a comment right above it.
    for index, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[index - 1].startswith("#") or lines[index - 2].startswith("#"), line
    config = yaml.safe_load((REPO / "deploy" / "dagster.yaml").read_text())
    fields = config["storage"]["postgres"]["postgres_db"]
    assert {value["env"] for value in fields.values() if isinstance(value, dict)} == set(DAGSTER_PG)
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert limits == [{"key": GPU_TAG, "value": TRAIN, "limit": 1}]
    assert config["run_retries"] == {"enabled": True, "max_retries": 1} and config["telemetry"] == {"enabled": False}
    assert defs.resolve_job_def("retrain_job").tags[GPU_TAG] == TRAIN
    dvc_config = (REPO / ".dvc" / "config").read_text()
    assert "['remote \"shared\"']\n    url = s3://mumic-dvc" in dvc_config and "remote = local" in dvc_config
