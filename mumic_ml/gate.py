"""The evaluation gate: what a model must show on the test split before it may be registered or promoted."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateResult:
    passed: bool
    gap_at_10: float
    floor: float
    champion_gap_at_10: float | None
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gate(
    report: dict[str, Any],
    *,
    floor: float,
    champion_report: dict[str, Any] | None = None,
    tolerance: float = 0.0,
) -> GateResult:
    """Pass when GAP@10 clears the absolute floor and is not below the champion's on the same split.

    `tolerance` allows a candidate that is at most that much below the champion (noise between retrains on a
    grown dataset); 0 means "not worse".
    """
    gap = float(report["gap_at_10"])
    reasons = []
    if gap < floor:
        reasons.append(f"GAP@10 {gap:.4f} is below the floor {floor:.4f}")
    champion_gap = None
    if champion_report is not None:
        if champion_report.get("split_sha256") != report.get("split_sha256"):
            reasons.append("the champion was evaluated on another test split; evaluate both on the same split")
        champion_gap = float(champion_report["gap_at_10"])
        if gap < champion_gap - tolerance:
            reasons.append(f"GAP@10 {gap:.4f} is below the champion's {champion_gap:.4f}")
    return GateResult(not reasons, gap, floor, champion_gap, reasons)
