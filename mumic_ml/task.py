"""Model plus loss behind one interface, so the training loop never branches on the kind of head or loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mumic_ml.config import AsymmetricLossConfig, Loss
from mumic_ml.losses import asymmetric_loss, binary_cross_entropy, tempered_sigmoid_bce
from mumic_ml.model import ClassifierOutput

LossFn = Callable[[ClassifierOutput, torch.Tensor], torch.Tensor]


def create_loss(kind: Loss, asl: AsymmetricLossConfig | None = None) -> LossFn:
    if kind is Loss.TEMPERED_SIGMOID_BCE:

        def loss(out: ClassifierOutput, targets: torch.Tensor) -> torch.Tensor:
            if out.similarity is None:
                raise ValueError("the tempered-sigmoid BCE needs a MuMIC head (cosine similarities)")
            return tempered_sigmoid_bce(out.similarity, targets, out.temperature, out.bias)

    elif kind is Loss.BCE:

        def loss(out: ClassifierOutput, targets: torch.Tensor) -> torch.Tensor:
            return binary_cross_entropy(out.logits, targets)

    elif kind is Loss.ASL:
        cfg = asl or AsymmetricLossConfig()

        def loss(out: ClassifierOutput, targets: torch.Tensor) -> torch.Tensor:
            # ASL sums over the batch; divide by its size so learning rates transfer between batch sizes.
            total = asymmetric_loss(out.logits, targets, cfg.gamma_neg, cfg.gamma_pos, cfg.clip, reduction="sum")
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

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return self.training_forward(images, targets)

    def training_forward(
        self, images: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out = self.model(images)
        losses = {"classification_loss": self.loss_fn(out, targets)}
        report: dict[str, Any] = {}
        if out.temperature is not None:
            report["temperature"] = out.temperature.detach()
        if out.bias is not None:
            report["bias"] = out.bias.detach()
        return losses, report


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.endswith("_loss"))
