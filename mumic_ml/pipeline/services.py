"""Preflight checks of the shared services, so a misconfigured one stops a run in one line before any training.

The pipeline talks to whatever store its configuration names; these checks do the same, so no step knows which
kind of store it has. Each check asks the service for something cheap with the credentials the real client would
use, without retries, and turns a refusal into one line naming the service, the address, the cause and the setting
to fix, e.g. `MLflow tracking server at http://127.0.0.1:5999 is unreachable (connection refused): check
MLFLOW_TRACKING_URI`. A store that is a local file (the embedded SQLite default) has nothing to check.

- MLflow: a tracking server (http, https) must answer an experiment search (its backend store) and an artifact
  listing (the store it proxies); a PostgreSQL tracking URI must accept the connection.
- PostgreSQL: any server, given which setting holds each connection field; Dagster's instance names its own in
  its dagster.yaml (`{env: DAGSTER_PG_HOST}`), which is read as YAML, so this module imports no Dagster.
- DVC: an S3 remote must list its bucket with the credentials and endpoint DVC would use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from mumic_ml.pipeline import ServiceUnavailable
from mumic_ml.pipeline.tracking import TRACKING_URI_ENV, public_uri, tracking_location
from mumic_ml.project import Project

TIMEOUT_S = 5.0
HTTP_SCHEMES = ("http://", "https://")
POSTGRES_SCHEMES = ("postgresql", "postgres")
SERVER_ARTIFACT_SETTINGS = (
    "MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
)
S3_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
S3_ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# Settings that say this machine talks to an S3 store: in the environment, or in a DVC remote's own settings.
S3_ENVIRONMENT = (S3_ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_PROFILE")
S3_REMOTE_SETTINGS = ("endpointurl", "access_key_id", "profile", "credentialpath")
# What an S3 server answers when the key is unknown, the secret wrong or the key not allowed.
S3_REFUSALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
)


def cause_of(exc: BaseException) -> str:
    """Why a connection failed, in a few words, from the innermost error that says (refused, unknown host, ...)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return "host name not found"
        if isinstance(error, TimeoutError | socket.timeout):
            return f"no answer within {TIMEOUT_S:.0f} s"
        if isinstance(error, ssl.SSLError):
            return f"TLS error: {error.reason or error}"
        pending += [error.__cause__, error.__context__, getattr(error, "reason", None)]
        pending += [arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)]
    text = " ".join(str(exc).split())
    lowered = text.lower()
    for marker, phrase in (
        ("connection refused", "connection refused"),
        ("could not translate host name", "host name not found"),
        ("failed to resolve host", "host name not found"),
        ("name or service not known", "host name not found"),
        ("timeout", f"no answer within {TIMEOUT_S:.0f} s"),
        ("timed out", f"no answer within {TIMEOUT_S:.0f} s"),
    ):
        if marker in lowered:
            return phrase
    return text[:200] or type(exc).__name__


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresTarget:
    """Where to connect, and which setting holds each field (what a message tells the user to fix)."""

    service: str
    host: str
    port: int
    user: str
    password: str
    database: str
    settings: Mapping[str, str]  # field (host, port, user, password, database) -> the setting that holds it

    def setting(self, *fields: str) -> str:
        names = list(dict.fromkeys(self.settings[field] for field in fields))
        return " and ".join(names)


def postgres_problem(target: PostgresTarget) -> str | None:
    """None when PostgreSQL accepts the connection, else the one line that says why not and what to fix."""
    import psycopg

    where = f"{target.service} at {target.host}:{target.port}"
    try:
        psycopg.connect(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password,
            dbname=target.database,
            connect_timeout=int(TIMEOUT_S),
        ).close()
    except psycopg.OperationalError as exc:
        text = str(exc)
        if "password authentication failed" in text or "no password supplied" in text:
            return f"{where} refused user {target.user!r} (password authentication failed): check " + target.setting(
                "user", "password"
            )
        if f'database "{target.database}" does not exist' in text:
            return f"{where} has no database {target.database!r}: check {target.setting('database')}"
        if "role" in text and "does not exist" in text:
            return f"{where} has no user {target.user!r}: check {target.setting('user')}"
        return f"{where} is unreachable ({cause_of(exc)}): check {target.setting('host', 'port')}"
    return None


def postgres_target_from_url(service: str, url: str, setting: str) -> PostgresTarget:
    """A SQLAlchemy-style PostgreSQL URL (`postgresql+driver://user:password@host:port/db`), every field in
    `setting`."""
    parts = urlsplit(url)
    return PostgresTarget(
        service=service,
        host=parts.hostname or "localhost",
        port=parts.port or 5432,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/"),
        settings=dict.fromkeys(("host", "port", "user", "password", "database"), setting),
    )


# --- MLflow -------------------------------------------------------------------------------------------------------


def tracking_setting(project: Project) -> str:
    """The setting that chose the project's tracking store: what to fix when it does not answer."""
    from_env = os.environ.get(TRACKING_URI_ENV)
    if project.tracking_uri and project.tracking_uri != from_env:
        return "the tracking_uri of the Dagster mlflow resource"
    if from_env:
        return TRACKING_URI_ENV
    return "mlflow.tracking_uri in params.yaml"


def _server_message(response) -> str:
    try:
        message = response.json().get("message", "")
    except ValueError:
        message = response.text
    message = " ".join(str(message).split())[:200]
    return f"HTTP {response.status_code}" + (f": {message}" if message else "")


def tracking_server_problem(uri: str, setting: str = TRACKING_URI_ENV) -> str | None:
    """None when the MLflow server at `uri` serves its backend store and its artifact store to this client (with
    the credentials MLflow's client would send), else the one line that says why not."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    where = f"MLflow tracking server at {public_uri(uri)}"
    creds = get_default_host_creds(uri)

    def get(endpoint: str, params: dict[str, str]):
        return http_request(
            creds, endpoint, "GET", max_retries=0, timeout=TIMEOUT_S, raise_on_status=False, params=params
        )

    try:
        response = get("/api/2.0/mlflow/experiments/search", {"max_results": "1"})
    except MlflowException as exc:
        return f"{where} is unreachable ({cause_of(exc)}): check {setting}"
    if response.status_code in (401, 403):
        return (
            f"{where} refused the credentials (HTTP {response.status_code}): check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if response.status_code == 404:
        return f"{where} is not an MLflow tracking server (HTTP 404 for its REST API): check {setting}"
    if response.status_code != 200:
        return f"{where} cannot use its backend store ({_server_message(response)}): check the server's " + (
            "MLFLOW_BACKEND_STORE_URI"
        )
    try:
        response = get("/api/2.0/mlflow-artifacts/artifacts", {"path": ""})
    except MlflowException as exc:
        return f"{where} is unreachable ({cause_of(exc)}): check {setting}"
    # 503: the server does not proxy artifacts (--no-serve-artifacts); clients then write to the store directly.
    if response.status_code not in (200, 503):
        return f"{where} cannot use its artifact store ({_server_message(response)}): check the server's " + (
            SERVER_ARTIFACT_SETTINGS
        )
    return None


def tracking_store_problem(uri: str, setting: str) -> str | None:
    """None when the MLflow store at `uri` can be used; a local file store has nothing to check."""
    if uri.startswith(HTTP_SCHEMES):
        return tracking_server_problem(uri, setting)
    if urlsplit(uri).scheme.partition("+")[0] in POSTGRES_SCHEMES:
        return postgres_problem(postgres_target_from_url("MLflow's PostgreSQL store", uri, setting))
    return None


def reachable_tracking_location(project: Project) -> tuple[str, Path | None]:
    """The project's tracking location (`tracking.tracking_location`) once its store answers; raises
    ServiceUnavailable otherwise, so a step fails before it trains or logs anything, never on another store."""
    uri, artifacts = tracking_location(project)
    problem = tracking_store_problem(uri, tracking_setting(project))
    if problem is not None:
        raise ServiceUnavailable(problem)
    return uri, artifacts


@contextlib.contextmanager
def tracking_store_guard(project: Project, uri: str, after: str) -> Iterator[None]:
    """Re-raise a failure inside the block as one line when the store has stopped answering since the step began
    (`after`: what the user may do about it), not as the client's retry chatter; other failures pass unchanged."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ServiceUnavailable):
            raise
        problem = tracking_store_problem(uri, tracking_setting(project))
        if problem is None:
            raise
        raise ServiceUnavailable(f"{problem}. It stopped answering during the step; {after}") from exc


# --- Dagster ------------------------------------------------------------------------------------------------------

DAGSTER_PG_FIELDS = {
    "hostname": "host",
    "port": "port",
    "username": "user",
    "password": "password",
    "db_name": "database",
}
DAGSTER_STORAGES = ("run_storage", "event_log_storage", "schedule_storage")


def dagster_postgres_target(dagster_home: str | os.PathLike) -> PostgresTarget | None:
    """The PostgreSQL server of the instance in `dagster_home` (its dagster.yaml: `storage: postgres:` or a
    PostgreSQL run, event-log or schedule storage), each field resolved as Dagster resolves it (`{env: NAME}` from the
    environment); None for an instance on SQLite. Read from the YAML, so it needs no Dagster import."""
    import yaml

    config_file = Path(dagster_home) / "dagster.yaml"
    config = (yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None) or {}
    storage = (config.get("storage") or {}).get("postgres")
    if storage is None:
        storage = next(
            (
                section.get("config")
                for section in (config.get(key) or {} for key in DAGSTER_STORAGES)
                if "postgres" in str(section.get("module", "")).lower()
            ),
            None,
        )
    if not storage:
        return None

    def resolve(value: Any, where: str) -> tuple[str, str]:
        if isinstance(value, Mapping) and "env" in value:
            name = str(value["env"])
            if name not in os.environ:
                raise ServiceUnavailable(f"Dagster's PostgreSQL storage: {name} is not set ({config_file} reads it)")
            return os.environ[name], name
        return str(value), f"{where} in {config_file}"

    if "postgres_url" in storage:
        url, setting = resolve(storage["postgres_url"], "postgres_url")
        return postgres_target_from_url("Dagster's PostgreSQL storage", url, setting)
    fields = storage.get("postgres_db") or {}
    values, settings = {"port": "5432", "password": ""}, {}
    for key, field in DAGSTER_PG_FIELDS.items():
        settings[field] = f"postgres_db.{key} in {config_file}"
        if key in fields:
            values[field], settings[field] = resolve(fields[key], f"postgres_db.{key}")
    return PostgresTarget(
        service="Dagster's PostgreSQL storage",
        host=values.get("host", "localhost"),
        port=int(values["port"]),
        user=values.get("user", ""),
        password=values["password"],
        database=values.get("database", ""),
        settings=settings,
    )


def dagster_storage_problem(dagster_home: str | os.PathLike) -> str | None:
    """None when the instance's storage is SQLite or its PostgreSQL accepts the connection, else the one line."""
    try:
        target = dagster_postgres_target(dagster_home)
    except ServiceUnavailable as exc:
        return str(exc)
    return None if target is None else postgres_problem(target)


# --- DVC ----------------------------------------------------------------------------------------------------------


def dvc_s3_remotes(root: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The S3 remotes of the DVC repository at `root` that this machine is set up to use, with their merged
    settings (config, config.local). A remote counts when it is DVC's default or when an endpoint or credentials
    for it are set, in its settings or the environment: a fresh clone on the embedded default has the `shared`
    remote in its config and no S3 at all, and must not fail a check for a remote it never uses."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remotes = {name: dict(section) for name, section in repo.config["remote"].items()}
        default = repo.config["core"].get("remote")
    s3_settings = any(os.environ.get(name) for name in S3_ENVIRONMENT)
    return {
        name: section
        for name, section in remotes.items()
        if section.get("url", "").startswith("s3://")
        and (name == default or s3_settings or any(section.get(key) for key in S3_REMOTE_SETTINGS))
    }


def dvc_remote_problem(remote: str, section: Mapping[str, str]) -> str | None:
    """None when the S3 remote `remote` (its DVC settings in `section`) can be listed with the endpoint and
    credentials DVC would use: the remote's settings, then the environment."""
    return _s3_problem(remote, section["url"], section)


def _s3_problem(remote: str, url: str, section: Mapping[str, str]) -> str | None:
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    session = boto3.Session(profile_name=section.get("profile"))
    endpoint = section.get("endpointurl")
    endpoint_setting = (
        f"the remote's endpointurl (dvc remote modify --local {remote} endpointurl)" if endpoint else S3_ENDPOINT_ENV
    )
    client = session.client(
        "s3",
        endpoint_url=endpoint,
        region_name=section.get("region"),
        aws_access_key_id=section.get("access_key_id"),
        aws_secret_access_key=section.get("secret_access_key"),
        config=botocore.config.Config(
            connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S, retries={"max_attempts": 1, "mode": "standard"}
        ),
    )
    where = f"DVC remote {remote!r} ({url}) at {client.meta.endpoint_url}"
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.NoCredentialsError:
        return f"{where} has no credentials: set {S3_CREDENTIALS}"
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in S3_REFUSALS:
            return f"{where} refused the credentials ({code}): check {S3_CREDENTIALS}"
        if code == "NoSuchBucket":
            return f"{where} has no bucket {bucket!r}: check the remote's url (dvc remote modify {remote} url)"
        return f"{where} answered {code or 'an error'}: check {endpoint_setting}"
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
        return f"{where} is unreachable ({cause_of(exc)}): check {endpoint_setting}"
    return None


# --- all at once ---------------------------------------------------------------------------------------------------


def check_services(project: Project, dagster_home: str | os.PathLike | None) -> list[tuple[str, str | None]]:
    """Each configured service with None when it answers, else the one line that says what to fix: the project's
    MLflow store, the Dagster instance's PostgreSQL (when `dagster_home` names one on PostgreSQL), and every S3
    remote of the project's DVC repository that this machine is set up to use (`dvc_s3_remotes`)."""
    uri, _ = tracking_location(project)
    results = [(f"MLflow tracking store {public_uri(uri)}", tracking_store_problem(uri, tracking_setting(project)))]
    if dagster_home:
        try:
            target = dagster_postgres_target(dagster_home)
        except ServiceUnavailable as exc:
            results.append(("Dagster's PostgreSQL storage", str(exc)))
        else:
            if target is not None:
                results.append((f"{target.service} at {target.host}:{target.port}", postgres_problem(target)))
    if (project.root / ".dvc").is_dir():
        for name, section in dvc_s3_remotes(project.root).items():
            results.append((f"DVC remote {name!r} ({section['url']})", dvc_remote_problem(name, section)))
    return results
