"""MuMIC against its baselines on the demo world: same backbone, data, budget and seeds (docs/results.md).

One project folder is built the way the pipeline builds it (demo world -> ingest -> split -> demo foundation, each
through `mumic_ml.steps`); then every variant below is fine-tuned from that foundation with params.yaml's settings
plus its own overrides, at each level of missing-positive noise in the training labels (test labels stay clean),
once per seed, and scored on the test split: GAP@10, GAP, macro mAP, mAP over the majority classes, zero-shot mAP
on the held-out classes and the image embeddings' retrieval mAP. Every finished run is saved at once, so a killed
run continues where it stopped when started again with the same --workdir.

A second setting measures partial labels: a share of the train split's (image, class) entries (`Budget.hidden`,
drawn with the run's seed) is hidden as unknown, hidden positives leaving `labels`, while val and test stay whole;
MuMIC is then trained with the unknown entries masked out of the loss (`train.partial_labels: true`) and with them
counted as negatives (false), on the same seeds.

    python benchmarks/quality.py --quick              # CI: a few minutes
    python benchmarks/quality.py                      # the full table in docs/results.md (~45 min on 2 cores)
    python benchmarks/quality.py --world-seed 1 --n-images 2000 --variants "linear + ASL" MuMIC --out DIR
                                                      # the same comparison on another demo world
    python benchmarks/quality.py --combine DIR1 DIR2 DIR3 --out DIR   # one summary of several worlds' results
    python benchmarks/quality.py --variants "MuMIC, unknown masked" "MuMIC, unknown as negative" --out DIR
                                                      # the partial-labels rows alone
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from mumic_ml import steps
from mumic_ml.data import read_split
from mumic_ml.demo_world import generate_demo_world
from mumic_ml.io import atomic_directory, atomic_write_json, atomic_write_text, read_json
from mumic_ml.pretrain import export_zero_shot
from mumic_ml.project import Project
from mumic_ml.split import label_lists_as_strings
from mumic_ml.taxonomy import load_taxonomy, training_classes
from mumic_ml.train import train

REPO = Path(__file__).resolve().parents[1]
ZERO_SHOT = "zero-shot"
MUMIC = "MuMIC"
NO_PROBE = "MuMIC without linear probe"
LINEAR_ASL = "linear + ASL"
LINEAR_ASL_PROBE = "linear + ASL + linear probe"
PAPER = "paper recipe"
LL_REJECT = "MuMIC + large loss rejection"
LL_CORRECT = "MuMIC + large loss correction"
WISE_FT = "MuMIC + WiSE-FT"
PSEUDO_UNKNOWN = "MuMIC + audit pseudo-unknown"
# A variant that changes only how the model is exported (train.wise_ft, which the run signature leaves out)
# re-exports the finished run of the variant it names instead of fine-tuning again: same training, no extra cost.
SHARED_RUNS = {WISE_FT: MUMIC}

# name -> overrides of params.yaml (None: no fine-tuning). MuMIC itself is params.yaml as it stands: the MuMIC
# head (cosines to class text embeddings plus a class residual, temperature learned from 0.2, text tower frozen),
# fitted alone on the foundation's embeddings first (train.linear_probe), then fine-tuned with ASL on s / T. The
# linear baselines are plain fine-tuning of a fresh linear head, as published; one row gives them the probe too.
NO_PROBE_SETTING = {"train.linear_probe.steps": 0}
VARIANTS: dict[str, dict[str, Any] | None] = {
    ZERO_SHOT: None,
    "linear + BCE": {"model.head": "linear", "train.loss": "bce", **NO_PROBE_SETTING},
    LINEAR_ASL: {"model.head": "linear", "train.loss": "asl", **NO_PROBE_SETTING},
    LINEAR_ASL_PROBE: {"model.head": "linear", "train.loss": "asl"},
    MUMIC: {},
    NO_PROBE: NO_PROBE_SETTING,
    "MuMIC, fixed T=0.07": {"model.learn_temperature": False, "model.init_temperature": 0.07},
    "MuMIC, fixed T=0.2": {"model.learn_temperature": False, "model.init_temperature": 0.2},
    "MuMIC + learned bias": {"model.learn_bias": True},
    "MuMIC, tuned text tower": {"model.freeze_text": False},
    "MuMIC from random init": {"model.pretrained": None},
    # The method as published: tempered-sigmoid BCE, both towers tuned, T learned from CLIP's 0.07, no residual.
    PAPER: {
        "train.loss": "tempered_sigmoid_bce",
        "model.freeze_text": False,
        "model.init_temperature": 0.07,
        "model.learn_temperature": True,
        "model.class_residual": False,
        **NO_PROBE_SETTING,
    },
    # Against missing positives: Large Loss rejection / correction (train.large_loss at params.yaml's rate), and
    # WiSE-FT with alpha chosen on the validation split.
    LL_REJECT: {"train.large_loss.mode": "reject"},
    LL_CORRECT: {"train.large_loss.mode": "correct"},
    WISE_FT: {"train.wise_ft.alpha_grid": [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]},
    # The label audit's out-of-fold scores before fine-tuning (train.pseudo_labels): the negatives it scores at
    # least 0.5 are left out of the loss.
    PSEUDO_UNKNOWN: {"train.pseudo_labels.mode": "unknown", "train.pseudo_labels.min_score": 0.5},
}
# The partial-labels setting: MuMIC on train labels with `Budget.hidden` of the entries unknown, masked or not.
PARTIAL_VARIANTS: dict[str, dict[str, Any]] = {
    "MuMIC, unknown masked": {"train.partial_labels": True},
    "MuMIC, unknown as negative": {"train.partial_labels": False},
}
METRICS = ("gap_at_10", "gap", "map_macro", "map_top_n", "held_out_map", "retrieval_map")
METRIC_TITLES = {
    "gap_at_10": "GAP@10",
    "gap": "GAP",
    "map_macro": "mAP",
    "map_top_n": "majority mAP",
    "held_out_map": "held-out zero-shot mAP",
    "retrieval_map": "retrieval mAP (Jaccard ≥ 0.5)",
}


@dataclass(frozen=True)
class Budget:
    """What one benchmark run costs: the world, the foundation's pretraining and every fine-tuning."""

    n_images: int
    pretrain_epochs: int
    train_epochs: int
    seeds: tuple[int, ...]
    noise: tuple[float, ...]
    hidden: float = 0.3  # share of the train split's (image, class) entries hidden as unknown for PARTIAL_VARIANTS
    world_seed: int = 0  # the demo world's generator seed: another seed draws other scenes


FULL = Budget(n_images=3000, pretrain_epochs=20, train_epochs=3, seeds=(0, 1, 2), noise=(0.0, 0.2, 0.4))
# Two epochs, so that the Large Loss variants modify the loss (from the second epoch) and the best epoch is chosen.
QUICK = Budget(n_images=300, pretrain_epochs=2, train_epochs=2, seeds=(0,), noise=(0.4,))


def project_params(budget: Budget) -> dict[str, Any]:
    """params.yaml of the benchmark project: the repository's, at the budget's size, no early stopping."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["demo"]["n_images"] = budget.n_images
    params["demo"]["seed"] = budget.world_seed
    params["pretrain"]["epochs"] = budget.pretrain_epochs
    params["pretrain"]["device"] = "cpu"
    params["train"].update(epochs=budget.train_epochs, early_stopping_patience=None, device="cpu")
    if budget.n_images < 1000:  # a quick world has too few images per class for the default batch sizes
        params["pretrain"]["batch_size"] = 32
        params["train"]["batch_size"] = 32
    return params


def build_project(root: Path, budget: Budget) -> Project:
    """Demo world, ingest, split and foundation, each by the pipeline's own step; reused when already there."""
    params_path = root / "params.yaml"
    wanted = yaml.safe_dump(project_params(budget), sort_keys=False)
    if params_path.is_file() and params_path.read_text(encoding="utf-8") != wanted:
        raise SystemExit(f"{root} holds a benchmark of another budget; use another --workdir or delete it")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(params_path, wanted)
    project = Project.load(root)
    demo = project.params.demo
    if not project.split("test").is_file():
        generate_demo_world(project.demo, n_images=demo.n_images, image_size=demo.image_size, seed=demo.seed)
        steps.ingest_step(project)
        steps.split_step(project)
    return project


def hide_entries(frame: pd.DataFrame, class_names: list[str], fraction: float, seed: int) -> pd.DataFrame:
    """A copy of a split whose hidden (image, class) entries, each drawn with probability `fraction`, are moved to
    `unknown_labels`: a hidden positive leaves `labels`, a hidden negative leaves `negative_labels` if listed."""
    hidden = np.random.default_rng(seed).random((len(frame), len(class_names))) < fraction
    unknown = [[name for name, is_hidden in zip(class_names, row) if is_hidden] for row in hidden]
    hidden_sets = [set(row) for row in unknown]
    frame = frame.copy()
    for column in ("labels", "negative_labels"):
        if column in frame.columns:
            frame[column] = [
                [label for label in labels if label not in hide] for labels, hide in zip(frame[column], hidden_sets)
            ]
    frame["unknown_labels"] = unknown
    return frame


def hidden_splits(project: Project, fraction: float, seed: int) -> Path:
    """The project's split files with `fraction` of the train split's entries of the trained classes hidden as
    unknown (val and test unchanged); written once per fraction and seed and reused."""
    out = project.root / "partial" / f"hidden={fraction:g}_seed={seed}"
    if out.is_dir():
        return out
    class_names, _, _ = training_classes(load_taxonomy(project.taxonomy), project.params.train.held_out_classes)
    with atomic_directory(out) as staging:
        for name in ("train", "val", "test"):
            frame = read_split(project.split(name))
            if name == "train":
                frame = hide_entries(frame, class_names, fraction, seed)
            table = label_lists_as_strings(pa.Table.from_pandas(frame, preserve_index=False))
            pq.write_table(table, staging / f"{name}.parquet")
    return out


def _scores(report: dict[str, Any]) -> dict[str, float | None]:
    held_out = report.get("zero_shot", {}).get("map_held_out")
    return {
        "gap_at_10": report["gap_at_10"],
        "gap": report["gap"],
        "map_macro": report["map_macro"],
        "map_top_n": report.get("map_top_n"),
        "held_out_map": held_out,
        "retrieval_map": report["retrieval_map"],
    }


def run_zero_shot(project: Project, weights: str) -> dict[str, Any]:
    """The foundation with an untrained MuMIC head: the zero-shot row, and retrieval before fine-tuning."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=project.root) as tmp:
        model_dir = export_zero_shot(
            project.params, taxonomy_path=project.taxonomy, backbone_weights=weights, model_dir=Path(tmp) / "model"
        )
        report = steps.evaluate_on_test(project, model_dir, Path(tmp) / "metrics.json", retrieval=True)
    return {"variant": ZERO_SHOT, "scores": _scores(report), "seconds": time.perf_counter() - started}


def run_variant(
    project: Project,
    weights: str,
    name: str,
    overrides: dict[str, Any],
    noise: float,
    seed: int,
    hidden: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune one variant at one noise level and seed, score it on the test split, keep only the scores.

    With `hidden`, the variant trains on `hidden_splits` (that share of the train entries unknown) instead."""
    splits_dir = hidden_splits(project, hidden, seed) if hidden else project.splits
    settings = {
        "model.pretrained": weights,
        "train.seed": seed,
        "train.label_noise.missing": noise,
        "train.label_noise.seed": seed,
        **overrides,
    }
    run_params = project.params.updated(settings)
    started = time.perf_counter()
    sharing = {name, SHARED_RUNS.get(name)} & set(SHARED_RUNS.values())
    shared_run = (
        project.root / "runs" / _file_name(_run_key(next(iter(sharing)), noise, seed, hidden)) if sharing else None
    )
    with tempfile.TemporaryDirectory(dir=project.root) as tmp:
        result = train(
            run_params,
            splits_dir=splits_dir,
            images_root=project.ingested,
            taxonomy_path=project.taxonomy,
            run_dir=shared_run or Path(tmp) / "run",
            model_dir=Path(tmp) / "model",
            cache_dir=project.cache,
            progress=False,
            resume=shared_run is not None,
        )
        report = steps.evaluate_on_test(project, result.model_dir, Path(tmp) / "metrics.json", retrieval=True)
        metadata = read_json(result.model_dir / "model.json").get("metadata", {})
    if shared_run is not None and name in SHARED_RUNS:
        shutil.rmtree(shared_run, ignore_errors=True)
    return {
        "variant": name,
        "noise": noise,
        "hidden": hidden,
        "seed": seed,
        "overrides": settings,
        "scores": _scores(report),
        "best_epoch": result.best_epoch,
        "val_gap_at_k": [round(h["val_gap_at_k"], 5) for h in result.history],
        "gap_k": result.gap_k,
        "final_temperature": result.history[-1].get("temperature"),
        "wise_ft": metadata.get("wise_ft"),
        "pseudo_labels": metadata.get("pseudo_labels"),
        "linear_probe": metadata.get("linear_probe"),
        "resumed_from": result.resumed_from,
        "seconds": time.perf_counter() - started,
    }


def _file_name(key: str) -> str:
    return key.replace("|", "_").replace(" ", "_").replace("/", "_")


def _run_key(name: str, noise: float, seed: int, hidden: float = 0.0) -> str:
    return f"{name}|noise={noise:g}|seed={seed}" if not hidden else f"{name}|hidden={hidden:g}|seed={seed}"


def summarise(runs: list[dict[str, Any]], zero_shot: dict[str, Any], budget: Budget) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds of every metric, per variant and noise level; the
    partial-labels variants (no noise, `budget.hidden` of the train entries unknown) last."""
    rows = []
    for name in VARIANTS:
        for noise in budget.noise:
            if name == ZERO_SHOT:
                group = [zero_shot["scores"]]
            else:
                group = [r["scores"] for r in runs if r["variant"] == name and r["noise"] == noise]
            rows.append(_summary_row(name, noise, 0.0, group))
    for name in PARTIAL_VARIANTS:
        group = [r["scores"] for r in runs if r["variant"] == name]
        rows.append(_summary_row(name, 0.0, budget.hidden, group))
    return rows


def _summary_row(name: str, noise: float, hidden: float, group: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": name, "noise": noise, "hidden": hidden, "n": len(group)}
    for metric in METRICS:
        values = [g[metric] for g in group if g.get(metric) is not None]
        row[metric] = statistics.fmean(values) if values else None
        row[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
    return row


def _cell(row: dict[str, Any], metric: str, best: float | None) -> str:
    value = row[metric]
    if value is None:
        return "–"
    text = f"{value:.3f} ± {row[f'{metric}_sd']:.3f}" if row["n"] > 1 else f"{value:.3f}"
    return f"**{text}**" if best is not None and math.isclose(value, best) else text


def markdown_table(rows: list[dict[str, Any]], budget: Budget) -> str:
    """One table per noise level, then one for the partial-labels setting; the best mean of each column in bold.
    A table none of whose variants ran is left out."""
    titles = [f"{noise:.0%} missing positives in the training labels" for noise in budget.noise]
    titles.append(f"{budget.hidden:.0%} of the training entries hidden as unknown")
    groups: list[list[dict[str, Any]]] = [[] for _ in titles]
    for r in rows:
        groups[-1 if r["hidden"] else budget.noise.index(r["noise"])].append(r)
    parts = []
    for title, group in zip(titles, groups):
        if not any(r["n"] for r in group):
            continue
        best = {m: max((r[m] for r in group if r[m] is not None), default=None) for m in METRICS}
        parts.append(f"**{title}**\n")
        parts.append("| variant | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |")
        parts.append("|---|" + "---|" * len(METRICS))
        for r in group:
            parts.append(f"| {r['variant']} | " + " | ".join(_cell(r, m, best[m]) for m in METRICS) + " |")
        parts.append("")
    return "\n".join(parts)


def _world_name(results: dict[str, Any]) -> str:
    budget = results["budget"]
    return f"seed {budget.get('world_seed', 0)}, {budget['n_images']:,} images"


def worlds_table(all_results: list[dict[str, Any]], baselines: tuple[str, ...] = (LINEAR_ASL, LINEAR_ASL_PROBE)) -> str:
    """GAP@10 and mAP of every variant run in each world (one quality.json per world), per noise level; then, for
    each MuMIC variant and each of `baselines`, its lead and whether it exceeds one sample standard deviation (the
    larger of the two rows'): ✓ where it does, = where the lead is positive but within it, ✗ where MuMIC is behind."""
    parts = []
    for metric in ("gap_at_10", "map_macro"):
        variants = [
            v for v in VARIANTS if any(r["variant"] == v and r["n"] for res in all_results for r in res["summary"])
        ]
        parts.append(f"**{METRIC_TITLES[metric]}** (mean ± sample sd over seeds)\n")
        parts.append("| world | missing | " + " | ".join(variants) + " |")
        parts.append("|---|---|" + "---|" * len(variants))
        for results in all_results:
            rows = {(r["variant"], r["noise"]): r for r in results["summary"] if not r["hidden"]}
            for noise in results["budget"]["noise"]:
                cells = []
                for v in variants:
                    row = rows.get((v, noise))
                    cells.append(_cell(row, metric, None) if row and row["n"] and row[metric] is not None else "–")
                parts.append(f"| {_world_name(results)} | {noise:.0%} | " + " | ".join(cells) + " |")
        parts.append("")
    contenders = [v for v in VARIANTS if v.startswith(MUMIC) or v == PAPER]
    for baseline in baselines:
        parts.append(_lead_table(all_results, baseline, contenders))
    return "\n".join(parts)


def _lead_table(all_results: list[dict[str, Any]], baseline: str, contenders: list[str]) -> str:
    parts = [f"**Lead over {baseline}** (mean difference; ✓ more than one sd, = within one sd, ✗ behind)\n"]
    parts.append("| world | missing | variant | GAP@10 | mAP |")
    parts.append("|---|---|---|---|---|")
    for results in all_results:
        rows = {(r["variant"], r["noise"]): r for r in results["summary"] if not r["hidden"]}
        for noise in results["budget"]["noise"]:
            base = rows.get((baseline, noise))
            if not base or not base["n"]:
                continue
            for v in contenders:
                row = rows.get((v, noise))
                if not row or not row["n"]:
                    continue
                cells = [_lead(row, base, m) for m in ("gap_at_10", "map_macro")]
                parts.append(f"| {_world_name(results)} | {noise:.0%} | {v} | " + " | ".join(cells) + " |")
    parts.append("")
    return "\n".join(parts)


def _lead(row: dict[str, Any], base: dict[str, Any], metric: str) -> str:
    lead = row[metric] - base[metric]
    spread = max(row[f"{metric}_sd"], base[f"{metric}_sd"])
    mark = "✓" if lead > spread else "=" if lead > 0 else "✗"
    return f"{lead:+.3f} {mark}"


def plot(rows: list[dict[str, Any]], budget: Budget, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric in ("gap_at_10", "map_macro"):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for name in VARIANTS:
            series = [r for r in rows if r["variant"] == name and r[metric] is not None]
            if series:
                ax.errorbar(
                    [100 * r["noise"] for r in series],
                    [r[metric] for r in series],
                    yerr=[r[f"{metric}_sd"] for r in series],
                    marker="o",
                    capsize=3,
                    label=name,
                    linewidth=2.5 if name == MUMIC else 1.2,
                )
        ax.set_xlabel("missing positives in the training labels (%)")
        ax.set_ylabel(f"test {METRIC_TITLES[metric]}")
        ax.set_xticks([100 * n for n in budget.noise])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        path = out_dir / f"quality_{metric}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny world, 1 seed, 2 noise levels (CI)")
    parser.add_argument("--workdir", type=Path, help="project folder, reused to resume (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="results folder (default: docs/results, quick: reports/quality)")
    parser.add_argument(
        "--variants", nargs="*", choices=[*VARIANTS, *PARTIAL_VARIANTS], help="only these (default: all)"
    )
    parser.add_argument("--world-seed", type=int, help="the demo world's seed (default 0, the default world)")
    parser.add_argument("--n-images", type=int, help="images in the demo world (default 3000, quick 300)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these training seeds (default 0 1 2)")
    parser.add_argument("--noise", nargs="+", type=float, help="only these shares of missing positives")
    parser.add_argument(
        "--combine",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="no training: summarise the quality.json of these results folders (one per world) into --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.combine:
        out_dir = args.out or (REPO / "docs/results")
        out_dir.mkdir(parents=True, exist_ok=True)
        table = worlds_table([read_json(folder / "quality.json") for folder in args.combine])
        atomic_write_text(out_dir / "worlds_table.md", table)
        print(table)
        return 0
    budget = QUICK if args.quick else FULL
    if args.world_seed is not None:
        budget = dataclasses.replace(budget, world_seed=args.world_seed)
    if args.n_images is not None:
        budget = dataclasses.replace(budget, n_images=args.n_images)
    if args.seeds:
        budget = dataclasses.replace(budget, seeds=tuple(args.seeds))
    if args.noise:
        budget = dataclasses.replace(budget, noise=tuple(args.noise))
    out_dir = args.out or (REPO / ("reports/quality" if args.quick else "docs/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    root = (args.workdir or Path(tempfile.mkdtemp(prefix="mumic-quality-"))).resolve()
    selected = set(args.variants or [*VARIANTS, *PARTIAL_VARIANTS])
    started = time.perf_counter()
    try:
        project = build_project(root, budget)
        foundation = steps.foundation_step(project, progress=False)
        print(f"foundation {foundation.source}: {foundation.weights}", flush=True)
        done_dir = root / "results"
        done_dir.mkdir(exist_ok=True)

        def cached(key: str, compute) -> dict[str, Any]:
            path = done_dir / (_file_name(key) + ".json")
            if path.is_file():
                return read_json(path)
            result = compute()
            atomic_write_json(path, result)
            return result

        zero_shot = cached(ZERO_SHOT, lambda: run_zero_shot(project, foundation.weights))
        # (variant, overrides, noise, seed, hidden share): every noise level, then the partial-labels setting.
        jobs = [
            (name, overrides, noise, seed, 0.0)
            for noise in budget.noise
            for seed in budget.seeds
            for name, overrides in VARIANTS.items()
            if name in selected and overrides is not None
        ]
        jobs += [
            (name, overrides, 0.0, seed, budget.hidden)
            for seed in budget.seeds
            for name, overrides in PARTIAL_VARIANTS.items()
            if name in selected
        ]
        runs = []
        for name, overrides, noise, seed, hidden in jobs:
            key = _run_key(name, noise, seed, hidden)
            run = cached(
                key, functools.partial(run_variant, project, foundation.weights, name, overrides, noise, seed, hidden)
            )
            runs.append(run)
            scores = run["scores"]
            print(
                f"{key:45s} GAP@10 {scores['gap_at_10']:.4f}  mAP {scores['map_macro']:.4f}  "
                f"retrieval {scores['retrieval_map']:.4f}  {run['seconds']:.0f} s",
                flush=True,
            )
        rows = summarise(runs, zero_shot, budget)
        table = markdown_table([r for r in rows if r["variant"] in selected], budget)
        elapsed = time.perf_counter() - started
        results = {
            "budget": budget.__dict__,
            "params": project_params(budget),
            "foundation": read_json(foundation.report_path),
            "zero_shot": zero_shot,
            "runs": runs,
            "summary": rows,
            "seconds": elapsed,
            "machine": {
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "cpu_threads": torch.get_num_threads(),
                "platform": platform.platform(),
            },
        }
        atomic_write_json(out_dir / "quality.json", results)
        atomic_write_text(out_dir / "quality_table.md", table)
        plots = plot(rows, budget, out_dir)
        print("\n" + table)
        print(
            f"wall time {elapsed / 60:.1f} min; results in {out_dir}: quality.json, quality_table.md, "
            + ", ".join(p.name for p in plots)
        )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
