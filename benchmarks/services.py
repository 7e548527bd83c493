"""The demo pipeline on shared services against the embedded default, side by side in one run, and the latency of
the registry operations through the tracking server.

Each round materializes the whole asset graph and then promotes (what `retrain_job` and `promote_job` run) twice,
in two fresh copies of the same small project: once on the embedded default (a Dagster instance on SQLite, MLflow
on SQLite with local artifacts) and once on the shared services (the instance of deploy/dagster.yaml on PostgreSQL,
the MLflow tracking server with PostgreSQL and S3 behind it). Rounds alternate which side goes first, so load from
other processes hits both alike; the figure that matters is the ratio of wall times (goal: <= 1.25).

Then, on each side, `repeats` times each: registering a version (`registry.register_model`), moving the champion
alias (`registry.promote`) and loading the champion cold (`registry.resolve_model_uri` into an empty cache, then
`Predictor.from_dir`).

The shared side uses the servers the environment names (deploy/env.example: MLFLOW_TRACKING_URI, DAGSTER_PG_*),
or, when MLFLOW_TRACKING_URI is not an http(s) URL, starts PostgreSQL, S3 and an MLflow server on loopback with
tests/services.py (the `dev` extra) for the run.

    python benchmarks/services.py --quick                  # 120 images, 2 epochs, 1 round, 5 repeats
    python benchmarks/services.py --images 400 --epochs 3 --rounds 2 --repeats 20 --out reports/services.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import mlflow
import yaml
from mlflow.tracking import MlflowClient

from mumic_dagster import assets
from mumic_dagster.jobs import promote_job
from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource
from mumic_ml.config import load_params
from mumic_ml.demo_world import generate_demo_world
from mumic_ml.pipeline import registry
from mumic_ml.pipeline.tracking import tracking_scope
from mumic_ml.predict import Predictor

REPO = Path(__file__).resolve().parents[1]
EMBEDDED, SHARED = "embedded", "shared"
BENCH_MODEL = "mumic-bench"
ENV_PREFIXES = ("MLFLOW_", "DAGSTER_PG_", "AWS_")


@contextlib.contextmanager
def shared_environment() -> Iterator[dict[str, str]]:
    """The shared services' client settings: the environment's when it names a tracking server, else loopback
    servers started for this run (and stopped after it)."""
    if os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        yield {name: value for name, value in os.environ.items() if name.startswith(ENV_PREFIXES)}
        return
    sys.path.insert(0, str(REPO / "tests"))
    from services import shared_services

    started = time.monotonic()
    with shared_services() as servers:
        print(f"loopback services started in {time.monotonic() - started:.1f} s: {servers.seconds_to_start()}")
        yield servers.client_env()


@contextlib.contextmanager
def patched_environment(values: dict[str, str]) -> Iterator[None]:
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_project(root: Path, images: int, epochs: int, pretrain_epochs: int) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demo"]["n_images"] = images
    params["train"].update({"epochs": epochs, "batch_size": 16, "early_stopping_patience": None})
    params["pretrain"].update({"epochs": pretrain_epochs, "batch_size": 16})
    params["gate"]["min_gap_at_10"] = 0.0
    params["audit"].update({"folds": 2, "head_steps": 50})
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params(root / "params.yaml")
    generate_demo_world(root / loaded.paths.demo, n_images=images, image_size=64, seed=0)
    return root


@contextlib.contextmanager
def instance_for(side: str, workdir: Path) -> Iterator[dg.DagsterInstance]:
    """The side's Dagster instance: SQLite in a fresh folder, or deploy/dagster.yaml as deployed."""
    home = Path(tempfile.mkdtemp(prefix=f"dagster_home_{side}-", dir=workdir))
    if side == SHARED:
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Each step's wall time in the run, from its start and end events."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            started[event.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            seconds[event.step_key] = round(entry.timestamp - started.get(event.step_key, entry.timestamp), 2)
    return seconds


def run_pipeline(side: str, root: Path, tracking_uri: str, workdir: Path) -> dict:
    """The asset graph materialized, then the challenger promoted, on one side's stores; timed."""
    resources = {
        "project": ProjectResource(root=str(root)),
        "mlflow": MlflowResource(tracking_uri=tracking_uri),
        "compute": ComputeResource(device="cpu"),
    }
    with instance_for(side, workdir) as instance:
        started = time.monotonic()
        result = dg.materialize(
            dg.load_assets_from_modules([assets]), resources=resources, instance=instance, raise_on_error=True
        )
        retrain = time.monotonic() - started
        promoted = promote_job.execute_in_process(resources=resources, instance=instance)
        total = time.monotonic() - started
        steps = step_seconds(instance, result.run_id)
        steps["promote_challenger"] = step_seconds(instance, promoted.run_id).get("promote_challenger")
    return {"side": side, "retrain_s": round(retrain, 2), "total_s": round(total, 2), "steps_s": steps}


def timed(action: Callable[[], object], repeats: int, untimed: Callable[[], object] | None = None) -> dict:
    samples = []
    for _ in range(repeats):
        started = time.monotonic()
        action()
        samples.append(time.monotonic() - started)
        if untimed is not None:
            untimed()
    samples.sort()
    return {
        "median_ms": round(1000 * statistics.median(samples), 1),
        "p90_ms": round(1000 * samples[min(len(samples) - 1, int(0.9 * len(samples)))], 1),
        "n": repeats,
    }


def registry_latency(tracking_uri: str, repeats: int, workdir: Path) -> dict:
    """Register, move the champion, load the champion cold, on a model of its own (`mumic-bench`) whose versions
    all point at the pipeline's champion."""
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("mumic", registry.CHAMPION)
    run_id, model_uri = champion.run_id, champion.source

    def register() -> registry.ModelVersionInfo:
        return registry.register_model(
            run_id, model_uri, name=BENCH_MODEL, tags={"benchmark": "true"}, gate_passed=True, tracking_uri=tracking_uri
        )

    def unregister_latest() -> None:
        latest = max(int(v.version) for v in client.search_model_versions(f"name = '{BENCH_MODEL}'"))
        client.delete_model_version(BENCH_MODEL, str(latest))

    figures = {"register": timed(register, repeats, untimed=unregister_latest)}
    # Two versions for the alias to move between (`register_model` gives a run one version, so MLflow adds the other).
    first = register().version
    with tracking_scope(tracking_uri):
        second = int(mlflow.register_model(model_uri, BENCH_MODEL).version)
    targets = iter([second, first] * repeats)
    figures["alias_move"] = timed(
        lambda: registry.promote(BENCH_MODEL, version=next(targets), reason="benchmark", tracking_uri=tracking_uri),
        repeats,
    )
    caches = iter(range(repeats))

    def load_champion() -> None:
        cache = workdir / f"model-cache-{next(caches)}"
        uri = f"models:/{BENCH_MODEL}@{registry.CHAMPION}"
        Predictor.from_dir(registry.resolve_model_uri(uri, cache_dir=cache, tracking_uri=tracking_uri), device="cpu")

    figures["champion_load"] = timed(load_champion, repeats)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="demo images per project (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--pretrain-epochs", type=int, default=1, help="foundation epochs (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="pipeline runs per side (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="samples per registry latency (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="120 images, 2 epochs, 1 round, 5 repeats")
    parser.add_argument("--workdir", help="keep the projects and stores here (default: a temporary folder)")
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.rounds, args.repeats = 120, 2, 1, 5

    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        shared_env = stack.enter_context(shared_environment())
        embedded_uri = f"sqlite:///{workdir / 'embedded-mlflow' / 'mlflow.db'}"
        (workdir / "embedded-mlflow").mkdir(parents=True, exist_ok=True)
        # Both stores exist before the clock starts: the server migrated its database when it started.
        MlflowClient(embedded_uri).search_experiments()
        uris = {EMBEDDED: embedded_uri, SHARED: shared_env["MLFLOW_TRACKING_URI"]}
        stack.enter_context(patched_environment({**shared_env, "MLFLOW_TRACKING_URI": ""}))
        runs: list[dict] = []
        for round_index in range(args.rounds):
            order = (EMBEDDED, SHARED) if round_index % 2 == 0 else (SHARED, EMBEDDED)
            for side in order:
                root = make_project(workdir / f"{side}-{round_index}", args.images, args.epochs, args.pretrain_epochs)
                runs.append({"round": round_index, **run_pipeline(side, root, uris[side], workdir)})
                print(f"round {round_index + 1} {side}: {runs[-1]['total_s']:.1f} s", flush=True)
        totals = {side: sum(r["total_s"] for r in runs if r["side"] == side) for side in (EMBEDDED, SHARED)}
        latency = {side: registry_latency(uris[side], args.repeats, workdir / f"latency-{side}") for side in uris}
    figures = {
        "settings": {k: getattr(args, k) for k in ("images", "epochs", "pretrain_epochs", "rounds", "repeats")},
        "load_average": os.getloadavg()[0],
        "runs": runs,
        "total_s": {side: round(value, 1) for side, value in totals.items()},
        "ratio_shared_over_embedded": round(totals[SHARED] / totals[EMBEDDED], 3),
        "latency": latency,
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
