"""Backbone factory: an open_clip CLIP model from a model name plus pretrained weights.

Three sources, one code path (open_clip's `create_model`), so the demo exercises exactly what real weights use:
- a model name and a pretrained tag, e.g. ``ViT-B-32`` / ``laion2b_s34b_b79k`` (downloaded by open_clip and cached;
  offline this fails with a message that says how to provide the file instead),
- a model name and a local checkpoint file (``.safetensors``, or a torch file loaded with ``weights_only=True``),
- a model name and no weights: random initialisation, e.g. the project's own small configs in ``model_configs/``.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from safetensors import SafetensorError
from torch import nn

PROJECT_MODEL_CONFIGS = Path(__file__).parent / "model_configs"
open_clip.add_model_config(PROJECT_MODEL_CONFIGS)

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class BackboneError(RuntimeError):
    """The backbone cannot be built: unknown model, unknown tag, missing or unreachable weights."""


@dataclass(frozen=True)
class ImageNorm:
    """What the model expects of its input images."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class Backbone:
    clip: nn.Module
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    image_norm: ImageNorm
    model_config: dict


def _looks_like_path(pretrained: str) -> bool:
    return pretrained.endswith(_CHECKPOINT_SUFFIXES) or "/" in pretrained or "\\" in pretrained


def resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """Check that the weights can be named before anything heavy is built; return what open_clip should load."""
    if model_name not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model {model_name!r}; known project models: "
            f"{sorted(p.stem for p in PROJECT_MODEL_CONFIGS.glob('*.json'))}, and open_clip's own "
            "(see open_clip.list_models())"
        )
    if pretrained is None:
        return None
    if _looks_like_path(pretrained) or Path(pretrained).is_file():
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneError(f"pretrained checkpoint file not found: {path}")
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise BackboneError(
            f"open_clip has no pretrained tag {pretrained!r} for {model_name!r}; known tags: {tags or 'none'}. "
            "A local checkpoint file path is also accepted."
        )
    return pretrained


class _QuietRandomInit(logging.Filter):
    """open_clip warns about random init at WARNING; here random init (or weights loaded after) is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def create_backbone(model_name: str, pretrained: str | None = None, *, device: str | torch.device = "cpu") -> Backbone:
    source = resolve_pretrained(model_name, pretrained)
    quiet = _QuietRandomInit()
    root = logging.getLogger()
    if source is None:
        root.addFilter(quiet)
    try:
        clip = open_clip.create_model(model_name, pretrained=source, device=device, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError) as exc:
        # torch's own message suggests weights_only=False, i.e. running whatever code the file carries: never.
        first_line = str(exc).partition("\n")[0][:200]
        raise BackboneError(
            f"refusing {source}: not a plain weights file (a valid safetensors file, or a torch file holding only "
            f"tensors); it is never unpickled ({type(exc).__name__}: {first_line})"
        ) from None
    except (OSError, RuntimeError, ValueError) as exc:
        if source is not None and not Path(source).is_file():
            raise BackboneError(
                f"could not load pretrained weights {model_name}/{source}: {exc}\n"
                "This machine cannot download them (offline, or HF_HUB_OFFLINE=1). Either fetch them once on a "
                "machine with network access (open_clip caches them under ~/.cache/huggingface; copy that cache "
                "here), or download the checkpoint file and set model.pretrained to its local path."
            ) from exc
        raise BackboneError(f"could not build {model_name} from {source or 'random init'}: {exc}") from exc
    finally:
        root.removeFilter(quiet)
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return Backbone(
        clip=clip,
        tokenizer=open_clip.get_tokenizer(model_name),
        image_norm=ImageNorm(int(size), tuple(cfg["mean"]), tuple(cfg["std"])),
        model_config=open_clip.get_model_config(model_name),
    )


def register_model_config(name: str, config: dict, directory: Path) -> None:
    """Make an architecture saved beside a model known to open_clip, so a model directory is self-contained."""
    if name in open_clip.list_models():
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    if not path.exists():
        path.write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(path)
