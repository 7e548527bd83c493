"""Ranking and threshold metrics for multi-label scores (GAP@k, mAP, per-class AP, P/R/F1), in plain numpy.

All functions take `scores` and `targets` as N x C arrays (N images, C classes). Scores may be float32 or float64
and keep their dtype: every step compares or sorts score values and never does arithmetic on them, so the result
is the same whatever the precision. Targets are 0/1 (bool or numeric).

Ties are grouped the way `sklearn.metrics.average_precision_score` groups them: every positive in a block of equal
scores gets the precision at the end of the block. That makes each metric a function of the score values alone,
independent of the order of images or classes, and it gives the closed form used throughout this module:

    AP = (1 / P) * sum over hits h of  #(hits with score >= s_h) / #(entries with score >= s_h)

Both counts come from `np.searchsorted` on sorted score values, so no argsort (slow, and tie-order dependent) is
needed anywhere.

Partial labels: every metric takes an optional `known` mask (N x C, 0/1 or bool; 0 where the image's label for the
class is unknown, as in a manifest's `unknown_labels`). Unknown entries are treated as if they were deleted from
the data, the way the Open Images evaluation ignores unverified classes: a class's AP ranks only the images where
the class is known, and GAP@k ranks only known (image, class) pairs. Without a mask, or with one that marks every
entry known, each metric runs exactly the unmasked computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral

import numpy as np

_KEPT_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _check_inputs(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    """Validate once, up front, so every metric fails with the same clear message instead of a numpy error later.

    Returns the scores (float32/float64 kept as is, other real dtypes as float64) and the targets as bool.
    """
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.ndim != 2:
        raise ValueError(
            f"scores and targets must be 2-D (images x classes), got shapes {scores.shape} and {targets.shape}"
        )
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape, got {scores.shape} and {targets.shape}")
    if scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"scores and targets must have at least one image and one class, got shape {scores.shape}")

    if scores.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.dtype not in _KEPT_FLOAT_DTYPES:
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        kind = "NaN" if np.isnan(scores).any() else "inf"
        row, col = np.argwhere(~np.isfinite(scores))[0]
        raise ValueError(f"scores contain {kind} (first non-finite value at image {row}, class {col})")

    return scores, _as_bool(targets, "targets")


def _as_bool(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype.kind == "b":
        return values
    if values.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be 0/1 (bool or numeric), got dtype {values.dtype}")
    is_binary = (values == 0) | (values == 1)
    if not is_binary.all():
        row, col = np.argwhere(~is_binary)[0]
        raise ValueError(f"{name} must be 0/1, found {values[row, col]!r} at image {row}, class {col}")
    return values == 1


def _check_known(known, shape: tuple[int, ...]) -> np.ndarray | None:
    """The mask of known entries as bool; None when none is given or every entry is known, so that those cases
    take the unmasked code path and give its results bit for bit."""
    if known is None:
        return None
    known = np.asarray(known)
    if known.shape != shape:
        raise ValueError(f"known must have the shape of scores {shape}, got {known.shape}")
    known = _as_bool(known, "known")
    return None if known.all() else known


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _precision_sum_at_hits(entries_sorted: np.ndarray, hits_sorted: np.ndarray) -> float:
    """Sum over hits of the tie-grouped precision at the hit's score; both inputs sorted ascending.

    `#(x >= s)` in a sorted array of length n is `n - searchsorted(x, s, side="left")`; taking it at the hit's own
    score is what puts every hit of a tie block at the end of the block.
    """
    hits_at_or_above = hits_sorted.size - np.searchsorted(hits_sorted, hits_sorted, side="left")
    entries_at_or_above = entries_sorted.size - np.searchsorted(entries_sorted, hits_sorted, side="left")
    return float(np.sum(hits_at_or_above / entries_at_or_above))


def _top_k_hit_scores(scores: np.ndarray, targets: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the pooled top-k entries of every row, and of those that are true labels.

    Sorting each row (short rows, vectorised sorting networks) gives the k-th largest value per row; the pooled
    values are simply the last k columns of the sorted rows, whichever classes tied at the cut. Which classes were
    taken only matters for the hits: an entry is in the top k when its score is above the row's k-th value, or
    equal to it and among the first `k - #above` such entries in class order. Ties at the cut are rare with
    continuous scores, so that class-order fill is done only on rows where the two values around the cut are equal.
    """
    num_classes = scores.shape[1]
    rows_sorted = np.sort(scores, axis=1)
    pooled = rows_sorted[:, num_classes - k :].ravel()
    kth = rows_sorted[:, num_classes - k]

    taken = scores >= kth[:, None]
    tied_rows = np.flatnonzero(rows_sorted[:, num_classes - k - 1] == kth)
    if tied_rows.size:
        row_scores = scores[tied_rows]
        row_kth = kth[tied_rows, None]
        above = row_scores > row_kth
        at_cut = row_scores == row_kth
        free_slots = k - np.count_nonzero(above, axis=1)
        taken[tied_rows] = above | (at_cut & (np.cumsum(at_cut, axis=1) <= free_slots[:, None]))
    return pooled, scores[taken & targets]


def gap_at_k(scores, targets, k: int | None = 10, known=None) -> float:
    """YouTube-8M global average precision over the pooled top-k predictions of every image.

    Dividing by all positives of the ground truth (not only those that reached the top k) is what makes GAP@k
    penalise a model for positives it ranked below k. `k=None`, or any k >= C, pools every class. Classes tied
    at an image's top-k cut are taken in class-index order; tied pooled scores share the end-of-block precision.

    With a `known` mask, each image's ranking is restricted to its known classes: the top k of an image are its k
    best-scored known classes (all of them when it has fewer), an unknown class neither takes a place nor counts
    as a false positive, and the divisor is the number of known positives. The pooled entries are then ranked
    globally as before, so for k=None the result is the AP of the global ranking of every known (image, class)
    pair. This is GAP@k of the data with the unknown entries deleted from each image's row.

    Raises ValueError when the ground truth has no (known) positive: GAP is undefined then.
    """
    scores, targets = _check_inputs(scores, targets)
    if k is not None:
        k = _check_positive_int(k, "k")
    return _gap(scores, targets, k, _check_known(known, scores.shape))


def _gap(scores: np.ndarray, targets: np.ndarray, k: int | None, known: np.ndarray | None = None) -> float:
    num_classes = scores.shape[1]
    if known is not None:
        targets = targets & known
    num_positives = np.count_nonzero(targets)
    if num_positives == 0:
        raise ValueError("GAP is undefined: targets contain no positive label")

    if k is None or k >= num_classes:
        pooled = scores.ravel() if known is None else scores[known]
        hit_scores = scores[targets]
    elif known is None:
        pooled, hit_scores = _top_k_hit_scores(scores, targets, k)
    else:
        # Scores are finite (checked), so -inf puts the unknown entries below every known one of their row: they
        # fill an image's top k only where it has fewer than k known classes, and are dropped from the pool there.
        pooled, hit_scores = _top_k_hit_scores(np.where(known, scores, -np.inf), targets, k)
        pooled = pooled[pooled > -np.inf]
    return float(_precision_sum_at_hits(np.sort(pooled), np.sort(hit_scores)) / num_positives)


def _sorted_columns(scores: np.ndarray, known: np.ndarray | None):
    """Each class's scores sorted ascending, over the images where the class is known."""
    if known is None:
        return np.sort(scores, axis=0).T
    return [np.sort(scores[known[:, c], c]) for c in range(scores.shape[1])]


def _per_class_ap(scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    """Per-class AP on already checked inputs (NaN for classes without a known positive)."""
    if known is not None:
        targets = targets & known
    columns_sorted = _sorted_columns(scores, known)
    ap = np.full(scores.shape[1], np.nan)
    for c in np.flatnonzero(targets.any(axis=0)):
        hits_sorted = np.sort(scores[targets[:, c], c])
        ap[c] = _precision_sum_at_hits(columns_sorted[c], hits_sorted) / hits_sorted.size
    return ap


def per_class_average_precision(scores, targets, known=None) -> np.ndarray:
    """Non-interpolated AP of each class's ranking of the images; NaN where a class has no positive.

    With a `known` mask, a class ranks only the images where it is known (positive or negative).
    """
    scores, targets = _check_inputs(scores, targets)
    return _per_class_ap(scores, targets, _check_known(known, scores.shape))


def _majority_classes(targets: np.ndarray, top_n: int) -> np.ndarray:
    """Indices of the top_n classes with most positives; a stable sort breaks count ties by lower class index."""
    counts = np.count_nonzero(targets, axis=0)
    return np.argsort(-counts, kind="stable")[:top_n]


def _mean_ignoring_empty(ap: np.ndarray) -> float:
    if np.isnan(ap).all():
        raise ValueError("mAP is undefined: no class has a positive label")
    return float(np.nanmean(ap))


def mean_average_precision(scores, targets, top_n: int | None = None, known=None) -> float:
    """Macro mean of per-class AP over classes with at least one positive.

    `top_n` restricts the mean to the top_n classes with most positives, as the paper reports mAP over its 32
    majority classes. With a `known` mask every class's AP ranks its known images only, and only known positives
    count. Raises ValueError when no (selected) class has a positive.
    """
    scores, targets = _check_inputs(scores, targets)
    known = _check_known(known, scores.shape)
    ap = _per_class_ap(scores, targets, known)
    if top_n is not None:
        top_n = _check_positive_int(top_n, "top_n")
        ap = ap[_majority_classes(targets if known is None else targets & known, top_n)]
    return _mean_ignoring_empty(ap)


def _tune_thresholds(scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None = None) -> np.ndarray:
    if known is not None:
        targets = targets & known
    columns_sorted = _sorted_columns(scores, known)
    thresholds = np.full(scores.shape[1], np.inf)
    for c in np.flatnonzero(targets.any(axis=0)):
        hits_sorted = np.sort(scores[targets[:, c], c])
        true_positives = hits_sorted.size - np.searchsorted(hits_sorted, hits_sorted, side="left")
        predicted = columns_sorted[c].size - np.searchsorted(columns_sorted[c], hits_sorted, side="left")
        f1 = 2 * true_positives / (predicted + hits_sorted.size)
        thresholds[c] = hits_sorted[np.flatnonzero(f1 == f1.max())[-1]]
    return thresholds


def tune_thresholds(scores, targets, known=None) -> np.ndarray:
    """Per-class threshold (predict positive when score >= threshold) that maximises F1, e.g. on a validation split.

    Only positives' scores need trying: moving a threshold up from just above one positive to the next keeps the
    true positives and drops false ones, so the best threshold in that stretch is the next positive's score. Among
    equal F1 the higher threshold wins. A class with no positive gets +inf, i.e. it is never predicted. With a
    `known` mask, each class is tuned on the images where it is known.
    """
    scores, targets = _check_inputs(scores, targets)
    return _tune_thresholds(scores, targets, _check_known(known, scores.shape))


def _divide_or_zero(numerator, denominator):
    numerator = np.asarray(numerator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=np.asarray(denominator) > 0)


def _check_thresholds(thresholds, num_classes: int) -> np.ndarray:
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (num_classes,):
        raise ValueError(f"thresholds must have one value per class ({num_classes}), got shape {thresholds.shape}")
    if np.isnan(thresholds).any():
        raise ValueError("thresholds contain NaN")
    return thresholds


def _precision_recall_f1(
    scores: np.ndarray, targets: np.ndarray, thresholds: np.ndarray, known: np.ndarray | None = None
) -> dict:
    predicted = scores >= thresholds
    if known is not None:
        predicted, targets = predicted & known, targets & known
    true_positives = np.count_nonzero(predicted & targets, axis=0)
    predicted_positives = np.count_nonzero(predicted, axis=0)
    positives = np.count_nonzero(targets, axis=0)
    f1 = _divide_or_zero(2 * true_positives, predicted_positives + positives)
    micro_tp = true_positives.sum()
    has_positive = positives > 0
    return {
        "precision": _divide_or_zero(true_positives, predicted_positives),
        "recall": _divide_or_zero(true_positives, positives),
        "f1": f1,
        "micro_precision": float(_divide_or_zero(micro_tp, predicted_positives.sum())),
        "micro_recall": float(_divide_or_zero(micro_tp, positives.sum())),
        "micro_f1": float(_divide_or_zero(2 * micro_tp, predicted_positives.sum() + positives.sum())),
        "macro_f1": float(f1[has_positive].mean()) if has_positive.any() else 0.0,
    }


def precision_recall_f1(scores, targets, thresholds, known=None) -> dict:
    """Per-class and micro precision, recall and F1 of `score >= threshold` predictions, plus macro F1.

    Any 0/0 (no prediction, no positive) counts as 0, so a class that is never predicted scores 0 rather than
    making the report undefined. `macro_f1` averages F1 over classes with at least one positive, like mAP: a class
    with no positive has nothing to recall. With a `known` mask, an unknown entry is neither a prediction nor a
    positive.
    """
    scores, targets = _check_inputs(scores, targets)
    thresholds = _check_thresholds(thresholds, scores.shape[1])
    return _precision_recall_f1(scores, targets, thresholds, _check_known(known, scores.shape))


def retrieval_map(embeddings, targets, min_jaccard: float = 0.5) -> float:
    """Mean over query images of the AP of their nearest neighbours (cosine), a neighbour being relevant when its
    label set overlaps the query's by at least `min_jaccard` (intersection over union): how well the embedding
    space alone groups images by content.

    A lenient "shares any label" criterion says little when images carry many labels: on the demo world it gives
    0.97 for a random-init backbone. Each query's AP is the per-class AP above with the other images'
    similarities as scores, ties included; queries without any relevant neighbour are left out. O(N^2) time, O(N)
    extra memory per query: meant for test splits, not whole collections.
    """
    if not 0.0 < min_jaccard <= 1.0:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard!r}")
    embeddings = np.asarray(embeddings, dtype=np.float64)
    _, targets = _check_inputs(np.zeros(np.shape(targets)), targets)
    if embeddings.ndim != 2 or embeddings.shape[0] != targets.shape[0]:
        raise ValueError(
            f"embeddings must be N x d with one row per image of targets ({targets.shape[0]}), got {embeddings.shape}"
        )
    if embeddings.shape[0] < 2:
        raise ValueError("retrieval needs at least two images")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.where(norms > 0, norms, 1.0)
    labels = targets.astype(np.float32)
    counts = labels.sum(axis=1)
    aps = []
    for i in range(unit.shape[0]):
        others = np.arange(unit.shape[0]) != i
        similarity = (unit[others] @ unit[i]).round(12)  # rounding: equal vectors tie despite float noise
        shared = labels[others] @ labels[i]
        union = counts[others] + counts[i] - shared
        relevant = (shared > 0) & (shared >= min_jaccard * union - 1e-9)
        if relevant.any():
            hits = np.sort(similarity[relevant])
            aps.append(_precision_sum_at_hits(np.sort(similarity), hits) / hits.size)
    if not aps:
        raise ValueError("retrieval mAP is undefined: no image has a relevant neighbour")
    return float(np.mean(aps))


def _json_float(value) -> float | None:
    """JSON has no NaN or inf; None stands for 'undefined' (NaN AP) or 'never predicted' (infinite threshold)."""
    value = float(value)
    return value if math.isfinite(value) else None


def evaluation_report(
    scores,
    targets,
    class_names: Sequence[str],
    *,
    k: int = 10,
    top_n: int | None = None,
    thresholds=None,
    known=None,
) -> dict:
    """Every metric of this module in one JSON-ready dict (plain floats, None for undefined values).

    `gap_at_10` is always present because the evaluation gate and the CLI contract rely on it; `gap_at_{k}` is
    added for another k. Threshold metrics appear only when thresholds (tuned on validation data) are given. With
    a `known` mask every metric ignores the unknown entries, `num_positives` counts known positives and
    `num_unknown` says how many entries were left out.
    """
    scores, targets = _check_inputs(scores, targets)
    mask_given = known is not None
    known = _check_known(known, scores.shape)
    k = _check_positive_int(k, "k")
    class_names = [str(name) for name in class_names]
    if len(class_names) != scores.shape[1]:
        raise ValueError(f"class_names has {len(class_names)} names for {scores.shape[1]} classes")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names contain duplicates")

    per_class_ap = _per_class_ap(scores, targets, known)
    known_targets = targets if known is None else targets & known
    report: dict = {
        "gap_at_10": _gap(scores, targets, 10, known),
        "gap": _gap(scores, targets, None, known),
        "map_macro": _mean_ignoring_empty(per_class_ap),
        "per_class_ap": {name: _json_float(ap) for name, ap in zip(class_names, per_class_ap)},
        "num_images": int(scores.shape[0]),
        "num_classes": int(scores.shape[1]),
        "num_positives": int(np.count_nonzero(known_targets)),
    }
    if mask_given:
        report["num_unknown"] = 0 if known is None else int(known.size - np.count_nonzero(known))
    if k != 10:
        report[f"gap_at_{k}"] = _gap(scores, targets, k, known)
    if top_n is not None:
        top_n = _check_positive_int(top_n, "top_n")
        report["top_n"] = top_n
        report["map_top_n"] = _mean_ignoring_empty(per_class_ap[_majority_classes(known_targets, top_n)])
    if thresholds is not None:
        thresholds = _check_thresholds(thresholds, scores.shape[1])
        prf = _precision_recall_f1(scores, targets, thresholds, known)
        report["thresholds"] = {name: _json_float(t) for name, t in zip(class_names, thresholds)}
        for key in ("precision", "recall", "f1"):
            report[key] = {name: float(v) for name, v in zip(class_names, prf[key])}
        for key in ("micro_precision", "micro_recall", "micro_f1", "macro_f1"):
            report[key] = prf[key]
    return report


CALIBRATION_BINS = 15


def _check_probabilities(scores, targets, n_bins, known) -> tuple[np.ndarray, np.ndarray, int]:
    """The known entries' probabilities (float64) and targets, flattened, and the number of bins."""
    scores, targets = _check_inputs(scores, targets)
    n_bins = _check_positive_int(n_bins, "n_bins")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError("calibration is measured on probabilities: scores must lie in [0, 1]")
    known = _check_known(known, scores.shape)
    if known is None:
        return scores.astype(np.float64).ravel(), targets.ravel(), n_bins
    if not known.any():
        raise ValueError("calibration is undefined: no entry is known")
    return scores[known].astype(np.float64), targets[known], n_bins


def _reliability(flat: np.ndarray, targets: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries, summed probabilities and positives per equal-width bin; bin i is [i/B, (i+1)/B), the last one
    also holds 1."""
    index = np.minimum((flat * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    confidence_sum = np.bincount(index, weights=flat, minlength=n_bins)
    positives = np.bincount(index, weights=targets.astype(np.float64), minlength=n_bins)
    return count, confidence_sum, positives


def expected_calibration_error(scores, targets, n_bins: int = CALIBRATION_BINS, known=None) -> float:
    """ECE of multi-label probabilities: every (image, class) entry is one binary forecast, the entries are put in
    `n_bins` equal-width bins of probability, and each bin's |mean probability - fraction of positives| is
    weighted by its share of the entries. 0 is perfectly calibrated, the value is always within [0, 1]. Entries
    where `known` is 0 are left out."""
    return calibration_summary(scores, targets, n_bins, known)["ece"]


def calibration_summary(scores, targets, n_bins: int = CALIBRATION_BINS, known=None) -> dict:
    """ECE, the maximum calibration error (MCE, the worst non-empty bin) and the reliability table behind them,
    JSON-ready: per bin its edges, entries, mean probability (`confidence`) and fraction of positives
    (`frequency`), None for an empty bin."""
    flat, targets, n_bins = _check_probabilities(scores, targets, n_bins, known)
    count, confidence_sum, positives = _reliability(flat, targets, n_bins)
    filled = count > 0
    confidence = _divide_or_zero(confidence_sum, count)
    frequency = _divide_or_zero(positives, count)
    gap = np.abs(confidence - frequency)
    return {
        "ece": float(np.sum(count * gap) / count.sum()),
        "mce": float(gap[filled].max()),
        "n_bins": n_bins,
        "num_entries": int(count.sum()),
        "bins": [
            {
                "lower": i / n_bins,
                "upper": (i + 1) / n_bins,
                "count": int(count[i]),
                "confidence": float(confidence[i]) if filled[i] else None,
                "frequency": float(frequency[i]) if filled[i] else None,
            }
            for i in range(n_bins)
        ],
    }
