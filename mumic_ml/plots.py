"""Evaluation plots (PNG): per-class AP and precision-recall curves of the most frequent classes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mumic_ml.io import atomic_path  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def per_class_ap_plot(per_class_ap: dict[str, float | None], path: Path) -> Path:
    items = sorted(((n, v) for n, v in per_class_ap.items() if v is not None), key=lambda kv: kv[1])
    fig, ax = plt.subplots(figsize=(7, max(3, 0.22 * len(items))))
    ax.barh([n for n, _ in items], [v for _, v in items], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision (test split)")
    ax.set_title("Per-class AP")
    return _save(fig, path)


def precision_recall_curves(
    scores: np.ndarray, targets: np.ndarray, class_names: list[str], path: Path, top_n: int = 8
) -> Path:
    """PR curves of the `top_n` most frequent classes: where the operating thresholds can sit."""
    order = np.argsort(-targets.sum(axis=0), kind="stable")[:top_n]
    fig, ax = plt.subplots(figsize=(6, 5))
    for j in order:
        if targets[:, j].sum() == 0:
            continue
        rank = np.argsort(-scores[:, j], kind="stable")
        hits = targets[rank, j]
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / hits.sum()
        ax.plot(recall, precision, label=class_names[j])
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("Precision-recall, most frequent classes")
    return _save(fig, path)
