"""Calibration: ECE and its reliability table by hand and as properties, the shared temperature and bias fitted on
validation scores, and the promise that calibrating never changes which labels a model selects."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from image_fixtures import encode, noise
from test_model import PROMPTS, _save

from mumic_ml.backbone import create_backbone
from mumic_ml.calibration import Calibration, fit_calibration
from mumic_ml.config import ModelConfig
from mumic_ml.evaluate import calibration_report
from mumic_ml.metrics import (
    calibration_summary,
    expected_calibration_error,
    precision_recall_f1,
    tune_thresholds,
)
from mumic_ml.model_io import LoadedModel, build_classifier, load_model_dir
from mumic_ml.predict import Predictor


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_ece_and_mce_by_hand():
    scores = np.array([[0.1, 0.9], [0.3, 0.8]])
    targets = np.array([[0, 1], [1, 1]])
    # Two bins: [0, 0.5) holds 0.1 and 0.3 (mean 0.2, one positive of two), [0.5, 1] holds 0.9 and 0.8 (mean 0.85,
    # both positive): ECE = (2 * |0.2 - 0.5| + 2 * |0.85 - 1|) / 4.
    summary = calibration_summary(scores, targets, n_bins=2)
    assert summary["ece"] == pytest.approx(0.225)
    assert summary["mce"] == pytest.approx(0.3)
    assert summary["n_bins"] == 2 and summary["num_entries"] == 4
    assert [b["count"] for b in summary["bins"]] == [2, 2]
    assert summary["bins"][0]["confidence"] == pytest.approx(0.2) and summary["bins"][0]["frequency"] == 0.5
    assert expected_calibration_error(scores, targets, n_bins=2) == pytest.approx(0.225)
    json.dumps(summary)


def test_bins_are_half_open_with_one_in_the_last_and_empty_bins_are_none():
    summary = calibration_summary(np.array([[0.0, 0.25, 0.5, 1.0]]), np.array([[0, 0, 1, 1]]), n_bins=4)
    assert [b["count"] for b in summary["bins"]] == [1, 1, 1, 1]
    summary = calibration_summary(np.array([[0.5, 1.0]]), np.array([[1, 1]]), n_bins=2)
    assert [b["count"] for b in summary["bins"]] == [0, 2]
    assert summary["bins"][0]["confidence"] is None and summary["bins"][0]["frequency"] is None
    assert summary["ece"] == pytest.approx(0.25) and summary["mce"] == pytest.approx(0.25)
    assert calibration_summary(np.array([[0.3]]), np.array([[1]]))["n_bins"] == 15


def test_forecasts_that_match_their_frequencies_exactly_have_zero_ece():
    scores = np.full((8, 2), 0.25)
    targets = np.zeros((8, 2))
    targets[:4, 0] = 1  # 4 of the 16 entries: exactly a quarter
    assert expected_calibration_error(scores, targets) == 0.0


def test_unknown_entries_are_left_out():
    scores = np.array([[0.1, 0.9], [0.3, 0.8]])
    targets = np.array([[0, 1], [1, 0]])
    known = np.array([[1, 1], [0, 1]])
    kept = calibration_summary(np.array([[0.1, 0.9, 0.8]]), np.array([[0, 1, 0]]), n_bins=3)
    assert calibration_summary(scores, targets, n_bins=3, known=known) == kept
    assert calibration_summary(scores, targets, known=np.ones((2, 2))) == calibration_summary(scores, targets)
    with pytest.raises(ValueError, match="no entry is known"):
        calibration_summary(scores, targets, known=np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("scores", "n_bins", "message"),
    [([[1.2, 0.1]], 15, r"\[0, 1\]"), ([[-0.1, 0.1]], 15, r"\[0, 1\]"), ([[0.2, 0.1]], 0, "n_bins")],
)
def test_calibration_bad_inputs(scores, n_bins, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(np.array(scores), np.array([[1, 0]]), n_bins=n_bins)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 6)), elements=st.floats(0, 1)),
    st.integers(0, 2**32 - 1),
    st.integers(1, 30),
)
def test_ece_and_mce_are_within_zero_and_one(scores, seed, n_bins):
    targets = np.random.default_rng(seed).integers(0, 2, scores.shape)
    summary = calibration_summary(scores, targets, n_bins=n_bins)
    assert 0.0 <= summary["ece"] <= summary["mce"] + 1e-12 <= 1.0 + 1e-12
    assert sum(b["count"] for b in summary["bins"]) == scores.size


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_perfectly_calibrated_forecasts_have_ece_near_zero(seed):
    rng = np.random.default_rng(seed)
    scores = rng.random((2000, 20))
    targets = rng.random(scores.shape) < scores  # each entry is positive with exactly its forecast probability
    assert expected_calibration_error(scores, targets) < 0.02


def _overconfident(seed=0, factor=2.5, shift=0.0, shape=(2000, 20)):
    """Probabilities whose logits are `factor` times too large, plus `shift`, for the labels drawn from them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, shape)
    targets = (rng.random(shape) < _sigmoid(logits)).astype(np.int64)
    return _sigmoid(factor * logits + shift).astype(np.float32), targets


def test_the_fitted_map_undoes_overconfidence_and_a_shift_deterministically():
    probs, targets = _overconfident(factor=2.5)
    fitted = fit_calibration(probs, targets)
    assert fitted.temperature == pytest.approx(2.5, rel=0.05) and fitted.bias == pytest.approx(0.0, abs=0.05)
    assert fitted == fit_calibration(probs, targets)
    assert fitted.fit["fitted_on"] == "val" and fitted.fit["entries"] == probs.size
    assert fitted.fit["bce_after"] < fitted.fit["bce_before"]
    assert fitted.fit["ece_after"] < 0.02 < fitted.fit["ece_before"]
    assert expected_calibration_error(fitted.apply(probs), targets) == pytest.approx(fitted.fit["ece_after"])

    calibrated, targets = _overconfident(factor=1.0)
    assert fit_calibration(calibrated, targets).temperature == pytest.approx(1.0, abs=0.05)

    # Everything lifted, as ASL lifts the negatives: a temperature alone cannot undo it, the shared bias does.
    shifted, targets = _overconfident(factor=1.0, shift=1.5)
    fitted = fit_calibration(shifted, targets)
    assert fitted.temperature == pytest.approx(1.0, abs=0.05) and fitted.bias == pytest.approx(-1.5, abs=0.1)
    assert fitted.fit["ece_after"] < 0.02 < fitted.fit["ece_before"]


def test_unknown_entries_do_not_move_the_fitted_map():
    probs, targets = _overconfident(shape=(400, 5))
    padded_probs = np.hstack([probs, np.full((400, 2), 0.999, dtype=np.float32)])
    padded_targets = np.hstack([targets, np.zeros((400, 2), dtype=np.int64)])  # confidently wrong, but unknown
    known = np.hstack([np.ones((400, 5)), np.zeros((400, 2))])
    masked = fit_calibration(padded_probs, padded_targets, known=known)
    assert masked == fit_calibration(probs, targets)
    assert fit_calibration(padded_probs, padded_targets).bias < masked.bias


def test_saturated_probabilities_do_not_break_the_fit():
    probs = np.array([[0.0, 1.0, 0.7], [1.0, 0.0, 0.2]], dtype=np.float32)
    fitted = fit_calibration(probs, np.array([[0, 1, 1], [1, 0, 0]]))
    assert np.isfinite(fitted.temperature) and np.isfinite(fitted.bias) and np.isfinite(fitted.fit["bce_after"])
    separable = fit_calibration(np.array([[0.2, 0.8]]), np.array([[0, 1]]))
    assert 0.01 <= separable.temperature <= 100 and abs(separable.bias) <= 20


def test_calibration_is_increasing_and_passes_nan_and_inf_through():
    calibration = Calibration(2.0)
    values = np.array([0.0, 1e-6, 0.2, 0.5, 0.9, 1 - 1e-6, 1.0, np.nan, np.inf])
    out = calibration.apply(values)
    assert out[0] == 0.0 and out[6] == 1.0 and out[3] == 0.5
    assert np.all(np.diff(out[:7]) > 0)
    assert out[2] > 0.2 and out[4] < 0.9  # a temperature above 1 softens towards 0.5
    assert np.isnan(out[7]) and out[8] == np.inf
    assert np.array_equal(Calibration().apply(values[:7]), values[:7])


def test_calibration_round_trips_through_json_and_none_is_the_identity():
    fitted = fit_calibration(*_overconfident(shape=(50, 4)))
    assert Calibration.from_json(json.loads(json.dumps(fitted.to_json()))) == fitted
    assert Calibration.from_json(None).is_identity
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibration.from_json({"method": "isotonic"})


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.2, 5.0), st.floats(-3.0, 3.0))
def test_calibrated_thresholds_select_the_same_labels(seed, temperature, bias):
    """Thresholds are tuned on raw scores, so they sit exactly on scores; the transform must keep every tie."""
    rng = np.random.default_rng(seed)
    probs = _sigmoid(rng.normal(0, 4, (60, 5))).astype(np.float32)
    probs[:10] = probs[10:20]  # exact ties between images
    targets = rng.random(probs.shape) < probs
    thresholds = tune_thresholds(probs, targets)
    calibration = Calibration(temperature, bias)
    calibrated, cuts = calibration.apply(probs), calibration.apply(thresholds)
    assert np.array_equal(calibrated >= cuts, probs >= thresholds)
    assert np.array_equal(tune_thresholds(calibrated, targets), cuts)
    raw_prf = precision_recall_f1(probs, targets, thresholds)
    calibrated_prf = precision_recall_f1(calibrated, targets, cuts)
    assert all(np.array_equal(raw_prf[key], calibrated_prf[key]) for key in raw_prf)


def test_the_evaluation_reports_ece_before_and_after():
    probs, targets = _overconfident(shape=(300, 3))
    names = ["a", "b", "c"]
    fitted = fit_calibration(probs, targets)
    thresholds = tune_thresholds(probs, targets)
    loaded = LoadedModel(None, None, names, [], thresholds, 8, calibration=fitted)
    report = calibration_report(loaded, probs, targets)
    assert report["ece_calibrated"] < report["ece_raw"]
    detail = report["calibration"]
    assert detail["method"] == "shared_platt" and detail["temperature"] == fitted.temperature
    assert detail["bias"] == fitted.bias
    assert detail["fitted_on"] == "val" and detail["raw"]["ece"] == report["ece_raw"]
    assert detail["calibrated"]["n_bins"] == 15 and len(detail["calibrated"]["bins"]) == 15
    assert list(detail["thresholds"]) == names
    json.dumps(report)
    assert calibration_report(loaded, probs, targets, known=np.ones_like(targets)) == report

    plain = calibration_report(LoadedModel(None, None, names, [], None, 8), probs, targets)
    assert plain["ece_raw"] == plain["ece_calibrated"] and plain["calibration"]["method"] == "none"
    assert "thresholds" not in plain["calibration"]


def test_model_directories_keep_the_calibration_and_older_ones_load_as_identity(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("mumic-tiny", None)
    cfg = ModelConfig()
    classifier = build_classifier(cfg, PROMPTS, backbone).eval()
    calibration = Calibration(3.0, -1.0, {"fitted_on": "val"})
    for name, fitted in (("plain", None), ("calibrated", calibration)):
        _save(tmp_path / name, classifier, cfg, backbone, thresholds=np.array([0.5, np.inf, 0.2]), calibration=fitted)
    plain = json.loads((tmp_path / "plain" / "model.json").read_text())
    assert "calibration" not in plain  # the layout of a directory written before calibration existed
    assert load_model_dir(tmp_path / "plain").calibration.is_identity
    loaded = load_model_dir(tmp_path / "calibrated")
    assert loaded.calibration == calibration
    assert loaded.calibrated_thresholds[1] == np.inf
    assert loaded.calibrated_thresholds[2] == pytest.approx(calibration.apply(np.array([0.2]))[0])

    images = [encode(noise(64, 64, seed=s), "PNG") for s in range(3)]
    raw = Predictor.from_dir(tmp_path / "plain").predict(images, top_k=3)
    served = Predictor.from_dir(tmp_path / "calibrated").predict(images, top_k=3)
    for before, after in zip(raw, served):
        assert after.labels == before.labels
        assert after.scores == pytest.approx(list(calibration.apply(np.array(before.scores))), abs=1e-5)
