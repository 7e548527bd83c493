"""MuMIC fine-tuning: one loop for every head, loss, device and process count.

Shape of the loop (nanoGPT's, with open_clip's TrainState): the learning rate is a pure function of the step;
validation runs under `no_grad` after each epoch; the best weights by validation GAP@10 are exported at the end.

Resuming is exact. Batch order and flips are pure functions of (seed, epoch, batch), the schedule of the step,
and checkpoints carry weights, optimizer tensors and counters. A run killed mid-epoch restarts from its last
checkpoint and replays the same batches, so on CPU with deterministic settings it ends with bitwise the same
weights as a run that was never interrupted (tests/test_train.py kills one to check).

Distributed data parallel: start the same command under `torchrun --nproc_per_node N`; ranks share the epoch's
permutation and take interleaved slices, gradients are averaged by DDP, rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from mumic_ml.backbone import create_backbone
from mumic_ml.checkpoint import discard_partial_writes, latest_checkpoint, load_checkpoint, save_checkpoint
from mumic_ml.config import Params, Precision, TrainConfig
from mumic_ml.data import CachedImageDataset, ImagePreparer, epoch_batches, label_matrix, read_split
from mumic_ml.demo_world import corrupt_labels
from mumic_ml.evaluate import compute_scores
from mumic_ml.images import PreprocessCache
from mumic_ml.io import atomic_path, atomic_write_json, sha256_file
from mumic_ml.metrics import gap_at_k, mean_average_precision, tune_thresholds
from mumic_ml.model_io import build_classifier, save_model_dir
from mumic_ml.task import MumicTask, create_loss, total_loss
from mumic_ml.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything about progress that a resumed run needs besides weights and optimizer tensors."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already taken in `epoch`
    global_step: int = 0
    best_val_gap_at_10: float = -1.0
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    finished: bool = False
    # Training loss of `epoch` so far, folded in at each checkpoint, so a resumed epoch reports the same mean.
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochReport:
    epoch: int
    global_step: int
    train_loss: float
    val_gap_at_10: float
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
    best_val_gap_at_10: float
    epochs_run: int
    resumed_from: str | None
    history: list[dict[str, Any]]
    data_fingerprint: str


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(0, 1, 0)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def autocast_and_scaler(
    precision: Precision, device: torch.device
) -> tuple[Callable[[], contextlib.AbstractContextManager], torch.amp.GradScaler | None, str]:
    """Mixed precision on CUDA: bf16 where the chip has it (no scaler needed), fp16 with a loss scaler otherwise."""
    if device.type != "cuda":
        if precision in (Precision.AUTO, Precision.FP32):
            return contextlib.nullcontext, None, "fp32"
        if precision is Precision.BF16:
            return lambda: torch.autocast("cpu", dtype=torch.bfloat16), None, "bf16"
        raise ValueError("fp16 autocast needs CUDA; use precision 'auto', 'fp32' or 'bf16' on CPU")
    if precision is Precision.FP32:
        return contextlib.nullcontext, None, "fp32"
    use_bf16 = precision is Precision.BF16 or (precision is Precision.AUTO and torch.cuda.is_bf16_supported())
    if use_bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16), None, "bf16"
    return lambda: torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda"), "fp16"


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_fraction: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_fraction` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


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
        self, images: torch.Tensor, targets: torch.Tensor, sync_gradients: bool = True
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Accumulate gradients of one micro-batch; returns its (undivided) loss, detached."""
        sync = contextlib.nullcontext()
        if not sync_gradients and isinstance(self.model, DistributedDataParallel):
            sync = self.model.no_sync()  # all-reduce once per optimizer step, not per micro-batch
        with sync:
            with self.autocast():
                losses, report = self.model(images, targets)
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


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _weights_digest(pretrained: str | None) -> str | None:
    """A checkpoint file's content hash: a foundation re-pretrained in place must not resume an older run."""
    if pretrained is None or not Path(pretrained).is_file():
        return pretrained
    return sha256_file(pretrained)


def data_fingerprint(frames: dict[str, Any]) -> str:
    """Identifies the exact images and labels of every split, independent of file locations."""
    digest = hashlib.sha256()
    for name in sorted(frames):
        frame = frames[name]
        digest.update(name.encode())
        for sha, labels in zip(frame["sha256"], frame["labels"]):
            digest.update(f"{sha}:{'|'.join(sorted(labels))};".encode())
    return digest.hexdigest()


def training_classes(taxonomy: Taxonomy, held_out: list[str]) -> tuple[list[str], list[list[str]], list[str]]:
    held = []
    for name in held_out:
        canonical = taxonomy.canonical(name)
        if canonical is None:
            raise ValueError(f"train.held_out_classes names {name!r}, which is not in the taxonomy")
        held.append(canonical)
    kept = [spec for spec in taxonomy.classes if spec.name not in held]
    if not kept:
        raise ValueError("train.held_out_classes removes every class")
    return [s.name for s in kept], [taxonomy.prompts_for(s) for s in kept], held


def _unwrap(module: nn.Module) -> nn.Module:
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


def _configure_runtime(cfg: TrainConfig) -> tuple[torch.device, DistInfo]:
    """Device, process group, seeds and determinism switches, before anything is built."""
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist_info = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device, dist_info


def _restore_or_reset(
    run_dir: Path,
    *,
    resume: bool,
    run_signature: str,
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    is_main: bool,
) -> tuple[TrainState, str | None]:
    """Continue from the run directory's last checkpoint, or clear it so a fresh run never resumes a stale one.

    A checkpoint of another configuration or other data is not resumed (that would silently mix two runs): the
    run starts fresh and says so. This is what lets `dvc repro` and the Dagster asset always pass `resume`.
    """
    if is_main:
        for leftover in discard_partial_writes(run_dir):
            log.info("removed %s, left half-written by an interrupted run", leftover)
    checkpoint_path = latest_checkpoint(run_dir) if resume else None
    loaded = load_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if loaded is not None and loaded.state.get("run_signature") != run_signature:
        log.warning("%s belongs to a run with another configuration or data; starting a fresh run", checkpoint_path)
        loaded = None
    if loaded is None:
        if is_main:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            for name in ("latest.json", "best.safetensors"):
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


def _validate_and_keep_best(
    classifier: nn.Module,
    val_set: CachedImageDataset,
    val_targets: np.ndarray,
    preparer: ImagePreparer,
    autocast: Callable[[], contextlib.AbstractContextManager],
    params: Params,
    state: TrainState,
    best_path: Path,
) -> tuple[float, float, bool]:
    """Validation GAP@k and mAP of this epoch; the best epoch's weights are saved for the export."""
    val_probs, _ = compute_scores(
        classifier, val_set, preparer, batch_size=params.evaluate.batch_size, autocast=autocast
    )
    classifier.train()
    val_gap = float(gap_at_k(val_probs, val_targets, k=params.evaluate.k))
    val_map = float(mean_average_precision(val_probs, val_targets)) if val_targets.any() else float("nan")
    is_best = val_gap > state.best_val_gap_at_10
    if is_best:
        state.best_val_gap_at_10, state.best_epoch, state.epochs_without_improvement = val_gap, state.epoch, 0
        with atomic_path(best_path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}, tmp)
    else:
        state.epochs_without_improvement += 1
    return val_gap, val_map, is_best


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
    cfg = params.train
    device, dist_info = _configure_runtime(cfg)

    taxonomy = load_taxonomy(taxonomy_path)
    class_names, class_prompts, held_out = training_classes(taxonomy, cfg.held_out_classes)
    frames = {name: read_split(Path(splits_dir) / f"{name}.parquet") for name in ("train", "val")}
    fingerprint = data_fingerprint(frames)
    train_targets = label_matrix(frames["train"]["labels"], class_names)
    if cfg.label_noise.missing or cfg.label_noise.spurious:
        train_targets = corrupt_labels(
            train_targets,
            missing_rate=cfg.label_noise.missing,
            spurious_rate=cfg.label_noise.spurious,
            seed=cfg.label_noise.seed,
        )
    val_targets = label_matrix(frames["val"]["labels"], class_names)

    backbone = create_backbone(params.model.backbone, params.model.pretrained, device="cpu")
    log.info("backbone %s from %s", params.model.backbone, params.model.pretrained or "random initialisation")
    classifier = build_classifier(params.model, class_prompts, backbone)
    cache = PreprocessCache(cache_dir)
    size = backbone.image_norm.size
    train_set = CachedImageDataset(frames["train"], images_root, train_targets, cache, size)
    val_set = CachedImageDataset(frames["val"], images_root, val_targets, cache, size)
    if len(train_set) < cfg.batch_size * cfg.accumulation_steps * dist_info.world_size:
        raise ValueError(
            f"the train split has {len(train_set)} images, fewer than one step needs "
            f"(batch_size {cfg.batch_size} x accumulation_steps {cfg.accumulation_steps} "
            f"x {dist_info.world_size} ranks)"
        )

    channels_last = cfg.channels_last and device.type == "cuda"
    task = MumicTask(classifier, create_loss(cfg.loss, cfg.asl)).to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(parameter_groups(classifier, params), betas=(0.9, 0.98), eps=1e-6)
    autocast, scaler, precision_used = autocast_and_scaler(cfg.precision, device)
    preparer = ImagePreparer(backbone.image_norm, device, channels_last)

    run_dir = Path(run_dir)
    run_signature = _sha256_json(
        {
            "model": params.model.model_dump(mode="json"),
            "weights": _weights_digest(params.model.pretrained),
            "train": cfg.model_dump(mode="json"),
            "data": fingerprint,
        }
    )
    state, resumed_from = _restore_or_reset(
        run_dir,
        resume=resume,
        run_signature=run_signature,
        classifier=classifier,
        optimizer=optimizer,
        scaler=scaler,
        is_main=dist_info.is_main,
    )

    model_for_step: nn.Module = task
    if cfg.compile:
        model_for_step = torch.compile(model_for_step)
    if dist_info.world_size > 1:
        model_for_step = DistributedDataParallel(
            model_for_step, device_ids=[device.index] if device.type == "cuda" else None
        )

    micro_batches_per_epoch = len(
        epoch_batches(len(train_set), cfg.batch_size, seed=cfg.seed, epoch=0, rank=0, world_size=dist_info.world_size)
    )
    steps_per_epoch = micro_batches_per_epoch // cfg.accumulation_steps
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_fraction * total_steps)

    losses_seen: list[torch.Tensor] = []

    def fold_losses() -> None:
        """Move this epoch's losses into the state (one device sync, at checkpoints and at the epoch's end)."""
        if losses_seen:
            state.epoch_loss_sum += float(torch.stack(losses_seen).sum())
            state.epoch_loss_count += len(losses_seen)
            losses_seen.clear()

    def checkpoint_now() -> None:
        fold_losses()
        if not dist_info.is_main:
            return
        save_checkpoint(
            run_dir,
            global_step=state.global_step,
            model_state=_unwrap(model_for_step).model.state_dict(),
            optimizer_state=optimizer.state_dict(),
            state={
                "run_signature": run_signature,
                "train_state": asdict(state),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "class_names": class_names,
                "params": params.model_dump(mode="json"),
                "data_fingerprint": fingerprint,
            },
            keep=cfg.keep_checkpoints,
        )

    stepper = Stepper(model_for_step, optimizer, autocast, scaler, cfg.accumulation_steps, cfg.grad_clip_norm)
    model_for_step.train()
    while not state.finished and state.epoch < cfg.epochs:
        epoch = state.epoch
        batches = epoch_batches(
            len(train_set),
            cfg.batch_size,
            seed=cfg.seed,
            epoch=epoch,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
        )[: steps_per_epoch * cfg.accumulation_steps]
        first_micro = state.step_in_epoch * cfg.accumulation_steps
        loader = DataLoader(
            train_set,
            batch_sampler=batches[first_micro:],
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        report: dict[str, Any] = {}
        started = time.perf_counter()
        images_seen = 0
        bar = tqdm(
            total=steps_per_epoch,
            initial=state.step_in_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=None if progress and dist_info.is_main else True,  # None: off when not a terminal
            leave=False,
            dynamic_ncols=True,
        )
        for offset, (images, targets) in enumerate(loader):
            micro = first_micro + offset
            flips = None
            if cfg.hflip:
                flips = torch.Generator().manual_seed(
                    (cfg.seed * 1_000_003 + epoch) * 1_000_003 + micro * max(dist_info.world_size, 1) + dist_info.rank
                )
            x = preparer(images, flips)
            y = targets.to(device, non_blocking=True)
            last_micro = (micro + 1) % cfg.accumulation_steps == 0
            loss, report = stepper.backward(x, y, sync_gradients=last_micro)
            losses_seen.append(loss)
            images_seen += images.shape[0]
            if not last_micro:
                continue
            stepper.update(lr_factor(state.global_step, total_steps, warmup_steps, cfg.min_lr_fraction))
            state.global_step += 1
            state.step_in_epoch += 1
            bar.update(1)
            if state.step_in_epoch % 10 == 0 and losses_seen:
                bar.set_postfix(loss=f"{float(torch.stack(losses_seen[-10:]).mean()):.4f}")
            # Not at the epoch's last step: the end-of-epoch checkpoint follows, and a resume from here would
            # replay no step and lose the epoch's last training report.
            mid_epoch = state.step_in_epoch < steps_per_epoch
            if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0 and mid_epoch:
                checkpoint_now()
        bar.close()
        elapsed = time.perf_counter() - started
        fold_losses()
        train_loss = state.epoch_loss_sum / state.epoch_loss_count if state.epoch_loss_count else float("nan")
        if dist_info.world_size > 1:
            loss_tensor = torch.tensor([train_loss], device=device)
            dist.all_reduce(loss_tensor)
            train_loss = float(loss_tensor) / dist_info.world_size

        stop = torch.zeros(1, device=device)
        if dist_info.is_main:
            val_gap, val_map, is_best = _validate_and_keep_best(
                classifier, val_set, val_targets, preparer, autocast, params, state, run_dir / "best.safetensors"
            )
            epoch_report = EpochReport(
                epoch=epoch,
                global_step=state.global_step,
                train_loss=train_loss,
                val_gap_at_10=val_gap,
                val_map=val_map,
                temperature=float(report["temperature"]) if "temperature" in report else None,
                bias=float(report["bias"]) if "bias" in report else None,
                learning_rate=optimizer.param_groups[0]["lr"],
                images_per_second=images_seen * dist_info.world_size / max(elapsed, 1e-9),
                is_best=is_best,
            )
            state.history.append(asdict(epoch_report))
            log.info(
                "epoch %d: loss %.4f  val GAP@%d %.4f  val mAP %.4f  %.0f img/s%s",
                epoch + 1,
                train_loss,
                params.evaluate.k,
                val_gap,
                val_map,
                epoch_report.images_per_second,
                "  (best)" if is_best else "",
            )
            patience = cfg.early_stopping_patience
            if patience is not None and state.epochs_without_improvement >= patience:
                log.info("early stopping: no val GAP@%d gain for %d epochs", params.evaluate.k, patience)
                stop[0] = 1
        if dist_info.world_size > 1:
            dist.broadcast(stop, src=0)
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum, state.epoch_loss_count = 0.0, 0
        state.finished = bool(stop.item()) or state.epoch >= cfg.epochs
        checkpoint_now()
        if dist_info.is_main and on_epoch_end is not None:
            on_epoch_end(epoch_report)

    result = TrainResult(
        model_dir=Path(model_dir),
        run_dir=run_dir,
        best_epoch=state.best_epoch,
        best_val_gap_at_10=state.best_val_gap_at_10,
        epochs_run=state.epoch,
        resumed_from=resumed_from,
        history=state.history,
        data_fingerprint=fingerprint,
    )
    if dist_info.is_main:
        _export_best(
            params,
            classifier=classifier,
            backbone=backbone,
            taxonomy=taxonomy,
            class_names=class_names,
            class_prompts=class_prompts,
            held_out=held_out,
            val_set=val_set,
            val_targets=val_targets,
            preparer=preparer,
            autocast=autocast,
            run_dir=run_dir,
            model_dir=Path(model_dir),
            state=state,
            fingerprint=fingerprint,
            precision_used=precision_used,
            world_size=dist_info.world_size,
            extra_metadata=metadata or {},
            seen_images={*frames["train"]["sha256"], *frames["val"]["sha256"], *seen_before},
        )
    if dist_info.world_size > 1:
        dist.barrier()
    return result


def _export_best(
    params: Params,
    *,
    classifier: nn.Module,
    backbone,
    taxonomy: Taxonomy,
    class_names: list[str],
    class_prompts: list[list[str]],
    held_out: list[str],
    val_set: CachedImageDataset,
    val_targets: np.ndarray,
    preparer: ImagePreparer,
    autocast,
    run_dir: Path,
    model_dir: Path,
    state: TrainState,
    fingerprint: str,
    precision_used: str,
    world_size: int,
    extra_metadata: dict[str, Any],
    seen_images: set[str],
) -> None:
    """Load the best epoch's weights, tune per-class thresholds on validation, write the model directory."""
    best = copy.deepcopy(classifier).cpu()
    best.load_state_dict(load_file(run_dir / "best.safetensors"), strict=False)
    best.to(preparer.device)
    val_probs, _ = compute_scores(best, val_set, preparer, batch_size=params.evaluate.batch_size, autocast=autocast)
    thresholds = tune_thresholds(val_probs, val_targets)
    save_model_dir(
        model_dir,
        classifier=best.cpu(),
        backbone_name=params.model.backbone,
        backbone_config=backbone.model_config,
        model_cfg=params.model,
        image_norm=backbone.image_norm,
        taxonomy=taxonomy,
        class_names=class_names,
        class_prompts=class_prompts,
        thresholds=thresholds,
        metadata={
            "best_epoch": state.best_epoch,
            "best_val_gap_at_10": state.best_val_gap_at_10,
            "epochs_run": state.epoch,
            "global_step": state.global_step,
            "held_out_classes": held_out,
            "data_fingerprint": fingerprint,
            "pretrained": params.model.pretrained,
            "precision": precision_used,
            "world_size": world_size,
            "train": params.train.model_dump(mode="json"),
            "history": state.history,
            **extra_metadata,
        },
        seen_images=seen_images,
    )
    atomic_write_json(run_dir / "result.json", {"model_dir": str(model_dir), **asdict(state)})
