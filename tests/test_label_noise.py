"""Simulated annotation noise: the asked rates, seeded, input untouched, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest

from mumic_ml.label_noise import corrupt_labels


def test_rates_are_the_asked_ones():
    rng = np.random.default_rng(0)
    clean = (rng.random((400, 250)) < 0.2).astype(np.float32)
    noisy = corrupt_labels(clean, missing_rate=0.3, spurious_rate=0.05, seed=1)
    assert noisy.dtype == clean.dtype and noisy.shape == clean.shape
    assert set(np.unique(noisy)) <= {0.0, 1.0}
    positives, negatives = clean == 1, clean == 0
    assert abs((noisy[positives] == 0).mean() - 0.3) < 0.01
    assert abs((noisy[negatives] == 1).mean() - 0.05) < 0.005


def test_is_deterministic_and_leaves_the_input_alone():
    clean = np.eye(30, dtype=np.int64)
    before = clean.copy()
    a = corrupt_labels(clean, missing_rate=0.5, spurious_rate=0.1, seed=3)
    b = corrupt_labels(clean, missing_rate=0.5, spurious_rate=0.1, seed=3)
    c = corrupt_labels(clean, missing_rate=0.5, spurious_rate=0.1, seed=4)
    assert np.array_equal(clean, before)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a is not clean and a.dtype == np.int64


def test_without_a_spurious_rate_it_only_removes():
    clean = np.random.default_rng(2).random((200, 40)) < 0.3
    noisy = corrupt_labels(clean, missing_rate=0.2, spurious_rate=0.0, seed=0)
    assert noisy.dtype == np.bool_
    assert not (noisy & ~clean).any()
    assert np.array_equal(corrupt_labels(clean, missing_rate=0.0, spurious_rate=0.0, seed=0), clean)


@pytest.mark.parametrize(
    ("missing", "spurious"), [(-0.1, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, -0.5), (float("nan"), 0.0)]
)
def test_rejects_bad_rates(missing, spurious):
    with pytest.raises(ValueError):
        corrupt_labels(np.zeros((3, 3)), missing_rate=missing, spurious_rate=spurious, seed=0)


@pytest.mark.parametrize("matrix", [np.zeros(5), np.full((2, 2), 0.5)])
def test_rejects_bad_matrices(matrix):
    with pytest.raises(ValueError):
        corrupt_labels(matrix, missing_rate=0.1, spurious_rate=0.1, seed=0)
