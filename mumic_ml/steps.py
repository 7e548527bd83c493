"""The pipeline steps, each defined once: the `mumic` CLI, the DVC stages and the Dagster assets call these.

Every step takes the typed `Params` and the project root (all paths in `params.paths` are relative to it) and
returns a result the caller reports. Orchestration adds scheduling and UI, never logic.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from mumic_ml.batches import BatchIngestResult, ingest_batches
from mumic_ml.config import DEMO_FOUNDATION, Params
from mumic_ml.gate import Measured
from mumic_ml.io import atomic_write_json, read_json
from mumic_ml.taxonomy import load_taxonomy

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProjectPaths:
    """`params.paths` resolved against the project root."""

    root: Path
    params: Params

    def __getattr__(self, name: str) -> Path:
        return self.root / getattr(self.params.paths, name)

    @property
    def manifest(self) -> Path:
        return self.ingested / "manifest.parquet"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"


def md5_file(path: Path) -> str:
    """The hash DVC records for a file output, so asset metadata and dvc.lock can be compared directly."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_version(paths: ProjectPaths) -> dict[str, str]:
    """md5 of each split file: names the exact data a model was trained and tested on."""
    return {name: md5_file(paths.split(name)) for name in SPLITS}


def ingest_step(params: Params, root: Path = Path(".")) -> BatchIngestResult:
    paths = ProjectPaths(root, params)
    return ingest_batches(
        paths.incoming,
        paths.ingested,
        taxonomy=load_taxonomy(paths.taxonomy),
        max_side=params.ingest.max_side,
        min_side=params.ingest.min_side,
        max_pixels=params.ingest.max_pixels,
        workers=params.ingest.workers,
    )


def validate_step(params: Params, root: Path = Path(".")):
    from mumic_ml.validate import ValidationRules, validate_manifest

    paths = ProjectPaths(root, params)
    cfg = params.expectations
    rules = ValidationRules(
        min_labels_per_image=cfg.min_labels_per_image,
        max_labels_per_image=cfg.max_labels_per_image,
        min_side=params.ingest.min_side,
        max_side=params.ingest.max_side,
        min_positives_per_class=cfg.min_positives_per_class,
        min_positives_blocking=cfg.min_positives_blocking,
    )
    return validate_manifest(paths.manifest, load_taxonomy(paths.taxonomy), paths.validation / "labels", rules)


def split_step(params: Params, root: Path = Path("."), *, reassign: bool = False) -> dict[str, Any]:
    """Images already split keep their split; new ones are dealt (`reassign`: every image afresh)."""
    from mumic_ml.split import split_manifest

    paths = ProjectPaths(root, params)
    report = split_manifest(
        paths.manifest,
        paths.splits,
        params.split.fractions,
        params.split.seed,
        taxonomy_names=load_taxonomy(paths.taxonomy).names,
        reassign=reassign,
    )
    report["md5"] = data_version(paths)
    return report


def validate_splits_step(params: Params, root: Path = Path(".")):
    from mumic_ml.validate import validate_splits

    paths = ProjectPaths(root, params)
    return validate_splits({name: paths.split(name) for name in SPLITS}, paths.validation / "splits")


def demo_foundation_checkpoint(params: Params, root: Path = Path(".")) -> Path:
    return ProjectPaths(root, params).foundation / f"{params.model.backbone}.safetensors"


def foundation_weights(params: Params, root: Path = Path(".")) -> str | None:
    """What `model.pretrained` names, for `create_backbone`: the demo foundation's checkpoint, or the tag or file
    as configured."""
    if params.model.pretrained != DEMO_FOUNDATION:
        return params.model.pretrained
    checkpoint = demo_foundation_checkpoint(params, root)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"model.pretrained is {DEMO_FOUNDATION!r} but {checkpoint} does not exist; build it with `mumic pretrain` "
            "(the foundation_model asset, the DVC stage `pretrain`)"
        )
    return str(checkpoint)


@dataclass(frozen=True)
class FoundationOutcome:
    source: str  # how the weights were obtained this time: pretrained, cached, resolved, random init
    decision: str  # why: what made the step pretrain again or reuse the checkpoint (pretrain.refresh)
    weights: str | None
    zero_shot: dict[str, Any] | None  # test-split metrics of the untrained MuMIC head on these weights
    pretrain: dict[str, Any] | None  # the demo foundation's pretraining record (None for other weights)
    report_path: Path


def _pretrain_decision(checkpoint: Path, params: Params, fingerprint: str, force: bool) -> str | None:
    """Why the demo foundation must be pretrained now, or None to reuse the checkpoint (`pretrain.refresh`)."""
    from mumic_ml.config import FoundationRefresh

    meta_path = checkpoint.with_name(checkpoint.name + ".json")
    refresh = params.pretrain.refresh
    if force:
        return "asked to (--force)"
    if not checkpoint.is_file() or not meta_path.is_file():
        return "no foundation checkpoint yet"
    if refresh is FoundationRefresh.ALWAYS:
        return "pretrain.refresh is always"
    meta = read_json(meta_path)
    if meta.get("backbone") != params.model.backbone or meta.get("pretrain") != params.pretrain.recipe():
        return "model.backbone or the pretrain recipe changed"
    if refresh is FoundationRefresh.DATA and meta.get("data_fingerprint") != fingerprint:
        return "the train or val split changed (pretrain.refresh: data)"
    return None


def foundation_seen_images(params: Params, root: Path = Path(".")) -> list[str]:
    """The images the demo foundation was pretrained on (none for other weights): a fine-tuned model has seen them."""
    if params.model.pretrained != DEMO_FOUNDATION:
        return []
    checkpoint = demo_foundation_checkpoint(params, root)
    meta_path = checkpoint.with_name(checkpoint.name + ".json")
    if not meta_path.is_file():
        return []
    return list(read_json(meta_path).get("seen_images", []))


def _zero_shot_on_test(params: Params, paths: ProjectPaths, weights: str) -> dict[str, Any]:
    """The untrained MuMIC head on `weights`, scored on the test split like any trained model."""
    from mumic_ml.pretrain import export_zero_shot

    with tempfile.TemporaryDirectory(prefix="mumic-zero-shot-") as tmp:
        model_dir = export_zero_shot(
            params.updated({"model.head": "mumic"}),
            taxonomy_path=paths.taxonomy,
            backbone_weights=weights,
            model_dir=Path(tmp) / "model",
        )
        report = evaluate_on_test(paths, model_dir, Path(tmp) / "metrics.json")
    zero_shot = {key: report[key] for key in ("gap_at_10", "gap", "map_macro", "num_images") if key in report}
    if "map_held_out" in report.get("zero_shot", {}):
        zero_shot["held_out"] = report["zero_shot"]
    return zero_shot


def foundation_step(
    params: Params, root: Path = Path("."), *, force: bool = False, progress: bool = True
) -> FoundationOutcome:
    """The backbone weights that fine-tuning starts from, and their zero-shot quality on the test split.

    With `model.pretrained: demo-foundation` the demo foundation is pretrained on the train split's captions,
    unless the checkpoint there was already pretrained with the same backbone, `pretrain` section and data
    (`force` pretrains anyway). With `model.pretrained: demo-foundation` the checkpoint is reused while the backbone
    and the pretrain recipe are unchanged (`pretrain.refresh: config`), as a real CLIP would be; `refresh: data`
    also pretrains again when the data changed. Any other setting is resolved, downloading a tag now, so that
    missing weights fail here with the fix in the message and not after the data steps of a long run.
    """
    from mumic_ml.backbone import create_backbone
    from mumic_ml.data import read_split
    from mumic_ml.pretrain import pretrain
    from mumic_ml.train import data_fingerprint

    paths = ProjectPaths(root, params)
    record = None
    if params.model.pretrained == DEMO_FOUNDATION:
        checkpoint = demo_foundation_checkpoint(params, root)
        meta_path = checkpoint.with_name(checkpoint.name + ".json")
        fingerprint = data_fingerprint({name: read_split(paths.split(name)) for name in ("train", "val")})
        why = _pretrain_decision(checkpoint, params, fingerprint, force)
        if why is None:
            source = "cached"
            decision = f"reused: same backbone and pretrain recipe (pretrain.refresh: {params.pretrain.refresh})"
            if read_json(meta_path).get("data_fingerprint") != fingerprint:
                decision += "; the data has changed since it was pretrained"
        else:
            decision = f"pretrained: {why}"
            pretrain(
                params,
                splits_dir=paths.splits,
                images_root=paths.ingested,
                cache_dir=paths.cache,
                out_path=checkpoint,
                progress=progress,
            )
            source = "pretrained"
        meta = read_json(meta_path)
        kept = ("epochs", "final_loss", "val_retrieval_top1", "seconds", "data_fingerprint")
        record = {key: meta[key] for key in kept}
        weights: str | None = str(checkpoint)
    else:
        weights = params.model.pretrained
        create_backbone(params.model.backbone, weights, device="cpu")
        source = "resolved" if weights else "random init"
        decision = f"model.pretrained is {weights!r}: nothing to pretrain"

    report_path = paths.foundation / "foundation.json"
    zero_shot, zero_shot_inputs = None, None
    if weights is not None:
        zero_shot_inputs = {
            "weights": md5_file(Path(weights)) if Path(weights).is_file() else weights,
            "model": params.model.model_dump(mode="json"),
            "held_out_classes": params.train.held_out_classes,
            "evaluate": params.evaluate.model_dump(mode="json"),
            "test_split": md5_file(paths.split("test")),
            "taxonomy": md5_file(paths.taxonomy),
        }
        previous = read_json(report_path) if report_path.is_file() else {}
        if previous.get("zero_shot_inputs") == zero_shot_inputs:  # a retrain on unchanged data: nothing to measure
            zero_shot = previous["zero_shot_test"]
        else:
            zero_shot = _zero_shot_on_test(params, paths, weights)
    atomic_write_json(
        report_path,
        {
            "backbone": params.model.backbone,
            "pretrained": params.model.pretrained,
            "weights": weights,
            "source": source,
            "decision": decision,
            "pretrain": record,
            "zero_shot_test": zero_shot,
            "zero_shot_inputs": zero_shot_inputs,
        },
    )
    return FoundationOutcome(source, decision, weights, zero_shot, record, report_path)


def evaluate_on_test(
    paths: ProjectPaths, model_dir: Path, out: Path, *, plots_dir: Path | None = None, retrieval: bool = False
) -> dict[str, Any]:
    """Any model (ours, the champion, a candidate, a benchmark variant) measured the same way on the test split."""
    from mumic_ml.evaluate import evaluate_model

    cfg = paths.params.evaluate
    return evaluate_model(
        model_dir,
        paths.split("test"),
        paths.ingested,
        out,
        cache_dir=paths.cache,
        k=cfg.k,
        top_n_classes=cfg.top_n_classes,
        batch_size=cfg.batch_size,
        plots_dir=plots_dir,
        retrieval=retrieval,
    )


def evaluate_step(params: Params, root: Path = Path("."), *, model_dir: Path | None = None) -> dict[str, Any]:

    paths = ProjectPaths(root, params)
    report = evaluate_on_test(paths, model_dir or paths.model, paths.metrics, plots_dir=paths.reports / "plots")
    # The headline numbers alone: what `dvc metrics show/diff` compares (the full report has every class).
    headline = ("gap_at_10", "gap", "map_macro", "map_top_n", "micro_f1", "macro_f1", "num_images", "num_classes")
    atomic_write_json(paths.reports / "summary.json", {key: report[key] for key in headline if key in report})
    return report


def read_metrics(params: Params, root: Path = Path(".")) -> dict[str, Any]:
    return read_json(ProjectPaths(root, params).metrics)


def write_gate(params: Params, root: Path, gate: dict[str, Any]) -> Path:
    path = ProjectPaths(root, params).reports / "gate.json"
    atomic_write_json(path, gate)
    return path


def combined_version(md5s: dict[str, str]) -> str:
    """One short identifier for the split files together: the data version tag of runs and model versions."""
    joined = ";".join(f"{name}:{md5s[name]}" for name in sorted(md5s))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def dvc_lock_matches(paths: ProjectPaths, md5s: dict[str, str]) -> dict[str, bool | None]:
    """Whether each split file equals what dvc.lock records (None: dvc.lock does not know it yet)."""
    lock_path = paths.root / "dvc.lock"
    recorded: dict[str, str] = {}
    if lock_path.is_file():
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
        for stage in (lock.get("stages") or {}).values():
            for out in stage.get("outs", []):
                recorded[str(out.get("path"))] = str(out.get("md5"))
    splits_rel = paths.params.paths.splits
    return {
        name: (recorded[key] == md5 if (key := str(splits_rel / f"{name}.parquet")) in recorded else None)
        for name, md5 in md5s.items()
    }


def tracking_location(params: Params, root: Path) -> tuple[str, Path | None]:
    """The MLflow tracking URI (MLFLOW_TRACKING_URI first) and where new experiments keep their artifacts.

    A relative SQLite path is taken under `root`. Artifacts of a SQLite store live beside the database file
    (params.yaml's `mlflow.artifact_location` for the project's own store); a tracking server decides for itself.
    """
    from mumic_ml.tracking import TRACKING_URI_ENV, resolve_tracking_uri

    # Download progress bars would flood logs of every asset and CLI step that touches the registry.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_tracking_uri(params.mlflow.tracking_uri)
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri, None
    database = Path(uri[len(prefix) :])
    if not database.is_absolute():
        database = (root / database).resolve()
    if os.environ.get(TRACKING_URI_ENV):
        artifacts = database.parent / "mlartifacts"
    else:
        artifacts = (root / params.mlflow.artifact_location).resolve()
    return prefix + str(database), artifacts


def _run_url(uri: str, run_id: str) -> str:
    """Where the run shows in the MLflow UI: the server itself, or `mlflow ui` on its default port."""
    if not uri.startswith(("http://", "https://")):
        return f"http://127.0.0.1:5000/#/runs/{run_id}"
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    # Rebuilt without user:password: the URL is shown in the Dagster UI and its event log.
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")) + f"/#/runs/{run_id}"


@dataclass(frozen=True)
class TrainOutcome:
    result: Any  # mumic_ml.train.TrainResult
    run_id: str
    run_url: str
    data_version: dict[str, str]


def train_step(
    params: Params,
    root: Path = Path("."),
    *,
    resume: bool = False,
    on_epoch_end=None,
    progress: bool = True,
) -> TrainOutcome:
    """Fine-tune inside an MLflow run: params, data version, git commit, per-epoch metrics, the taxonomy."""
    from mumic_ml.tracking import log_artifacts, log_epoch, start_run
    from mumic_ml.train import train

    paths = ProjectPaths(root, params)
    version = data_version(paths)
    weights = foundation_weights(params, root)
    training_params = params.updated({"model.pretrained": weights}) if weights != params.model.pretrained else params
    train_paths = {
        "splits_dir": paths.splits,
        "images_root": paths.ingested,
        "taxonomy_path": paths.taxonomy,
        "run_dir": paths.run,
        "model_dir": paths.model,
        "cache_dir": paths.cache,
    }
    train_paths["seen_before"] = foundation_seen_images(params, root)
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun the other ranks only share the gradient work; rank 0 owns the run and the export.
        result = train(training_params, **train_paths, resume=resume, progress=False)
        return TrainOutcome(result, "", "", version)
    uri, artifacts = tracking_location(params, root)
    with start_run(
        experiment=params.mlflow.experiment,
        tracking_uri=uri,
        artifact_location=artifacts,
        params=params.model_dump(mode="json"),
        data_version=combined_version(version),
        tags={f"split_md5.{name}": md5 for name, md5 in version.items()},
        run_name="train",
        repo_dir=root,
    ) as run_id:
        logged: set[int] = set()

        def log_history_entry(entry: dict[str, Any]) -> None:
            keys = ("train_loss", "val_gap_at_10", "val_map", "learning_rate", "images_per_second", "temperature")
            metrics = {key: entry[key] for key in keys if entry.get(key) is not None}
            log_epoch(run_id, entry["epoch"], metrics, tracking_uri=uri)
            logged.add(entry["epoch"])

        def log_and_forward(report) -> None:
            log_history_entry(asdict(report))
            if on_epoch_end is not None:
                on_epoch_end(report)

        result = train(
            training_params,
            **train_paths,
            resume=resume,
            on_epoch_end=log_and_forward,
            progress=progress,
            metadata={"mlflow_run_id": run_id, "data_version": version},
        )
        for entry in result.history:  # epochs run before a crash, when this run resumed
            if entry["epoch"] not in logged:
                log_history_entry(entry)
        log_artifacts(run_id, paths.taxonomy, tracking_uri=uri)
    return TrainOutcome(result, run_id, _run_url(uri, run_id), version)


def _model_run_id(model_dir: Path) -> str:
    run_id = read_json(model_dir / "model.json").get("metadata", {}).get("mlflow_run_id")
    if not run_id:
        raise ValueError(f"{model_dir} was trained without an MLflow run; train it with `mumic train`")
    return run_id


@dataclass(frozen=True)
class EvaluationOutcome:
    report: dict[str, Any]
    gate: Any  # mumic_ml.gate.GateResult
    metrics_path: Path
    gate_path: Path


def _test_images(paths: ProjectPaths) -> frozenset[str]:
    from mumic_ml.data import read_split

    return frozenset(read_split(paths.split("test"))["sha256"])


def _measure_registered(paths: ProjectPaths, model_uri: str, label: str, uri: str) -> Measured:
    """A registered model scored on the current test split, with the images it records it trained on."""
    from mumic_ml.model_io import read_seen_images
    from mumic_ml.registry import resolve_model_uri

    model_dir = resolve_model_uri(model_uri, cache_dir=paths.root / ".cache" / "models", tracking_uri=uri)
    report = evaluate_on_test(paths, model_dir, paths.reports / f"{label.split()[0]}_metrics.json")
    return Measured(label, report, read_seen_images(model_dir))


def _champion(paths: ProjectPaths, uri: str) -> Measured | None:
    from mumic_ml.registry import current_champion

    name = paths.params.mlflow.registered_model
    champion = current_champion(name, tracking_uri=uri)
    if champion is None:
        return None
    return _measure_registered(paths, champion.uri, f"champion v{champion.version}", uri)


def evaluate_and_gate_step(params: Params, root: Path = Path(".")) -> EvaluationOutcome:
    """Test-split metrics and plots into the training run, then the gate: the floor, and the champion re-measured
    on the same split, neither having trained on any of its images."""
    from mumic_ml.gate import check_gate
    from mumic_ml.model_io import read_seen_images
    from mumic_ml.tracking import log_artifacts, log_epoch

    paths = ProjectPaths(root, params)
    report = evaluate_step(params, root)
    uri, _ = tracking_location(params, root)
    gate = check_gate(
        Measured("this model", report, read_seen_images(paths.model)),
        floor=params.gate.min_gap_at_10,
        champion=_champion(paths, uri),
        tolerance=params.gate.champion_tolerance,
        test_images=_test_images(paths),
    )
    run_id = _model_run_id(paths.model)
    gate_path = write_gate(params, root, {**gate.to_dict(), "mlflow_run_id": run_id})
    scalars = {f"test_{k}": v for k, v in report.items() if k in ("gap_at_10", "gap", "map_macro", "map_top_n")}
    log_epoch(run_id, 0, {**scalars, "gate_passed": float(gate.passed)}, tracking_uri=uri)
    log_artifacts(run_id, paths.metrics, artifact_path="evaluation", tracking_uri=uri)
    if (paths.reports / "plots").is_dir():
        log_artifacts(run_id, paths.reports / "plots", artifact_path="evaluation/plots", tracking_uri=uri)
    return EvaluationOutcome(report, gate, paths.metrics, gate_path)


def register_step(params: Params, root: Path = Path(".")):
    """Log the gated model as a pyfunc and register it as `challenger`.

    A model that failed the gate is refused before anything is logged, so refusals leave no orphan model behind.
    """
    from mumic_ml.registry import GateFailedError, log_model, register_model, registered_version_of_run

    paths = ProjectPaths(root, params)
    run_id = _model_run_id(paths.model)
    gate = read_json(paths.reports / "gate.json")
    if gate.get("mlflow_run_id") != run_id:
        raise ValueError("reports/gate.json belongs to another model; run `mumic evaluate` on this one first")
    if not gate.get("passed"):
        reasons = "; ".join(gate.get("reasons", [])) or "no reason recorded"
        raise GateFailedError(f"refusing to register run {run_id}: it did not pass the evaluation gate ({reasons})")
    uri, _ = tracking_location(params, root)
    name = params.mlflow.registered_model
    existing = registered_version_of_run(name, run_id, tracking_uri=uri)
    model_uri = existing.source if existing is not None else log_model(run_id, paths.model, tracking_uri=uri)
    version = data_version(paths)
    info = register_model(
        run_id,
        model_uri,
        name=name,
        gate_passed=True,
        metrics=read_metrics(params, root),
        tags={
            "data_version": combined_version(version),
            **{f"split_md5.{k}": v for k, v in version.items()},
            "gate_passed": "True",
        },
        tracking_uri=uri,
    )
    atomic_write_json(
        paths.reports / "registration.json",
        {"name": info.name, "version": info.version, "run_id": run_id, "alias": "challenger"},
    )
    return info


@dataclass(frozen=True)
class PromoteOutcome:
    moved: bool
    champion_version: int | None
    message: str


def promote_step(
    params: Params, root: Path = Path("."), *, version: str | None = None, force: bool = False, rollback: bool = False
) -> PromoteOutcome:
    """Move `champion` to the challenger (or `version`) if the gate's comparison with the champion, on the current
    test split, finds nothing against it (`force` moves it anyway); or roll back."""
    from mumic_ml import registry
    from mumic_ml.gate import compare_with_champion

    uri, _ = tracking_location(params, root)
    name = params.mlflow.registered_model
    if rollback:
        result = registry.rollback(name, tracking_uri=uri)
        return PromoteOutcome(result.moved, result.champion, result.reason)
    paths = ProjectPaths(root, params)
    candidate_info = registry.promotion_candidate(name, int(version) if version else None, tracking_uri=uri)
    champion_info = registry.current_champion(name, tracking_uri=uri)
    if champion_info is None:
        reason = "no champion yet: the first registered candidate becomes champion"
    elif champion_info.version == candidate_info.version:
        return PromoteOutcome(False, champion_info.version, f"version {candidate_info.version} is already the champion")
    else:
        candidate = _measure_registered(paths, candidate_info.uri, f"candidate v{candidate_info.version}", uri)
        champion = _measure_registered(paths, champion_info.uri, f"champion v{champion_info.version}", uri)
        comparison = compare_with_champion(
            candidate, champion, tolerance=params.gate.champion_tolerance, test_images=_test_images(paths)
        )
        if comparison.reasons and not force:
            return PromoteOutcome(False, champion_info.version, "; ".join(comparison.reasons))
        summary = f"GAP@10 {candidate.gap_at_10:.4f} against {champion.label}'s {champion.gap_at_10:.4f}"
        reason = f"forced ({'; '.join(comparison.reasons)})" if comparison.reasons else summary
    result = registry.promote(name, version=candidate_info.version, reason=reason, forced=force, tracking_uri=uri)
    return PromoteOutcome(result.moved, result.champion, result.reason)
