"""The pipeline steps, each defined once: the `mumic` CLI, the DVC stages and the Dagster assets call these.

Every step takes the `Project` (params.yaml's settings and the absolute project root; every path is a property of
it) and returns a result the caller reports. Orchestration adds scheduling and UI, never logic. The steps that track
runs or validate data import `mumic_ml.pipeline` when they run, so this module imports without the pipeline extra.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mumic_ml.batches import BatchIngestResult, ingest_batches
from mumic_ml.config import DEMO_FOUNDATION
from mumic_ml.gate import Measured
from mumic_ml.io import atomic_write_json, file_digest, read_json
from mumic_ml.project import DVC_DIGEST, SPLITS, Project, combined_version, data_version_fields
from mumic_ml.taxonomy import load_taxonomy


def ingest_step(project: Project) -> BatchIngestResult:
    cfg = project.params.ingest
    return ingest_batches(
        project.incoming,
        project.ingested,
        taxonomy=load_taxonomy(project.taxonomy),
        max_side=cfg.max_side,
        min_side=cfg.min_side,
        max_pixels=cfg.max_pixels,
        workers=cfg.workers,
    )


def validate_step(project: Project):
    from mumic_ml.pipeline.validate import validate_manifest

    return validate_manifest(
        project.manifest,
        load_taxonomy(project.taxonomy),
        project.labels_validation,
        expectations=project.params.expectations,
        ingest=project.params.ingest,
    )


def split_step(project: Project, *, reassign: bool = False) -> dict[str, Any]:
    """Images already split keep their split; new ones are dealt (`reassign`: every image afresh)."""
    from mumic_ml.split import split_manifest

    cfg = project.params.split
    report = split_manifest(
        project.manifest,
        project.splits,
        cfg.fractions,
        cfg.seed,
        taxonomy_names=load_taxonomy(project.taxonomy).names,
        reassign=reassign,
    )
    report["md5"] = project.data_version()
    return report


def validate_splits_step(project: Project):
    from mumic_ml.pipeline.validate import validate_splits

    return validate_splits({name: project.split(name) for name in SPLITS}, project.splits_validation)


@dataclass(frozen=True)
class FoundationOutcome:
    source: str  # how the weights were obtained this time: pretrained, cached, resolved, random init
    decision: str  # why: what made the step pretrain again or reuse the checkpoint (pretrain.refresh)
    weights: str | None
    zero_shot: dict[str, Any] | None  # test-split metrics of the untrained MuMIC head on these weights
    pretrain: dict[str, Any] | None  # the demo foundation's pretraining record (None for other weights)
    report_path: Path


def _zero_shot_on_test(project: Project, weights: str) -> dict[str, Any]:
    """The untrained MuMIC head on `weights`, scored on the test split like any trained model."""
    from mumic_ml.pretrain import export_zero_shot

    with tempfile.TemporaryDirectory(prefix="mumic-zero-shot-") as tmp:
        model_dir = export_zero_shot(
            project.params.updated({"model.head": "mumic"}),
            taxonomy_path=project.taxonomy,
            backbone_weights=weights,
            model_dir=Path(tmp) / "model",
        )
        report = evaluate_on_test(project, model_dir, Path(tmp) / "metrics.json")
    zero_shot = {key: report[key] for key in ("gap_at_10", "gap", "map_macro", "num_images") if key in report}
    if "map_held_out" in report.get("zero_shot", {}):
        zero_shot["held_out"] = report["zero_shot"]
    return zero_shot


def foundation_step(
    project: Project,
    *,
    force: bool = False,
    progress: bool = True,
    on_pretrain_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> FoundationOutcome:
    """The backbone weights that fine-tuning starts from, and their zero-shot quality on the test split.

    With `model.pretrained: demo-foundation` the demo foundation is pretrained on the train split's captions,
    unless the checkpoint there was already pretrained with the same backbone, `pretrain` section and data
    (`force` pretrains anyway). With `model.pretrained: demo-foundation` the checkpoint is reused while the backbone
    and the pretrain recipe are unchanged (`pretrain.refresh: config`), as a real CLIP would be; `refresh: data`
    also pretrains again when the data changed. Any other setting is resolved, downloading a tag now, so that
    missing weights fail here with the fix in the message and not after the data steps of a long run.
    `on_pretrain_epoch` receives each pretraining epoch's history entry as it completes.
    """
    from mumic_ml.backbone import create_backbone
    from mumic_ml.data import data_fingerprint, read_split
    from mumic_ml.pretrain import checkpoint_record_path, pretrain, pretrain_decision

    params = project.params
    record = None
    if params.model.pretrained == DEMO_FOUNDATION:
        checkpoint = project.foundation_checkpoint
        meta_path = checkpoint_record_path(checkpoint)
        fingerprint = data_fingerprint({name: read_split(project.split(name)) for name in ("train", "val")})
        why = pretrain_decision(checkpoint, params, fingerprint, force)
        if why is None:
            source = "cached"
            decision = f"reused: same backbone and pretrain recipe (pretrain.refresh: {params.pretrain.refresh})"
            if read_json(meta_path).get("data_fingerprint") != fingerprint:
                decision += "; the data has changed since it was pretrained"
        else:
            decision = f"pretrained: {why}"
            pretrain(
                params,
                splits_dir=project.splits,
                images_root=project.ingested,
                cache_dir=project.cache,
                out_path=checkpoint,
                progress=progress,
                on_epoch_end=on_pretrain_epoch,
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

    report_path = project.foundation_report
    zero_shot, zero_shot_inputs = None, None
    if weights is not None:
        zero_shot_inputs = {
            "weights": file_digest(weights, DVC_DIGEST) if Path(weights).is_file() else weights,
            "model": params.model.model_dump(mode="json"),
            "held_out_classes": params.train.held_out_classes,
            "evaluate": params.evaluate.model_dump(mode="json"),
            "test_split": file_digest(project.split("test"), DVC_DIGEST),
            "taxonomy": file_digest(project.taxonomy, DVC_DIGEST),
        }
        previous = read_json(report_path) if report_path.is_file() else {}
        if previous.get("zero_shot_inputs") == zero_shot_inputs:  # a retrain on unchanged data: nothing to measure
            zero_shot = previous["zero_shot_test"]
        else:
            zero_shot = _zero_shot_on_test(project, weights)
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
    project: Project, model_dir: Path, out: Path, *, plots_dir: Path | None = None, retrieval: bool = False
) -> dict[str, Any]:
    """Any model (ours, the champion, a candidate, a benchmark variant) measured the same way on the test split."""
    from mumic_ml.evaluate import evaluate_model

    cfg = project.params.evaluate
    return evaluate_model(
        model_dir,
        project.split("test"),
        project.ingested,
        out,
        cache_dir=project.cache,
        k=cfg.k,
        top_n_classes=cfg.top_n_classes,
        batch_size=cfg.batch_size,
        plots_dir=plots_dir,
        retrieval=retrieval,
    )


def evaluate_step(project: Project) -> dict[str, Any]:
    """The project's model on the test split: the full report with plots, and the headline numbers apart."""
    report = evaluate_on_test(project, project.model, project.metrics, plots_dir=project.plots)
    # The headline numbers alone: what `dvc metrics show/diff` compares (the full report has every class).
    headline = (
        "gap_at_10",
        "gap",
        "map_macro",
        "map_top_n",
        "micro_f1",
        "macro_f1",
        "ece_raw",
        "ece_calibrated",
        "num_images",
        "num_classes",
    )
    atomic_write_json(project.summary, {key: report[key] for key in headline if key in report})
    return report


def audit_step(project: Project):
    """Suspected missing and wrong labels of the training split (`mumic_ml.audit`): out-of-fold scores by k-fold
    cross-fitting on frozen embeddings of `audit.backbone`'s image tower, ranked into `suspects.csv` and the
    reviewer's `report.html` under `paths.reports/audit/`."""
    from mumic_ml.audit import run_audit, tower_from_backbone, tower_from_model_dir
    from mumic_ml.config import AuditBackbone
    from mumic_ml.data import read_split
    from mumic_ml.runtime import resolve_device
    from mumic_ml.taxonomy import training_classes

    params = project.params
    cfg = params.audit
    device = resolve_device(cfg.device)
    if cfg.backbone is AuditBackbone.MODEL:
        tower = tower_from_model_dir(project.model, device)
    else:
        tower = tower_from_backbone(params.model.backbone, project.foundation_weights(), device)
    class_names, _, _ = training_classes(load_taxonomy(project.taxonomy), params.train.held_out_classes)
    return run_audit(
        read_split(project.split("train")),
        class_names,
        tower,
        cfg,
        images_root=project.ingested,
        preprocess_cache=project.cache,
        embedding_cache=project.audit_cache,
        out_dir=project.audit,
    )


def audit_apply_step(project: Project, reviewed: Path):
    """A reviewed suspects list as a correction batch in the incoming folder, which the next ingest applies."""
    from mumic_ml.audit import apply_review

    return apply_review(
        reviewed,
        manifest_path=project.manifest,
        images_root=project.ingested,
        incoming=project.incoming,
        taxonomy=load_taxonomy(project.taxonomy),
    )


@dataclass(frozen=True)
class TrainOutcome:
    result: Any  # mumic_ml.train.TrainResult
    run_id: str
    run_url: str
    data_version: dict[str, str]


def train_step(
    project: Project,
    *,
    resume: bool = False,
    on_epoch_end=None,
    progress: bool = True,
    dagster_run_id: str | None = None,
) -> TrainOutcome:
    """Fine-tune inside an MLflow run that a UI user can read without the server: params, the data version and
    the orchestrator's run id as tags, the splits as dataset inputs, per-epoch metrics (step = epoch), the
    label and training-curve figures, the taxonomy."""
    from mumic_ml.data import read_split
    from mumic_ml.pipeline.services import reachable_tracking_location, tracking_store_guard
    from mumic_ml.pipeline.tracking import (
        TAG_DAGSTER_RUN_ID,
        log_artifacts,
        log_epoch,
        log_png,
        log_split_datasets,
        run_url,
        start_run,
    )
    from mumic_ml.plots import label_histogram, positives_per_split, training_curves
    from mumic_ml.pretrain import foundation_seen_images
    from mumic_ml.previews import split_positives
    from mumic_ml.train import train

    params = project.params
    version = project.data_version()
    weights = project.foundation_weights()
    training_params = params.updated({"model.pretrained": weights}) if weights != params.model.pretrained else params
    train_paths = {
        "splits_dir": project.splits,
        "images_root": project.ingested,
        "taxonomy_path": project.taxonomy,
        "run_dir": project.run,
        "model_dir": project.model,
        "cache_dir": project.cache,
        "seen_before": foundation_seen_images(params, project.foundation_checkpoint),
    }
    if int(os.environ.get("RANK", "0")) != 0:
        # Under torchrun the other ranks only share the gradient work; rank 0 owns the run and the export.
        result = train(training_params, **train_paths, resume=resume, progress=False)
        return TrainOutcome(result, "", "", version)
    uri, artifacts = reachable_tracking_location(project)
    data_version = combined_version(version)
    today = datetime.now(UTC).date().isoformat()
    resumable = "the last epoch's checkpoint is kept, so a rerun resumes from it"
    with (
        tracking_store_guard(project, uri, after=resumable),
        start_run(
            experiment=params.mlflow.experiment,
            tracking_uri=uri,
            artifact_location=artifacts,
            params=params.model_dump(mode="json"),
            data_version=data_version,
            tags={**data_version_fields(version), **({TAG_DAGSTER_RUN_ID: dagster_run_id} if dagster_run_id else {})},
            run_name=f"train {params.model.backbone} {today} data {data_version[:6]}",
            repo_dir=project.root,
            source="dagster asset trained_model" if dagster_run_id else "mumic train",
            source_type="JOB" if dagster_run_id else "LOCAL",
        ) as run_id,
    ):
        frames = {name: read_split(project.split(name)) for name in SPLITS}
        sources = {name: project.split(name) for name in SPLITS}
        log_split_datasets(run_id, frames, sources=sources, digests=version, tracking_uri=uri)
        positives = split_positives(frames)
        classes = {name for counts in positives.values() for name in counts}
        totals = {name: sum(counts.get(name, 0) for counts in positives.values()) for name in classes}
        log_png(run_id, label_histogram(totals), "figures/label_histogram.png", tracking_uri=uri)
        log_png(run_id, positives_per_split(positives), "figures/positives_per_split.png", tracking_uri=uri)
        logged: set[int] = set()

        def log_history_entry(entry: dict[str, Any]) -> None:
            keys = ("train_loss", "val_gap_at_k", "val_map", "learning_rate", "images_per_second", "temperature")
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
        if result.pseudo_labels:
            counts = {f"pseudo_label_{key}": result.pseudo_labels[key] for key in ("entries", "images")}
            log_epoch(run_id, 0, counts, tracking_uri=uri)
        if result.linear_probe:
            losses = {f"linear_probe_{key}": result.linear_probe[key] for key in ("loss_before", "loss_after")}
            log_epoch(run_id, 0, losses, tracking_uri=uri)
        if result.history:
            curves = training_curves(result.history, result.gap_k, result.best_epoch)
            log_png(run_id, curves, "figures/training_curves.png", tracking_uri=uri)
        log_artifacts(run_id, project.taxonomy, tracking_uri=uri)
    return TrainOutcome(result, run_id, run_url(uri, run_id), version)


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


def _measure_registered(project: Project, model_uri: str, label: str, uri: str) -> Measured:
    """A registered model scored on the current test split, with the images it records it trained on."""
    from mumic_ml.model_io import read_seen_images
    from mumic_ml.pipeline.registry import resolve_model_uri

    model_dir = resolve_model_uri(model_uri, cache_dir=project.registered_models_cache, tracking_uri=uri)
    report = evaluate_on_test(project, model_dir, project.reports / f"{label.split()[0]}_metrics.json")
    return Measured(label, report, read_seen_images(model_dir))


def _champion(project: Project, uri: str) -> Measured | None:
    from mumic_ml.pipeline.registry import current_champion

    champion = current_champion(project.params.mlflow.registered_model, tracking_uri=uri)
    if champion is None:
        return None
    return _measure_registered(project, champion.uri, f"champion v{champion.version}", uri)


def evaluate_and_gate_step(project: Project) -> EvaluationOutcome:
    """Test-split metrics and plots into the training run, then the gate: the floor, and the champion re-measured
    on the same split, neither having trained on any of its images.

    The verdict is a tag of the training run (`gate` passed or failed, with `gate_reasons` and `gate_notes`); the
    run stays FINISHED, because training itself did finish and its model and metrics are what the reasons are about.
    """
    from mumic_ml.gate import check_gate
    from mumic_ml.model_io import read_seen_images
    from mumic_ml.pipeline.registry import GATE_FAILED, GATE_PASSED, TAG_GATE
    from mumic_ml.pipeline.services import reachable_tracking_location
    from mumic_ml.pipeline.tracking import log_artifacts, log_epoch, set_tags

    params = project.params
    uri, _ = reachable_tracking_location(project)
    report = evaluate_step(project)
    gate = check_gate(
        Measured("this model", report, read_seen_images(project.model)),
        floor=params.gate.min_gap_at_10,
        champion=_champion(project, uri),
        tolerance=params.gate.champion_tolerance,
        test_images=project.test_images(),
    )
    run_id = _model_run_id(project.model)
    atomic_write_json(project.gate_report, {**gate.to_dict(), "mlflow_run_id": run_id})
    logged = ("gap_at_10", "gap", "map_macro", "map_top_n", "ece_raw", "ece_calibrated")
    scalars = {f"test_{k}": v for k, v in report.items() if k in logged}
    log_epoch(run_id, 0, {**scalars, "gate_passed": float(gate.passed)}, tracking_uri=uri)
    verdict = {
        TAG_GATE: GATE_PASSED if gate.passed else GATE_FAILED,
        "gate_reasons": "; ".join(gate.reasons) or None,
        "gate_notes": "; ".join(gate.notes) or None,
    }
    set_tags(run_id, verdict, tracking_uri=uri)
    log_artifacts(run_id, project.metrics, artifact_path="evaluation", tracking_uri=uri)
    if project.plots.is_dir():
        log_artifacts(run_id, project.plots, artifact_path="evaluation/plots", tracking_uri=uri)
    return EvaluationOutcome(report, gate, project.metrics, project.gate_report)


def register_step(project: Project, *, dagster_run_id: str | None = None):
    """Log the gated model as a pyfunc, register it as `challenger` and describe the version with its model card.

    A model that failed the gate is refused before anything is logged, so refusals leave no orphan model behind.
    """
    from mumic_ml.pipeline.registry import (
        GateFailedError,
        describe_version,
        log_model,
        model_card,
        register_model,
        registered_version_of_run,
    )
    from mumic_ml.pipeline.services import reachable_tracking_location
    from mumic_ml.pipeline.tracking import TAG_DAGSTER_RUN_ID

    run_id = _model_run_id(project.model)
    gate = read_json(project.gate_report)
    if gate.get("mlflow_run_id") != run_id:
        raise ValueError("reports/gate.json belongs to another model; run `mumic evaluate` on this one first")
    if not gate.get("passed"):
        reasons = "; ".join(gate.get("reasons", [])) or "no reason recorded"
        raise GateFailedError(f"refusing to register run {run_id}: it did not pass the evaluation gate ({reasons})")
    uri, _ = reachable_tracking_location(project)
    name = project.params.mlflow.registered_model
    existing = registered_version_of_run(name, run_id, tracking_uri=uri)
    model_uri = existing.source if existing is not None else log_model(run_id, project.model, tracking_uri=uri)
    data_version = data_version_fields(project.data_version())
    metrics = read_json(project.metrics)
    info = register_model(
        run_id,
        model_uri,
        name=name,
        gate_passed=True,
        metrics=metrics,
        tags={
            **data_version,
            "gate_passed": "True",
            **({TAG_DAGSTER_RUN_ID: dagster_run_id} if dagster_run_id else {}),
        },
        tracking_uri=uri,
    )
    model_spec = read_json(project.model / "model.json")
    card = model_card(
        name=name,
        version=info.version,
        data_version=data_version,
        metrics=metrics,
        gate=gate,
        class_names=model_spec["class_names"],
        held_out_classes=model_spec.get("metadata", {}).get("held_out_classes", []),
        backbone=project.params.model.backbone,
        run_id=run_id,
        dagster_run_id=dagster_run_id,
    )
    describe_version(name, info.version, card, tracking_uri=uri)
    info = replace(info, description=card)
    atomic_write_json(
        project.registration,
        {"name": info.name, "version": info.version, "run_id": run_id, "alias": "challenger"},
    )
    return info


@dataclass(frozen=True)
class PromoteOutcome:
    moved: bool
    champion_version: int | None
    message: str


def promote_step(
    project: Project, *, version: str | None = None, force: bool = False, rollback: bool = False
) -> PromoteOutcome:
    """Move `champion` to the challenger (or `version`) if the gate's comparison with the champion, on the current
    test split, finds nothing against it (`force` moves it anyway); or roll back."""
    from mumic_ml.gate import compare_with_champion
    from mumic_ml.pipeline import registry
    from mumic_ml.pipeline.services import reachable_tracking_location

    params = project.params
    uri, _ = reachable_tracking_location(project)
    name = params.mlflow.registered_model
    if rollback:
        result = registry.rollback(name, tracking_uri=uri)
        return PromoteOutcome(result.moved, result.champion, result.reason)
    candidate_info = registry.promotion_candidate(name, int(version) if version else None, tracking_uri=uri)
    champion_info = registry.current_champion(name, tracking_uri=uri)
    if champion_info is None:
        reason = "no champion yet: the first registered candidate becomes champion"
    elif champion_info.version == candidate_info.version:
        return PromoteOutcome(False, champion_info.version, f"version {candidate_info.version} is already the champion")
    else:
        candidate = _measure_registered(project, candidate_info.uri, f"candidate v{candidate_info.version}", uri)
        champion = _measure_registered(project, champion_info.uri, f"champion v{champion_info.version}", uri)
        comparison = compare_with_champion(
            candidate, champion, tolerance=params.gate.champion_tolerance, test_images=project.test_images()
        )
        if comparison.reasons and not force:
            return PromoteOutcome(False, champion_info.version, "; ".join(comparison.reasons))
        summary = f"GAP@10 {candidate.gap_at_10:.4f} against {champion.label}'s {champion.gap_at_10:.4f}"
        reason = f"forced ({'; '.join(comparison.reasons)})" if comparison.reasons else summary
    result = registry.promote(name, version=candidate_info.version, reason=reason, forced=force, tracking_uri=uri)
    return PromoteOutcome(result.moved, result.champion, result.reason)
