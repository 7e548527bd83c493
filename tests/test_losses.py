"""Losses against hand-computed values and naive float64 references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mumic_ml.losses import asymmetric_loss, binary_cross_entropy, tempered_sigmoid_bce


def naive_tempered_bce(similarity, targets, temperature, bias=0.0):
    total = 0.0
    n, c = similarity.shape
    for i in range(n):
        for j in range(c):
            x = float(similarity[i, j]) / temperature + bias
            y = float(targets[i, j])
            # -y log(sigmoid(x)) - (1 - y) log(1 - sigmoid(x)) = softplus(x) - y x, written without overflow.
            softplus = max(x, 0.0) + math.log1p(math.exp(-abs(x)))
            total += softplus - y * x
    return total / (n * c)


def naive_asl(logits, targets, gamma_neg, gamma_pos, clip):
    total = 0.0
    for x, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1.0 / (1.0 + math.exp(-x))
        if y == 1:
            total += -((1 - p) ** gamma_pos) * math.log(p)
        else:
            p_m = max(p - clip, 0.0)
            total += -(p_m**gamma_neg) * math.log(1 - p_m)
    return total


def test_tempered_bce_hand_computed():
    # One positive with cosine 0.5, T = 0.1: p = sigmoid(5) = 0.993307, loss = -log(p) = 0.0067153.
    # One negative with cosine 0.2: p = sigmoid(2) = 0.880797, loss = -log(1 - p) = 2.126928.
    similarity = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = tempered_sigmoid_bce(similarity, targets, 0.1)
    assert loss.item() == pytest.approx((0.0067153 + 2.126928) / 2, abs=1e-6)


def test_tempered_bce_with_bias_hand_computed():
    # s = 0, T = 1, b = -1: p = sigmoid(-1) = 0.268941; negative loss = -log(0.731059) = 0.313262.
    loss = tempered_sigmoid_bce(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1), 1.0, bias=-1.0)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 7),
    temperature=st.floats(0.01, 2.0),
    bias=st.floats(-5, 5),
    seed=st.integers(0, 10_000),
)
def test_tempered_bce_matches_naive_reference(n, c, temperature, bias, seed):
    g = torch.Generator().manual_seed(seed)
    similarity = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    targets = (torch.rand(n, c, generator=g) < 0.3).double()
    got = tempered_sigmoid_bce(similarity, targets, temperature, bias).item()
    assert got == pytest.approx(naive_tempered_bce(similarity, targets, temperature, bias), abs=1e-6, rel=1e-6)


def test_tempered_bce_gradient_is_hardness_aware():
    # d loss / d s = (p - y) / (T * N * C): a hard negative (high similarity) gets the largest push.
    similarity = torch.tensor([[0.9, 0.1, -0.5]], dtype=torch.float64, requires_grad=True)
    targets = torch.zeros(1, 3, dtype=torch.float64)
    temperature = 0.1
    tempered_sigmoid_bce(similarity, targets, temperature).backward()
    expected = torch.sigmoid(similarity.detach() / temperature) / (temperature * 3)
    assert torch.allclose(similarity.grad, expected, atol=1e-12)
    assert similarity.grad[0, 0] > similarity.grad[0, 1] > similarity.grad[0, 2]


def test_tempered_bce_is_stable_at_extreme_logits():
    similarity = torch.tensor([[1.0, -1.0]])
    targets = torch.tensor([[0.0, 1.0]])
    loss = tempered_sigmoid_bce(similarity, targets, 1e-3)  # logits of +-1000
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(1000.0, rel=1e-5)


def test_tempered_bce_accepts_learned_temperature_tensor_and_backprops_into_it():
    log_inv_t = torch.tensor(math.log(10.0), requires_grad=True)
    similarity = torch.tensor([[0.3, -0.2]])
    loss = tempered_sigmoid_bce(similarity, torch.tensor([[1.0, 0.0]]), torch.exp(-log_inv_t))
    loss.backward()
    assert log_inv_t.grad is not None and torch.isfinite(log_inv_t.grad)


def test_asl_hand_computed():
    # Positive x=0: p=0.5, weight (1-0.5)^1 = 0.5, loss 0.5 * log 2 = 0.346574.
    # Negative x=0: p_m = 0.45, weight 0.45^4 = 0.041006, loss 0.041006 * -log(0.55) = 0.024515.
    # Negative x=-5: p = 0.006693 < clip, p_m = 0 -> loss 0.
    logits = torch.tensor([[0.0, 0.0, -5.0]], dtype=torch.float64)
    targets = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    assert asymmetric_loss(logits, targets).item() == pytest.approx(0.346574 + 0.024515, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5),
    c=st.integers(1, 6),
    gamma_neg=st.sampled_from([0.0, 1.0, 4.0]),
    gamma_pos=st.sampled_from([0.0, 1.0]),
    clip=st.sampled_from([0.0, 0.05, 0.2]),
    seed=st.integers(0, 10_000),
)
def test_asl_matches_naive_reference(n, c, gamma_neg, gamma_pos, clip, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 4
    targets = (torch.rand(n, c, generator=g) < 0.4).double()
    got = asymmetric_loss(logits, targets, gamma_neg, gamma_pos, clip).item()
    assert got == pytest.approx(naive_asl(logits, targets, gamma_neg, gamma_pos, clip), abs=1e-6, rel=1e-6)


def test_asl_without_focusing_is_summed_bce():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64)
    targets = (torch.rand(3, 4, generator=g) < 0.5).double()
    asl = asymmetric_loss(logits, targets, gamma_neg=0, gamma_pos=0, clip=0)
    assert asl.item() == pytest.approx(binary_cross_entropy(logits, targets).item() * 12, abs=1e-9)


def test_asl_reductions():
    logits, targets = torch.zeros(2, 3), torch.ones(2, 3)
    none = asymmetric_loss(logits, targets, reduction="none")
    assert none.shape == (2, 3)
    assert asymmetric_loss(logits, targets, reduction="mean").item() == pytest.approx(none.mean().item())
    with pytest.raises(ValueError, match="reduction"):
        asymmetric_loss(logits, targets, reduction="max")


@pytest.mark.parametrize(
    "call",
    [
        lambda: tempered_sigmoid_bce(torch.zeros(2, 3), torch.zeros(2, 4), 0.1),
        lambda: tempered_sigmoid_bce(torch.zeros(3), torch.zeros(3), 0.1),
        lambda: binary_cross_entropy(torch.zeros(2, 3), torch.zeros(3, 2)),
        lambda: asymmetric_loss(torch.zeros(2, 3), torch.zeros(2, 2)),
    ],
)
def test_shape_errors_are_clear(call):
    with pytest.raises(ValueError, match="shape|2-D"):
        call()


def test_non_positive_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        tempered_sigmoid_bce(torch.zeros(1, 1), torch.zeros(1, 1), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        tempered_sigmoid_bce(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor(-1.0))
