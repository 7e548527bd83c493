"""The evaluation gate: what a model must show on the test split before it may be registered or promoted.

One comparison decides both: the gate of a retraining run (may the new model be registered?) and promotion (may
the challenger replace the champion?) call `compare_with_champion`, so a model the gate lets through is never
refused by promotion for a rule the gate did not apply, and the other way round.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import asdict, dataclass, field
from typing import Any

# What passing the gate means, for readers of the evaluation_gate asset check.
GATE_MEANING = (
    "The model may be registered: its test GAP@10 clears gate.min_gap_at_10, it is at most "
    "gate.champion_tolerance below the champion re-measured on the same test split, and neither model trained on "
    "a test image."
)


@dataclass(frozen=True)
class Measured:
    """A model as the gate sees it: its report on the current test split and the images it was trained on.

    `seen_images` holds the sha256 of every image the model (and the weights it started from) trained or selected
    epochs on; None when the model does not record them (a model directory from before they were recorded).
    """

    label: str
    report: dict[str, Any]
    seen_images: frozenset[str] | None

    @property
    def gap_at_10(self) -> float:
        return float(self.report["gap_at_10"])


@dataclass(frozen=True)
class Comparison:
    """Why a comparison must not be trusted or is lost (`reasons`), and what it could not check (`notes`)."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class GateResult:
    passed: bool
    gap_at_10: float
    floor: float
    champion_gap_at_10: float | None
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _leak(model: Measured, test_images: Set[str], *, unknown_is_refused: bool) -> tuple[list[str], list[str]]:
    if model.seen_images is None:
        message = f"{model.label} does not record the images it was trained on"
        if unknown_is_refused:
            return [f"{message}: its test score cannot be trusted; retrain it with this version of mumic"], []
        return [], [f"{message}; if it trained on test images its score is inflated, which favours it"]
    overlap = len(model.seen_images & test_images)
    if overlap:
        return [
            f"the test split holds {overlap} image(s) that {model.label} trained on; its test score is inflated "
            "(were the splits re-dealt? `mumic split` keeps every image in its split unless --reassign)"
        ], []
    return [], []


def compare_with_champion(
    candidate: Measured, champion: Measured | None, *, tolerance: float, test_images: Set[str]
) -> Comparison:
    """The candidate may replace the champion: neither trained on the test split, both were measured on the same
    split, and the candidate's GAP@10 is at most `tolerance` below the champion's.

    A candidate that does not record its training images is refused (its score might be inflated in its favour);
    a champion that does not is compared anyway, with a note, since an inflated champion only makes the candidate
    look worse.
    """
    reasons, notes = _leak(candidate, test_images, unknown_is_refused=True)
    if champion is None:
        return Comparison(reasons, notes)
    champion_reasons, champion_notes = _leak(champion, test_images, unknown_is_refused=False)
    reasons += champion_reasons
    notes += champion_notes
    if champion.report.get("split_sha256") != candidate.report.get("split_sha256"):
        reasons.append(f"{champion.label} was evaluated on another test split; evaluate both on the same split")
    elif candidate.gap_at_10 < champion.gap_at_10 - tolerance:
        allowed = f" (tolerance {tolerance:.4f})" if tolerance else ""
        reasons.append(
            f"GAP@10 {candidate.gap_at_10:.4f} is below {champion.label}'s {champion.gap_at_10:.4f}{allowed}"
        )
    return Comparison(reasons, notes)


def check_gate(
    candidate: Measured,
    *,
    floor: float,
    champion: Measured | None = None,
    tolerance: float = 0.0,
    test_images: Set[str] = frozenset(),
) -> GateResult:
    """Pass when GAP@10 clears the absolute floor and `compare_with_champion` finds nothing against it.

    `tolerance` allows a candidate that is at most that much below the champion (noise between retrains on a
    grown dataset); 0 means "not worse".
    """
    reasons = []
    if candidate.gap_at_10 < floor:
        reasons.append(f"GAP@10 {candidate.gap_at_10:.4f} is below the floor {floor:.4f}")
    comparison = compare_with_champion(candidate, champion, tolerance=tolerance, test_images=test_images)
    return GateResult(
        not reasons and not comparison.reasons,
        candidate.gap_at_10,
        floor,
        None if champion is None else champion.gap_at_10,
        reasons + comparison.reasons,
        comparison.notes,
    )
