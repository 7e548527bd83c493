"""Contrastive image-caption pretraining: the demo world's own foundation model, and when to reuse it.

Real CLIP weights cannot be fetched here, so `pretrain` trains the configured open_clip architecture from random
initialisation the way CLIP was trained, on the train split's images and captions, and writes the open_clip state
dict as a `.safetensors` file. `create_backbone(model.backbone, <that file>)` loads it through open_clip's own
checkpoint loader, exactly like downloaded weights, so fine-tuning and zero-shot scoring on the demo world take the
code path a real user's CLIP takes.

`export_zero_shot` turns a backbone, pretrained or not, into a MuMIC model directory without any training: the
class matrix comes from the text tower alone, which is the zero-shot CLIP baseline that fine-tuning must beat.

`pretrain_decision` says whether the foundation step must pretrain again or may reuse the checkpoint it has (as a
downloaded CLIP would be reused), and `foundation_seen_images` what a model fine-tuned from it has already seen.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mumic_ml.backbone import create_backbone
from mumic_ml.config import DEMO_FOUNDATION, ContrastiveLoss, FoundationRefresh, Head, Params, PretrainConfig
from mumic_ml.data import CachedImageDataset, ImagePreparer, batch_seed, data_fingerprint, epoch_batches, read_split
from mumic_ml.images import PreprocessCache
from mumic_ml.io import atomic_path, atomic_write_json, read_json
from mumic_ml.model import encode_text, tokenize_prompts
from mumic_ml.model_io import build_classifier, save_model_dir
from mumic_ml.optim import LrSchedule, Stepper
from mumic_ml.runtime import autocast_and_scaler, resolve_device
from mumic_ml.taxonomy import load_taxonomy, training_classes

log = logging.getLogger(__name__)

# SigLIP's initialisation (Zhai et al. 2023): t' = log 10 and b = -10, so that the many negative pairs of a batch
# start near their target instead of swamping the first steps.
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
# CLIP clamps its learned logit scale at 100 so the softmax cannot become arbitrarily sharp.
MAX_LOGIT_SCALE = math.log(100.0)
RETRIEVAL_BATCH_SIZE = 256


@dataclass
class PretrainResult:
    out_path: Path
    meta_path: Path
    epochs: int
    final_loss: float
    val_retrieval_top1: float
    seconds: float
    history: list[dict[str, Any]]
    data_fingerprint: str


def label_caption(labels: list[str]) -> str:
    """A caption made of the labels, for splits that carry none: 'a photo of red, circle and striped background.'"""
    if not labels:
        return "a photo."
    words = ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else labels[0]
    return f"a photo of {words}."


def split_captions(frame: pd.DataFrame) -> list[str]:
    """Each row's caption; a row without one (no `caption` column, or an empty or null value: an image its
    dataset left uncaptioned, or a batch without captions beside one with them) gets its label caption."""
    captions = frame["caption"] if "caption" in frame.columns else [None] * len(frame)
    texts = ["" if pd.isna(caption) else str(caption) for caption in captions]
    return [text if text.strip() else label_caption(list(labels)) for text, labels in zip(texts, frame["labels"])]


class _IndexedImages(Dataset):
    """(uint8 image, row index) pairs: the loop looks the caption tokens up by index."""

    def __init__(self, images: CachedImageDataset) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i][0], i


class ContrastiveTask(nn.Module):
    """CLIP plus its contrastive loss, behind the (inputs, targets) -> (losses, report) interface of `Stepper`.

    The temperature is the CLIP model's own learned `logit_scale`. SigLIP's learned bias lives here rather than in
    the CLIP model: the project's architecture configs have no `logit_bias`, and open_clip loads checkpoints
    strictly, so the written checkpoint keeps the shape of the architecture (the bias is recorded in the sidecar).
    """

    def __init__(self, clip: nn.Module, loss: ContrastiveLoss) -> None:
        super().__init__()
        self.clip = clip
        if loss is ContrastiveLoss.SIGLIP:
            with torch.no_grad():
                clip.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
            self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS))
            self.loss_fn: nn.Module = SigLipLoss()
        else:
            self.logit_bias = None
            self.loss_fn = ClipLoss()

    def features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        text_features = F.normalize(encode_text(self.clip, tokens).float(), dim=-1)
        return image_features, text_features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        image_features, text_features = self.features(images, tokens)
        scale = self.clip.logit_scale.float().exp()
        loss = self.loss_fn(image_features, text_features, scale, self.logit_bias)
        report: dict[str, Any] = {"logit_scale": scale.detach()}
        if self.logit_bias is not None:
            report["logit_bias"] = self.logit_bias.detach()
        return {"contrastive_loss": loss}, report


def _optimizer(task: ContrastiveTask, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """CLIP's AdamW: decay on matrices and embeddings only, none on 1-D parameters (norms, biases, logit scale).

    Fused: the 6M-entry token embedding makes the optimizer step a large share of a small-batch step on a CPU.
    """
    decay = [p for p in task.parameters() if p.ndim >= 2]
    no_decay = [p for p in task.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "peak_lr": lr, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "peak_lr": lr, "lr": lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-6, fused=True)


@torch.no_grad()
def retrieval_top1(
    task: ContrastiveTask,
    images: CachedImageDataset,
    tokens: torch.Tensor,
    captions: list[str],
    preparer: ImagePreparer,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> float:
    """Image -> caption top-1 accuracy over all of a split's captions.

    A hit is a retrieved caption with the same text as the image's own: the demo world words many simple scenes
    identically, and those captions are equally right.
    """
    was_training = task.training
    task.eval()
    image_rows, text_rows = [], []
    for batch in epoch_batches(len(images), RETRIEVAL_BATCH_SIZE, seed=0, epoch=0, shuffle=False):
        pixels = torch.stack([images[i][0] for i in batch])
        with autocast():
            v, t = task.features(preparer(pixels), tokens[batch].to(preparer.device))
        image_rows.append(v.float())
        text_rows.append(t.float())
    task.train(was_training)
    best = (torch.cat(image_rows) @ torch.cat(text_rows).T).argmax(dim=1).cpu().tolist()
    return float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))


def _contrastive_epoch(
    task: ContrastiveTask,
    stepper: Stepper,
    schedule: LrSchedule,
    preparer: ImagePreparer,
    images: CachedImageDataset,
    tokens: torch.Tensor,
    *,
    cfg: PretrainConfig,
    epoch: int,
    progress: bool,
) -> dict[str, Any]:
    """One epoch of contrastive steps; its history entry, which validation completes."""
    batches = epoch_batches(len(images), cfg.batch_size, seed=cfg.seed, epoch=epoch)
    loader = DataLoader(_IndexedImages(images), batch_sampler=batches)
    losses: list[torch.Tensor] = []
    report: dict[str, Any] = {}
    started = time.perf_counter()
    for batch_index, (pixels, index) in enumerate(
        tqdm(loader, desc=f"pretrain {epoch + 1}/{cfg.epochs}", disable=None if progress else True, leave=False)
    ):
        flips = None
        if cfg.hflip:
            flips = torch.Generator().manual_seed(batch_seed(cfg.seed, epoch, batch=batch_index))
        loss, report = stepper.backward(preparer(pixels, flips), tokens[index].to(preparer.device))
        # Every epoch has the same number of steps: incomplete batches are dropped.
        stepper.update(schedule(epoch * len(batches) + batch_index))
        with torch.no_grad():
            task.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(loss)
    elapsed = time.perf_counter() - started
    train_loss = float(torch.stack(losses).mean())
    if not math.isfinite(train_loss):
        raise FloatingPointError(f"pretraining diverged in epoch {epoch + 1} (loss {train_loss}); lower pretrain.lr")
    entry = {
        "epoch": epoch,
        "train_loss": train_loss,
        "logit_scale": float(report["logit_scale"]),
        "images_per_second": len(batches) * cfg.batch_size / max(elapsed, 1e-9),
    }
    if "logit_bias" in report:
        entry["logit_bias"] = float(report["logit_bias"])
    return entry


def _save_foundation(
    task: ContrastiveTask,
    result: PretrainResult,
    *,
    params: Params,
    precision_used: str,
    device: torch.device,
    train_frame: pd.DataFrame,
) -> None:
    """The open_clip state dict, and beside it the record the foundation step and fine-tuning read."""
    with atomic_path(result.out_path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in task.clip.state_dict().items()}, tmp)
    atomic_write_json(
        result.meta_path,
        {
            **asdict(result),
            "out_path": str(result.out_path),
            "meta_path": str(result.meta_path),
            "backbone": params.model.backbone,
            "pretrain": params.pretrain.recipe(),
            "precision": precision_used,
            "device": str(device),
            "train_images": len(train_frame),
            # What fine-tuning from these weights has already seen: the gate keeps such images out of any test.
            "seen_images": sorted(train_frame["sha256"]),
            "captions_from": "caption column" if "caption" in train_frame.columns else "labels",
        },
    )


def pretrain(
    params: Params,
    *,
    splits_dir: Path,
    images_root: Path,
    cache_dir: Path,
    out_path: Path,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Pretrain `params.model.backbone` from random init on the train split's (image, caption) pairs.

    Captions come from the split's `caption` column; a split without one gets captions built from its labels
    (`label_caption`), so any labelled collection can be pretrained on. Batch order, flips and initialisation are
    functions of `pretrain.seed`: on CPU two runs write byte-identical checkpoints. Writes `out_path` (the
    open_clip state dict) and `<out_path>.json` (config, history, final loss and retrieval, data fingerprint).
    `on_epoch_end` receives each epoch's history entry as it completes (progress for a long run's log).
    """
    cfg = params.pretrain
    out_path = Path(out_path)
    meta_path = out_path.with_name(out_path.name + ".json")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    frames = {name: read_split(Path(splits_dir) / f"{name}.parquet") for name in ("train", "val")}
    fingerprint = data_fingerprint(frames)
    captions = {name: split_captions(frame) for name, frame in frames.items()}
    backbone = create_backbone(params.model.backbone, None, device="cpu")
    task = ContrastiveTask(backbone.clip, cfg.loss).to(device)
    tokens = {name: tokenize_prompts(backbone.tokenizer, texts, backbone.clip) for name, texts in captions.items()}

    cache = PreprocessCache(cache_dir)
    size = backbone.image_norm.size
    sets = {
        name: CachedImageDataset(frame, images_root, np.zeros((len(frame), 0), np.float32), cache, size)
        for name, frame in frames.items()
    }
    if len(sets["train"]) < cfg.batch_size:
        raise ValueError(f"the train split has {len(sets['train'])} images, fewer than pretrain.batch_size")
    if len(sets["val"]) == 0:
        raise ValueError("the val split is empty: pretraining reports retrieval accuracy on it")

    optimizer = _optimizer(task, cfg.lr, cfg.weight_decay)
    autocast, scaler, precision_used = autocast_and_scaler(cfg.precision, device)
    preparer = ImagePreparer(backbone.image_norm, device)
    stepper = Stepper(task, optimizer, autocast, scaler, grad_clip_norm=cfg.grad_clip_norm)
    steps_per_epoch = len(epoch_batches(len(sets["train"]), cfg.batch_size, seed=cfg.seed, epoch=0))
    schedule = LrSchedule(steps_per_epoch * cfg.epochs, cfg.warmup_fraction, cfg.min_lr_fraction)

    history: list[dict[str, Any]] = []
    started_all = time.perf_counter()
    task.train()
    for epoch in range(cfg.epochs):
        entry = _contrastive_epoch(
            task, stepper, schedule, preparer, sets["train"], tokens["train"], cfg=cfg, epoch=epoch, progress=progress
        )
        entry["val_retrieval_top1"] = retrieval_top1(
            task, sets["val"], tokens["val"], captions["val"], preparer, autocast
        )
        history.append(entry)
        log.info(
            "pretrain epoch %d: loss %.4f  val image->caption top-1 %.3f  logit scale %.1f  %.0f img/s",
            epoch + 1,
            entry["train_loss"],
            entry["val_retrieval_top1"],
            entry["logit_scale"],
            entry["images_per_second"],
        )
        if on_epoch_end is not None:
            on_epoch_end(dict(entry))
    result = PretrainResult(
        out_path=out_path,
        meta_path=meta_path,
        epochs=cfg.epochs,
        final_loss=history[-1]["train_loss"],
        val_retrieval_top1=history[-1]["val_retrieval_top1"],
        seconds=time.perf_counter() - started_all,
        history=history,
        data_fingerprint=fingerprint,
    )
    _save_foundation(
        task, result, params=params, precision_used=precision_used, device=device, train_frame=frames["train"]
    )
    return result


def export_zero_shot(
    params: Params, *, taxonomy_path: Path, backbone_weights: str | Path | None, model_dir: Path
) -> Path:
    """A MuMIC model directory straight from a backbone, with no fine-tuning: the zero-shot baseline.

    `backbone_weights` is a checkpoint file or open_clip tag; None gives the random initialisation that `train`
    starts from (seeded by train.seed), the floor to compare against. Classes in `train.held_out_classes` are left
    out of the class list and recorded, as training does, so `evaluate_model` scores them separately under
    `zero_shot`. No thresholds: none were tuned.
    """
    if params.model.head is not Head.MUMIC:
        raise ValueError("zero-shot scoring needs model.head 'mumic': a linear head has no class text embeddings")
    taxonomy = load_taxonomy(taxonomy_path)
    class_names, class_prompts, held_out = training_classes(taxonomy, params.train.held_out_classes)
    weights = None if backbone_weights is None else str(backbone_weights)
    torch.manual_seed(params.train.seed)
    backbone = create_backbone(params.model.backbone, weights, device="cpu")
    classifier = build_classifier(params.model, class_prompts, backbone).eval()
    return save_model_dir(
        Path(model_dir),
        classifier=classifier,
        backbone_name=params.model.backbone,
        backbone_config=backbone.model_config,
        model_cfg=params.model.model_copy(update={"pretrained": weights}),
        image_norm=backbone.image_norm,
        taxonomy=taxonomy,
        class_names=class_names,
        class_prompts=class_prompts,
        thresholds=None,
        metadata={"zero_shot": True, "pretrained": weights, "held_out_classes": held_out, "epochs_run": 0},
    )


# --- reusing the demo foundation ----------------------------------------------------------------------------------


def checkpoint_record_path(checkpoint: Path) -> Path:
    """The JSON record `pretrain` writes beside a checkpoint: recipe, data fingerprint, the images it saw."""
    return checkpoint.with_name(checkpoint.name + ".json")


def pretrain_decision(checkpoint: Path, params: Params, fingerprint: str, force: bool) -> str | None:
    """Why the demo foundation must be pretrained now, or None to reuse the checkpoint (`pretrain.refresh`)."""
    record_path = checkpoint_record_path(checkpoint)
    refresh = params.pretrain.refresh
    if force:
        return "asked to (--force)"
    if not checkpoint.is_file() or not record_path.is_file():
        return "no foundation checkpoint yet"
    if refresh is FoundationRefresh.ALWAYS:
        return "pretrain.refresh is always"
    record = read_json(record_path)
    if record.get("backbone") != params.model.backbone or record.get("pretrain") != params.pretrain.recipe():
        return "model.backbone or the pretrain recipe changed"
    if refresh is FoundationRefresh.DATA and record.get("data_fingerprint") != fingerprint:
        return "the train or val split changed (pretrain.refresh: data)"
    return None


def foundation_seen_images(params: Params, checkpoint: Path) -> list[str]:
    """The images the demo foundation at `checkpoint` was pretrained on (none for other weights): a model
    fine-tuned from it has seen them too."""
    if params.model.pretrained != DEMO_FOUNDATION:
        return []
    record_path = checkpoint_record_path(checkpoint)
    if not record_path.is_file():
        return []
    return list(read_json(record_path).get("seen_images", []))
