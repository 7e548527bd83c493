"""The asset graph: raw_images -> validated_labels -> dataset_splits -> (foundation_model) -> trained_model ->
model_evaluation -> registered_model. Each asset calls one step of `mumic_ml.steps` and reports what a reviewer
wants to see."""

import dagster as dg

from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource
from mumic_ml import steps
from mumic_ml.pipeline.validate import EXPECTATION_NAMES, SPLIT_EXPECTATION_NAMES
from mumic_ml.project import combined_version

OWNERS = ["team:ml-platform"]
DATA = "data"
MODEL = "model"


def _table(rows: list[dict], columns: list[str]) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: row.get(c) for c in columns}) for row in rows],
        schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in columns]),
    )


@dg.asset(group_name=DATA, owners=OWNERS, kinds={"python", "pillow"})
def raw_images(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """Every batch in the incoming folder, decoded safely, normalised, hashed and de-duplicated.

    New batches are ingested once and accumulate; the combined manifest covers all of them, and every row left
    out has a reason in the rejection table.
    """
    result = steps.ingest_step(project.load())
    context.log.info("ingested %s, unchanged %s", result.ingested, result.skipped)
    return dg.MaterializeResult(
        metadata={
            "images": result.n_images,
            "rejected_rows": result.n_rejected,
            "batches_ingested_now": dg.MetadataValue.json(result.ingested),
            "batches_unchanged": dg.MetadataValue.json(result.skipped),
            "rejections_by_reason": _table(
                [{"reason": r, "rows": n} for r, n in result.rejected_by_reason.items()], ["reason", "rows"]
            ),
            "manifest": dg.MetadataValue.path(str(result.manifest_path)),
            "rejected": dg.MetadataValue.path(str(result.rejected_path)),
        }
    )


@dg.asset(
    deps=[raw_images],
    group_name=DATA,
    owners=OWNERS,
    kinds={"great_expectations"},
    check_specs=[dg.AssetCheckSpec(name, asset="validated_labels", blocking=True) for name in EXPECTATION_NAMES],
)
def validated_labels(project: ProjectResource) -> dg.MaterializeResult:
    """The Great Expectations suite over the manifest; a failed blocking expectation stops the run here."""
    result = steps.validate_step(project.load())
    label_counts = result.label_counts
    return dg.MaterializeResult(
        metadata={
            "all_blocking_passed": result.success,
            "report": dg.MetadataValue.path(str(result.report_path)),
            "data_docs": dg.MetadataValue.path(str(result.data_docs_path)),
            "label_histogram": _table(
                [{"class": k, "images": v} for k, v in sorted(label_counts.items(), key=lambda kv: -kv[1])],
                ["class", "images"],
            ),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=o.name,
                passed=o.success,
                severity=dg.AssetCheckSeverity.ERROR if o.blocking else dg.AssetCheckSeverity.WARN,
                description=o.description,
                metadata={"observed": o.observed, "details": dg.MetadataValue.json(o.details)},
            )
            for o in result.outcomes
        ],
    )


@dg.asset(
    deps=[validated_labels],
    group_name=DATA,
    owners=OWNERS,
    kinds={"dvc"},
    check_specs=[dg.AssetCheckSpec(name, asset="dataset_splits", blocking=True) for name in SPLIT_EXPECTATION_NAMES],
)
def dataset_splits(project: ProjectResource) -> dg.MaterializeResult:
    """Iteratively stratified train/val/test split; the files are DVC outputs and their md5 is the data version.

    An image keeps its split for life: new images are dealt among themselves, so the test split never holds an
    image that the champion trained on (`mumic split --reassign` deals everything afresh)."""
    loaded = project.load()
    report = steps.split_step(loaded)
    leakage = steps.validate_splits_step(loaded)
    per_class = [
        {"class": name, **{split: info["positives"].get(name, 0) for split, info in report["splits"].items()}}
        for name in report["classes"]
    ]
    return dg.MaterializeResult(
        metadata={
            **{f"{split}_images": info["n_images"] for split, info in report["splits"].items()},
            "images_kept_in_their_split": report["assignment"]["kept"],
            "new_images_dealt": dg.MetadataValue.json(report["assignment"]["new_per_split"]),
            "md5 (as in dvc.lock)": dg.MetadataValue.json(report["md5"]),
            "dvc_lock_matches": dg.MetadataValue.json(loaded.dvc_lock_matches(report["md5"])),
            "positives_per_class": _table(per_class, ["class", *report["splits"]]),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name=o.name,
                passed=o.success,
                description=o.description,
                metadata={"details": dg.MetadataValue.json(o.details)},
            )
            for o in leakage.outcomes
        ],
        data_version=dg.DataVersion(combined_version(report["md5"])),
    )


@dg.asset(deps=[dataset_splits], group_name=MODEL, owners=OWNERS, kinds={"pytorch"})
def foundation_model(
    context: dg.AssetExecutionContext, project: ProjectResource, compute: ComputeResource
) -> dg.MaterializeResult:
    """The weights fine-tuning starts from. `model.pretrained: demo-foundation` pretrains the demo world's own
    CLIP on the train split's captions (skipped while the checkpoint matches the config and data); real weights
    are resolved (downloaded) here instead. Either way their zero-shot quality on the test split is reported."""
    outcome = steps.foundation_step(project.load().updated({"pretrain.device": compute.device}), progress=False)
    context.log.info("foundation %s: %s", outcome.source, outcome.weights or "random initialisation")
    metadata: dict = {
        "source": outcome.source,
        "decision": outcome.decision,
        "weights": outcome.weights or "random initialisation",
        "report": dg.MetadataValue.path(str(outcome.report_path)),
    }
    if outcome.zero_shot is not None:
        metadata["zero_shot_test_gap_at_10"] = outcome.zero_shot["gap_at_10"]
        metadata["zero_shot_test_map"] = outcome.zero_shot["map_macro"]
        if "held_out" in outcome.zero_shot:
            metadata["zero_shot_held_out_map"] = outcome.zero_shot["held_out"]["map_held_out"]
    if outcome.pretrain is not None:
        metadata["pretrain_seconds"] = round(outcome.pretrain["seconds"], 1)
        metadata["val_retrieval_top1"] = outcome.pretrain["val_retrieval_top1"]
    return dg.MaterializeResult(metadata=metadata)


class TrainRunConfig(dg.Config):
    """Launchpad overrides of params.yaml's train section (empty: use the file)."""

    epochs: int | None = None
    batch_size: int | None = None
    resume: bool = True


@dg.asset(deps=[dataset_splits, foundation_model], group_name=MODEL, owners=OWNERS, kinds={"pytorch", "mlflow"})
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainRunConfig,
    project: ProjectResource,
    mlflow: MlflowResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    """MuMIC fine-tuning (GPU with mixed precision when present), checkpointed every epoch and resumed after a
    crash; params, per-epoch metrics and the data version go to an MLflow run."""
    overrides = {"train.device": compute.device}
    if config.epochs is not None:
        overrides["train.epochs"] = config.epochs
    if config.batch_size is not None:
        overrides["train.batch_size"] = config.batch_size
    loaded = mlflow.track(project.load()).updated(overrides)

    def on_epoch(report) -> None:
        context.log.info(
            "epoch %d: loss %.4f val GAP@%d %.4f",
            report.epoch + 1,
            report.train_loss,
            loaded.params.evaluate.k,
            report.val_gap_at_k,
        )

    outcome = steps.train_step(loaded, resume=config.resume, on_epoch_end=on_epoch)
    curve = [
        {
            "epoch": h["epoch"] + 1,
            "train_loss": round(h["train_loss"], 5),
            "val_gap_at_k": round(h["val_gap_at_k"], 5),
        }
        for h in outcome.result.history
    ]
    return dg.MaterializeResult(
        metadata={
            "best_epoch": outcome.result.best_epoch + 1,
            "best_val_gap_at_k": outcome.result.best_val_gap_at_k,
            "gap_k": outcome.result.gap_k,
            "resumed_from": outcome.result.resumed_from or "",
            "training_curve": _table(curve, ["epoch", "train_loss", "val_gap_at_k"]),
            "model_dir": dg.MetadataValue.path(str(outcome.result.model_dir)),
            "mlflow_run_id": outcome.run_id,
            "mlflow_run": dg.MetadataValue.url(outcome.run_url),
            "data_version": dg.MetadataValue.json(outcome.data_version),
        }
    )


@dg.asset(
    deps=[trained_model],
    group_name=MODEL,
    owners=OWNERS,
    kinds={"mlflow"},
    check_specs=[dg.AssetCheckSpec("evaluation_gate", asset="model_evaluation", blocking=True)],
)
def model_evaluation(project: ProjectResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """GAP@10, GAP, mAP and per-class AP on the test split, with plots; the gate is a blocking check: an
    absolute GAP@10 floor, and not below the current champion on the same split."""
    outcome = steps.evaluate_and_gate_step(mlflow.track(project.load()))
    report, gate = outcome.report, outcome.gate
    per_class = [{"class": k, "ap": None if v is None else round(v, 4)} for k, v in report["per_class_ap"].items()]
    plots = report.get("plots", {})
    return dg.MaterializeResult(
        metadata={
            "gap_at_10": report["gap_at_10"],
            "gap": report["gap"],
            "map_macro": report["map_macro"],
            "map_top_n": report.get("map_top_n"),
            "per_class_ap": _table(sorted(per_class, key=lambda r: r["ap"] or 0), ["class", "ap"]),
            "per_class_ap_plot": dg.MetadataValue.path(plots.get("per_class_ap", "")),
            "pr_curves_plot": dg.MetadataValue.path(plots.get("precision_recall", "")),
            "metrics": dg.MetadataValue.path(str(outcome.metrics_path)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="evaluation_gate",
                passed=gate.passed,
                description="; ".join(gate.reasons) or "GAP@10 clears the floor and is not below the champion",
                metadata={
                    "gap_at_10": gate.gap_at_10,
                    "floor": gate.floor,
                    "champion_gap_at_10": gate.champion_gap_at_10,
                },
            )
        ],
    )


@dg.asset(deps=[model_evaluation], group_name=MODEL, owners=OWNERS, kinds={"mlflow"})
def registered_model(project: ProjectResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """The gated model in the MLflow registry as a pyfunc with a signature, tagged with its data version and gate
    result; alias `challenger` points at it. Promotion to `champion` is the promote job."""
    version = steps.register_step(mlflow.track(project.load()))
    return dg.MaterializeResult(
        metadata={
            "registered_model": version.name,
            "version": int(version.version),
            "alias": "challenger",
            "model_uri": f"models:/{version.name}@challenger",
            "newly_created": version.created,
        }
    )
