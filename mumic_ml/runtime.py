"""Where and how a training process runs: device, process group, numeric precision, determinism switches.

Kept apart from the loops so fine-tuning, pretraining and the throughput benchmark pick the same device and
precision the same way, and so the loops read as training code only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mumic_ml.config import Precision, TrainConfig


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


def configure_runtime(cfg: TrainConfig) -> tuple[torch.device, DistInfo]:
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


def wrap_for_training(
    module: nn.Module, *, compile_model: bool, dist_info: DistInfo, device: torch.device
) -> nn.Module:
    """The module the step runs: compiled if asked, and under DDP when several processes share the work.

    Wrapping shares the parameters, so weights loaded into `module` beforehand are what every rank starts from.
    """
    if compile_model:
        module = torch.compile(module)
    if dist_info.world_size > 1:
        module = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module
