"""`mumic`: one subcommand per pipeline step, each a thin call into the library.

Every subcommand reads `params.yaml` (or `--params FILE`), accepts `--set key=value` overrides, and takes explicit
paths that default to the `paths` section; DVC stages and the Dagster assets call the same functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mumic_ml.config import DEFAULT_PARAMS_FILE, ConfigError, Params, load_params

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


def _params(args: argparse.Namespace) -> Params:
    params = load_params(args.params)
    return params.updated(_parse_overrides(args.set)) if args.set else params


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mumic_ml.demo_world import generate_demo_world

    params = _params(args)
    out = Path(args.out or params.paths.demo)
    world = generate_demo_world(
        out,
        n_images=args.n_images or params.demo.n_images,
        image_size=args.image_size or params.demo.image_size,
        seed=params.demo.seed if args.seed is None else args.seed,
    )
    print(f"demo world: {world.n_images} images, {len(world.class_names)} classes -> {out}")
    print(f"  manifest: {world.manifest_path}\n  taxonomy: {world.taxonomy_path}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mumic_ml.ingest import ingest
    from mumic_ml.taxonomy import load_taxonomy

    params = _params(args)
    taxonomy = load_taxonomy(args.taxonomy) if args.taxonomy else None
    result = ingest(
        args.manifest,
        args.images_root,
        args.out or params.paths.ingested,
        taxonomy=taxonomy,
        max_side=params.ingest.max_side,
        min_side=params.ingest.min_side,
        max_pixels=params.ingest.max_pixels,
        workers=params.ingest.workers,
    )
    print(f"ingest: {result.n_rows} rows, {result.n_accepted} accepted, {result.n_rejected} rejected")
    for reason, count in result.rejected_by_reason.items():
        print(f"  {reason}: {count}")
    print(f"  manifest: {result.manifest_path}\n  rejected: {result.rejected_path}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from mumic_ml.split import split_manifest
    from mumic_ml.taxonomy import load_taxonomy

    params = _params(args)
    manifest = Path(args.manifest or params.paths.ingested / "manifest.parquet")
    names = load_taxonomy(args.taxonomy).names if args.taxonomy else None
    report = split_manifest(
        manifest,
        Path(args.out or params.paths.splits),
        params.split.fractions,
        params.split.seed,
        taxonomy_names=names,
    )
    sizes = {name: info["n_images"] for name, info in report["splits"].items()}
    print(f"split: {sizes} -> {args.out or params.paths.splits}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mumic_ml.train import train

    params = _params(args)
    result = train(
        params,
        splits_dir=Path(args.splits or params.paths.splits),
        images_root=Path(args.images_root or params.paths.ingested),
        taxonomy_path=Path(args.taxonomy or params.paths.demo / "taxonomy.yaml"),
        run_dir=Path(args.run_dir or params.paths.run),
        model_dir=Path(args.model_dir or params.paths.model),
        cache_dir=Path(args.cache_dir or params.paths.cache),
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(
        f"train: best epoch {result.best_epoch + 1} of {result.epochs_run}, "
        f"val GAP@{params.evaluate.k} {result.best_val_gap_at_10:.4f} -> {result.model_dir}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mumic_ml.evaluate import evaluate_model

    params = _params(args)
    out = Path(args.out or params.paths.reports / "metrics.json")
    report = evaluate_model(
        Path(args.model or params.paths.model),
        Path(args.split or params.paths.splits / "test.parquet"),
        Path(args.images_root or params.paths.ingested),
        out,
        cache_dir=Path(args.cache_dir or params.paths.cache),
        k=params.evaluate.k,
        top_n_classes=params.evaluate.top_n_classes,
        batch_size=params.evaluate.batch_size,
        device=args.device,
    )
    print(f"evaluate ({report['num_images']} images, {report['num_classes']} classes) -> {out}")
    print(f"  GAP@10 {report['gap_at_10']:.4f}   GAP {report['gap']:.4f}   mAP {report['map_macro']:.4f}", end="")
    if "map_top_n" in report:
        print(f"   mAP(top {report['top_n']}) {report['map_top_n']:.4f}", end="")
    print()
    zero_shot = report.get("zero_shot", {})
    if "map_held_out" in zero_shot:
        print(
            f"  zero-shot on held-out {zero_shot['classes']}: mAP {zero_shot['map_held_out']:.4f} "
            f"(chance {zero_shot['chance_map']:.4f})"
        )
    return 0


def _resolve_model(model: str) -> Path:
    if "://" in model or model.startswith(("models:/", "runs:/")):
        raise CommandError(
            f"{model!r} is an MLflow URI; resolving it needs the orchestration install (the pipeline issue). "
            "Pass a local model directory instead."
        )
    path = Path(model)
    if not path.is_dir():
        raise CommandError(f"model directory not found: {path}")
    return path


def cmd_predict(args: argparse.Namespace) -> int:
    from mumic_ml.predict import Predictor

    params = _params(args)
    predictor = Predictor.from_dir(_resolve_model(args.model), device=args.device, batch_size=params.predict.batch_size)
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

    predictor = Predictor.from_dir(_resolve_model(args.model), device=args.device)
    matrix, errors = predictor.embed(args.images)
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, matrix, allow_pickle=False)
    for image, error in zip(args.images, errors):
        if error is not None:
            print(f"embed: {image}: {error}", file=sys.stderr)
    print(f"embed: {matrix.shape[0]} x {matrix.shape[1]} embeddings -> {args.out}")
    return 0


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
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("ingest", parents=[common], help="decode, normalise, de-duplicate and check a labelled batch")
    p.add_argument("--manifest", required=True, help="CSV, JSONL or Parquet with `path` and `labels`")
    p.add_argument("--images-root", required=True, help="folder that manifest paths are relative to")
    p.add_argument("--out", help="output folder (default: paths.ingested)")
    p.add_argument("--taxonomy", help="taxonomy YAML; labels outside it are rejected")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("split", parents=[common], help="iteratively stratified train/val/test split")
    p.add_argument("--manifest", help="ingested manifest.parquet (default: paths.ingested/manifest.parquet)")
    p.add_argument("--out", help="output folder (default: paths.splits)")
    p.add_argument("--taxonomy", help="taxonomy YAML (fixes the class order)")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", parents=[common], help="fine-tune MuMIC (or a baseline) and export the best model")
    p.add_argument("--splits", help="folder with train.parquet and val.parquet (default: paths.splits)")
    p.add_argument("--images-root", help="folder the split paths are relative to (default: paths.ingested)")
    p.add_argument("--taxonomy", help="taxonomy YAML (default: paths.demo/taxonomy.yaml)")
    p.add_argument("--run-dir", help="checkpoints and history (default: paths.run)")
    p.add_argument("--model-dir", help="exported model (default: paths.model)")
    p.add_argument("--cache-dir", help="preprocessing cache (default: paths.cache)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", parents=[common], help="GAP@10, GAP, mAP and per-class AP on a split")
    p.add_argument("--model", help="model directory (default: paths.model)")
    p.add_argument("--split", help="split parquet (default: paths.splits/test.parquet)")
    p.add_argument("--images-root", help="folder the split paths are relative to (default: paths.ingested)")
    p.add_argument("--out", help="metrics JSON (default: paths.reports/metrics.json)")
    p.add_argument("--cache-dir", help="preprocessing cache (default: paths.cache)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", parents=[common], help="print top labels for images as JSON lines")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--top-k", type=int, help="labels per image (default: predict.top_k)")
    p.add_argument("--threshold", type=float, help="only labels with probability >= this")
    p.add_argument(
        "--extra-class",
        action="append",
        default=[],
        metavar="NAME",
        help="also score this class name zero-shot (repeatable)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("embed", parents=[common], help="export L2-normalised image embeddings to a .npy file")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--out", required=True, help="output .npy (rows in the order of the images; NaN if unreadable)")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; third-party chatter (open_clip logs every model build at INFO) only at WARNING.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("mumic_ml").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from mumic_ml.backbone import BackboneError
    from mumic_ml.checkpoint import CheckpointError
    from mumic_ml.manifest import ManifestError
    from mumic_ml.model_io import ModelDirError
    from mumic_ml.taxonomy import TaxonomyError

    try:
        return args.func(args)
    except (
        CommandError,
        ConfigError,
        ManifestError,
        TaxonomyError,
        BackboneError,
        CheckpointError,
        ModelDirError,
        FileNotFoundError,
    ) as exc:
        print(f"mumic {args.command}: error: {exc}", file=sys.stderr)
        return 2
