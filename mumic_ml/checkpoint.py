"""Self-describing training checkpoints that load without unpickling anything.

A checkpoint is a directory: `model.safetensors` (weights), `optimizer.safetensors` (optimizer tensors) and
`state.json` (everything else: step counters, optimizer hyper-parameters, history, config, class names).
Nested state such as `optimizer.state_dict()` is split into its tensors, stored by a dotted path, and a JSON
skeleton that refers to them, so loading is `safetensors` + `json` and never `pickle`.

Each checkpoint directory is built under a temporary name and renamed into place whole; `latest.json` is then
replaced atomically to point at it. A reader that follows `latest.json` therefore never sees a partial checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mumic_ml.io import atomic_directory, atomic_write_json, read_json

FORMAT = "mumic-checkpoint"
FORMAT_VERSION = 1
_TENSOR_REF = "__tensor__"
_TUPLE = "__tuple__"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the current run."""


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists of tensors and plain values into a JSON skeleton and a flat tensor dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if torch.is_tensor(node):
            tensors[path] = node.detach().cpu().contiguous()
            return {_TENSOR_REF: path}
        if isinstance(node, dict):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"state at {path or '<root>'} has non-string keys")
            return {"__dict__": [[k, walk(v, f"{path}.{k}" if path else str(k))] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
            return {_TUPLE: items} if isinstance(node, tuple) else items
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path or '<root>'} in a checkpoint")

    return walk(obj, prefix), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if _TENSOR_REF in skeleton:
            return tensors[skeleton[_TENSOR_REF]]
        if _TUPLE in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton[_TUPLE])
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        raise CheckpointError(f"malformed checkpoint state: unexpected mapping keys {sorted(skeleton)}")
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class LoadedCheckpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(
    run_dir: Path,
    *,
    global_step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    run_dir = Path(run_dir)
    target = run_dir / "checkpoints" / f"step-{global_step:09d}"
    optimizer_skeleton, optimizer_tensors = flatten_state(optimizer_state)
    with atomic_directory(target) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, staging / "model.safetensors")
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
        atomic_write_json(
            staging / "state.json",
            {"format": FORMAT, "format_version": FORMAT_VERSION, "optimizer": optimizer_skeleton, **state},
        )
    atomic_write_json(run_dir / "latest.json", {"checkpoint": target.name, "global_step": global_step})
    _prune(run_dir / "checkpoints", keep=keep, protect=target.name)
    return target


def _prune(directory: Path, keep: int, protect: str) -> None:
    names = sorted(p.name for p in directory.iterdir() if _CHECKPOINT_NAME.match(p.name))
    for name in names[:-keep]:
        if name != protect:
            shutil.rmtree(directory / name, ignore_errors=True)


def discard_partial_writes(run_dir: Path) -> list[Path]:
    """Remove what a killed writer left half-done in `run_dir`: temporary files and unfinished checkpoint folders.

    Only the run's single writer calls this, before it writes anything, so nothing removed can be in use. Such
    leftovers are never read (readers follow `latest.json` only), but each can be as large as a checkpoint.
    """
    run_dir = Path(run_dir)
    removed = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        removed += [p for p in checkpoints.iterdir() if p.name.startswith(".") and p.suffix in (".staging", ".retired")]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return removed


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    try:
        name = read_json(pointer)["checkpoint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable ({exc}); delete {run_dir} to start the run afresh") from exc
    path = Path(run_dir) / "checkpoints" / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which is not on disk")
    return path


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    path = Path(path)
    files = [path / "model.safetensors", path / "optimizer.safetensors", path / "state.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    try:
        state = read_json(path / "state.json")
        optimizer_tensors = load_file(path / "optimizer.safetensors")
        model_state = load_file(path / "model.safetensors")
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        # A damaged file is refused whole (and never unpickled); safetensors' own message names no file.
        raise CheckpointError(f"checkpoint {path} is damaged: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} checkpoint")
    optimizer_state = unflatten_state(state.pop("optimizer"), optimizer_tensors)
    return LoadedCheckpoint(path, model_state, optimizer_state, state)
