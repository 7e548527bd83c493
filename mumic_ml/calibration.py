"""Post-hoc calibration of a model's probabilities: Platt scaling shared by every class (one temperature and one
bias on the logits), fitted on the validation split.

Training with ASL on tempered logits ranks well but leaves the sigmoid outputs far from frequencies: ASL's clip and
focusing lift the many negatives' probabilities, so a temperature alone, which keeps 0.5 fixed, cannot bring them
down (on the demo world it removed a third of the ECE, a shared bias with it nine tenths: docs/results.md).
`sigmoid(logit(p) / T + b)` with T > 0 is strictly increasing and the same for every class, so it changes no
ranking (GAP, mAP, top-k) and maps each tuned threshold onto the cut that selects the same labels: only what the
numbers mean changes. Per-class maps could fit better but would reorder the classes of an image. A model directory
without a fitted calibration loads with the identity (T = 1, b = 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mumic_ml.metrics import expected_calibration_error

METHOD = "shared_platt"
# Bounds of the fitted map, wide enough that they only matter for degenerate (separable or constant) scores.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
MAX_ABS_BIAS = 20.0
# Newton's method on a two-parameter convex loss converges in a handful of steps; these are an upper bound.
NEWTON_STEPS = 50
# Fitting needs finite logits; float32 sigmoids reach exactly 0 or 1, so they are moved this far inside.
FIT_CLIP = 1e-7


def _logit(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(probs) - np.log1p(-probs)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        positive = 1.0 / (1.0 + np.exp(-np.abs(x)))
    return np.where(x >= 0, positive, 1.0 - positive)


@dataclass(frozen=True)
class Calibration:
    """`sigmoid(logit(p) / temperature + bias)`; `fit` records how it was fitted (split, loss and ECE before and
    after)."""

    temperature: float = 1.0
    bias: float = 0.0
    fit: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return self.temperature == 1.0 and self.bias == 0.0

    def apply(self, probs) -> np.ndarray:
        """Calibrated probabilities in float64 (the map is applied to float32 inputs without collapsing distinct
        values); values outside [0, 1] pass unchanged: NaN rows of unreadable images, +inf never-predict
        thresholds."""
        probs = np.asarray(probs, dtype=np.float64)
        if self.is_identity:
            return probs.copy()
        out = probs.copy()
        inside = (probs >= 0) & (probs <= 1)
        out[inside] = _sigmoid(_logit(probs[inside]) / self.temperature + self.bias)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"method": METHOD, "temperature": self.temperature, "bias": self.bias, **self.fit}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any] | None) -> Calibration:
        if spec is None:
            return cls()
        if spec.get("method") != METHOD:
            raise ValueError(f"unknown calibration method {spec.get('method')!r}")
        fit = {k: v for k, v in spec.items() if k not in ("method", "temperature", "bias")}
        return cls(float(spec["temperature"]), float(spec["bias"]), fit)


def _mean_bce(logits: np.ndarray, targets: np.ndarray, scale: float, bias: float) -> float:
    x = logits * scale + bias
    return float(np.mean(np.logaddexp(0.0, x) - targets * x))


def _bounded(scale: float, bias: float) -> tuple[float, float]:
    return min(max(scale, 1 / MAX_TEMPERATURE), 1 / MIN_TEMPERATURE), min(max(bias, -MAX_ABS_BIAS), MAX_ABS_BIAS)


def _newton(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """The (1/T, b) minimising the mean BCE of `logits / T + b`, by damped Newton steps from the identity. The
    loss is convex in both, so this is its minimum, found deterministically without a learning rate to tune."""
    scale, bias = 1.0, 0.0
    loss = _mean_bce(logits, targets, scale, bias)
    for _ in range(NEWTON_STEPS):
        q = _sigmoid(logits * scale + bias)
        residual, weight = q - targets, q * (1 - q)
        gradient = np.array([np.mean(residual * logits), np.mean(residual)])
        hessian = np.array(
            [[np.mean(weight * logits**2), np.mean(weight * logits)], [np.mean(weight * logits), np.mean(weight)]]
        )
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        length = 1.0
        while length > 1e-6:
            candidate = _bounded(scale - length * step[0], bias - length * step[1])
            candidate_loss = _mean_bce(logits, targets, *candidate)
            if candidate_loss <= loss:
                break
            length /= 2
        else:
            break
        improvement = loss - candidate_loss
        (scale, bias), loss = candidate, candidate_loss
        if improvement < 1e-12:
            break
    return scale, bias


def fit_calibration(probs, targets, *, known=None, split: str = "val") -> Calibration:
    """The shared temperature and bias minimising the mean binary cross-entropy of every (image, class) entry of
    `split`, those where `known` is 0 left out."""
    probs = np.asarray(probs, dtype=np.float64)
    keep = np.ones(probs.shape, dtype=bool) if known is None else np.asarray(known) == 1
    targets = np.asarray(targets, dtype=np.float64)[keep]
    logits = _logit(np.clip(probs[keep], FIT_CLIP, 1 - FIT_CLIP))
    scale, bias = _newton(logits, targets)
    calibration = Calibration(float(1 / scale), float(bias))
    fit = {
        "fitted_on": split,
        "entries": int(targets.size),
        "bce_before": _mean_bce(logits, targets, 1.0, 0.0),
        "bce_after": _mean_bce(logits, targets, scale, bias),
        "ece_before": expected_calibration_error(probs[keep][None], targets[None]),
        "ece_after": expected_calibration_error(calibration.apply(probs[keep])[None], targets[None]),
    }
    return Calibration(calibration.temperature, calibration.bias, fit)
