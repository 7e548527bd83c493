import os

# Tests never reach a model hub: a download attempt must fail fast instead of hanging on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Each test worker gets its share of the cores, and so does every process it starts (set before torch loads):
# torch's OpenMP threads spin while they wait for each other, so two workers with a thread per core each spend
# much of their time fighting over the cores (with the cores busy, a small retrain took half the wall time and a
# third of the CPU on one thread).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@dataclass(frozen=True)
class TinyWorld:
    """A small demo world taken through ingest and split, shared by the training and CLI tests."""

    root: Path
    raw: Path
    ingested: Path
    splits: Path
    taxonomy: Path
    cache: Path


def build_tiny_world(root: Path, n_images: int) -> TinyWorld:
    from mumic_ml.demo_world import generate_demo_world
    from mumic_ml.ingest import ingest
    from mumic_ml.split import split_manifest
    from mumic_ml.taxonomy import load_taxonomy

    world = generate_demo_world(root / "raw", n_images=n_images, image_size=64, seed=0)
    taxonomy = load_taxonomy(world.taxonomy_path)
    ingest(world.manifest_path, world.root, root / "ingested", taxonomy=taxonomy)
    split_manifest(
        root / "ingested" / "manifest.parquet",
        root / "splits",
        {"train": 0.6, "val": 0.2, "test": 0.2},
        seed=0,
        taxonomy_names=taxonomy.names,
    )
    return TinyWorld(root, world.root, root / "ingested", root / "splits", world.taxonomy_path, root / "cache")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> TinyWorld:
    return build_tiny_world(tmp_path_factory.mktemp("tiny_world"), n_images=240)


# Every MLflow run of the test session goes to a throwaway store, never to mlflow.db / mlartifacts in the repo.
_MLFLOW_DIR = Path(tempfile.mkdtemp(prefix="mumic-mlflow-"))
atexit.register(shutil.rmtree, _MLFLOW_DIR, ignore_errors=True)  # one per test process; none left in /tmp
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR / 'mlflow.db'}"


@pytest.fixture(scope="session")
def load_benchmark():
    """benchmarks/ is not a package: load one of its scripts as a module, to call its main in-process."""
    import importlib.util
    import sys

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory):
    """A module's own MLflow store, through MLFLOW_TRACKING_URI as a user would point the pipeline at one."""
    store = tmp_path_factory.mktemp("mlflow")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = before or ""
