"""Multi-label losses, all computed in logit space so that no probability is ever passed through `log`.

The method's loss is the tempered-sigmoid binary cross-entropy of MuMIC (Wang et al., "MuMIC -- Multimodal
Embedding for Multi-label Image Classification with Tempered Sigmoid", AAAI 2023): a cosine similarity s in
[-1, 1] between an image and a class text embedding becomes a probability p = sigmoid(s / T + b). A plain sigmoid
of a cosine can only reach 0.27..0.73; a small temperature T lets it use the whole range. The gradient
d loss / d s = (p - y) / T is largest for hard examples (confident negatives, unconfident positives), and T sets how
sharply the loss concentrates on them: that is the "hardness-aware" property.

`asymmetric_loss` is the ASL baseline (Ridnik et al., ICCV 2021) and `binary_cross_entropy` the plain BCE baseline
for a linear head.

Partial labels: every loss takes an optional `known` mask (1 where the label is known, 0 where it is unknown) and
then reduces over the known entries only, so an unknown entry adds nothing to the loss, its count or its gradient:
a mean is taken over the known entries, a sum sums them. Without a mask each loss is computed exactly as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2:
        raise ValueError(f"{name_a} must be 2-D (batch x classes), got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _cheap_to_inspect(value: torch.Tensor) -> bool:
    """Reading a CUDA tensor's value forces a device sync, and under torch.compile a graph break: skip it there."""
    return value.device.type == "cpu" and not torch.compiler.is_compiling()


def _known_mask(known: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`known` as bool, checked against the targets' shape (and for 0/1 values where that costs no sync)."""
    _check_pair("targets", targets, "known", known)
    if known.dtype != torch.bool:
        if _cheap_to_inspect(known) and not bool(((known == 0) | (known == 1)).all()):
            raise ValueError("known must contain only 0 and 1")
        known = known != 0
    return known


def _mean_over_known(loss: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Mean of the per-entry loss over the known entries; 0 (with zero gradient) when none is known."""
    return torch.where(known, loss, 0.0).sum() / known.sum().clamp(min=1)


def tempered_logits(
    similarity: torch.Tensor, temperature: torch.Tensor | float, bias: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """s / T + b: the logits whose sigmoid is MuMIC's class probability."""
    return similarity / temperature + bias


def tempered_sigmoid_bce(
    similarity: torch.Tensor,
    targets: torch.Tensor,
    temperature: torch.Tensor | float,
    bias: torch.Tensor | float = 0.0,
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(similarity / temperature + bias) against multi-hot `targets`.

    The mean runs over samples and classes, as in the paper; with `known`, over the known entries only.
    """
    _check_pair("similarity", similarity, "targets", targets)
    if not torch.is_tensor(temperature):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
    elif _cheap_to_inspect(temperature) and bool((temperature <= 0).any()):
        raise ValueError("temperature must be positive")
    logits = tempered_logits(similarity, temperature, bias)
    return _bce(logits, targets, known)


def binary_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain mean BCE on free logits: the loss of the linear-head baseline; with `known`, over the known entries."""
    _check_pair("logits", logits, "targets", targets)
    return _bce(logits, targets, known)


def _bce(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    if known is None:
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
    per_entry = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return _mean_over_known(per_entry, _known_mask(known, targets))


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 1.0,
    clip: float = 0.05,
    reduction: str = "sum",
    known: torch.Tensor | None = None,
) -> torch.Tensor:
    """Asymmetric Loss for multi-label classification (Ridnik et al., 2021).

    Positives: -(1 - p)^gamma_pos * log(p). Negatives: -p_m^gamma_neg * log(1 - p_m) with the shifted probability
    p_m = max(p - clip, 0), which discards very easy negatives entirely. The focusing weights are treated as
    constants in the backward pass, as in the reference formulation. `reduction` is "sum" (the paper's), "mean"
    or "none". With `known`, "sum" and "mean" run over the known entries, and "none" gives unknown entries 0.
    """
    _check_pair("logits", logits, "targets", targets)
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    if clip < 0 or clip >= 1:
        raise ValueError(f"clip must be in [0, 1), got {clip}")
    y = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    if clip > 0:
        # Shifted probability for negatives; log(1 - p_m) is exactly 0 where the shift zeroes p_m.
        p_neg = (p - clip).clamp(min=0)
        log_one_minus_p_neg = torch.log1p(-p_neg)
    else:
        p_neg = p
        log_one_minus_p_neg = F.logsigmoid(-logits)
    with torch.no_grad():
        weight_pos = (1 - p).pow(gamma_pos)
        weight_neg = p_neg.pow(gamma_neg)
    loss = -(y * weight_pos * log_p + (1 - y) * weight_neg * log_one_minus_p_neg)
    if known is not None:
        mask = _known_mask(known, targets)
        if reduction == "mean":
            return _mean_over_known(loss, mask)
        loss = torch.where(mask, loss, 0.0)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def large_loss_rate(epoch: int, rate_per_epoch: float, max_rate: float) -> float:
    """Share of a batch's entries modified in `epoch` (0-based): none in the first, then linear growth, capped."""
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    return min(rate_per_epoch * epoch, max_rate)


def large_loss_selection(
    logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None, rate: float
) -> torch.Tensor:
    """The labelled negatives with the largest loss: ceil(rate x known entries) of them, at most every negative.

    Every loss here (BCE, the tempered BCE, ASL) charges a negative more the higher its logit, so the largest
    losses among the negatives are their highest logits: ranking by logit picks them for every loss, and breaks
    ASL's ties among the negatives its margin already ignores. Positives and unknown entries are never picked.
    """
    _check_pair("logits", logits, "targets", targets)
    mask = torch.ones_like(targets, dtype=torch.bool) if known is None else _known_mask(known, targets)
    negative = mask & (targets == 0)
    count = min(math.ceil(rate * int(mask.sum()) - 1e-9), int(negative.sum()))
    selected = torch.zeros_like(negative)
    if count <= 0:
        return selected
    scores = torch.where(negative, logits.detach().float(), float("-inf")).flatten()
    selected.view(-1)[torch.topk(scores, count).indices] = True
    return selected


class LargeLossModification:
    """Wraps a loss (classifier output, targets, known mask) so that each batch's largest-loss negatives are rejected
    from it (their entries become unknown) or corrected (counted as positives for this step), as in Kim et al.,
    "Large Loss Matters in Weakly Supervised Multi-Label Classification" (CVPR 2022). The loop sets `epoch`."""

    def __init__(self, loss_fn, mode: str, rate_per_epoch: float, max_rate: float) -> None:
        if mode not in ("reject", "correct"):
            raise ValueError(f"mode must be 'reject' or 'correct', got {mode!r}")
        self.loss_fn = loss_fn
        self.mode = mode
        self.rate_per_epoch = rate_per_epoch
        self.max_rate = max_rate
        self.epoch = 0

    @property
    def rate(self) -> float:
        return large_loss_rate(self.epoch, self.rate_per_epoch, self.max_rate)

    def __call__(self, out, targets: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        rate = self.rate
        if rate <= 0:
            return self.loss_fn(out, targets, known)
        selected = large_loss_selection(out.logits, targets, known, rate)
        if self.mode == "reject":
            mask = torch.ones_like(selected) if known is None else _known_mask(known, targets)
            return self.loss_fn(out, targets, mask & ~selected)
        return self.loss_fn(out, torch.where(selected, torch.ones_like(targets), targets), known)
