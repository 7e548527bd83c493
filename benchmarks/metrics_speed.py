"""Time gap_at_k against a plain vectorised numpy GAP@k, and mAP, on one synthetic score matrix.

The target is GAP@10 over 100,000 x 120 scores in at most 0.15 s; this prints whether it holds.
The functions run interleaved, one call of each per round, so load from other processes hits them alike.

    python benchmarks/metrics_speed.py --n 100000 --c 120 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from mumic_ml.metrics import gap_at_k, mean_average_precision

BAR_SECONDS = 0.15


def reference_gap_at_k(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    """The straightforward version: argsort rows, take the top k, argsort the pool, cumsum.

    A stable argsort of negated scores puts the lower class index first on ties, as gap_at_k does; tied pooled
    scores share the precision at the end of their block.
    """
    num_images = scores.shape[0]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = np.arange(num_images)[:, None]
    pooled_scores = scores[rows, top].ravel()
    pooled_hits = targets[rows, top].ravel()

    order = np.argsort(-pooled_scores, kind="stable")
    ranked_scores = pooled_scores[order]
    ranked_hits = pooled_hits[order]
    new_block = ranked_scores[1:] != ranked_scores[:-1]
    block_of = np.concatenate([[0], np.cumsum(new_block)])
    block_last = np.flatnonzero(np.concatenate([new_block, [True]]))
    block_precision = np.cumsum(ranked_hits)[block_last] / (block_last + 1)
    return float(block_precision[block_of][ranked_hits].sum() / np.count_nonzero(targets))


def synthetic_scores(num_images: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores loosely correlated with long-tailed targets, roughly like a trained model's output."""
    rng = np.random.default_rng(seed)
    class_rates = 0.2 / np.arange(1, num_classes + 1) ** 0.8
    targets = rng.random((num_images, num_classes)) < class_rates
    scores = rng.random((num_images, num_classes), dtype=np.float32) + 0.5 * targets.astype(np.float32)
    return scores, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="images")
    parser.add_argument("--c", type=int, default=120, help="classes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scores, targets = synthetic_scores(args.n, args.c, args.seed)
    candidates = {
        f"gap_at_k(k={args.k})": lambda: gap_at_k(scores, targets, k=args.k),
        f"reference GAP@{args.k}": lambda: reference_gap_at_k(scores, targets, args.k),
        "mean_average_precision": lambda: mean_average_precision(scores, targets),
    }
    values = {name: run() for name, run in candidates.items()}
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(times) for name, times in timings.items()}
    fast, reference = list(candidates)[:2]
    print(f"scores {args.n} x {args.c} float32, {np.count_nonzero(targets)} positives, median of {args.repeats}")
    print(f"{'function':<26}{'seconds':>10}{'value':>14}{'vs reference':>14}")
    for name in candidates:
        ratio = medians[name] / medians[reference]
        print(f"{name:<26}{medians[name]:>10.4f}{values[name]:>14.9f}{ratio:>13.2f}x")

    difference = abs(values[fast] - values[reference])
    print(f"gap_at_k vs reference: |difference| = {difference:.2e} ({'same' if difference <= 1e-9 else 'DIFFERENT'})")
    met = medians[fast] <= BAR_SECONDS
    print(f"bar: GAP@{args.k} in at most {BAR_SECONDS} s: {'met' if met else 'NOT met'} ({medians[fast]:.4f} s)")
    if difference > 1e-9:
        raise SystemExit("gap_at_k and the reference disagree")


if __name__ == "__main__":
    main()
