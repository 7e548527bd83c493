"""The gate and promotion share one comparison with the champion: the floor, the tolerance, the same test split,
and no test image that a compared model trained on."""

import pytest

from mumic_ml.gate import Measured, check_gate, compare_with_champion

TEST = frozenset({"t1", "t2", "t3"})
SPLIT = {"split_sha256": "split-a"}


def model(label: str, gap: float, seen=frozenset({"a", "b"}), split=SPLIT) -> Measured:
    return Measured(label, {"gap_at_10": gap, **split}, None if seen is None else frozenset(seen))


@pytest.mark.parametrize(
    ("candidate_gap", "tolerance", "passes"),
    [
        (0.80, 0.0, True),  # level with the champion
        (0.81, 0.0, True),
        (0.79, 0.0, False),
        (0.79, 0.02, True),  # within the tolerance
        (0.77, 0.02, False),  # beyond it
    ],
)
def test_gate_and_promotion_agree_on_the_champion_and_the_tolerance(candidate_gap, tolerance, passes):
    candidate, champion = model("candidate", candidate_gap), model("champion v1", 0.80)
    gate = check_gate(candidate, floor=0.5, champion=champion, tolerance=tolerance, test_images=TEST)
    comparison = compare_with_champion(candidate, champion, tolerance=tolerance, test_images=TEST)
    assert gate.passed is passes and (not comparison.reasons) is passes
    assert gate.champion_gap_at_10 == 0.80
    if not passes:
        assert "below champion v1's 0.8000" in comparison.reasons[0] and comparison.reasons == gate.reasons


def test_the_floor_applies_with_or_without_a_champion():
    assert not check_gate(model("candidate", 0.4), floor=0.5, test_images=TEST).passed
    gate = check_gate(model("candidate", 0.6), floor=0.5, test_images=TEST)
    assert gate.passed and gate.champion_gap_at_10 is None and gate.reasons == []


def test_a_test_image_that_either_model_trained_on_refuses_the_comparison():
    leaky_candidate = model("candidate", 0.9, seen={"a", "t1", "t2"})
    gate = check_gate(leaky_candidate, floor=0.5, test_images=TEST)
    assert not gate.passed and "2 image(s) that candidate trained on" in gate.reasons[0]

    leaky_champion = model("champion v1", 0.5, seen={"t3"})
    comparison = compare_with_champion(model("candidate", 0.9), leaky_champion, tolerance=0.0, test_images=TEST)
    assert len(comparison.reasons) == 1 and "1 image(s) that champion v1 trained on" in comparison.reasons[0]


def test_an_unknown_training_set_refuses_the_candidate_but_only_notes_the_champion():
    gate = check_gate(model("candidate", 0.9, seen=None), floor=0.5, test_images=TEST)
    assert not gate.passed and "does not record the images" in gate.reasons[0]
    old_champion = model("champion v1", 0.7, seen=None)
    comparison = compare_with_champion(model("candidate", 0.8), old_champion, tolerance=0.0, test_images=TEST)
    assert comparison.reasons == [] and "champion v1 does not record" in comparison.notes[0]


def test_measurements_on_different_test_splits_are_not_compared():
    champion = model("champion v1", 0.5, split={"split_sha256": "split-b"})
    comparison = compare_with_champion(model("candidate", 0.9), champion, tolerance=0.0, test_images=TEST)
    assert len(comparison.reasons) == 1 and "another test split" in comparison.reasons[0]
