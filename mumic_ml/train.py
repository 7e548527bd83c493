"""MuMIC fine-tuning: one loop for every head, loss, device and process count.

`train` reads top to bottom: `_setup` builds the run once and restores its progress, `train_one_epoch` takes one
epoch's optimizer steps, `_end_of_epoch` validates, keeps the best weights, checkpoints and stops early, and
`_export_best` writes the model directory. Where a process runs is `runtime.py`; how the weights move is `optim.py`.

Shape of the loop (nanoGPT's, with open_clip's TrainState): the learning rate is a pure function of the step;
validation runs under `no_grad` after each epoch; the best weights by validation GAP@k (k = `evaluate.k`) are
exported at the end.

Resuming is exact. Batch order and flips are pure functions of (seed, epoch, batch) (`data.batch_seed`), the
schedule of the step, and checkpoints carry weights, optimizer tensors and counters. A run killed mid-epoch
restarts from its last checkpoint and replays the same batches, so on CPU with deterministic settings it ends with
bitwise the same weights as a run that was never interrupted (tests/test_reliability.py kills one to check).

Against missing positives, options act before, inside and after the loop: `train.pseudo_labels` changes the train
labels the audit's out-of-fold scores call missing, `train.linear_probe` fits the head alone on the starting weights'
embeddings before the first step (LP-FT), `train.large_loss` wraps the loss so that each batch's largest-loss
negatives are rejected or corrected (the loop sets its epoch, which sets the rate), and `train.wise_ft` exports a
weight-space ensemble of the starting and the fine-tuned weights.

Distributed data parallel: start the same command under `torchrun --nproc_per_node N`; ranks share the epoch's
permutation and take interleaved slices, gradients are averaged by DDP, rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mumic_ml.audit import Tower, embed_images, label_state, out_of_fold_scores
from mumic_ml.backbone import Backbone, create_backbone
from mumic_ml.calibration import fit_calibration
from mumic_ml.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    discard_partial_writes,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mumic_ml.config import Params, PseudoLabelMode, TrainConfig
from mumic_ml.data import (
    CachedImageDataset,
    ImagePreparer,
    batch_seed,
    data_fingerprint,
    epoch_batches,
    read_split,
    split_targets,
)
from mumic_ml.evaluate import compute_scores
from mumic_ml.images import PreprocessCache
from mumic_ml.io import atomic_path, atomic_write_json, file_digest, read_json
from mumic_ml.label_noise import corrupt_labels, pseudo_label
from mumic_ml.losses import LargeLossModification
from mumic_ml.metrics import gap_at_k, mean_average_precision, tune_thresholds
from mumic_ml.model_io import build_classifier, save_model_dir, weight_space_ensemble
from mumic_ml.optim import LrSchedule, Stepper, fit_head_on_features, parameter_groups
from mumic_ml.runtime import DistInfo, autocast_and_scaler, configure_runtime, wrap_for_training
from mumic_ml.task import LossFn, MumicTask, create_loss
from mumic_ml.taxonomy import Taxonomy, load_taxonomy, training_classes

log = logging.getLogger(__name__)

BEST_WEIGHTS = "best.safetensors"


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs besides weights and optimizer tensors."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    global_step: int = 0
    best_val_gap_at_k: float = -1.0  # validation GAP@k at k = evaluate.k, which the run signature pins
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False
    # Training loss of `epoch` so far, folded in at each checkpoint, so a resumed epoch reports the same mean.
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def fold_losses(self, losses: list[torch.Tensor]) -> None:
        """Move losses kept on the device into the sums (one sync), so a checkpoint carries them; empties `losses`."""
        if losses:
            self.epoch_loss_sum += float(torch.stack(losses).sum())
            self.epoch_loss_count += len(losses)
            losses.clear()


@dataclass
class EpochReport:
    """One epoch's entry of the training history; `val_gap_at_k` is validation GAP@k at k = evaluate.k."""

    epoch: int
    global_step: int
    train_loss: float
    val_gap_at_k: float
    val_map: float
    temperature: float | None
    bias: float | None
    learning_rate: float
    images_per_second: float
    is_best: bool


@dataclass
class TrainResult:
    model_dir: Path
    run_dir: Path
    best_epoch: int
    best_val_gap_at_k: float
    gap_k: int  # the k of every GAP@k above and in `history`
    epochs_run: int
    resumed_from: str | None
    history: list[dict[str, Any]]
    data_fingerprint: str
    pseudo_labels: dict[str, Any] | None  # train.pseudo_labels: the negatives the audit's scores changed; None: off
    linear_probe: dict[str, Any] | None  # train.linear_probe: the head's fit before the first step; None: off


@dataclass(frozen=True)
class LabelledSplits:
    """The classes a run learns and the labels of its train and val splits, read once."""

    taxonomy: Taxonomy
    class_names: list[str]
    class_prompts: list[list[str]]
    held_out: list[str]
    frames: dict[str, pd.DataFrame]
    fingerprint: str
    train_targets: np.ndarray  # with the simulated label noise, if any
    val_targets: np.ndarray
    train_known: np.ndarray  # bool, False where the split lists the class in unknown_labels (or pseudo-labels hid it)
    val_known: np.ndarray


@dataclass(frozen=True)
class Run:
    """What set-up builds once and every epoch reads; progress lives beside it in `TrainState`."""

    params: Params
    device: torch.device
    dist_info: DistInfo
    run_dir: Path
    signature: str
    resumed_from: str | None
    labels: LabelledSplits
    backbone: Backbone
    classifier: nn.Module  # unwrapped: what checkpoints, validation and the export read
    train_set: CachedImageDataset
    val_set: CachedImageDataset
    preparer: ImagePreparer
    stepper: Stepper  # the stepped model (compiled and/or under DDP), optimizer, autocast and scaler
    precision_used: str
    steps_per_epoch: int
    schedule: LrSchedule
    # train.partial_labels and the train split has unknown entries. Without any the mask would be all ones, so the
    # loss is then computed unmasked: exactly the numbers of partial_labels off.
    mask_unknown: bool
    # train.large_loss: the loss wrapper whose epoch the loop sets; None when off.
    large_loss: LargeLossModification | None
    # train.wise_ft: the weights fine-tuning started from, for the weight-space ensemble at export; None when off.
    start_state: dict[str, torch.Tensor] | None
    # train.pseudo_labels: what the audit's scores changed, for the model's metadata; None when off.
    pseudo_labels: dict[str, Any] | None
    # train.linear_probe: the head fit before the first step (losses before and after), for the metadata; None when off.
    linear_probe: dict[str, Any] | None


@dataclass(frozen=True)
class EpochTraining:
    """What one epoch's optimizer steps measured, for its report."""

    train_loss: float  # mean over the epoch's micro-batches and ranks, steps before a resume included
    images_per_second: float
    step_report: dict[str, Any]  # the last micro-batch's temperature and bias, when the head has them


def train(
    params: Params,
    *,
    splits_dir: Path,
    images_root: Path,
    taxonomy_path: Path,
    run_dir: Path,
    model_dir: Path,
    cache_dir: Path,
    resume: bool = False,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    seen_before: Iterable[str] = (),
) -> TrainResult:
    """Fine-tune on `splits_dir/{train,val}.parquet`, export the best epoch's model to `model_dir`.

    `metadata` is stored in the exported model directory (e.g. the MLflow run id and the data version), so later
    steps find them beside the weights instead of in some side channel. `seen_before` names the images the starting
    weights already trained on (the demo foundation's); the model records them with its own train and val images.
    """
    run, state = _setup(
        params,
        splits_dir=Path(splits_dir),
        images_root=Path(images_root),
        taxonomy_path=Path(taxonomy_path),
        run_dir=Path(run_dir),
        cache_dir=Path(cache_dir),
        resume=resume,
    )
    while not state.finished and state.epoch < params.train.epochs:
        trained = train_one_epoch(run, state, progress=progress)
        report = _end_of_epoch(run, state, trained)
        if report is not None and on_epoch_end is not None:
            on_epoch_end(report)
    if run.dist_info.is_main:
        _export_best(run, state, model_dir=Path(model_dir), extra_metadata=metadata or {}, seen_before=seen_before)
    if run.dist_info.world_size > 1:
        dist.barrier()
    return TrainResult(
        model_dir=Path(model_dir),
        run_dir=run.run_dir,
        best_epoch=state.best_epoch,
        best_val_gap_at_k=state.best_val_gap_at_k,
        gap_k=params.evaluate.k,
        epochs_run=state.epoch,
        resumed_from=run.resumed_from,
        history=state.history,
        data_fingerprint=run.labels.fingerprint,
        pseudo_labels=run.pseudo_labels,
        linear_probe=run.linear_probe,
    )


def _setup(
    params: Params,
    *,
    splits_dir: Path,
    images_root: Path,
    taxonomy_path: Path,
    run_dir: Path,
    cache_dir: Path,
    resume: bool,
) -> tuple[Run, TrainState]:
    """Build the run and restore its progress. Seeded steps keep their order: the same seed, the same model."""
    cfg = params.train
    device, dist_info = configure_runtime(cfg)
    labels = _read_labels(cfg, splits_dir, taxonomy_path)
    backbone = create_backbone(params.model.backbone, params.model.pretrained, device="cpu")
    log.info("backbone %s from %s", params.model.backbone, params.model.pretrained or "random initialisation")
    # The train split under the starting weights, embedded at most once for the options that read it.
    starting_embeddings = functools.cache(
        lambda: _embed_with_starting_weights(backbone, labels.frames["train"], images_root, cache_dir, params, device)
    )
    pseudo_labels = None
    if cfg.pseudo_labels.mode is not None:
        labels, pseudo_labels = _apply_pseudo_labels(params, labels, starting_embeddings)
    classifier = build_classifier(params.model, labels.class_prompts, backbone)
    cache = PreprocessCache(cache_dir)
    size = backbone.image_norm.size
    train_set = CachedImageDataset(
        labels.frames["train"], images_root, labels.train_targets, cache, size, known=labels.train_known
    )
    val_set = CachedImageDataset(labels.frames["val"], images_root, labels.val_targets, cache, size)
    if len(train_set) < cfg.batch_size * cfg.accumulation_steps * dist_info.world_size:
        raise ValueError(
            f"the train split has {len(train_set)} images, fewer than one step needs "
            f"(batch_size {cfg.batch_size} x accumulation_steps {cfg.accumulation_steps} "
            f"x {dist_info.world_size} ranks)"
        )

    channels_last = cfg.channels_last and device.type == "cuda"
    loss_fn = base_loss = create_loss(cfg.loss, cfg.asl)
    large_loss = None
    if cfg.large_loss.mode is not None:
        ll = cfg.large_loss
        loss_fn = large_loss = LargeLossModification(loss_fn, ll.mode.value, ll.rate_per_epoch, ll.max_rate)
    start_state = None
    if cfg.wise_ft.enabled:  # taken before a checkpoint is restored: the starting weights, not the resumed ones
        start_state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
    task = MumicTask(classifier, loss_fn).to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(classifier, params), betas=(0.9, 0.98), eps=1e-6)
    autocast, scaler, precision_used = autocast_and_scaler(cfg.precision, device)
    signature = _run_signature(params, labels)
    state, resumed_from = _restore_or_reset(
        run_dir,
        resume=resume,
        signature=signature,
        classifier=classifier,
        optimizer=optimizer,
        scaler=scaler,
        dist_info=dist_info,
        device=device,
    )
    linear_probe = None
    if cfg.linear_probe.steps:
        record_path = run_dir / "linear_probe.json"
        if resumed_from is None:
            linear_probe = _fit_head_first(params, classifier, labels, starting_embeddings(), base_loss, device)
            if dist_info.is_main:
                atomic_write_json(record_path, linear_probe)
        else:  # the restored checkpoint already holds the fitted head
            linear_probe = read_json(record_path) if record_path.is_file() else None
    # Wrapped after the restore, so DDP starts every rank from the restored weights.
    model_for_step = wrap_for_training(task, compile_model=cfg.compile, dist_info=dist_info, device=device)
    model_for_step.train()
    micro_batches = epoch_batches(
        len(train_set), cfg.batch_size, seed=cfg.seed, epoch=0, world_size=dist_info.world_size
    )
    steps_per_epoch = len(micro_batches) // cfg.accumulation_steps
    run = Run(
        params=params,
        device=device,
        dist_info=dist_info,
        run_dir=run_dir,
        signature=signature,
        resumed_from=resumed_from,
        labels=labels,
        backbone=backbone,
        classifier=classifier,
        train_set=train_set,
        val_set=val_set,
        preparer=ImagePreparer(backbone.image_norm, device, channels_last),
        stepper=Stepper(model_for_step, optimizer, autocast, scaler, cfg.accumulation_steps, cfg.grad_clip_norm),
        precision_used=precision_used,
        steps_per_epoch=steps_per_epoch,
        schedule=LrSchedule(steps_per_epoch * cfg.epochs, cfg.warmup_fraction, cfg.min_lr_fraction),
        mask_unknown=_masks_unknown(cfg) and not labels.train_known.all(),
        large_loss=large_loss,
        start_state=start_state,
        pseudo_labels=pseudo_labels,
        linear_probe=linear_probe,
    )
    return run, state


def _read_labels(cfg: TrainConfig, splits_dir: Path, taxonomy_path: Path) -> LabelledSplits:
    taxonomy = load_taxonomy(taxonomy_path)
    class_names, class_prompts, held_out = training_classes(taxonomy, cfg.held_out_classes)
    frames = {name: read_split(splits_dir / f"{name}.parquet") for name in ("train", "val")}
    train_targets, train_known = split_targets(frames["train"], class_names)
    val_targets, val_known = split_targets(frames["val"], class_names)
    noise = cfg.label_noise
    if noise.missing or noise.spurious:
        train_targets = corrupt_labels(
            train_targets, missing_rate=noise.missing, spurious_rate=noise.spurious, seed=noise.seed
        )
    return LabelledSplits(
        taxonomy=taxonomy,
        class_names=class_names,
        class_prompts=class_prompts,
        held_out=held_out,
        frames=frames,
        fingerprint=data_fingerprint(frames),
        train_targets=train_targets,
        val_targets=val_targets,
        train_known=train_known,
        val_known=val_known,
    )


def _masks_unknown(cfg: TrainConfig) -> bool:
    """Whether the loss leaves out the train split's unknown entries: the manifest's (train.partial_labels) and the
    negatives that audit pseudo-labels made unknown."""
    return cfg.partial_labels or cfg.pseudo_labels.mode == PseudoLabelMode.UNKNOWN


def _embed_with_starting_weights(
    backbone: Backbone, frame: pd.DataFrame, images_root: Path, cache_dir: Path, params: Params, device: torch.device
) -> np.ndarray:
    """L2-normalised embeddings of `frame`'s images by the image tower fine-tuning starts from (no flips)."""
    started_on = next(backbone.clip.parameters()).device
    backbone.clip.to(device)
    tower = Tower(backbone.clip.eval().encode_image, backbone.image_norm, device, key="starting-weights")
    features, _ = embed_images(tower, frame, images_root, cache_dir, None, params.audit.batch_size)
    backbone.clip.to(started_on)
    return features


def _fit_head_first(
    params: Params,
    classifier: nn.Module,
    labels: LabelledSplits,
    features: np.ndarray,
    loss_fn: LossFn,
    device: torch.device,
) -> dict[str, Any]:
    """train.linear_probe: the head fitted alone to the starting embeddings with the training loss, unknown entries
    left out as the loop leaves them out; what it did, for the model's metadata."""
    cfg = params.train
    started = time.monotonic()
    known = None
    if _masks_unknown(cfg) and not labels.train_known.all():
        known = torch.from_numpy(labels.train_known.astype(np.float32))
    before, after = fit_head_on_features(
        classifier,
        torch.from_numpy(features),
        torch.from_numpy(labels.train_targets.astype(np.float32)),
        known,
        loss_fn,
        steps=cfg.linear_probe.steps,
        lr=cfg.linear_probe.lr,
        weight_decay=cfg.weight_decay,
        device=device,
    )
    log.info("linear probe: train loss %.4f -> %.4f in %d full-batch steps", before, after, cfg.linear_probe.steps)
    seconds = round(time.monotonic() - started, 2)
    return {
        "steps": cfg.linear_probe.steps,
        "lr": cfg.linear_probe.lr,
        "loss_before": round(before, 5),
        "loss_after": round(after, 5),
        "seconds": seconds,
    }


def _apply_pseudo_labels(
    params: Params, labels: LabelledSplits, starting_embeddings: Callable[[], np.ndarray]
) -> tuple[LabelledSplits, dict[str, Any]]:
    cfg = params.train.pseudo_labels
    if params.model.pretrained is None:
        raise ValueError(
            "train.pseudo_labels needs model.pretrained: the audit scores with the image tower fine-tuning starts "
            "from, and random weights embed nothing"
        )
    started = time.monotonic()
    frame = labels.frames["train"]
    features = starting_embeddings()
    _, _, rankable = label_state(frame, labels.class_names)
    known = labels.train_known if params.train.partial_labels else np.ones_like(labels.train_known)
    scores = out_of_fold_scores(features, labels.train_targets, known, list(frame["sha256"]), params.audit)
    negatives = int(((labels.train_targets == 0) & known).sum())
    targets, known, flagged = pseudo_label(labels.train_targets, known, rankable, scores, cfg.mode, cfg.min_score)
    if cfg.mode == PseudoLabelMode.UNKNOWN:  # the mask the loss applies: without partial_labels, only the flagged
        labels = replace(labels, train_known=known)
    labels = replace(labels, train_targets=targets)
    record = {
        "mode": cfg.mode.value,
        "min_score": cfg.min_score,
        "entries": int(flagged.sum()),
        "images": int(flagged.any(axis=1).sum()),
        "negatives": negatives,
        "seconds": round(time.monotonic() - started, 2),
    }
    log.info(
        "pseudo-labels: %d of %d labelled negatives (%d images) scored >= %g out of fold: %s",
        record["entries"],
        record["negatives"],
        record["images"],
        cfg.min_score,
        record["mode"],
    )
    return labels, record


def _run_signature(params: Params, labels: LabelledSplits) -> str:
    """What a checkpoint must match to be resumed: model, starting weights, train config, validation k and data.

    `evaluate.k` belongs to it because the best epoch and early stopping compare validation GAP@k across epochs;
    the unknown entries because the loss and the validation metrics leave them out.
    """
    recipe = {
        "model": params.model.model_dump(mode="json"),
        "weights": _weights_digest(params.model.pretrained),
        "train": _train_recipe(params.train),
        "gap_k": params.evaluate.k,
        "data": labels.fingerprint,
        "unknown": [_mask_digest(labels.train_known), _mask_digest(labels.val_known)],
    }
    if params.train.pseudo_labels.mode is not None:  # the flipped entries depend on the audit settings and scores
        recipe["pseudo_targets"] = hashlib.sha256(np.packbits(labels.train_targets > 0).tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()


def _train_recipe(cfg: TrainConfig) -> dict[str, Any]:
    """The train config as the signature sees it. WiSE-FT acts only at export, so a run may resume with another
    alpha; Large Loss, pseudo-labels and the linear probe only while on, so runs without them keep the signature
    they had before the options existed."""
    recipe = cfg.model_dump(mode="json", exclude={"wise_ft", "large_loss", "pseudo_labels", "linear_probe"})
    if cfg.large_loss.mode is not None:
        recipe["large_loss"] = cfg.large_loss.model_dump(mode="json")
    if cfg.pseudo_labels.mode is not None:
        recipe["pseudo_labels"] = cfg.pseudo_labels.model_dump(mode="json")
    if cfg.linear_probe.steps:
        recipe["linear_probe"] = cfg.linear_probe.model_dump(mode="json")
    return recipe


def _mask_digest(known: np.ndarray) -> str | None:
    """None when every entry is known, so data without unknown labels keeps one signature for the mask."""
    return None if known.all() else hashlib.sha256(np.packbits(known).tobytes()).hexdigest()


def _weights_digest(pretrained: str | None) -> str | None:
    """A checkpoint file's content hash: a foundation re-pretrained in place must not resume an older run."""
    if pretrained is None or not Path(pretrained).is_file():
        return pretrained
    return file_digest(pretrained)


def _restore_or_reset(
    run_dir: Path,
    *,
    resume: bool,
    signature: str,
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    dist_info: DistInfo,
    device: torch.device,
) -> tuple[TrainState, str | None]:
    """Continue from the run directory's last checkpoint, or clear it so a fresh run never resumes a stale one.

    A checkpoint of another configuration or other data, or one whose progress record this version does not know,
    is not resumed (that would silently mix two runs, or fail half-way): the run starts fresh and says why. This is
    what lets `dvc repro` and the Dagster asset always pass `resume`.
    """
    is_main = dist_info.is_main
    if is_main:
        for leftover in discard_partial_writes(run_dir):
            log.info("removed %s, left half-written by an interrupted run", leftover)
    checkpoint_path = latest_checkpoint(run_dir) if resume else None
    loaded = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if loaded is not None:
        stored = loaded.state.get("train_state")
        differing = (set(stored) if isinstance(stored, dict) else set()) ^ {f.name for f in fields(TrainState)}
        if differing:
            log.warning(
                "%s was written by another version of mumic (progress fields differ: %s); starting a fresh run",
                checkpoint_path,
                ", ".join(sorted(differing)),
            )
            loaded = None
        elif loaded.state.get("run_signature") != signature:
            log.warning("%s belongs to a run with another configuration or data; starting a fresh run", checkpoint_path)
            loaded = None
    if dist_info.world_size > 1:
        _agree_on_checkpoint(loaded, run_dir, device)
    if loaded is None:
        if is_main:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for name in ("latest.json", BEST_WEIGHTS):
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / name).unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        return TrainState(), None
    classifier.load_state_dict(loaded.model_state, strict=False)
    optimizer.load_state_dict(loaded.optimizer_state)
    if scaler is not None and loaded.state.get("scaler"):
        scaler.load_state_dict(loaded.state["scaler"])
    state = TrainState(**loaded.state["train_state"])
    log.info("resumed from %s (epoch %d, step %d)", checkpoint_path, state.epoch, state.global_step)
    return state, str(checkpoint_path)


def _agree_on_checkpoint(loaded: LoadedCheckpoint | None, run_dir: Path, device: torch.device) -> None:
    """Every rank continues from the same checkpoint, or none does.

    A rank that started afresh beside one that resumed would take other steps and wait forever in a collective: on
    several nodes each reads its own `run_dir`, and only rank 0's holds checkpoints unless the folder is shared. The
    exchange also keeps rank 0 from clearing a stale run folder while another rank still reads it.
    """
    step = torch.tensor([loaded.state["train_state"]["global_step"] if loaded is not None else -1], device=device)
    steps = [torch.empty_like(step) for _ in range(dist.get_world_size())]
    dist.all_gather(steps, step)
    found = [int(s) for s in steps]
    if len(set(found)) > 1:
        raise CheckpointError(
            f"the ranks found different checkpoints to resume in {run_dir} (global step by rank, -1 for none: "
            f"{found}); to resume on several nodes, put --run-dir on storage every node shares"
        )


def train_one_epoch(run: Run, state: TrainState, *, progress: bool) -> EpochTraining:
    """The optimizer steps of `state.epoch` from `state.step_in_epoch` on, checkpointing as configured."""
    cfg = run.params.train
    rank, world_size = run.dist_info.rank, run.dist_info.world_size
    micro_batches = epoch_batches(
        len(run.train_set), cfg.batch_size, seed=cfg.seed, epoch=state.epoch, rank=rank, world_size=world_size
    )
    first_micro = state.step_in_epoch * cfg.accumulation_steps
    loader = DataLoader(
        run.train_set,
        batch_sampler=micro_batches[first_micro : run.steps_per_epoch * cfg.accumulation_steps],
        num_workers=cfg.num_workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
    )
    if run.large_loss is not None:
        run.large_loss.epoch = state.epoch
        log.info("epoch %d: large loss %s rate %.3f", state.epoch + 1, run.large_loss.mode, run.large_loss.rate)
    losses: list[torch.Tensor] = []
    step_report: dict[str, Any] = {}
    images_seen = 0
    started = time.perf_counter()
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{cfg.epochs}",
        disable=None if progress and run.dist_info.is_main else True,  # None: off when not a terminal
        leave=False,
        dynamic_ncols=True,
    )
    for micro, (images, targets, known) in enumerate(loader, start=first_micro):
        flips = None
        if cfg.hflip:
            flips = torch.Generator().manual_seed(batch_seed(cfg.seed, state.epoch, batch=micro * world_size + rank))
        x = run.preparer(images, flips)
        y = targets.to(run.device, non_blocking=True)
        mask = known.to(run.device, non_blocking=True) if run.mask_unknown else None
        last_micro = (micro + 1) % cfg.accumulation_steps == 0
        loss, step_report = run.stepper.backward(x, y, sync_gradients=last_micro, known=mask)
        losses.append(loss)
        images_seen += images.shape[0]
        if not last_micro:
            continue
        run.stepper.update(run.schedule(state.global_step))
        state.global_step += 1
        state.step_in_epoch += 1
        bar.update(1)
        if state.step_in_epoch % 10 == 0:
            bar.set_postfix(loss=f"{float(torch.stack(losses[-10:]).mean()):.4f}")
        # Not at the epoch's last step: the end-of-epoch checkpoint follows, and a resume from here would
        # replay no step and lose the epoch's last training report.
        mid_epoch = state.step_in_epoch < run.steps_per_epoch
        if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0 and mid_epoch:
            state.fold_losses(losses)
            _save_checkpoint(run, state)
    bar.close()
    elapsed = time.perf_counter() - started
    state.fold_losses(losses)
    train_loss = state.epoch_loss_sum / state.epoch_loss_count if state.epoch_loss_count else float("nan")
    if world_size > 1:
        loss_tensor = torch.tensor([train_loss], device=run.device)
        dist.all_reduce(loss_tensor)
        train_loss = float(loss_tensor) / world_size
    return EpochTraining(train_loss, images_seen * world_size / max(elapsed, 1e-9), step_report)


def _end_of_epoch(run: Run, state: TrainState, trained: EpochTraining) -> EpochReport | None:
    """Validate and keep the best weights, stop early if due, then move on an epoch and checkpoint.

    Rank 0 validates and returns the epoch's report; the other ranks return None and follow its stop decision.
    """
    cfg, k = run.params.train, run.params.evaluate.k
    report = None
    stop = torch.zeros(1, device=run.device)
    if run.dist_info.is_main:
        val_gap, val_map, is_best = _validate_and_keep_best(run, state)
        step_report = trained.step_report
        report = EpochReport(
            epoch=state.epoch,
            global_step=state.global_step,
            train_loss=trained.train_loss,
            val_gap_at_k=val_gap,
            val_map=val_map,
            temperature=float(step_report["temperature"]) if "temperature" in step_report else None,
            bias=float(step_report["bias"]) if "bias" in step_report else None,
            learning_rate=run.stepper.optimizer.param_groups[0]["lr"],
            images_per_second=trained.images_per_second,
            is_best=is_best,
        )
        state.history.append(asdict(report))
        log.info(
            "epoch %d: loss %.4f  val GAP@%d %.4f  val mAP %.4f  %.0f img/s%s",
            state.epoch + 1,
            trained.train_loss,
            k,
            val_gap,
            val_map,
            trained.images_per_second,
            "  (best)" if is_best else "",
        )
        patience = cfg.early_stopping_patience
        if patience is not None and state.epochs_without_improvement >= patience:
            log.info("early stopping: no val GAP@%d gain for %d epochs", k, patience)
            stop[0] = 1
    if run.dist_info.world_size > 1:
        dist.broadcast(stop, src=0)
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
    state.finished = bool(stop.item()) or state.epoch >= cfg.epochs
    _save_checkpoint(run, state)
    return report


def _validate_and_keep_best(run: Run, state: TrainState) -> tuple[float, float, bool]:
    """Validation GAP@k and mAP of this epoch, unknown entries left out; the best epoch's weights are saved for the
    export."""
    evaluate, val_targets, val_known = run.params.evaluate, run.labels.val_targets, run.labels.val_known
    val_probs, _ = compute_scores(
        run.classifier, run.val_set, run.preparer, batch_size=evaluate.batch_size, autocast=run.stepper.autocast
    )
    run.classifier.train()
    val_gap = float(gap_at_k(val_probs, val_targets, k=evaluate.k, known=val_known))
    has_positive = (val_targets * val_known).any()
    val_map = float(mean_average_precision(val_probs, val_targets, known=val_known)) if has_positive else float("nan")
    is_best = val_gap > state.best_val_gap_at_k
    if is_best:
        state.best_val_gap_at_k, state.best_epoch, state.epochs_without_improvement = val_gap, state.epoch, 0
        with atomic_path(run.run_dir / BEST_WEIGHTS) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in run.classifier.state_dict().items()}, tmp)
    else:
        state.epochs_without_improvement += 1
    return val_gap, val_map, is_best


def _save_checkpoint(run: Run, state: TrainState) -> None:
    """Rank 0 writes; every rank holds the same weights."""
    if not run.dist_info.is_main:
        return
    scaler = run.stepper.scaler
    save_checkpoint(
        run.run_dir,
        global_step=state.global_step,
        model_state=run.classifier.state_dict(),
        optimizer_state=run.stepper.optimizer.state_dict(),
        state={
            "run_signature": run.signature,
            "train_state": asdict(state),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "class_names": run.labels.class_names,
            "params": run.params.model_dump(mode="json"),
            "data_fingerprint": run.labels.fingerprint,
        },
        keep=run.params.train.keep_checkpoints,
    )


def _export_best(
    run: Run, state: TrainState, *, model_dir: Path, extra_metadata: dict[str, Any], seen_before: Iterable[str]
) -> None:
    """Load the best epoch's weights, tune per-class thresholds and fit the calibration on validation, write
    the model directory."""
    params, labels = run.params, run.labels
    best = copy.deepcopy(run.classifier).cpu()
    best.load_state_dict(load_file(run.run_dir / BEST_WEIGHTS), strict=False)
    best.to(run.preparer.device)
    wise_ft: dict[str, Any] = {}
    if run.start_state is not None:
        val_probs, wise_ft = _apply_wise_ft(run, best)
    else:
        val_probs, _ = compute_scores(
            best, run.val_set, run.preparer, batch_size=params.evaluate.batch_size, autocast=run.stepper.autocast
        )
    thresholds = tune_thresholds(val_probs, labels.val_targets, known=labels.val_known)
    calibration = fit_calibration(val_probs, labels.val_targets, known=labels.val_known)
    save_model_dir(
        model_dir,
        classifier=best.cpu(),
        backbone_name=params.model.backbone,
        backbone_config=run.backbone.model_config,
        model_cfg=params.model,
        image_norm=run.backbone.image_norm,
        taxonomy=labels.taxonomy,
        class_names=labels.class_names,
        class_prompts=labels.class_prompts,
        thresholds=thresholds,
        calibration=calibration,
        metadata={
            "best_epoch": state.best_epoch,
            "best_val_gap_at_k": state.best_val_gap_at_k,
            "gap_k": params.evaluate.k,
            "epochs_run": state.epoch,
            "global_step": state.global_step,
            "held_out_classes": labels.held_out,
            "data_fingerprint": labels.fingerprint,
            "pretrained": params.model.pretrained,
            "precision": run.precision_used,
            "world_size": run.dist_info.world_size,
            "train": params.train.model_dump(mode="json"),
            "history": state.history,
            **({"wise_ft": wise_ft} if wise_ft else {}),
            **({"pseudo_labels": run.pseudo_labels} if run.pseudo_labels else {}),
            **({"linear_probe": run.linear_probe} if run.linear_probe else {}),
            **extra_metadata,
        },
        seen_images={*labels.frames["train"]["sha256"], *labels.frames["val"]["sha256"], *seen_before},
    )
    result = {"model_dir": str(model_dir), "gap_k": params.evaluate.k, **asdict(state)}
    if wise_ft:
        result["wise_ft"] = wise_ft
    atomic_write_json(run.run_dir / "result.json", result)


def _apply_wise_ft(run: Run, best: nn.Module) -> tuple[np.ndarray, dict[str, Any]]:
    """Load the weight-space ensemble of the starting and the best weights into `best`: at `wise_ft.alpha`, or at
    the alpha of `wise_ft.alpha_grid` with the highest validation GAP@k (the larger alpha on a tie). Returns its
    validation scores and the record for the model's metadata."""
    cfg, evaluate = run.params.train.wise_ft, run.params.evaluate
    tuned = {k: v.detach().clone() for k, v in best.state_dict().items()}
    grid = [cfg.alpha] if cfg.alpha is not None else sorted(set(cfg.alpha_grid))
    val_gap: dict[float, float] = {}
    chosen: tuple[float, np.ndarray] | None = None
    for alpha in grid:
        best.load_state_dict(weight_space_ensemble(best, run.start_state, tuned, alpha))
        probs, _ = compute_scores(
            best, run.val_set, run.preparer, batch_size=evaluate.batch_size, autocast=run.stepper.autocast
        )
        val_gap[alpha] = float(gap_at_k(probs, run.labels.val_targets, k=evaluate.k, known=run.labels.val_known))
        if chosen is None or val_gap[alpha] >= val_gap[chosen[0]]:
            chosen = (alpha, probs)
    alpha, probs = chosen
    best.load_state_dict(weight_space_ensemble(best, run.start_state, tuned, alpha))
    log.info("WiSE-FT: alpha %g (val GAP@%d by alpha: %s)", alpha, evaluate.k, val_gap)
    record = {"alpha": alpha, "val_gap_at_k": {f"{a:g}": g for a, g in val_gap.items()}}
    return probs, record
