"""The deployment files agree with each other and with the code: deploy/env.example (the one list of settings),
deploy/docker-compose.yaml (+ its GPU override), deploy/helm/values.yaml, deploy/dagster.yaml, deploy/workspace.yaml,
deploy/Dockerfile and .dvc/config name the same services, ports, variables, queue limit and command.

Docker and Kubernetes cannot run here, so these files are read, not started; the instance file is checked by Dagster's
own config schema, and the two helper scripts the containers run are run against stand-ins.
"""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
import shlex
import stat
import subprocess
from urllib.parse import urlparse

import pytest
import yaml
from repo_copy import REPO

DEPLOY = REPO / "deploy"
# The contract's ports, by docker compose service.
PORTS = {"postgres": 5432, "s3": 9000, "mlflow": 5000, "webserver": 3000, "code-server": 4000}
DAGSTER_SERVICES = ("code-server", "webserver", "daemon")
INSTANCE = "/opt/dagster/home/dagster.yaml"
CODE_SERVER = ["dagster", "code-server", "start", "-m", "mumic_dagster.definitions", "-h", "0.0.0.0", "-p", "4000"]
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / "env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def compose(name: str = "docker-compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def helm() -> dict:
    return yaml.safe_load((DEPLOY / "helm" / "values.yaml").read_text())


def instance() -> dict:
    return yaml.safe_load((DEPLOY / "dagster.yaml").read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip().removesuffix("\\") + " "
        if not raw.rstrip().endswith("\\"):
            instruction, _, rest = current.strip().partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def dockerfile_json(instruction: str) -> list[str]:
    (arguments,) = [rest for name, rest in dockerfile() if name == instruction]
    return yaml.safe_load(arguments)


def interpolated(node) -> list[tuple[str, str]]:
    """Every ${NAME...} compose fills in from deploy/.env: (name, modifier), `$${...}` (a literal $) left out."""
    found = []
    if isinstance(node, dict):
        for value in node.values():
            found += interpolated(value)
    elif isinstance(node, list):
        for value in node:
            found += interpolated(value)
    elif isinstance(node, str):
        found += INTERPOLATION.findall(node)
    return found


def options(command: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """A command as its leading words and its options (`-x value`, or a bare `--flag` as None), so option order
    does not matter."""
    first = next(i for i, word in enumerate(command) if word.startswith("-"))
    parsed: dict[str, str | None] = {}
    for word, after in zip(command[first:], [*command[first + 1 :], "-"]):
        if word.startswith("-"):
            parsed[word] = None if after.startswith("-") else after
    return list(command[:first]), parsed


def dvc_remotes() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read_string((REPO / ".dvc" / "config").read_text())
    remotes = {}
    for section in parser.sections():
        match = re.fullmatch(r"""['"]?remote "([^"]+)"['"]?""", section)
        if match:
            remotes[match.group(1)] = parser[section]["url"]
    return remotes


# --- variables ------------------------------------------------------------------------------------------------------


def test_every_variable_of_env_example_is_used_by_compose():
    used = {name for name, _ in interpolated(compose())}
    assert sorted(set(env_example()) - used) == []


def test_compose_and_helm_pass_only_variables_of_env_example():
    names = set(env_example())
    assert sorted({name for name, _ in interpolated(compose())} - names) == []
    assert sorted({name for name, _ in interpolated(compose("docker-compose.gpu.yaml"))} - names) == []
    values = helm()
    for deployment in values["dagster-user-deployments"]["deployments"]:
        assert sorted(set(deployment.get("env") or {}) - names) == []
    assert sorted(set(values["runLauncher"]["config"]["k8sRunLauncher"].get("envVars") or []) - names) == []


def test_compose_stops_with_the_name_of_an_unset_variable():
    assert [name for name, modifier in interpolated(compose()) if not modifier.startswith(":?")] == []


def test_our_containers_see_each_variable_under_its_own_name():
    """Only the third-party images (postgres, MinIO) take a setting under their own name."""
    for name, service in compose()["services"].items():
        if service.get("image", "").startswith("mumic"):
            for key, value in (service.get("environment") or {}).items():
                found = INTERPOLATION.findall(str(value))
                assert not found or found[0][0] == key, (name, key, value)


def test_the_dagster_processes_get_every_variable_the_instance_reads():
    wanted = set(re.findall(r"env:\s*([A-Z0-9_]+)", (DEPLOY / "dagster.yaml").read_text()))
    assert wanted == {f"DAGSTER_PG_{part}" for part in ("HOST", "PORT", "USER", "PASSWORD", "DB")}
    services = compose()["services"]
    for name in DAGSTER_SERVICES:
        assert wanted <= set(services[name]["environment"]), name


def test_no_password_or_key_is_written_into_the_deployment_files():
    secrets = {value for name, value in env_example().items() if "PASSWORD" in name or "SECRET" in name}
    assert secrets, "env.example names its secrets"
    for path in (DEPLOY / "docker-compose.yaml", DEPLOY / "docker-compose.gpu.yaml", DEPLOY / "helm" / "values.yaml"):
        text = path.read_text()
        assert not [secret for secret in secrets if secret in text], path
    values = helm()
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()


# --- services and ports ---------------------------------------------------------------------------------------------


def test_the_hosts_and_ports_of_env_example_are_the_compose_services():
    env, services = env_example(), compose()["services"]
    urls = {
        "mlflow": env["MLFLOW_TRACKING_URI"],
        "postgres": env["MLFLOW_BACKEND_STORE_URI"],
        "s3": env["MLFLOW_S3_ENDPOINT_URL"],
    }
    for service, url in urls.items():
        parsed = urlparse(url)
        assert (parsed.hostname, parsed.port) == (service, PORTS[service]), url
        assert service in services
    assert urlparse(env["AWS_ENDPOINT_URL"]).netloc == urlparse(env["MLFLOW_S3_ENDPOINT_URL"]).netloc
    assert (env["DAGSTER_PG_HOST"], int(env["DAGSTER_PG_PORT"])) == ("postgres", PORTS["postgres"])


def test_each_server_listens_on_its_port_and_is_published_on_loopback_only():
    services = compose()["services"]
    assert options(services["mlflow"]["command"])[1]["--port"] == str(PORTS["mlflow"])
    assert options(services["webserver"]["command"])[1]["-p"] == str(PORTS["webserver"])
    assert options(services["code-server"]["command"])[1]["-p"] == str(PORTS["code-server"])
    assert options(services["s3"]["command"])[1]["--address"] == f":{PORTS['s3']}"
    for name, service in services.items():
        for mapping in service.get("ports", []):
            host, published, target = mapping.split(":")
            assert host == "127.0.0.1" and int(published) == int(target) == PORTS[name], (name, mapping)


def test_the_workspace_points_at_the_code_server():
    (location,) = yaml.safe_load((DEPLOY / "workspace.yaml").read_text())["load_from"]
    grpc = location["grpc_server"]
    assert grpc["host"] in compose()["services"]
    assert (grpc["host"], grpc["port"]) == ("code-server", PORTS["code-server"])
    for name in ("webserver", "daemon"):
        service = compose()["services"][name]
        workspace = options(service["command"])[1]["-w"]
        assert f"./workspace.yaml:{workspace}:ro" in service["volumes"], name


def test_the_dagster_instance_in_compose_is_deploy_dagster_yaml():
    home = re.search(r"DAGSTER_HOME=(\S+)", " ".join(rest for name, rest in dockerfile() if name == "ENV")).group(1)
    assert f"{home}/dagster.yaml" == INSTANCE
    services = compose()["services"]
    for name in DAGSTER_SERVICES:
        volumes = services[name]["volumes"]
        assert f"./dagster.yaml:{INSTANCE}:ro" in volumes, name
        # One compute-log folder for the run workers (in the code server) and the webserver that shows them.
        assert f"dagster-storage:{home}/storage" in volumes, name
    assert services["code-server"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


def test_one_image_runs_every_project_service_and_the_gpu_override_reserves_a_gpu_for_training():
    services = compose()["services"]
    ours = {name for name, service in services.items() if "build" in service}
    assert ours == {"create-buckets", "mlflow", *DAGSTER_SERVICES}
    assert {services[name]["build"]["dockerfile"] for name in ours} == {"deploy/Dockerfile"}
    gpu = compose("docker-compose.gpu.yaml")["services"]
    assert set(gpu) == {"code-server"}
    (device,) = gpu["code-server"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "cpu" not in gpu["code-server"]["build"]["args"]["TORCH_INDEX_URL"]


def test_the_mlflow_server_is_started_as_the_clients_expect():
    service = compose()["services"]["mlflow"]
    words, flags = options(service["command"])
    assert words == ["mlflow", "server"] and flags["--host"] == "0.0.0.0"
    assert "--serve-artifacts" in flags and flags["--serve-artifacts"] is None
    # It reads its stores from the environment (the click options' envvars) and answers the clients' Host header.
    assert {"MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"} <= set(service["environment"])
    allowed = service["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert urlparse(env_example()["MLFLOW_TRACKING_URI"]).netloc in allowed


# --- the run queue and the instance ---------------------------------------------------------------------------------


def test_the_run_queue_limits_exactly_the_tag_retrain_job_carries():
    from mumic_dagster.jobs import promote_job, retrain_job

    (limit,) = instance()["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert retrain_job.tags[limit["key"]] == limit["value"] and limit["limit"] == 1
    assert limit["key"] not in promote_job.tags
    queued = helm()["dagsterDaemon"]["runCoordinator"]
    assert queued["type"] == "QueuedRunCoordinator" and queued["enabled"] is True
    assert queued["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"] == [limit]


def test_helm_retries_runs_as_the_instance_does():
    retries = helm()["dagsterDaemon"]["runRetries"]
    expected = instance()["run_retries"]
    assert (retries["enabled"], retries["maxRetries"]) == (expected["enabled"], expected["max_retries"])


@pytest.fixture
def dummy_pg_env(monkeypatch):
    for name, value in env_example().items():
        if name.startswith("DAGSTER_PG_"):
            monkeypatch.setenv(name, value)


def test_deploy_dagster_yaml_passes_dagsters_own_instance_schema(dummy_pg_env):
    from dagster import QueuedRunCoordinator
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import ConfigurableClassData

    config, custom_class = dagster_instance_config(str(DEPLOY), "dagster.yaml")
    assert custom_class is None
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert config["run_retries"]["enabled"] is True
    coordinator = config["run_coordinator"]
    data = ConfigurableClassData(coordinator["module"], coordinator["class"], yaml.safe_dump(coordinator["config"]))
    assert isinstance(data.rehydrate(QueuedRunCoordinator), QueuedRunCoordinator)


def test_helms_queue_limits_pass_the_run_coordinators_schema():
    """The chart writes tagConcurrencyLimits into its instance as they are (max_concurrent_runs -1 when unset)."""
    from dagster import QueuedRunCoordinator
    from dagster._serdes import ConfigurableClassData

    limits = helm()["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"]
    config = {"max_concurrent_runs": -1, "tag_concurrency_limits": limits}
    data = ConfigurableClassData("dagster", "QueuedRunCoordinator", yaml.safe_dump(config))
    assert data.rehydrate(QueuedRunCoordinator).get_run_queue_config().tag_concurrency_limits == limits


# --- helm -----------------------------------------------------------------------------------------------------------


def test_helm_uses_the_same_postgresql_settings_and_password_variable():
    env, pg = env_example(), helm()["postgresql"]
    assert pg["enabled"] is False
    assert (pg["postgresqlHost"], pg["postgresqlUsername"], pg["postgresqlDatabase"], pg["service"]["port"]) == (
        env["DAGSTER_PG_HOST"],
        env["DAGSTER_PG_USER"],
        env["DAGSTER_PG_DB"],
        int(env["DAGSTER_PG_PORT"]),
    )
    # The chart's instance reads the password from DAGSTER_PG_PASSWORD, as deploy/dagster.yaml does.
    assert instance()["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}
    assert helm()["global"]["postgresqlSecretName"]


def test_helm_starts_the_code_server_with_the_images_command():
    (deployment,) = helm()["dagster-user-deployments"]["deployments"]
    # The chart's command for codeServerArgs: dagster code-server start -h 0.0.0.0 -p <port> <codeServerArgs...>
    chart = ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", str(deployment["port"])]
    chart += deployment["codeServerArgs"]
    assert options(chart) == options(dockerfile_json("CMD")) == options(CODE_SERVER)
    assert options(compose()["services"]["code-server"]["command"]) == options(CODE_SERVER)
    assert deployment["port"] == PORTS["code-server"]


def test_helm_passes_the_same_secret_to_the_code_location_and_its_runs():
    values = helm()
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    secrets = [{"name": "mumic-services"}]
    assert deployment["envSecrets"] == launcher["config"]["k8sRunLauncher"]["envSecrets"] == secrets
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    (mount,) = deployment["volumeMounts"]
    assert mount["mountPath"] == dockerfile_workdir()


# --- the image ------------------------------------------------------------------------------------------------------


def dockerfile_workdir() -> str:
    return [rest for name, rest in dockerfile() if name == "WORKDIR"][-1]


def test_the_image_installs_the_locked_pipeline_and_services_and_runs_the_code_server_as_a_user():
    instructions = dockerfile()
    base = next(rest for name, rest in instructions if name == "FROM")
    assert re.fullmatch(r"python:3\.1[1-3]-slim", base)
    runs = " ".join(rest for name, rest in instructions if name == "RUN")
    assert re.search(r"pip install .*-c constraints\.txt \"\.\[pipeline,services\]\"", runs)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in [f"{n} {r}" for n, r in instructions]
    assert '--index-url "$TORCH_INDEX_URL"' in runs
    user = [rest for name, rest in instructions if name == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert dockerfile_json("CMD") == CODE_SERVER
    assert ("EXPOSE", str(PORTS["code-server"])) in instructions
    assert dockerfile_workdir() in [v.split(":")[1] for v in compose()["services"]["code-server"]["volumes"]]


def test_everything_the_image_copies_exists_and_reaches_the_builder():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for name, rest in dockerfile():
        if name == "COPY":
            sources = [word for word in shlex.split(rest) if not word.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is left out of the build context"
    assert os.stat(DEPLOY / "entrypoint.sh").st_mode & stat.S_IXUSR


def test_the_entrypoint_links_the_images_params_into_the_project_folder(tmp_path):
    done = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh"), "sh", "-c", "readlink params.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    # The Dockerfile copies params.yaml into the WORKDIR it installs from.
    install_dir = [rest for name, rest in dockerfile() if name == "WORKDIR"][0]
    assert done.stdout.strip() == f"{install_dir}/params.yaml"


# --- the scripts the containers run ---------------------------------------------------------------------------------


def test_postgres_init_creates_mlflows_user_and_database_from_its_uri(tmp_path):
    """The postgres image runs it with psql on PATH; a stand-in psql records what it was asked."""
    fake = tmp_path / "psql"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$OUT.args"\ncat > "$OUT.sql"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(tmp_path / "call"),
        "POSTGRES_USER": env_example()["DAGSTER_PG_USER"],
        "POSTGRES_DB": env_example()["DAGSTER_PG_DB"],
        "MLFLOW_BACKEND_STORE_URI": env_example()["MLFLOW_BACKEND_STORE_URI"],
    }
    subprocess.run(["sh", str(DEPLOY / "postgres-init.sh")], env=env, check=True)
    args = (tmp_path / "call.args").read_text().splitlines()
    uri = urlparse(env_example()["MLFLOW_BACKEND_STORE_URI"])
    for pair in (f"user={uri.username}", f"password={uri.password}", f"db={uri.path.lstrip('/')}"):
        assert pair in args
    sql = (tmp_path / "call.sql").read_text()
    assert 'CREATE ROLE :"user"' in sql and 'CREATE DATABASE :"db" OWNER :"user"' in sql
    mounted = compose()["services"]["postgres"]["volumes"]
    assert any(v.startswith("./postgres-init.sh:/docker-entrypoint-initdb.d/") for v in mounted)


def test_the_bucket_set_up_creates_the_mlflow_bucket_and_dvcs_shared_remote():
    remotes = dvc_remotes()
    assert "local" in remotes and remotes["shared"] == "s3://mumic-dvc"
    command = compose()["services"]["create-buckets"]["command"]
    assert command[:2] == ["python", "/opt/mumic/deploy/create_buckets.py"]
    assert command[2:] == ["${MLFLOW_ARTIFACTS_DESTINATION:?set in deploy/.env}", remotes["shared"]]
    assert env_example()["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mumic-mlflow"


def test_create_buckets_makes_versioned_buckets_and_can_run_again(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    spec = importlib.util.spec_from_file_location("create_buckets", DEPLOY / "create_buckets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with moto.mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for _ in range(2):
            names = module.ensure_buckets(client, ["s3://mumic-mlflow", "s3://mumic-dvc"])
            assert names == ["mumic-mlflow", "mumic-dvc"]
        for bucket in ("mumic-mlflow", "mumic-dvc"):
            assert client.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    with pytest.raises(ValueError, match="not an s3://bucket URL"):
        module.bucket_name("/tmp/bucket")
    assert module.main([]) == 2


def test_the_deploy_scripts_are_valid_python_and_shell():
    compile((DEPLOY / "create_buckets.py").read_text(), "create_buckets.py", "exec")
    for script in ("entrypoint.sh", "postgres-init.sh"):
        subprocess.run(["sh", "-n", str(DEPLOY / script)], check=True)
