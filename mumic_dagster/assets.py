"""The asset graph: raw_images -> validated_labels -> dataset_splits -> (foundation_model) -> trained_model ->
model_evaluation -> registered_model, and label_audit after dataset_splits and trained_model. Each asset calls one
step of `mumic_ml.steps` and reports what a reviewer wants to see: figures inline, numbers as numbers, the data
version in one format (`mumic_dagster.metadata`)."""

from pathlib import Path

import dagster as dg

from mumic_dagster.metadata import clean, markdown_image, markdown_table, table
from mumic_dagster.resources import ComputeResource, MlflowResource, ProjectResource
from mumic_ml import previews, steps
from mumic_ml.gate import GATE_MEANING
from mumic_ml.pipeline.expectations import EXPECTATION_MEANINGS, SPLIT_EXPECTATION_MEANINGS
from mumic_ml.plots import label_histogram, positives_per_split, training_curves
from mumic_ml.project import DATA_VERSION, SPLIT_MD5_PREFIX, combined_version, data_version_fields

OWNERS = ["team:ml-platform"]
DATA = "data"
MODEL = "model"


@dg.asset(group_name=DATA, owners=OWNERS, kinds={"python", "pillow"})
def raw_images(context: dg.AssetExecutionContext, project: ProjectResource) -> dg.MaterializeResult:
    """Every labelled batch in `data/incoming/`, decoded safely, normalised, hashed and de-duplicated.

    New batches are ingested once and accumulate into one manifest. Look at `sample_images` (do the labels fit the
    pictures?) and, when rows were left out, at `rejected_images` and `first_rejected_rows`: each rejected manifest
    row with its reason, to fix in the batch's manifest or files.
    """
    loaded = project.load()
    result = steps.ingest_step(loaded)
    context.log.info("ingested %s, unchanged %s", result.ingested, result.skipped)
    rejected = previews.rejected_rows(result.rejected_path)
    sample_sheet = previews.sample_images_sheet(loaded) if result.n_images else None
    rejected_sheet = previews.rejected_rows_sheet(loaded, rejected)
    return dg.MaterializeResult(
        metadata=clean(
            {
                "images": result.n_images,
                "rejected_rows": result.n_rejected,
                "batches_ingested_now": result.ingested,
                "batches_unchanged": result.skipped,
                "sample_images": markdown_image("sample images", sample_sheet) if sample_sheet else None,
                "rejections_by_reason": table(
                    [{"reason": r, "rows": n} for r, n in result.rejected_by_reason.items()], ["reason", "rows"]
                ),
                "rejected_images": markdown_image("rejected rows", rejected_sheet) if rejected_sheet else None,
                "first_rejected_rows": table(rejected, previews.REJECTED_COLUMNS),
                "manifest": dg.MetadataValue.path(str(result.manifest_path)),
                "rejected": dg.MetadataValue.path(str(result.rejected_path)),
            }
        )
    )


def _verdict(outcome) -> str:
    if outcome.success:
        return "yes"
    return "**no** (blocks the run)" if outcome.blocking else "no (warning)"


@dg.asset(
    deps=[raw_images],
    group_name=DATA,
    owners=OWNERS,
    kinds={"great_expectations"},
    check_specs=[
        dg.AssetCheckSpec(name, asset="validated_labels", blocking=True, description=meaning)
        for name, meaning in EXPECTATION_MEANINGS.items()
    ],
)
def validated_labels(project: ProjectResource) -> dg.MaterializeResult:
    """The Great Expectations suite over the combined manifest; a failed blocking expectation stops the run here.

    `expectations` lists every expectation with its verdict and what was observed (offending rows, or the measured
    value); the checks tab has the details. `label_histogram` shows the class balance: a long tail of rare classes
    is what `min_positives_per_class` warns about.
    """
    result = steps.validate_step(project.load())
    label_counts = result.label_counts
    expectations = [
        {
            "expectation": f"`{o.name}`: {o.description}",
            "passed": _verdict(o),
            "observed": "" if o.observed is None else o.observed,
        }
        for o in result.outcomes
    ]
    return dg.MaterializeResult(
        metadata=clean(
            {
                "all_blocking_passed": result.success,
                "expectations": markdown_table(expectations, ["expectation", "passed", "observed"]),
                "label_histogram": (
                    markdown_image("images per class", label_histogram(label_counts)) if label_counts else None
                ),
                "images_per_class": table(
                    [{"class": k, "images": v} for k, v in sorted(label_counts.items(), key=lambda kv: -kv[1])],
                    ["class", "images"],
                ),
                "report": dg.MetadataValue.path(str(result.report_path)),
                "data_docs": dg.MetadataValue.path(str(result.data_docs_path)),
            }
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name=o.name,
                passed=o.success,
                severity=dg.AssetCheckSeverity.ERROR if o.blocking else dg.AssetCheckSeverity.WARN,
                description=o.description,
                metadata=clean({"observed": o.observed, "details": o.details}),
            )
            for o in result.outcomes
        ],
    )


@dg.asset(
    deps=[validated_labels],
    group_name=DATA,
    owners=OWNERS,
    kinds={"dvc"},
    check_specs=[
        dg.AssetCheckSpec(name, asset="dataset_splits", blocking=True, description=meaning)
        for name, meaning in SPLIT_EXPECTATION_MEANINGS.items()
    ],
)
def dataset_splits(project: ProjectResource) -> dg.MaterializeResult:
    """Iteratively stratified train/val/test split files, versioned by DVC.

    An image keeps its split for life: new images are dealt among themselves, so the test split never holds an
    image that the champion trained on (`mumic split --reassign` deals everything afresh). `data_version` names the
    three files together (the tag on MLflow runs and model versions); `split_md5.<split>` is each file's md5 as
    dvc.lock records it. Look at `positives_per_split`: a class with no positives in val or test cannot be
    selected on or measured.
    """
    loaded = project.load()
    report = steps.split_step(loaded)
    leakage = steps.validate_splits_step(loaded)
    positives = {split: info["positives"] for split, info in report["splits"].items()}
    per_class = [
        {"class": name, **{split: positives[split].get(name, 0) for split in positives}} for name in report["classes"]
    ]
    return dg.MaterializeResult(
        metadata=clean(
            {
                **{f"{split}_images": info["n_images"] for split, info in report["splits"].items()},
                "images_kept_in_their_split": report["assignment"]["kept"],
                "new_images_dealt": report["assignment"]["new_per_split"],
                **data_version_fields(report["md5"]),
                "split_md5_matches_dvc_lock": loaded.dvc_lock_matches(report["md5"]),
                "positives_per_split": markdown_image("positives per class by split", positives_per_split(positives)),
                "positives_per_class": table(per_class, ["class", *report["splits"]]),
            }
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name=o.name,
                passed=o.success,
                description=o.description,
                metadata=clean({"details": o.details}),
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
    CLIP on the train split's captions (skipped while the checkpoint matches the config; `decision` says why),
    each epoch logged in the run; real weights are resolved (downloaded) here instead. Look at the zero-shot
    scores on the test split: what the weights know before fine-tuning, the baseline `trained_model` must beat."""
    loaded = project.load().updated({"pretrain.device": compute.device})
    epochs = loaded.params.pretrain.epochs

    def on_pretrain_epoch(entry: dict) -> None:
        context.log.info(
            "pretrain epoch %d/%d: loss %.4f, val image->caption top-1 %.4f",
            entry["epoch"] + 1,
            epochs,
            entry["train_loss"],
            entry["val_retrieval_top1"],
        )

    outcome = steps.foundation_step(loaded, progress=False, on_pretrain_epoch=on_pretrain_epoch)
    context.log.info("foundation %s: %s", outcome.source, outcome.weights or "random initialisation")
    zero_shot = outcome.zero_shot or {}
    pretrain = outcome.pretrain or {}
    return dg.MaterializeResult(
        metadata=clean(
            {
                "source": outcome.source,
                "decision": outcome.decision,
                "weights": outcome.weights or "random initialisation",
                "zero_shot_test_gap_at_10": zero_shot.get("gap_at_10"),
                "zero_shot_test_map": zero_shot.get("map_macro"),
                "zero_shot_held_out_map": zero_shot.get("held_out", {}).get("map_held_out"),
                "pretrain_epochs": pretrain.get("epochs"),
                "pretrain_seconds": round(pretrain["seconds"], 1) if "seconds" in pretrain else None,
                "val_retrieval_top1": pretrain.get("val_retrieval_top1"),
                "report": dg.MetadataValue.path(str(outcome.report_path)),
            }
        )
    )


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
    crash; each epoch is logged in the run. Look at `training_curves`: a validation GAP still rising at the last
    epoch wants more epochs, one falling after `best_epoch` over-fits (the best epoch is the one exported). The
    MLflow run (`mlflow_run`) holds params, per-epoch metrics, the datasets, the figures and this run's id."""
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

    outcome = steps.train_step(loaded, resume=config.resume, on_epoch_end=on_epoch, dagster_run_id=context.run.run_id)
    result = outcome.result
    curve = [
        {"epoch": h["epoch"] + 1, "train_loss": h["train_loss"], "val_gap_at_k": h["val_gap_at_k"]}
        for h in result.history
    ]
    curves_png = training_curves(result.history, result.gap_k, result.best_epoch) if result.history else None
    return dg.MaterializeResult(
        metadata=clean(
            {
                "best_epoch": result.best_epoch + 1,
                "best_val_gap_at_k": result.best_val_gap_at_k,
                "gap_k": result.gap_k,
                "epochs_run": result.epochs_run,
                "resumed_from": result.resumed_from,
                "pseudo_labels": result.pseudo_labels,
                "linear_probe": result.linear_probe,
                "training_curves": markdown_image("training and validation curves", curves_png) if curves_png else None,
                "training_curve": table(curve, ["epoch", "train_loss", "val_gap_at_k"]),
                "model_dir": dg.MetadataValue.path(str(result.model_dir)),
                "mlflow_run_id": outcome.run_id,
                "mlflow_run": dg.MetadataValue.url(outcome.run_url) if outcome.run_url else None,
                **data_version_fields(outcome.data_version),
            }
        )
    )


def _plot_file(title: str, path: str | None) -> dg.MarkdownMetadataValue | None:
    return markdown_image(title, Path(path).read_bytes()) if path else None


@dg.asset(
    deps=[trained_model],
    group_name=MODEL,
    owners=OWNERS,
    kinds={"mlflow"},
    check_specs=[
        dg.AssetCheckSpec("evaluation_gate", asset="model_evaluation", blocking=True, description=GATE_MEANING)
    ],
)
def model_evaluation(project: ProjectResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """The trained model on the test split, and the gate (a blocking check) that decides whether it is registered.

    GAP@10 is the headline (the Plots tab charts it across materializations); `per_class_ap_plot` shows which
    classes are weak, `pr_curves_plot` where thresholds can sit, `reliability_plot` and `ece_raw` /
    `ece_calibrated` how far the scores are from frequencies before and after the model's fitted calibration, and
    the `zero_shot_held_out_*` numbers how classes never trained on score from their names alone. The gate compares
    with the floor and with the champion re-measured on the same split.
    """
    outcome = steps.evaluate_and_gate_step(mlflow.track(project.load()))
    report, gate = outcome.report, outcome.gate
    per_class = [{"class": k, "ap": v} for k, v in report["per_class_ap"].items()]
    plots = report.get("plots", {})
    zero_shot = report.get("zero_shot", {})
    return dg.MaterializeResult(
        metadata=clean(
            {
                "gap_at_10": report["gap_at_10"],
                "gap": report["gap"],
                "map_macro": report["map_macro"],
                "map_top_n": report.get("map_top_n"),
                "test_images": report["num_images"],
                "gate_passed": gate.passed,
                "per_class_ap_plot": _plot_file("per-class AP", plots.get("per_class_ap")),
                "pr_curves_plot": _plot_file("precision-recall curves", plots.get("precision_recall")),
                "ece_raw": report["ece_raw"],
                "ece_calibrated": report["ece_calibrated"],
                "calibration_temperature": report["calibration"]["temperature"],
                "calibration_bias": report["calibration"]["bias"],
                "reliability_plot": _plot_file("reliability diagram", plots.get("reliability")),
                "per_class_ap": table(sorted(per_class, key=lambda r: r["ap"] or 0), ["class", "ap"]),
                "zero_shot_held_out_classes": ", ".join(zero_shot.get("classes", [])),
                "zero_shot_held_out_map": zero_shot.get("map_held_out"),
                "zero_shot_held_out_gap_at_10": zero_shot.get("gap_at_10_held_out"),
                "zero_shot_held_out_chance_map": zero_shot.get("chance_map"),
                "zero_shot_note": zero_shot.get("note"),
                "metrics": dg.MetadataValue.path(str(outcome.metrics_path)),
            }
        ),
        check_results=[
            dg.AssetCheckResult(
                check_name="evaluation_gate",
                passed=gate.passed,
                description="; ".join(gate.reasons) or "GAP@10 clears the floor and is not below the champion",
                metadata=clean(
                    {
                        "gap_at_10": gate.gap_at_10,
                        "floor": gate.floor,
                        "champion_gap_at_10": gate.champion_gap_at_10,
                        "notes": "; ".join(gate.notes),
                    }
                ),
            )
        ],
    )


@dg.asset(deps=[model_evaluation], group_name=MODEL, owners=OWNERS, kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext, project: ProjectResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """The gated model in the MLflow registry as a pyfunc with a signature, tagged with its data version and gate
    result, described by its model card (shown here as on the version's registry page); alias `challenger` points
    at it. Promotion to `champion` is the promote job."""
    version = steps.register_step(mlflow.track(project.load()), dagster_run_id=context.run.run_id)
    data_version = {k: v for k, v in version.tags.items() if k == DATA_VERSION or k.startswith(SPLIT_MD5_PREFIX)}
    return dg.MaterializeResult(
        metadata=clean(
            {
                "registered_model": version.name,
                "version": int(version.version),
                "alias": "challenger",
                "model_uri": f"models:/{version.name}@challenger",
                "newly_created": version.created,
                **data_version,
                "model_card": dg.MetadataValue.md(version.description),
            }
        )
    )


SUSPECT_COLUMNS = ["rank", "image", "class", "score", "source"]
TOP_SUSPECTS = 15


@dg.asset(deps=[dataset_splits, trained_model], group_name=DATA, owners=OWNERS, kinds={"pytorch"})
def label_audit(project: ProjectResource, compute: ComputeResource) -> dg.MaterializeResult:
    """Which training labels look wrong: every training image scored out of fold (k-fold cross-fitting of a linear
    head on frozen image embeddings, `audit` in params.yaml), ranked into suspected missing labels (labelled
    absent, scored high) and suspected wrong ones (labelled present, scored low). Look at `top_missing` and
    `top_wrong`; work through `report` (thumbnails, accept/reject), download the reviewed CSV and run
    `mumic audit --apply reviewed.csv`: the next run ingests the corrections as a batch and retrains on them."""
    loaded = project.load().updated({"audit.device": compute.device})
    result = steps.audit_step(loaded)
    return dg.MaterializeResult(
        metadata=clean(
            {
                "training_images": result.n_images,
                "classes": result.n_classes,
                "folds": loaded.params.audit.folds,
                "backbone": loaded.params.audit.backbone.value,
                "embedded_now": result.embedded_now,
                "missing_candidates": result.candidates["missing"],
                "wrong_candidates": result.candidates["wrong"],
                "top_missing": markdown_table(result.rows["missing"][:TOP_SUSPECTS], SUSPECT_COLUMNS),
                "top_wrong": markdown_table(result.rows["wrong"][:TOP_SUSPECTS], SUSPECT_COLUMNS),
                "seconds": round(result.seconds, 1),
                "suspects": dg.MetadataValue.path(str(result.csv_path)),
                "report": dg.MetadataValue.path(str(result.html_path)),
            }
        )
    )
