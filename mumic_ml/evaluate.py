"""Scoring a split with a trained model and writing the metrics report (`mumic evaluate`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mumic_ml.calibration import METHOD
from mumic_ml.data import CachedImageDataset, ImagePreparer, epoch_batches, read_split, split_targets
from mumic_ml.images import PreprocessCache
from mumic_ml.io import atomic_write_json, file_digest
from mumic_ml.metrics import (
    calibration_summary,
    evaluation_report,
    gap_at_k,
    mean_average_precision,
    per_class_average_precision,
    retrieval_map,
)
from mumic_ml.model_io import LoadedModel, load_model_dir
from mumic_ml.taxonomy import class_prompts


@torch.no_grad()
def compute_scores(
    classifier: torch.nn.Module,
    dataset: CachedImageDataset,
    preparer: ImagePreparer,
    *,
    batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    extra_class_features: torch.Tensor | None = None,
    with_embeddings: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Sigmoid probabilities (N x C) in dataset order, and optionally the image embeddings."""
    was_training = classifier.training
    classifier.eval()
    loader = DataLoader(dataset, batch_sampler=epoch_batches(len(dataset), batch_size, seed=0, epoch=0, shuffle=False))
    scores, embeddings = [], []
    for images, *_ in loader:
        with autocast():
            out = classifier(preparer(images), extra_class_features)
        scores.append(torch.sigmoid(out.logits.float()).cpu())
        if with_embeddings:
            embeddings.append(out.image_features.float().cpu())
    classifier.train(was_training)
    n_classes = getattr(classifier, "num_classes", 0) + (
        0 if extra_class_features is None else len(extra_class_features)
    )
    probs = torch.cat(scores).numpy() if scores else np.zeros((0, n_classes), np.float32)
    return probs, (torch.cat(embeddings).numpy() if with_embeddings and embeddings else None)


def evaluate_model(
    model_dir: Path,
    split_path: Path,
    images_root: Path,
    out_path: Path,
    *,
    cache_dir: Path,
    k: int = 10,
    top_n_classes: int | None = 20,
    batch_size: int = 256,
    device: str = "cpu",
    plots_dir: Path | None = None,
    retrieval: bool = False,
) -> dict[str, Any]:
    """GAP@k, GAP, mAP (macro and over the most frequent classes), per-class AP and thresholded P/R/F1;
    `retrieval` adds the image embeddings' nearest-neighbour mAP (`retrieval_map`, quadratic in the split size).

    Classes the model was not trained on but that appear in the split's labels (held-out classes) are scored
    zero-shot from their names and reported separately under `zero_shot`. Entries the split lists in
    `unknown_labels` are left out of every metric (`metrics`: an unknown class is as if deleted from the image);
    `num_unknown` says how many there were.
    """
    loaded = load_model_dir(model_dir, device=device)
    frame = read_split(split_path)
    targets, known = split_targets(frame, loaded.class_names)
    cache = PreprocessCache(cache_dir)
    dataset = CachedImageDataset(frame, images_root, targets, cache, loaded.image_norm.size)
    preparer = ImagePreparer(loaded.image_norm, torch.device(device))
    probs, embeddings = compute_scores(
        loaded.classifier, dataset, preparer, batch_size=batch_size, with_embeddings=retrieval
    )
    report = evaluation_report(
        probs,
        targets,
        loaded.class_names,
        k=k,
        top_n=min(top_n_classes, len(loaded.class_names)) if top_n_classes else None,
        thresholds=loaded.thresholds,
        known=known,
    )
    if retrieval:
        report["retrieval_map"] = retrieval_map(embeddings, targets)
    report.update(calibration_report(loaded, probs, targets, known=known))
    held_out = list(loaded.metadata.get("held_out_classes", []))
    if held_out and loaded.supports_zero_shot:
        report["zero_shot"] = zero_shot_report(loaded, dataset, preparer, frame, held_out, batch_size=batch_size, k=k)
    report["split"] = str(split_path)
    report["split_sha256"] = file_digest(split_path)
    report["model_dir"] = str(model_dir)
    if plots_dir is not None:
        report["plots"] = _write_plots(report, probs, targets, loaded.class_names, Path(plots_dir))
    atomic_write_json(out_path, report)
    return report


def _write_plots(report: dict[str, Any], probs, targets, class_names: list[str], plots_dir: Path) -> dict[str, str]:
    """PNG plots plus a per-class AP table that `dvc plots show` renders."""
    from mumic_ml.plots import per_class_ap_plot, precision_recall_curves, reliability_diagram

    plots_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"class": name, "ap": ap} for name, ap in report["per_class_ap"].items() if ap is not None]
    atomic_write_json(plots_dir / "per_class_ap.json", rows)
    calibration = report["calibration"]
    reliability = reliability_diagram(calibration["raw"], calibration["calibrated"], plots_dir / "reliability.png")
    return {
        "reliability": str(reliability),
        "per_class_ap": str(per_class_ap_plot(report["per_class_ap"], plots_dir / "per_class_ap.png")),
        "precision_recall": str(precision_recall_curves(probs, targets, class_names, plots_dir / "pr_curves.png")),
        "per_class_ap_table": str(plots_dir / "per_class_ap.json"),
    }


def calibration_report(loaded: LoadedModel, probs: np.ndarray, targets: np.ndarray, known=None) -> dict[str, Any]:
    """`ece_raw` and `ece_calibrated` on this split (unknown entries left out), and under `calibration` the
    model's fitted temperature and bias, both reliability tables and the tuned thresholds on the calibrated scale
    (the cut to apply to served scores).

    A model without a fitted calibration reports method `none` and the same numbers twice.
    """
    calibration = loaded.calibration
    raw = calibration_summary(probs, targets, known=known)
    calibrated = raw if calibration.is_identity else calibration_summary(calibration.apply(probs), targets, known=known)
    detail: dict[str, Any] = {
        "method": "none" if calibration.is_identity else METHOD,
        "temperature": calibration.temperature,
        "bias": calibration.bias,
        "fitted_on": calibration.fit.get("fitted_on"),
        "raw": raw,
        "calibrated": calibrated,
    }
    if loaded.thresholds is not None:
        cuts = loaded.calibrated_thresholds
        detail["thresholds"] = {n: float(t) if np.isfinite(t) else None for n, t in zip(loaded.class_names, cuts)}
    return {"ece_raw": raw["ece"], "ece_calibrated": calibrated["ece"], "calibration": detail}


def zero_shot_report(
    loaded: LoadedModel,
    dataset: CachedImageDataset,
    preparer: ImagePreparer,
    frame,
    held_out: list[str],
    *,
    batch_size: int,
    k: int,
) -> dict[str, Any]:
    """Rank trained + held-out classes together and measure how the held-out ones fare."""
    extra = loaded.classifier.encode_class_prompts([class_prompts(n, loaded.default_prompts) for n in held_out])
    probs, _ = compute_scores(loaded.classifier, dataset, preparer, batch_size=batch_size, extra_class_features=extra)
    targets, known = split_targets(frame, held_out)
    held = targets * known  # known positives: unknown entries are left out below, as in the main report
    result: dict[str, Any] = {"classes": held_out}
    if held.sum() == 0:
        result["note"] = "no positives of the held-out classes in this split"
        return result
    held_scores = probs[:, len(loaded.class_names) :]
    result["map_held_out"] = float(mean_average_precision(held_scores, targets, known=known))
    result["gap_at_10_held_out"] = float(gap_at_k(held_scores, targets, k=min(k, held.shape[1]), known=known))
    per_class = per_class_average_precision(held_scores, targets, known=known)
    result["per_class_ap"] = {n: (None if np.isnan(v) else float(v)) for n, v in zip(held_out, per_class)}
    result["chance_map"] = float(
        np.mean([held[known[:, j], j].mean() for j in range(held.shape[1]) if held[:, j].any()])
    )
    return result
