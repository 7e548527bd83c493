"""Training on two nodes: two torchrun agents meet through a c10d rendezvous, as on two machines, here on one host.

Each agent runs one process (gloo on CPU), and the rendezvous hands out the node ranks, so both processes have
LOCAL_RANK 0 and only their global RANK tells them apart. The same seed on the same world size must give what the
two-process run on one node gives, with only global rank 0 writing the model, the checkpoints and the MLflow run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from repo_copy import free_port
from safetensors.torch import load_file

from mumic_ml.io import atomic_write_json, read_json

pytestmark = pytest.mark.slow

EPOCHS = 2
TIMEOUT_S = 300


def _train_command(world, nnodes: int, nproc: int, endpoint: str, rdzv_id: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nnodes),
        "--nproc_per_node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        endpoint,
        "--rdzv-id",
        rdzv_id,
        "-m",
        "mumic_ml",
        "train",
        "--no-progress",
        "--splits",
        str(world.splits),
        "--images-root",
        str(world.ingested),
        "--taxonomy",
        str(world.taxonomy),
        "--cache-dir",
        str(world.cache),
        "--run-dir",
        str(out / "run"),
        "--model-dir",
        str(out / "model"),
        "--set",
        "model.pretrained=null",
        "--set",
        "train.batch_size=8",
        "--set",
        f"train.epochs={EPOCHS}",
        "--set",
        "train.early_stopping_patience=null",
        "--set",
        "train.device=cpu",
        *extra,
    ]


def _launch(world, node_dirs: list[Path], nproc: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """One torchrun agent per folder in `node_dirs`, all in one rendezvous; each node writes under its own folder
    (two folders: two machines that share no disk; the same folder twice: a shared file system)."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:12]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for out in node_dirs:
        out.mkdir(parents=True, exist_ok=True)
        command = _train_command(world, len(node_dirs), nproc, endpoint, rdzv_id, out, *extra)
        # Each agent in its own process group, so a failed test never leaves a worker behind.
        procs.append(
            subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
            )
        )
    done = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, output, ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    return done


def _succeeded(done: list[subprocess.CompletedProcess]) -> None:
    for node, proc in enumerate(done):
        assert proc.returncode == 0, f"node agent {node} exited with {proc.returncode}:\n{proc.stdout[-8000:]}"


def _history(model_dir: Path) -> list[dict]:
    return read_json(model_dir / "model.json")["metadata"]["history"]


def _assert_same_training(a: Path, b: Path) -> None:
    """Same per-epoch validation metrics and training loss, and bitwise the same exported weights."""
    keys = ("epoch", "global_step", "train_loss", "val_gap_at_k", "val_map", "temperature")
    assert [{k: e[k] for k in keys} for e in _history(a)] == [{k: e[k] for k in keys} for e in _history(b)]
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def single_node(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_node")
    _succeeded(_launch(tiny_world, [out], nproc=2))
    return out


@pytest.fixture(scope="module")
def two_nodes(tiny_world, tmp_path_factory) -> list[Path]:
    """Two nodes of one process each that share no disk: each gets its own run and model folder."""
    root = tmp_path_factory.mktemp("two_nodes")
    nodes = [root / "node-a", root / "node-b"]
    _succeeded(_launch(tiny_world, nodes, nproc=1))
    return nodes


def test_two_nodes_train_like_two_processes_on_one_node(single_node, two_nodes):
    writers = [node for node in two_nodes if (node / "model").exists()]
    assert len(writers) == 1, "exactly one node (the one holding global rank 0) exports the model"
    metadata = read_json(writers[0] / "model" / "model.json")["metadata"]
    assert metadata["world_size"] == 2 and len(metadata["history"]) == EPOCHS
    _assert_same_training(single_node / "model", writers[0] / "model")


def test_only_global_rank_zero_writes_checkpoints_and_results(two_nodes):
    """Both nodes' processes have LOCAL_RANK 0: local rank 0 writing would put a second copy on the other node."""
    writer = next(node for node in two_nodes if (node / "model").exists())
    other = next(node for node in two_nodes if node != writer)
    assert (writer / "run" / "latest.json").is_file() and (writer / "run" / "result.json").is_file()
    assert [p.name for p in (writer / "run" / "checkpoints").iterdir()]
    # The other node makes its run folder and nothing in it.
    assert sorted(p.name for p in other.rglob("*")) == ["run"]


def test_two_nodes_resume_from_a_shared_run_folder_to_the_same_model(tiny_world, two_nodes, tmp_path):
    """A job killed after its first epoch, restarted on two nodes that share the run folder, replays the second
    epoch exactly."""
    writer = next(node for node in two_nodes if (node / "model").exists())
    shared = tmp_path / "shared"
    shutil.copytree(writer / "run", shared / "run")
    checkpoints = sorted((shared / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == EPOCHS  # one per epoch, train.keep_checkpoints (2) kept
    shutil.rmtree(checkpoints[-1])
    step = int(checkpoints[-2].name.removeprefix("step-"))
    atomic_write_json(shared / "run" / "latest.json", {"checkpoint": checkpoints[-2].name, "global_step": step})
    _succeeded(_launch(tiny_world, [shared, shared], 1, "--resume"))
    assert read_json(shared / "run" / "result.json")["epoch"] == EPOCHS
    _assert_same_training(writer / "model", shared / "model")


def test_resume_on_nodes_that_see_different_checkpoints_fails_on_every_node_instead_of_hanging(tiny_world, two_nodes):
    """Only rank 0's node holds the checkpoints: a rank that started afresh would take other steps than rank 0 and
    wait forever in a collective. Every node stops at once and names the cause."""
    done = _launch(tiny_world, two_nodes, 1, "--resume")
    assert all(proc.returncode != 0 for proc in done)
    assert all("storage every node shares" in proc.stdout for proc in done), done[0].stdout[-3000:]
