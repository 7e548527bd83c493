"""Running the README's commands exactly as written: in a copy of the repository or in it, without the venv on PATH,
and servers started in their own process group that is always stopped.

A copy holds the files the commands read (Makefile, workspace.yaml, dvc.yaml, params.yaml with small overrides,
the code the DVC stages list) and links the repository's installed venv, so `make` finds it installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin folder: dvc, mumic, mlflow, dagster
COPIED = ("Makefile", "workspace.yaml", "dvc.yaml", "pyproject.toml", "constraints.txt", ".dvcignore")
# What the test session may have set that a user's fresh shell has not: make's own variables (the tests may run
# under `make test`), the activated venv, the session's stores, MLflow's serving flags and a port.
NOT_IN_A_FRESH_SHELL = (
    "MAKEFLAGS",
    "MAKELEVEL",
    "MFLAGS",
    "VIRTUAL_ENV",
    "DAGSTER_HOME",
    "MLFLOW_TRACKING_URI",
    "PORT",
    "MUMIC_IMAGE_ROOT",
    "_MLFLOW_IS_IN_SERVING_ENVIRONMENT",
    "__pyfunc_model_path__",
)


def copy_repository(root: Path, overrides: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # copy2 keeps modification times, so make sees the linked venv as installed for these files.
    for name in COPIED:
        shutil.copy2(REPO / name, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    # DVC stages list the code among their deps; what runs is the same code, imported from the install.
    shutil.copytree(REPO / "mumic_ml", root / "mumic_ml", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def make(*arguments: str) -> list[str]:
    """A make command line for a README target. `-o`: the linked venv counts as installed, so a test never
    reinstalls it through the copy's path (which would point the venv's scripts at a temporary folder)."""
    return ["make", "--no-print-directory", "-o", ".venv/.installed", *arguments]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh shell: nothing of the venv on PATH, HF_HUB_OFFLINE set; `extra` wins."""
    venv_bins = {(REPO / ".venv" / "bin").resolve(), BIN.resolve()}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() not in venv_bins]
    env = {name: value for name, value in os.environ.items() if name not in NOT_IN_A_FRESH_SHELL}
    return env | {"PATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", **(extra or {})}


def run_as_written(root: Path, command: list[str], env: dict[str, str] | None = None, **kwargs):
    """`command` in `root` as a fresh shell runs it (the project's own default stores apply unless `env` says)."""
    return subprocess.run(command, cwd=root, env=clean_env(env), capture_output=True, text=True, **kwargs)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever is left: make and every server it spawned. The grace is
    short because it is a test's wait: with 20 s, the browser tests' teardown took 24 s."""
    for sig, grace in ((signal.SIGTERM, 8), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            time.sleep(1)  # let the group's other members finish; the SIGKILL round reaps stragglers
    proc.wait(timeout=10)


@contextmanager
def make_target(root: Path, target: str, port: int, env: dict[str, str], log_path: Path) -> Iterator:
    """`make <target> PORT=<port>` in `root`, in its own process group, always stopped on the way out."""
    command = make(target, f"PORT={port}")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def wait_for(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 300.0) -> None:
    """Until `url` answers 200; fails with the server's log when it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(1)
    pytest.fail(f"{url} did not answer within {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(root: Path, target: str, ready_path: str, log_path: Path) -> Iterator[str]:
    """`make <target>` on a free loopback port until the server answers at `ready_path`; yields its base URL."""
    port = free_port()
    with make_target(root, target, port, clean_env(), log_path) as proc:
        wait_for(f"http://127.0.0.1:{port}{ready_path}", proc, log_path)
        yield f"http://127.0.0.1:{port}"
