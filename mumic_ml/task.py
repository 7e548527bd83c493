"""Model plus loss behind one interface, so the training loop never branches on the kind of head or loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mumic_ml.config import AsymmetricLossConfig, Loss
from mumic_ml.losses import asymmetric_loss, binary_cross_entropy, tempered_sigmoid_bce
from mumic_ml.model import ClassifierOutput

# (classifier output, targets, known mask or None) -> loss; the mask is None unless unknown labels are left out.
LossFn = Callable[[ClassifierOutput, torch.Tensor, torch.Tensor | None], torch.Tensor]


def create_loss(kind: Loss, asl: AsymmetricLossConfig | None = None) -> LossFn:
    """The loss of `kind`; given a known mask, each is normalised over the known entries (the BCEs are their mean,
    ASL their mean times the number of classes, which is its usual per-image sum when every entry is known)."""
    if kind is Loss.TEMPERED_SIGMOID_BCE:

        def loss(out: ClassifierOutput, targets: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
            if out.similarity is None:
                raise ValueError("the tempered-sigmoid BCE needs a MuMIC head (cosine similarities)")
            return tempered_sigmoid_bce(out.similarity, targets, out.temperature, out.bias, known=known)

    elif kind is Loss.BCE:

        def loss(out: ClassifierOutput, targets: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
            return binary_cross_entropy(out.logits, targets, known=known)

    elif kind is Loss.ASL:
        cfg = asl or AsymmetricLossConfig()

        def loss(out: ClassifierOutput, targets: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
            gammas = (cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
            if known is not None:
                mean = asymmetric_loss(out.logits, targets, *gammas, reduction="mean", known=known)
                return mean * out.logits.shape[1]
            # ASL sums over the batch; divide by its size so learning rates transfer between batch sizes.
            total = asymmetric_loss(out.logits, targets, *gammas, reduction="sum")
            return total / out.logits.shape[0]

    else:
        raise ValueError(f"unknown loss {kind!r}")
    return loss


class MumicTask(nn.Module):
    """Wraps a classifier and an injectable loss; `training_forward` is all the loop calls."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(
        self, images: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.training_forward(images, targets, known)

    def training_forward(
        self, images: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """`known` masks unknown labels out of the loss (train.partial_labels); None counts every entry."""
        out = self.model(images)
        losses = {"classification_loss": self.loss_fn(out, targets, known)}
        report: dict[str, Any] = {}
        if out.temperature is not None:
            report["temperature"] = out.temperature.detach()
        if out.bias is not None:
            report["bias"] = out.bias.detach()
        return losses, report


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.endswith("_loss"))
