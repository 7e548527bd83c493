"""Annotation noise at training time: simulated, and answered.

`corrupt_labels` simulates what labels look like when annotators miss some and add a few wrong ones, applied to a
training split's label matrix (`train.label_noise`), so one collection with clean labels can be trained at several
noise levels while validation and test stay clean. It works on any collection's labels; the demo world is only the
usual one. `pseudo_label` answers missing labels with the label audit's out-of-fold scores (`train.pseudo_labels`).
"""

from __future__ import annotations

import numpy as np

from mumic_ml.config import PseudoLabelMode


def corrupt_labels(label_matrix: np.ndarray, *, missing_rate: float, spurious_rate: float, seed: int) -> np.ndarray:
    """Drop positives (the common kind of annotation error) and add false ones, each independently at its rate."""
    for name, rate in (("missing_rate", missing_rate), ("spurious_rate", spurious_rate)):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
    labels = np.asarray(label_matrix)
    if labels.ndim != 2:
        raise ValueError(f"label_matrix must be 2-D (images x classes), got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("label_matrix must contain only 0 and 1")
    positive = labels.astype(bool)
    draws = np.random.default_rng(seed).random(labels.shape)
    noisy = np.where(positive, draws >= missing_rate, draws < spurious_rate)
    return noisy.astype(labels.dtype)


def pseudo_label(
    targets: np.ndarray,
    known: np.ndarray,
    rankable: np.ndarray,
    scores: np.ndarray,
    mode: PseudoLabelMode,
    min_score: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets and known mask after flipping the known, rankable negatives scored at least `min_score` to positives
    (mode positive) or to unknown (mode unknown); and the flipped entries."""
    flagged = (targets == 0) & known & rankable & (scores >= min_score)
    if mode == PseudoLabelMode.POSITIVE:
        return np.where(flagged, 1, targets).astype(targets.dtype), known, flagged
    return targets, known & ~flagged, flagged
