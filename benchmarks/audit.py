"""How well the label audit finds missing labels, measured on the demo world where the corruption is known.

The demo world's labels are clean, so the benchmark removes a share of the training positives itself (the same
`label_noise.corrupt_labels` that `train.label_noise` applies) and audits the corrupted labels: precision@K is the
share of the top K suspected missing labels that are removed positives, recall@K the share of removed positives
found in the top K. The project is built by the pipeline's own steps (`benchmarks/quality.py`: demo world, ingest,
split, demo foundation), so the audit measured is the one `mumic audit` runs.

`--compare` also measures, at the highest noise level, the two costlier ways to score out of fold: a linear head
per fold on the embeddings of a model fine-tuned on all the corrupted training labels (one fine-tuning, but the
tower saw every image's corrupted labels), and a MuMIC model fine-tuned per fold on the other folds (k fine-tunings,
no leak), scored with its own head.

    python benchmarks/audit.py --workdir /tmp/audit-bench/project            # default demo world (3,000 images)
    python benchmarks/audit.py --workdir /tmp/audit-bench/project --compare  # + the fine-tuned variants
    python benchmarks/audit.py --workdir /tmp/audit-quick --quick --compare  # a few minutes
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402

from mumic_ml import steps  # noqa: E402
from mumic_ml.audit import (  # noqa: E402
    MISSING,
    assign_folds,
    cross_fit,
    embed_images,
    label_state,
    linear_head,
    rank_suspects,
    tower_from_backbone,
    tower_from_model_dir,
)
from mumic_ml.data import CachedImageDataset, ImagePreparer, label_matrix, read_split  # noqa: E402
from mumic_ml.evaluate import compute_scores  # noqa: E402
from mumic_ml.images import PreprocessCache  # noqa: E402
from mumic_ml.label_noise import corrupt_labels  # noqa: E402
from mumic_ml.model_io import load_model_dir  # noqa: E402
from mumic_ml.project import Project  # noqa: E402
from mumic_ml.taxonomy import load_taxonomy, training_classes  # noqa: E402
from mumic_ml.train import train  # noqa: E402

KS = (100, 500, 1000)  # capped at the number of candidates on a quick world
CPU = torch.device("cpu")


def missing_figures(scores: np.ndarray, noisy: np.ndarray, clean: np.ndarray) -> dict[str, Any]:
    """precision@K and recall@K of the suspected missing labels against the positives the corruption removed."""
    ranked = rank_suspects(scores, noisy, np.ones_like(noisy, dtype=bool))[MISSING]
    hits = np.array([clean[s.image, s.label] == 1 for s in ranked])
    removed = int(((clean == 1) & (noisy == 0)).sum())
    figures: dict[str, Any] = {"removed_positives": removed, "candidates": len(ranked)}
    for k in (*KS, removed):
        found = int(hits[:k].sum())
        key = "r" if k == removed else str(k)
        figures[f"precision@{key}"] = found / min(k, len(hits))
        figures[f"recall@{key}"] = found / removed
    return figures


def cross_fitted(project: Project, features: np.ndarray, frame: pd.DataFrame, noisy: np.ndarray) -> np.ndarray:
    cfg = project.params.audit
    fold = assign_folds(list(frame["sha256"]), cfg.folds, cfg.seed)
    head = linear_head(steps=cfg.head_steps, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    return cross_fit(features, noisy, np.ones_like(noisy, dtype=bool), fold, head)


def _with_labels(frame: pd.DataFrame, matrix: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    out = frame.copy()
    out["labels"] = [[class_names[j] for j in np.flatnonzero(row)] for row in matrix]
    return out


def fine_tuned_folds(project: Project, weights: str, frame: pd.DataFrame, noisy: np.ndarray, names: list[str]):
    """Out-of-fold scores of MuMIC models fine-tuned per fold on the other folds' corrupted labels (val: clean)."""
    cfg = project.params.audit
    fold = assign_folds(list(frame["sha256"]), cfg.folds, cfg.seed)
    scores = np.full(noisy.shape, np.nan, dtype=np.float32)
    labelled = _with_labels(frame, noisy, names)
    params = project.params.updated({"model.pretrained": weights})
    for k in range(cfg.folds):
        with tempfile.TemporaryDirectory(dir=project.root) as tmp:
            splits = Path(tmp) / "splits"
            splits.mkdir()
            labelled[fold != k].to_parquet(splits / "train.parquet", index=False)
            read_split(project.split("val")).to_parquet(splits / "val.parquet", index=False)
            result = train(
                params,
                splits_dir=splits,
                images_root=project.ingested,
                taxonomy_path=project.taxonomy,
                run_dir=Path(tmp) / "run",
                model_dir=Path(tmp) / "model",
                cache_dir=project.cache,
                progress=False,
            )
            loaded = load_model_dir(result.model_dir)
            assert loaded.class_names == names
            held_out = frame[fold == k]
            dataset = CachedImageDataset(
                held_out, project.ingested, noisy[fold == k], PreprocessCache(project.cache), loaded.image_norm.size
            )
            probs, _ = compute_scores(loaded.classifier, dataset, ImagePreparer(loaded.image_norm, CPU), batch_size=256)
            scores[fold == k] = probs
    return scores


def fine_tuned_tower(project: Project, weights: str, noise: float) -> Path:
    """A model fine-tuned on every training image's corrupted labels, as `mumic train` with train.label_noise."""
    model_dir = project.root / f"model-noise-{noise:g}"
    if not (model_dir / "model.json").is_file():
        params = project.params.updated(
            {"model.pretrained": weights, "train.label_noise.missing": noise, "train.label_noise.seed": 0}
        )
        with tempfile.TemporaryDirectory(dir=project.root) as tmp:
            train(
                params,
                splits_dir=project.splits,
                images_root=project.ingested,
                taxonomy_path=project.taxonomy,
                run_dir=Path(tmp) / "run",
                model_dir=model_dir,
                cache_dir=project.cache,
                progress=False,
            )
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="project folder, reused when already built")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4], help="shares of positives removed")
    parser.add_argument("--compare", action="store_true", help="also the fine-tuned variants at the highest noise")
    parser.add_argument("--quick", action="store_true", help="quality.py's quick budget: a 300-image world (CI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mumic_ml.pretrain").setLevel(logging.INFO)  # the foundation's epochs: the slow part, once

    started = time.perf_counter()
    project = quality.build_project(args.workdir, quality.QUICK if args.quick else quality.FULL)
    steps.foundation_step(project, progress=False)
    weights = project.foundation_weights()
    print(f"project ready in {time.perf_counter() - started:.0f} s ({args.workdir})")
    frame = read_split(project.split("train"))
    names, _, _ = training_classes(load_taxonomy(project.taxonomy), project.params.train.held_out_classes)
    clean = label_matrix(frame["labels"], names)
    assert (label_state(frame, names)[0] == clean).all()
    print(f"{len(frame)} training images, {len(names)} classes, {int(clean.sum())} positives")

    header = ["variant", "missing", "removed", *(f"P@{k}" for k in KS), "R-precision", *(f"R@{k}" for k in KS), "s"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")

    def row(name: str, noise: float, scores: np.ndarray, noisy: np.ndarray, seconds: float) -> None:
        f = missing_figures(scores, noisy, clean)
        cells = [name, f"{noise:.0%}", str(f["removed_positives"])]
        cells += [f"{f[f'precision@{k}']:.3f}" for k in KS] + [f"{f['precision@r']:.3f}"]
        cells += [f"{f[f'recall@{k}']:.3f}" for k in KS] + [f"{seconds:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)

    t = time.perf_counter()
    tower = tower_from_backbone(project.params.model.backbone, weights, CPU)
    features, embedded_now = embed_images(tower, frame, project.ingested, project.cache, project.audit_cache, 256)
    embed_seconds = time.perf_counter() - t
    print(f"foundation embeddings in {embed_seconds:.0f} s ({embedded_now} computed, the rest cached)")
    cfg = project.params.audit
    for noise in args.noise:
        noisy = corrupt_labels(clean, missing_rate=noise, spurious_rate=0.0, seed=0)
        t = time.perf_counter()
        scores = cross_fitted(project, features, frame, noisy)
        row("foundation + linear head per fold", noise, scores, noisy, embed_seconds + time.perf_counter() - t)
        t = time.perf_counter()
        in_sample = linear_head(steps=cfg.head_steps, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
        scores = in_sample(features, noisy, np.ones_like(noisy, dtype=bool))(features)
        row("foundation + one head on every image (not cross-fitted)", noise, scores, noisy, time.perf_counter() - t)
    if args.compare:
        noise = max(args.noise)
        noisy = corrupt_labels(clean, missing_rate=noise, spurious_rate=0.0, seed=0)
        t = time.perf_counter()
        model_dir = fine_tuned_tower(project, weights, noise)
        model_tower = tower_from_model_dir(model_dir, CPU)
        tuned, _ = embed_images(model_tower, frame, project.ingested, project.cache, project.audit_cache, 256)
        scores = cross_fitted(project, tuned, frame, noisy)
        row("fine-tuned tower (saw every label) + linear head per fold", noise, scores, noisy, time.perf_counter() - t)
        t = time.perf_counter()
        scores = fine_tuned_folds(project, weights, frame, noisy, names)
        row(f"MuMIC fine-tuned per fold ({cfg.folds} fine-tunings)", noise, scores, noisy, time.perf_counter() - t)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
