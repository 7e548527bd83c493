"""How the weights move: the learning-rate schedule, the parameter groups and one optimizer step (`Stepper`).

Shared by fine-tuning, pretraining and the throughput benchmark, so the benchmark times exactly the step the loops
take.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mumic_ml.config import Params
from mumic_ml.task import total_loss


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_fraction` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LrSchedule:
    """`lr_factor` over a whole run: a pure function of the step, so a resumed run continues the same curve."""

    total_steps: int
    warmup_fraction: float
    min_fraction: float

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_fraction * self.total_steps)

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.min_fraction)


def parameter_groups(model: nn.Module, params: Params) -> list[dict[str, Any]]:
    """Separate learning rates per tower; no weight decay on 1-D parameters (norms, biases, temperature)."""
    cfg = params.train
    clip = model.clip
    visual = {id(p) for p in clip.visual.parameters()}
    in_clip = {id(p) for p in clip.parameters()}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in visual:
            tower = "image"
        elif id(param) in in_clip:
            tower = "text"
        else:
            tower = "head"
        decay = param.ndim >= 2
        buckets.setdefault((tower, decay), []).append(param)
    peak = {"image": cfg.lr_image, "text": cfg.lr_text, "head": cfg.lr_head}
    groups = []
    for (tower, decay), group_params in sorted(buckets.items()):
        groups.append(
            {
                "params": group_params,
                "name": f"{tower}_{'decay' if decay else 'no_decay'}",
                "peak_lr": peak[tower],
                "lr": peak[tower],
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
        )
    if not groups:
        raise ValueError("the configuration leaves no trainable parameter")
    return groups


# Entries (images x classes) per forward pass when fitting a head on embeddings: a 64 MiB float32 logit matrix, so
# a collection of any size is fitted full batch in chunks whose gradients add up.
HEAD_FIT_CHUNK_ENTRIES = 1 << 24


def fit_head_on_features(
    classifier: nn.Module,
    features: torch.Tensor,
    targets: torch.Tensor,
    known: torch.Tensor | None,
    loss_fn: Callable,
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Fit the head alone (every trainable parameter outside the towers) to fixed image embeddings, full batch;
    the loss before and after. The towers get no gradient, and the classifier is left in eval mode.

    Rows are taken in chunks of at most `HEAD_FIT_CHUNK_ENTRIES` entries, each chunk's loss weighted by its share of
    the rows: the full-batch loss for losses that average over images (with unknown entries masked, close to it)."""
    in_clip = {id(p) for p in classifier.clip.parameters()}
    head = [p for p in classifier.parameters() if p.requires_grad and id(p) not in in_clip]
    if not head:
        raise ValueError("the classifier has no trainable head parameter to fit")
    groups = [
        {"params": [p for p in head if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in head if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    n = len(features)
    rows = max(1, HEAD_FIT_CHUNK_ENTRIES // max(1, targets.shape[1]))
    chunks = [
        (features[i : i + rows], targets[i : i + rows], None if known is None else known[i : i + rows])
        for i in range(0, n, rows)
    ]
    if len(chunks) == 1:  # moved once, not every step
        chunks = [tuple(None if t is None else t.to(device) for t in chunks[0])]
    classifier.eval()  # cached class text embeddings, no dropout: only the head's parameters move
    losses = []
    for step in range(steps + 1):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y, k in chunks:
            x, y, k = x.to(device), y.to(device), None if k is None else k.to(device)
            loss = loss_fn(classifier.score_features(x), y, k) * (len(x) / n)
            if step < steps:
                loss.backward()
            total += float(loss.detach())
        losses.append(total)
        if step < steps:
            optimizer.step()
    return losses[0], losses[-1]


@dataclass
class Stepper:
    """One micro-batch forward/backward and one optimizer update: what the loop runs and the benchmark times."""

    model: nn.Module  # the task, possibly compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]
    scaler: torch.amp.GradScaler | None
    accumulation_steps: int = 1
    grad_clip_norm: float | None = None

    def backward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        sync_gradients: bool = True,
        *,
        known: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Accumulate gradients of one micro-batch; returns its (undivided) loss, detached.

        `known` (the mask of known labels) is handed to the model only when given, so models whose forward takes
        no mask (contrastive pretraining) are stepped the same way.
        """
        sync = contextlib.nullcontext()
        if not sync_gradients and isinstance(self.model, DistributedDataParallel):
            sync = self.model.no_sync()  # all-reduce once per optimizer step, not per micro-batch
        inputs = (images, targets) if known is None else (images, targets, known)
        with sync:
            with self.autocast():
                losses, report = self.model(*inputs)
                loss = total_loss(losses)
            scaled = loss / self.accumulation_steps
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach(), report

    def update(self, lr_scale: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip_norm is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
