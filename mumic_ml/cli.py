"""`mumic`: one subcommand per pipeline step, each a thin call into the library.

Every pipeline subcommand reads `params.yaml` (or `--params FILE`), accepts `--set key=value` overrides, and takes
explicit paths that default to the `paths` section; DVC stages and the Dagster assets call the same functions. The
folder a command runs in is the project root that relative paths start from, so a missing parameter file is an
error rather than a run on defaults. The commands that track, register or validate need the pipeline extra and say
so, in one line, when it is not installed. `import` is not a step: it turns a public benchmark into an incoming
batch from the paths it is given, and reads no parameters.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from mumic_ml.config import DEFAULT_PARAMS_FILE, DEMO_FOUNDATION, ConfigError, load_params
from mumic_ml.pipeline import ServiceUnavailable, missing_extra_module
from mumic_ml.project import Project

if TYPE_CHECKING:
    from mumic_ml.importers.batch_folder import ImportResult

log = logging.getLogger("mumic")


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback."""


def _parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _project(args: argparse.Namespace) -> Project:
    """The project in the current folder, with the parameter file and `--set` overrides the command was given."""
    return Project(load_params(args.params), Path.cwd()).updated(_parse_overrides(args.set))


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mumic_ml.demo_world import generate_demo_world

    project = _project(args)
    params = project.params
    out = Path(args.out) if args.out else project.demo
    if args.keep_existing and (out / "world.json").is_file():
        print(f"demo world: kept the one already in {out}")
        return 0
    world = generate_demo_world(
        out,
        n_images=args.n_images or params.demo.n_images,
        image_size=args.image_size or params.demo.image_size,
        seed=params.demo.seed if args.seed is None else args.seed,
        first_index=args.first_index,
    )
    print(f"demo world: {world.n_images} images, {len(world.class_names)} classes -> {out}")
    print(f"  manifest: {world.manifest_path}\n  taxonomy: {world.taxonomy_path}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mumic_ml.ingest import ingest
    from mumic_ml.steps import ingest_step
    from mumic_ml.taxonomy import load_taxonomy

    project = _project(args)
    params = project.params
    if args.manifest is None:
        overrides = {"paths.incoming": args.incoming, "paths.ingested": args.out, "paths.taxonomy": args.taxonomy}
        batches = ingest_step(_with_paths(project, overrides))
        print(
            f"ingest: {len(batches.ingested)} new batch(es) {batches.ingested}, {len(batches.skipped)} unchanged; "
            f"{batches.n_images} images, {batches.n_rejected} rejected rows"
        )
        reasons, manifest, rejected = batches.rejected_by_reason, batches.manifest_path, batches.rejected_path
    else:
        if args.images_root is None:
            raise CommandError("--manifest needs --images-root (the folder its paths are relative to)")
        result = ingest(
            args.manifest,
            args.images_root,
            args.out or project.ingested,
            taxonomy=load_taxonomy(args.taxonomy) if args.taxonomy else None,
            max_side=params.ingest.max_side,
            min_side=params.ingest.min_side,
            max_pixels=params.ingest.max_pixels,
            workers=params.ingest.workers,
        )
        print(f"ingest: {result.n_rows} rows, {result.n_accepted} accepted, {result.n_rejected} rejected")
        reasons, manifest, rejected = result.rejected_by_reason, result.manifest_path, result.rejected_path
    for reason, count in reasons.items():
        print(f"  {reason}: {count}")
    print(f"  manifest: {manifest}\n  rejected: {rejected}")
    return 0


def cmd_import_coco(args: argparse.Namespace) -> int:
    from mumic_ml.importers.coco import import_coco

    result = import_coco(
        args.annotations, args.images, args.out, captions=args.captions, keep_unlabelled=args.keep_unlabelled
    )
    _print_import("coco", result)
    return 0


def cmd_import_voc(args: argparse.Namespace) -> int:
    from mumic_ml.importers.voc import import_voc

    _print_import("voc", import_voc(args.root, args.image_set, args.out))
    return 0


def cmd_import_openimages(args: argparse.Namespace) -> int:
    from mumic_ml.importers.openimages import import_openimages

    _print_import("openimages", import_openimages(args.labels, args.classes, args.images, args.out))
    return 0


def _print_import(name: str, result: ImportResult) -> None:
    print(f"import {name}: {result.n_images} images, {result.n_classes} classes -> {result.out_dir}")
    if result.n_rejected:
        print(f"  {result.n_rejected} left out:")
    for reason, count in result.rejected_by_reason.items():
        print(f"    {reason}: {count}")
    if result.n_without_positives:
        print(
            f"  {result.n_without_positives} images show no class, only negative or unknown ones; the validation "
            "suite counts them against expectations.min_labels_per_image"
        )
    print(f"  manifest: {result.manifest_path}\n  taxonomy: {result.taxonomy_path}\n  rejected: {result.rejected_path}")


def _with_paths(project: Project, overrides: dict[str, object]) -> Project:
    """Apply the path flags a command was given (None: keep params.yaml's)."""
    return project.updated({key: str(value) for key, value in overrides.items() if value is not None})


def cmd_validate(args: argparse.Namespace) -> int:
    from mumic_ml.steps import validate_step

    project = _with_paths(_project(args), {"paths.ingested": args.ingested, "paths.taxonomy": args.taxonomy})
    result = validate_step(project)
    for outcome in result.outcomes:
        mark = "ok  " if outcome.success else ("FAIL" if outcome.blocking else "warn")
        print(f"  [{mark}] {outcome.name}: {outcome.description}")
    print(f"validate: report {result.report_path}, data docs {result.data_docs_path}")
    if not result.success:
        print("validate: a blocking expectation failed; fix the data or the taxonomy before training", file=sys.stderr)
        return 1
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from mumic_ml.steps import split_step, validate_splits_step

    project = _with_paths(
        _project(args), {"paths.splits": args.out, "paths.taxonomy": args.taxonomy, "paths.ingested": args.ingested}
    )
    report = split_step(project, reassign=args.reassign)
    sizes = {name: info["n_images"] for name, info in report["splits"].items()}
    print(f"split: {sizes} -> {project.params.paths.splits}")
    assignment = report["assignment"]
    dealt = assignment["new_per_split"]
    print(f"  {assignment['kept']} images kept their split, {assignment['new']} new dealt {dealt}", end="")
    print(f", {assignment['dropped']} no longer in the manifest" if assignment["dropped"] else "")
    leakage = validate_splits_step(project)
    if not leakage.success:
        for outcome in leakage.outcomes:
            if not outcome.success:
                print(f"split: {outcome.name} failed: {outcome.details}", file=sys.stderr)
        return 1
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from mumic_ml.steps import foundation_step

    project = _with_paths(
        _project(args),
        {
            "paths.splits": args.splits,
            "paths.ingested": args.images_root,
            "paths.cache": args.cache_dir,
            "paths.foundation": args.out,
            "paths.taxonomy": args.taxonomy,
        },
    )
    outcome = foundation_step(project, force=args.force, progress=not args.no_progress)
    print(f"pretrain: {outcome.decision}")
    if outcome.pretrain is not None:
        record = outcome.pretrain
        print(
            f"pretrain ({outcome.source}): {record['epochs']} epochs in {record['seconds']:.0f} s, "
            f"loss {record['final_loss']:.4f}, val image->caption top-1 {record['val_retrieval_top1']:.3f}"
        )
    else:
        print(
            f"pretrain: model.pretrained is {project.params.model.pretrained!r}, nothing to pretrain "
            f"(set model.pretrained to '{DEMO_FOUNDATION}' for the demo foundation)"
        )
    print(f"  weights: {outcome.weights or 'random initialisation'}")
    if outcome.zero_shot is not None:
        zero_shot = outcome.zero_shot
        print(f"  zero-shot on the test split: GAP@10 {zero_shot['gap_at_10']:.4f}, mAP {zero_shot['map_macro']:.4f}")
    print(f"  report: {outcome.report_path}")
    return 0


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from mumic_ml.pretrain import export_zero_shot

    project = _project(args)
    weights = args.weights or project.foundation_weights()
    model_dir = export_zero_shot(
        project.params,
        taxonomy_path=Path(args.taxonomy) if args.taxonomy else project.taxonomy,
        backbone_weights=weights,
        model_dir=Path(args.model_dir),
    )
    print(f"zero-shot: {project.params.model.backbone} from {weights}, no fine-tuning -> {model_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mumic_ml.steps import train_step

    project = _with_paths(
        _project(args),
        {
            "paths.splits": args.splits,
            "paths.ingested": args.images_root,
            "paths.taxonomy": args.taxonomy,
            "paths.run": args.run_dir,
            "paths.model": args.model_dir,
            "paths.cache": args.cache_dir,
        },
    )
    outcome = train_step(project, resume=args.resume, progress=not args.no_progress)
    result = outcome.result
    print(
        f"train: best epoch {result.best_epoch + 1} of {result.epochs_run}, "
        f"val GAP@{result.gap_k} {result.best_val_gap_at_k:.4f} -> {result.model_dir}"
    )
    print(f"  MLflow run {outcome.run_id}")
    return 0


# What `evaluate` measures when not gating; `--gate` always measures the project's own model and test split.
_EVALUATE_TARGET_FLAGS = {
    "model": "--model",
    "split": "--split",
    "images_root": "--images-root",
    "out": "--out",
    "cache_dir": "--cache-dir",
    "device": "--device",
}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mumic_ml.evaluate import evaluate_model

    project = _project(args)
    if args.gate:
        given = [flag for dest, flag in _EVALUATE_TARGET_FLAGS.items() if getattr(args, dest) is not None]
        if given:
            raise CommandError(
                f"--gate measures the project's model (paths.model) on its test split and writes paths.reports, "
                f"so it takes no {', '.join(given)}; use --set paths.<name>=... to point the project elsewhere"
            )
        return _evaluate_with_gate(project)
    params = project.params
    out = Path(args.out) if args.out else project.metrics
    report = evaluate_model(
        Path(args.model) if args.model else project.model,
        Path(args.split) if args.split else project.split("test"),
        Path(args.images_root) if args.images_root else project.ingested,
        out,
        cache_dir=Path(args.cache_dir) if args.cache_dir else project.cache,
        k=params.evaluate.k,
        top_n_classes=params.evaluate.top_n_classes,
        batch_size=params.evaluate.batch_size,
        device=args.device or "cpu",
    )
    _print_report(report, out)
    return 0


def _print_report(report: dict, out: Path) -> None:
    print(f"evaluate ({report['num_images']} images, {report['num_classes']} classes) -> {out}")
    print(f"  GAP@10 {report['gap_at_10']:.4f}   GAP {report['gap']:.4f}   mAP {report['map_macro']:.4f}", end="")
    if "map_top_n" in report:
        print(f"   mAP(top {report['top_n']}) {report['map_top_n']:.4f}", end="")
    print()
    calibration = report["calibration"]
    print(
        f"  ECE {report['ece_raw']:.4f} raw, {report['ece_calibrated']:.4f} calibrated "
        f"(temperature {calibration['temperature']:.3f}, bias {calibration['bias']:.3f}, "
        f"{calibration['raw']['n_bins']} bins)"
    )
    zero_shot = report.get("zero_shot", {})
    if "map_held_out" in zero_shot:
        print(
            f"  zero-shot on held-out {zero_shot['classes']}: mAP {zero_shot['map_held_out']:.4f} "
            f"(chance {zero_shot['chance_map']:.4f})"
        )


def _evaluate_with_gate(project: Project) -> int:
    """The project's model on the test split, logged to its MLflow run, then the gate (exit 1 when it fails)."""
    from mumic_ml.steps import evaluate_and_gate_step

    outcome = evaluate_and_gate_step(project)
    _print_report(outcome.report, outcome.metrics_path)
    gate = outcome.gate
    if gate.champion_gap_at_10 is not None:
        print(f"  champion on the same split: GAP@10 {gate.champion_gap_at_10:.4f}")
    for note in gate.notes:
        print(f"  note: {note}")
    if not gate.passed:
        print(f"gate: FAILED: {'; '.join(gate.reasons)} ({outcome.gate_path})", file=sys.stderr)
        return 1
    print(f"gate: passed (floor {gate.floor}) -> {outcome.gate_path}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from mumic_ml.audit import KINDS
    from mumic_ml.steps import audit_apply_step, audit_step

    project = _project(args)
    if args.apply is not None:
        outcome = audit_apply_step(project, Path(args.apply))
        if outcome.batch_dir is None:
            print(f"audit --apply: {outcome.decisions} decision(s), no label changes: nothing to write")
        elif not outcome.created:
            print(f"audit --apply: the same corrections are already in {outcome.batch_dir}")
        else:
            print(f"audit --apply: {outcome.decisions} decision(s) change {outcome.images} image(s)")
            print(f"  correction batch: {outcome.batch_dir} (run `mumic ingest`, or the pipeline, to apply it)")
        return 0
    result = audit_step(project)
    cfg = project.params.audit
    print(
        f"audit: {result.n_images} training images, {result.n_classes} classes, {cfg.folds}-fold cross-fitting on "
        f"the {cfg.backbone.value}'s embeddings ({result.embedded_now} embedded now) in {result.seconds:.1f} s"
    )
    for kind in KINDS:
        top = ", ".join(f"{row['image']} {row['class']!r} {row['score']:.2f}" for row in result.rows[kind][:3])
        print(f"  {kind}: {result.candidates[kind]} candidates; top: {top or 'none'}")
    print(f"  suspects: {result.csv_path}\n  report:   {result.html_path}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from mumic_ml.pipeline.registry import RegistryError
    from mumic_ml.steps import register_step

    try:
        info = register_step(_project(args))
    except RegistryError as exc:
        raise CommandError(str(exc)) from exc
    state = "registered" if info.created else "already registered"
    print(f"register: {state} {info.name} version {info.version}, alias challenger ({info.uri})")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from mumic_ml.pipeline.registry import RegistryError
    from mumic_ml.steps import promote_step

    try:
        outcome = promote_step(_project(args), version=args.version, force=args.force, rollback=args.rollback)
    except RegistryError as exc:
        raise CommandError(str(exc)) from exc
    print(f"promote: {outcome.message}")
    return 0 if outcome.moved else 1


def cmd_status(args: argparse.Namespace) -> int:
    """What the last pipeline run produced, and where to look at it."""
    from mumic_ml.io import read_json
    from mumic_ml.pipeline.registry import current_champion
    from mumic_ml.pipeline.services import reachable_tracking_location
    from mumic_ml.project import DATA_VERSION, SPLIT_MD5_PREFIX, data_version_fields

    project = _project(args)
    if not project.metrics.is_file():
        raise CommandError(f"no evaluation yet ({project.metrics}); run the pipeline first (make demo)")
    report = read_json(project.metrics)
    uri, _ = reachable_tracking_location(project)
    champion = current_champion(project.params.mlflow.registered_model, tracking_uri=uri)
    print("MuMIC pipeline summary")
    print(f"  test split: GAP@10 {report['gap_at_10']:.4f}   GAP {report['gap']:.4f}   mAP {report['map_macro']:.4f}")
    version = data_version_fields(project.data_version())
    splits = ", ".join(
        f"{key.removeprefix(SPLIT_MD5_PREFIX)} {md5}" for key, md5 in version.items() if key != DATA_VERSION
    )
    print(f"  data version: {version[DATA_VERSION]} (split md5s as in dvc.lock: {splits})")
    if project.registration.is_file():
        reg = read_json(project.registration)
        print(f"  registered: {reg['name']} version {reg['version']} (alias challenger), MLflow run {reg['run_id']}")
    print(f"  champion: {'none yet' if champion is None else f'version {champion.version}'}")
    print(f"  MLflow store: {uri}")
    print("  Dagster UI:  make ui         (then http://127.0.0.1:3000)")
    print("  MLflow UI:   make mlflow-ui  (then http://127.0.0.1:5000)")
    print("  serve:       make serve      (the champion on http://127.0.0.1:5001/invocations)")
    return 0


def cmd_check_services(args: argparse.Namespace) -> int:
    """Each shared service the project is configured for, `ok` or the one line that says what to fix; exit 2 when
    any does not answer, so a deployment can run it before anything else."""
    from mumic_ml.pipeline.services import check_services

    results = check_services(_project(args), os.environ.get("DAGSTER_HOME"))
    for service, problem in results:
        print(f"ok: {service}" if problem is None else f"error: {problem}")
    return 2 if any(problem is not None for _, problem in results) else 0


def _resolve_model(model: str, project: Project) -> Path:
    """A local model directory, or an MLflow model URI resolved against the configured (default: local) store."""
    if "://" in model or model.startswith(("models:/", "runs:/")):
        from mumic_ml.pipeline.registry import RegistryError, resolve_model_uri
        from mumic_ml.pipeline.services import reachable_tracking_location

        uri, _ = reachable_tracking_location(project)
        try:
            return resolve_model_uri(model, tracking_uri=uri)
        except RegistryError as exc:
            raise CommandError(str(exc)) from exc
    path = Path(model)
    if not path.is_dir():
        raise CommandError(f"model directory not found: {path}")
    return path


def _add_extra_class(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--extra-class",
        action="append",
        default=[],
        metavar="NAME",
        help="also score this class name zero-shot (repeatable)",
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from mumic_ml.predict import Predictor

    project = _project(args)
    params = project.params
    predictor = Predictor.from_dir(
        _resolve_model(args.model, project), device=args.device, batch_size=params.predict.batch_size
    )
    predictions = predictor.predict(
        args.images,
        top_k=args.top_k or params.predict.top_k,
        threshold=args.threshold if args.threshold is not None else params.predict.threshold,
        extra_classes=args.extra_class,
    )
    failed = 0
    for prediction in predictions:
        print(json.dumps(prediction.to_dict()))
        failed += prediction.error is not None
    return 1 if failed == len(predictions) else 0


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    from mumic_ml.io import atomic_path
    from mumic_ml.predict import Predictor

    predictor = Predictor.from_dir(_resolve_model(args.model, _project(args)), device=args.device)
    matrix, errors = predictor.embed(args.images)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, matrix, allow_pickle=False)
    for image, error in zip(args.images, errors):
        if error is not None:
            print(f"embed: {image}: {error}", file=sys.stderr)
    print(f"embed: {matrix.shape[0]} x {matrix.shape[1]} embeddings -> {args.out}")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    from mumic_ml.runtime import resolve_device
    from mumic_ml.tagging import TaggingError, list_images, tag_images

    flags = {"top_k": args.top_k, "threshold": args.threshold, "workers": args.workers, "batch_size": args.batch_size}
    project = _project(args).updated({f"tag.{key}": value for key, value in flags.items() if value is not None})
    model_dir = _resolve_model(args.model, project)
    images = Path(args.images)
    try:
        summary = tag_images(
            model_dir,
            list_images(images),
            Path(args.out),
            source=str(images.resolve()),
            config=project.params.tag,
            extra_classes=args.extra_class,
            embeddings=args.embeddings,
            device=resolve_device(args.device),
            progress=not args.no_progress,
        )
    except TaggingError as exc:
        raise CommandError(str(exc)) from exc
    print(json.dumps(summary.to_json()))
    return 1 if summary.images and not summary.tagged else 0


def _add_training_data_args(p: argparse.ArgumentParser) -> None:
    """Where pretraining and fine-tuning read their data: the same four flags for both."""
    p.add_argument("--splits", help="folder with train.parquet and val.parquet (default: paths.splits)")
    p.add_argument("--images-root", help="folder the split paths are relative to (default: paths.ingested)")
    p.add_argument("--taxonomy", help="taxonomy YAML (default: paths.taxonomy)")
    p.add_argument("--cache-dir", help="preprocessing cache (default: paths.cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mumic", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=DEFAULT_PARAMS_FILE, help="parameter file (default: params.yaml)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set train.epochs=3 (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", parents=[common], help="generate the procedural demo world")
    p.add_argument("--out", help="output folder (default: paths.demo)")
    p.add_argument("--n-images", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--first-index",
        type=int,
        default=0,
        help="start at this image of the sequence: with --out data/incoming/<name>, a batch of new photos",
    )
    p.add_argument("--keep-existing", action="store_true", help="leave a demo world already in --out as it is")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser(
        "ingest",
        parents=[common],
        help="decode, normalise, de-duplicate and check labelled images: one manifest, or every batch in a folder",
    )
    p.add_argument("--manifest", help="one batch: CSV, JSONL or Parquet with `path` and `labels`")
    p.add_argument("--images-root", help="with --manifest: the folder that manifest paths are relative to")
    p.add_argument("--incoming", help="without --manifest: folder of batches (default: paths.incoming)")
    p.add_argument("--out", help="output folder (default: paths.ingested)")
    p.add_argument("--taxonomy", help="taxonomy YAML; labels outside it are rejected (batch mode: paths.taxonomy)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("import", help="write a public benchmark (COCO, Pascal VOC, Open Images) as an incoming batch")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    out_help = "batch folder to write, e.g. data/incoming/<name> (replaced whole; refused if it is not a batch)"
    p = formats.add_parser("coco", help="COCO instances JSON, optionally captions JSON, and the image folder")
    p.add_argument("--annotations", required=True, help="instances_*.json")
    p.add_argument("--captions", help="captions_*.json of the same images: each image's first caption")
    p.add_argument("--images", required=True, help="folder the file_name of every image is relative to")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument(
        "--keep-unlabelled",
        action="store_true",
        help="keep images without annotations, every category a verified negative (default: left out, counted)",
    )
    p.set_defaults(func=cmd_import_coco)
    p = formats.add_parser("voc", help="Pascal VOC: image-level labels of an image set, difficult-only as unknown")
    p.add_argument("--root", required=True, help="the VOC folder, e.g. VOCdevkit/VOC2007")
    p.add_argument("--image-set", required=True, help="ImageSets/Main/<image-set>.txt, e.g. trainval")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(func=cmd_import_voc)
    p = formats.add_parser("openimages", help="Open Images human-verified image labels: 1 present, 0 verified absent")
    p.add_argument("--labels", required=True, nargs="+", help="one or more *-human-imagelabels*.csv")
    p.add_argument("--classes", required=True, help="class-descriptions*.csv (LabelName,DisplayName)")
    p.add_argument("--images", required=True, help="folder of <ImageID>.jpg")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(func=cmd_import_openimages)

    p = sub.add_parser("validate", parents=[common], help="Great Expectations suite over the ingested manifest")
    p.add_argument("--ingested", help="folder with manifest.parquet (default: paths.ingested)")
    p.add_argument("--taxonomy", help="taxonomy YAML (default: paths.taxonomy)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("split", parents=[common], help="iteratively stratified train/val/test split")
    p.add_argument("--ingested", help="folder with the ingested manifest.parquet (default: paths.ingested)")
    p.add_argument("--out", help="output folder (default: paths.splits)")
    p.add_argument("--taxonomy", help="taxonomy YAML, fixes the class order (default: paths.taxonomy)")
    p.add_argument(
        "--reassign",
        action="store_true",
        help="deal every image afresh instead of keeping earlier images in their split (earlier models can then "
        "no longer be compared on the test split)",
    )
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("pretrain", parents=[common], help="contrastive image-caption pretraining of the backbone")
    _add_training_data_args(p)
    p.add_argument("--out", help="folder for <backbone>.safetensors and its records (default: paths.foundation)")
    p.add_argument("--force", action="store_true", help="pretrain even if the checkpoint matches config and data")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("zero-shot", parents=[common], help="export a MuMIC model from a backbone, no fine-tuning")
    p.add_argument("--weights", help="checkpoint file or open_clip tag (default: what model.pretrained names)")
    p.add_argument("--taxonomy", help="taxonomy YAML (default: paths.taxonomy)")
    p.add_argument("--model-dir", required=True, help="model directory to write")
    p.set_defaults(func=cmd_zero_shot)

    p = sub.add_parser("train", parents=[common], help="fine-tune MuMIC (or a baseline) and export the best model")
    _add_training_data_args(p)
    p.add_argument("--run-dir", help="checkpoints and history (default: paths.run)")
    p.add_argument("--model-dir", help="exported model (default: paths.model)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="GAP@10, GAP, mAP and per-class AP on a split")
    p.add_argument("--model", help="model directory (default: paths.model)")
    p.add_argument("--split", help="split parquet (default: paths.splits/test.parquet)")
    p.add_argument("--images-root", help="folder the split paths are relative to (default: paths.ingested)")
    p.add_argument("--out", help="metrics JSON (default: paths.reports/metrics.json)")
    p.add_argument("--cache-dir", help="preprocessing cache (default: paths.cache)")
    p.add_argument("--device", help="default: cpu")
    p.add_argument(
        "--gate",
        action="store_true",
        help="the project's model on its test split (none of the flags above): log to its MLflow run, compare with "
        "the champion, exit 1 if it fails",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "audit",
        parents=[common],
        help="rank suspected missing and wrong training labels (CSV and HTML report), or --apply a reviewed list",
    )
    p.add_argument(
        "--apply",
        metavar="REVIEWED_CSV",
        help="turn a reviewed suspects list (decision accept/reject) into a correction batch in paths.incoming",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("register", parents=[common], help="register the gated model in MLflow as `challenger`")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("promote", parents=[common], help="move `champion` to the challenger if it is not worse")
    p.add_argument("--version", help="promote this registered version instead of the challenger")
    p.add_argument("--force", action="store_true", help="promote even if worse than the champion")
    p.add_argument("--rollback", action="store_true", help="put `champion` back on the previous champion")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("status", parents=[common], help="summary of the last run: metrics, data version, models")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "check-services",
        parents=[common],
        help="whether the MLflow store, Dagster's PostgreSQL ($DAGSTER_HOME) and DVC's S3 remotes answer as configured",
    )
    p.set_defaults(func=cmd_check_services)

    p = sub.add_parser("predict", parents=[common], help="print top labels for images as JSON lines")
    p.add_argument("--model", required=True, help="model directory, or an MLflow URI such as models:/mumic@champion")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, help="labels per image (default: predict.top_k)")
    p.add_argument("--threshold", type=float, help="only labels with probability >= this")
    _add_extra_class(p)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", parents=[common], help="export L2-normalised image embeddings to a .npy file")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output .npy (rows in the order of the images; NaN if unreadable)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "tag",
        parents=[common],
        help="tag a folder or manifest of photos into Parquet, in chunks that a killed run resumes",
    )
    p.add_argument("--model", required=True, help="model directory, or an MLflow URI such as models:/mumic@champion")
    p.add_argument("--images", required=True, help="folder (searched recursively) or manifest (CSV, JSONL, Parquet)")
    p.add_argument("--out", required=True, help="Parquet file to write; <out>.parts/ holds the chunks until done")
    p.add_argument("--embeddings", action="store_true", help="also write each image's L2-normalised embedding")
    _add_extra_class(p)
    p.add_argument("--top-k", type=int, help="ranked labels per image (default: tag.top_k)")
    p.add_argument("--threshold", type=float, help="tag every class at this probability (default: tuned per class)")
    p.add_argument("--workers", type=int, help="decoding processes (default: tag.workers)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: tag.batch_size)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tag)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; third-party chatter (open_clip logs every model build at INFO) only at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mumic_ml").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from mumic_ml.audit import AuditError
    from mumic_ml.backbone import BackboneError
    from mumic_ml.checkpoint import CheckpointError
    from mumic_ml.importers.batch_folder import DatasetImportError
    from mumic_ml.manifest import ManifestError
    from mumic_ml.model_io import ModelDirError
    from mumic_ml.taxonomy import TaxonomyError

    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        missing = missing_extra_module(exc)
        if missing is None:
            raise
        extra, module = missing
        install = f"pip install 'mumic[{extra}]'"
        print(f"mumic {args.command} needs the {extra} extra: {install} (missing: {module})", file=sys.stderr)
        return 2
    except (
        CommandError,
        ServiceUnavailable,
        AuditError,
        ConfigError,
        ManifestError,
        TaxonomyError,
        BackboneError,
        CheckpointError,
        ModelDirError,
        DatasetImportError,
        OSError,  # a missing input, a full disk, a refused permission: the cause is the message
    ) as exc:
        print(f"mumic {args.command}: error: {exc}", file=sys.stderr)
        return 2
