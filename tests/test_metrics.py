"""Metrics against hand-computed values, a loop-by-loop reference and scikit-learn (agreement within 1e-9)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score

from mumic_ml.metrics import (
    evaluation_report,
    gap_at_k,
    mean_average_precision,
    per_class_average_precision,
    precision_recall_f1,
    retrieval_map,
    tune_thresholds,
)

TOL = 1e-9


def naive_gap(scores, targets, k):
    """GAP@k written as the definition reads, with explicit loops and no numpy, as an independent reference."""
    num_classes = len(scores[0])
    pool = []
    for row_scores, row_targets in zip(scores, targets):
        ranked = sorted(range(num_classes), key=lambda c: (-float(row_scores[c]), c))
        for c in ranked[: num_classes if k is None else k]:
            pool.append((float(row_scores[c]), bool(row_targets[c])))
    num_positives = sum(bool(t) for row in targets for t in row)
    pool.sort(key=lambda entry: -entry[0])

    total, hits_so_far, i = 0.0, 0, 0
    while i < len(pool):
        block_end = i
        while block_end < len(pool) and pool[block_end][0] == pool[i][0]:
            block_end += 1
        block_hits = sum(hit for _, hit in pool[i:block_end])
        hits_so_far += block_hits
        total += block_hits * hits_so_far / block_end
        i = block_end
    return total / num_positives


def sklearn_gap(scores, targets, k):
    """GAP@k as sklearn's AP of the pooled entries, rescaled from pooled positives to all positives."""
    num_images, num_classes = scores.shape
    take = num_classes if k is None else min(k, num_classes)
    classes = np.arange(num_classes)
    pooled_scores, pooled_hits = [], []
    for i in range(num_images):
        order = np.lexsort((classes, -scores[i]))[:take]
        pooled_scores.append(scores[i, order])
        pooled_hits.append(targets[i, order])
    pooled_scores = np.concatenate(pooled_scores)
    pooled_hits = np.concatenate(pooled_hits).astype(int)
    if pooled_hits.sum() == 0:
        return 0.0
    return average_precision_score(pooled_hits, pooled_scores) * pooled_hits.sum() / targets.sum()


def sklearn_map(scores, targets):
    aps = [average_precision_score(targets[:, c], scores[:, c]) for c in range(scores.shape[1]) if targets[:, c].any()]
    return float(np.mean(aps))


def random_case(seed, num_images, num_classes, *, ties, dtype=np.float64, density=0.2):
    """Random scores and targets with at least one positive; `ties` rounds scores to one decimal."""
    rng = np.random.default_rng(seed)
    scores = rng.random((num_images, num_classes))
    if ties:
        scores = np.round(scores, 1)
    targets = (rng.random((num_images, num_classes)) < density).astype(np.int64)
    targets[rng.integers(num_images), rng.integers(num_classes)] = 1
    return scores.astype(dtype), targets


# --- hand-computed values ----------------------------------------------------------------------------------------

HAND_SCORES = np.array([[0.9, 0.8, 0.1], [0.7, 0.2, 0.6]])
HAND_TARGETS = np.array([[1, 0, 1], [0, 0, 1]])


def test_gap_hand_computed_top_2():
    # Top 2 per image: (0.9 T, 0.8 F) and (0.7 F, 0.6 T). Pool ranked: 0.9 T, 0.8 F, 0.7 F, 0.6 T.
    # Precision at the hits: 1/1 and 2/4. P = 3 positives in total (0.1 T never reached the pool).
    # GAP@2 = (1 + 0.5) / 3 = 0.5
    assert gap_at_k(HAND_SCORES, HAND_TARGETS, k=2) == pytest.approx(0.5, abs=TOL)


def test_gap_hand_computed_top_1():
    # Pool: 0.9 T, 0.7 F. GAP@1 = (1/1) / 3
    assert gap_at_k(HAND_SCORES, HAND_TARGETS, k=1) == pytest.approx(1 / 3, abs=TOL)


def test_gap_hand_computed_all_classes():
    # Pool of all 6: 0.9 T, 0.8 F, 0.7 F, 0.6 T, 0.2 F, 0.1 T -> precisions 1/1, 2/4, 3/6.
    # GAP = (1 + 0.5 + 0.5) / 3 = 2/3, for k=None and for any k >= C.
    for k in (None, 3, 50):
        assert gap_at_k(HAND_SCORES, HAND_TARGETS, k=k) == pytest.approx(2 / 3, abs=TOL)


def test_gap_tie_at_cut_takes_lower_class_index():
    # All three classes tie at 0.5; the top 2 are classes 0 and 1, so the positive (class 2) is not pooled: 0.
    # With k=3 it is pooled in a tie block of 3 entries holding 1 hit: precision 1/3, P = 1 -> 1/3.
    scores, targets = [[0.5, 0.5, 0.5]], [[0, 0, 1]]
    assert gap_at_k(scores, targets, k=2) == 0.0
    assert gap_at_k(scores, targets, k=3) == pytest.approx(1 / 3, abs=TOL)
    # Reversing the class order brings the positive to class 0, which now wins the tie: precision 1/2 over P=1.
    assert gap_at_k([[0.5, 0.5, 0.5]], [[1, 0, 0]], k=2) == pytest.approx(0.5, abs=TOL)


def test_gap_tie_in_pool_uses_end_of_block_whatever_the_image_order():
    # k=1 pools (0.8 F) and (0.8 T): one tie block of 2 entries with 1 hit, precision 1/2; P = 2 -> 0.25.
    scores = np.array([[0.8, 0.3], [0.8, 0.1]])
    targets = np.array([[0, 1], [1, 0]])
    assert gap_at_k(scores, targets, k=1) == pytest.approx(0.25, abs=TOL)
    assert gap_at_k(scores[::-1], targets[::-1], k=1) == pytest.approx(0.25, abs=TOL)


MAP_SCORES = np.array([[0.9, 0.2, 0.5], [0.8, 0.4, 0.5], [0.3, 0.6, 0.5], [0.1, 0.8, 0.5]])
MAP_TARGETS = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]])


def test_average_precision_hand_computed():
    # Class 0 ranks 0.9 T, 0.8 F, 0.3 T, 0.1 F: AP = (1/1 + 2/3) / 2 = 5/6.
    # Class 1 ranks its only positive (0.8) first: AP = 1. Class 2 has no positive: NaN.
    ap = per_class_average_precision(MAP_SCORES, MAP_TARGETS)
    assert ap[0] == pytest.approx(5 / 6, abs=TOL)
    assert ap[1] == pytest.approx(1.0, abs=TOL)
    assert np.isnan(ap[2])
    # mAP skips the empty class: (5/6 + 1) / 2 = 11/12.
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS) == pytest.approx(11 / 12, abs=TOL)


def test_map_top_n_keeps_majority_classes():
    # Positives per class: 2, 1, 0. top_n=1 keeps class 0 (AP 5/6); top_n=2 gives 11/12; top_n=3 adds only the
    # empty class, which has no AP, so the mean stays 11/12.
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS, top_n=1) == pytest.approx(5 / 6, abs=TOL)
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS, top_n=2) == pytest.approx(11 / 12, abs=TOL)
    assert mean_average_precision(MAP_SCORES, MAP_TARGETS, top_n=3) == pytest.approx(11 / 12, abs=TOL)


def test_map_top_n_breaks_count_ties_by_lower_class_index():
    # Both classes have one positive; top_n=1 must pick class 0 (AP 1/2: its positive is ranked second).
    scores = np.array([[0.2, 0.9], [0.7, 0.1]])
    targets = np.array([[1, 1], [0, 0]])
    assert mean_average_precision(scores, targets, top_n=1) == pytest.approx(0.5, abs=TOL)


def test_tune_thresholds_hand_computed():
    # Column 0: scores 0.9 .. 0.5, positives at 0.9 and 0.7. F1 = 2 TP / (#predicted + #positives):
    #   t=0.9: 2*1/(1+2) = 2/3;  t=0.7: 2*2/(3+2) = 4/5  -> 0.7.
    # Column 1: positives at 0.9 and 0.6: t=0.9: 2/3; t=0.6: 4/(4+2) = 2/3 -> tie, the higher threshold 0.9 wins.
    # Column 2: no positive -> +inf.
    scores = np.array([[0.9, 0.9, 0.1], [0.8, 0.8, 0.2], [0.7, 0.7, 0.3], [0.6, 0.6, 0.4], [0.5, 0.5, 0.5]])
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(tune_thresholds(scores, targets), [0.7, 0.9, np.inf])


def test_precision_recall_f1_hand_computed():
    # Thresholds 0.5, 0.5, inf on MAP_SCORES:
    # class 0 predicts images 0, 1; positives 0, 2: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2.
    # class 1 predicts images 2, 3; positive 3:     TP 1, FP 1, FN 0 -> P 1/2, R 1,   F1 2/3.
    # class 2 predicts nothing and has no positive: all 0/0 -> 0.
    # micro: TP 2, predicted 4, positives 3 -> P 1/2, R 2/3, F1 2*2/(4+3) = 4/7.
    # macro F1 over classes with a positive: (1/2 + 2/3) / 2 = 7/12.
    result = precision_recall_f1(MAP_SCORES, MAP_TARGETS, [0.5, 0.5, np.inf])
    np.testing.assert_allclose(result["precision"], [0.5, 0.5, 0.0], atol=TOL)
    np.testing.assert_allclose(result["recall"], [0.5, 1.0, 0.0], atol=TOL)
    np.testing.assert_allclose(result["f1"], [0.5, 2 / 3, 0.0], atol=TOL)
    assert result["micro_precision"] == pytest.approx(0.5, abs=TOL)
    assert result["micro_recall"] == pytest.approx(2 / 3, abs=TOL)
    assert result["micro_f1"] == pytest.approx(4 / 7, abs=TOL)
    assert result["macro_f1"] == pytest.approx(7 / 12, abs=TOL)


# --- parity with the references on random inputs ------------------------------------------------------------------

SHAPES = [(1, 1), (1, 6), (6, 1), (25, 7), (120, 15)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gap_matches_naive_and_sklearn(shape, ties, dtype):
    for seed in range(3):
        scores, targets = random_case(seed, *shape, ties=ties, dtype=dtype)
        for k in (1, 3, 10, 40, None):
            expected = naive_gap(scores.tolist(), targets.tolist(), k)
            assert gap_at_k(scores, targets, k=k) == pytest.approx(expected, abs=TOL), (seed, k)
            assert gap_at_k(scores, targets, k=k) == pytest.approx(sklearn_gap(scores, targets, k), abs=TOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_map_matches_sklearn(shape, ties):
    for seed in range(3):
        scores, targets = random_case(seed, *shape, ties=ties, density=0.1)
        assert mean_average_precision(scores, targets) == pytest.approx(sklearn_map(scores, targets), abs=TOL)
        ap = per_class_average_precision(scores, targets)
        for c in range(shape[1]):
            if targets[:, c].any():
                assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=TOL)
            else:
                assert np.isnan(ap[c])


def test_gap_with_many_tied_rows_matches_naive():
    # Scores on a coarse grid make ties at the top-k cut the rule, not the exception.
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 3, size=(300, 12)).astype(np.float32)
    targets = rng.random((300, 12)) < 0.3
    for k in (1, 2, 5, 11):
        assert gap_at_k(scores, targets, k=k) == pytest.approx(naive_gap(scores, targets, k), abs=TOL)


def test_tuned_thresholds_beat_every_other_present_score():
    scores, targets = random_case(3, 60, 5, ties=True)
    thresholds = tune_thresholds(scores, targets)
    best_f1 = precision_recall_f1(scores, targets, thresholds)["f1"]
    for c in range(scores.shape[1]):
        for candidate in np.unique(scores[:, c]):
            predicted = scores[:, c] >= candidate
            tp = np.sum(predicted & (targets[:, c] == 1))
            f1 = 2 * tp / (predicted.sum() + targets[:, c].sum())
            assert f1 <= best_f1[c]
            if f1 == best_f1[c]:
                assert candidate <= thresholds[c]


# --- properties -----------------------------------------------------------------------------------------------------

small_shapes = st.tuples(st.integers(1, 12), st.integers(1, 6))


@st.composite
def scored_labels(draw, integer_scores=False):
    """Scores on a coarse grid (many ties) and 0/1 targets with at least one positive."""
    shape = draw(small_shapes)
    grid = draw(hnp.arrays(np.int64, shape, elements=st.integers(-5, 5)))
    scores = grid.astype(np.float64) if integer_scores else grid / 10.0
    targets = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, 1)))
    targets.flat[draw(st.integers(0, targets.size - 1))] = 1
    return scores, targets


ks = st.one_of(st.none(), st.integers(1, 8))


@settings(max_examples=60, deadline=None)
@given(scored_labels(), ks, st.randoms(use_true_random=False))
def test_gap_is_a_fraction_invariant_under_permuting_images(case, k, rnd):
    scores, targets = case
    order = list(range(scores.shape[0]))
    rnd.shuffle(order)
    value = gap_at_k(scores, targets, k=k)
    assert 0.0 <= value <= 1.0
    assert gap_at_k(scores[order], targets[order], k=k) == pytest.approx(value, abs=TOL)


@settings(max_examples=60, deadline=None)
@given(scored_labels(), st.randoms(use_true_random=False))
def test_gap_over_all_classes_is_invariant_under_permuting_classes(case, rnd):
    scores, targets = case
    order = list(range(scores.shape[1]))
    rnd.shuffle(order)
    assert gap_at_k(scores[:, order], targets[:, order], k=None) == pytest.approx(gap_at_k(scores, targets, k=None))


@settings(max_examples=60, deadline=None)
@given(scored_labels(integer_scores=True), ks)
def test_gap_and_map_invariant_under_strictly_increasing_transform(case, k):
    scores, targets = case
    transformed = scores**3 + 2 * scores - 7  # strictly increasing and exact on small integers
    assert gap_at_k(transformed, targets, k=k) == pytest.approx(gap_at_k(scores, targets, k=k), abs=TOL)
    assert mean_average_precision(transformed, targets) == pytest.approx(
        mean_average_precision(scores, targets), abs=TOL
    )


@settings(max_examples=60, deadline=None)
@given(scored_labels(), ks)
def test_gap_invariant_under_duplicating_the_dataset(case, k):
    # Every count in the precision ratios doubles, and so does P.
    scores, targets = case
    doubled = gap_at_k(np.vstack([scores, scores]), np.vstack([targets, targets]), k=k)
    assert doubled == pytest.approx(gap_at_k(scores, targets, k=k), abs=TOL)


@settings(max_examples=60, deadline=None)
@given(scored_labels())
def test_perfect_scores(case):
    # Scoring each label by its own target ranks every positive above every negative: GAP over all classes is 1,
    # and GAP@k loses exactly the positives that could not fit in an image's top k.
    _, targets = case
    scores = targets.astype(np.float64)
    assert gap_at_k(scores, targets, k=None) == pytest.approx(1.0, abs=TOL)
    assert mean_average_precision(scores, targets) == pytest.approx(1.0, abs=TOL)
    for k in range(1, 4):
        pooled_positives = np.minimum(targets.sum(axis=1), k).sum()
        assert gap_at_k(scores, targets, k=k) == pytest.approx(pooled_positives / targets.sum(), abs=TOL)


@settings(max_examples=60, deadline=None)
@given(scored_labels(), ks)
def test_float32_and_float64_agree(case, k):
    scores, targets = case
    scores32 = scores.astype(np.float32)
    assert gap_at_k(scores32, targets, k=k) == pytest.approx(gap_at_k(scores32.astype(np.float64), targets, k=k))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 15), st.integers(0, 10_000), ks)
def test_single_class_gap_is_its_average_precision(num_images, seed, k):
    scores, targets = random_case(seed, num_images, 1, ties=True)
    assert gap_at_k(scores, targets, k=k) == pytest.approx(mean_average_precision(scores, targets), abs=TOL)


# --- dtypes and report ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_dtype", [bool, np.uint8, np.int32, np.float32, np.float64])
def test_targets_accept_bool_and_numeric(target_dtype):
    assert gap_at_k(HAND_SCORES, HAND_TARGETS.astype(target_dtype), k=2) == pytest.approx(0.5, abs=TOL)


def test_evaluation_report_is_json_ready():
    names = ["a", "b", "c"]
    thresholds = tune_thresholds(MAP_SCORES, MAP_TARGETS)
    report = evaluation_report(MAP_SCORES, MAP_TARGETS, names, k=2, top_n=1, thresholds=thresholds)
    json.dumps(report, allow_nan=False)
    assert report["gap_at_10"] == pytest.approx(gap_at_k(MAP_SCORES, MAP_TARGETS, k=10), abs=TOL)
    assert report["gap_at_2"] == pytest.approx(gap_at_k(MAP_SCORES, MAP_TARGETS, k=2), abs=TOL)
    assert report["gap"] == pytest.approx(gap_at_k(MAP_SCORES, MAP_TARGETS, k=None), abs=TOL)
    assert report["map_macro"] == pytest.approx(11 / 12, abs=TOL)
    assert report["top_n"] == 1
    assert report["map_top_n"] == pytest.approx(5 / 6, abs=TOL)
    assert report["per_class_ap"] == {"a": pytest.approx(5 / 6), "b": pytest.approx(1.0), "c": None}
    assert (report["num_images"], report["num_classes"], report["num_positives"]) == (4, 3, 3)
    assert report["thresholds"]["c"] is None
    assert set(report["f1"]) == set(names)
    for key in ("micro_precision", "micro_recall", "micro_f1", "macro_f1"):
        assert isinstance(report[key], float)


def test_evaluation_report_without_optional_parts():
    report = evaluation_report(HAND_SCORES, HAND_TARGETS, ["x", "y", "z"])
    assert {"gap_at_10", "gap", "map_macro", "per_class_ap", "num_images", "num_classes", "num_positives"} == set(
        report
    )


# --- bad inputs ----------------------------------------------------------------------------------------------------

GOOD_SCORES = np.array([[0.1, 0.9], [0.4, 0.3]])
GOOD_TARGETS = np.array([[0, 1], [1, 0]])

ALL_METRICS = [
    lambda s, t: gap_at_k(s, t),
    lambda s, t: mean_average_precision(s, t),
    lambda s, t: per_class_average_precision(s, t),
    lambda s, t: tune_thresholds(s, t),
    lambda s, t: precision_recall_f1(s, t, np.zeros(np.shape(s)[-1])),
    lambda s, t: evaluation_report(s, t, [f"c{i}" for i in range(np.shape(s)[-1])]),
]


@pytest.mark.parametrize("metric", ALL_METRICS)
@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.array([0.1, 0.9]), np.array([0, 1]), "2-D"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "2-D"),
        (GOOD_SCORES, GOOD_TARGETS[:1], "same shape"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "at least one image"),
        (np.zeros((2, 0)), np.zeros((2, 0)), "at least one image"),
        (np.array([[0.1, np.nan], [0.4, 0.3]]), GOOD_TARGETS, "NaN"),
        (np.array([[0.1, np.inf], [0.4, 0.3]]), GOOD_TARGETS, "inf"),
        (np.array([[0.1, 0.2], [-np.inf, 0.3]]), GOOD_TARGETS, "inf"),
        (np.array([["a", "b"], ["c", "d"]]), GOOD_TARGETS, "real numbers"),
        (GOOD_SCORES, np.array([[0, 2], [1, 0]]), "0/1"),
        (GOOD_SCORES, np.array([[0, 0.5], [1, 0]]), "0/1"),
        (GOOD_SCORES, np.array([[0, np.nan], [1, 0]]), "0/1"),
        (GOOD_SCORES, np.array([["0", "1"], ["1", "0"]]), "0/1"),
    ],
)
def test_bad_inputs_raise_clear_errors(metric, scores, targets, message):
    with pytest.raises(ValueError, match=message):
        metric(scores, targets)


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k must be an integer"):
        gap_at_k(GOOD_SCORES, GOOD_TARGETS, k=k)
    with pytest.raises(ValueError, match="k must be an integer"):
        evaluation_report(GOOD_SCORES, GOOD_TARGETS, ["a", "b"], k=k)


@pytest.mark.parametrize("top_n", [0, 1.5])
def test_bad_top_n(top_n):
    with pytest.raises(ValueError, match="top_n must be an integer"):
        mean_average_precision(GOOD_SCORES, GOOD_TARGETS, top_n=top_n)


def test_no_positive_at_all_is_undefined():
    with pytest.raises(ValueError, match="no positive"):
        gap_at_k(GOOD_SCORES, np.zeros_like(GOOD_TARGETS))
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(GOOD_SCORES, np.zeros_like(GOOD_TARGETS))


@pytest.mark.parametrize("names", [["a"], ["a", "b", "c"], ["a", "a"]])
def test_bad_class_names(names):
    with pytest.raises(ValueError, match="class_names"):
        evaluation_report(GOOD_SCORES, GOOD_TARGETS, names)


@pytest.mark.parametrize("thresholds", [[0.5], [[0.5, 0.5]], [0.5, np.nan]])
def test_bad_thresholds(thresholds):
    with pytest.raises(ValueError, match="thresholds"):
        precision_recall_f1(GOOD_SCORES, GOOD_TARGETS, thresholds)


def test_edge_single_sample_and_single_class():
    # One image: scores 0.2 (T), 0.7 (F). GAP over both: 0.7 F, 0.2 T -> precision 1/2, P = 1.
    assert gap_at_k([[0.2, 0.7]], [[1, 0]], k=None) == pytest.approx(0.5, abs=TOL)
    assert gap_at_k([[0.2, 0.7]], [[1, 0]], k=1) == 0.0
    # One class, one image, one positive: AP 1.
    assert gap_at_k([[0.3]], [[1]]) == 1.0
    assert mean_average_precision([[0.3]], [[1]]) == 1.0
    assert not math.isnan(tune_thresholds([[0.3]], [[1]])[0])


def test_retrieval_map_by_hand():
    embeddings = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [1, 1]])
    # Query 0 ranks 1 (miss), 2 (hit), 3 (hit): (1/2 + 2/3) / 2. Query 1 finds its one relevant image last: 1/3.
    # Query 2 ranks 1 (miss) then 0 and 3 tied (both hits): 2/3 each. Query 3 shares a label with everyone: 1.
    expected = ((1 / 2 + 2 / 3) / 2 + 1 / 3 + 2 / 3 + 1.0) / 4
    assert retrieval_map(embeddings, targets) == pytest.approx(expected)
    assert retrieval_map(embeddings * 7.5, targets) == pytest.approx(expected)
    # Same label set only: query 0 finds image 2 second (1/2); query 2 finds image 0 in a tie block of three
    # entries at similarity 0 (1/3); queries 1 and 3 have no relevant neighbour and are left out.
    assert retrieval_map(embeddings, targets, min_jaccard=1.0) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_retrieval_map_skips_queries_without_any_relevant_image():
    embeddings = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    targets = np.array([[1, 0], [1, 0], [0, 1]])
    assert retrieval_map(embeddings, targets) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no image has a relevant neighbour"):
        retrieval_map(embeddings, np.eye(3))


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 12), st.integers(2, 5), st.integers(0, 2**16))
def test_retrieval_map_matches_sklearn_per_query(n, d, seed):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, d))
    targets = rng.random((n, 3)) < 0.5
    targets[0, 0] = True
    targets[1] = targets[0]  # identical label sets: at least one query has a relevant neighbour
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    aps = []
    for i in range(n):
        others = np.arange(n) != i
        shared = (targets[others] & targets[i]).sum(axis=1)
        union = (targets[others] | targets[i]).sum(axis=1)
        relevant = (shared > 0) & (2 * shared >= union)
        if relevant.any():
            aps.append(average_precision_score(relevant, (unit[others] @ unit[i]).round(12)))
    assert retrieval_map(embeddings, targets) == pytest.approx(np.mean(aps))


@pytest.mark.parametrize(
    ("embeddings", "targets", "message"),
    [
        (np.ones((3, 2)), np.ones((4, 1)), "one row per image"),
        (np.ones((1, 2)), np.ones((1, 1)), "at least two images"),
        (np.array([[1.0, np.nan], [1.0, 0.0]]), np.ones((2, 1)), "NaN or inf"),
    ],
)
def test_retrieval_map_bad_inputs(embeddings, targets, message):
    with pytest.raises(ValueError, match=message):
        retrieval_map(embeddings, targets)
    with pytest.raises(ValueError, match="min_jaccard"):
        retrieval_map(np.eye(2), np.ones((2, 1)), min_jaccard=0.0)
