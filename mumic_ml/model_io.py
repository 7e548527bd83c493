"""Build classifiers from the config, and save/load them as self-contained model directories.

A model directory holds `model.json` (architecture, classes and their prompts, preprocessing, thresholds, the
post-hoc calibration, training metadata), `model.safetensors` (all weights), `architecture/<name>.json` (the
open_clip model config, so a directory trained on a project architecture loads anywhere) and `seen_images.txt`
(the sha256 of every image the model trained or chose its epoch on, so the evaluation gate can prove a test split
holds none of them). Nothing in it is a pickle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mumic_ml.backbone import Backbone, ImageNorm, create_backbone, register_model_config
from mumic_ml.calibration import Calibration
from mumic_ml.config import Head, ModelConfig
from mumic_ml.io import atomic_directory, atomic_write_json, read_json
from mumic_ml.model import LinearClassifier, MumicClassifier
from mumic_ml.taxonomy import Taxonomy, save_taxonomy

MODEL_FORMAT = "mumic-model"
MODEL_FORMAT_VERSION = 1
SEEN_IMAGES_FILE = "seen_images.txt"


class ModelDirError(RuntimeError):
    """A model directory is missing, incomplete or of an unknown format."""


def build_classifier(
    cfg: ModelConfig, class_prompts: list[list[str]], backbone: Backbone
) -> MumicClassifier | LinearClassifier:
    if cfg.head is Head.MUMIC:
        return MumicClassifier(
            backbone.clip,
            backbone.tokenizer,
            class_prompts,
            init_temperature=cfg.init_temperature,
            learn_temperature=cfg.learn_temperature,
            max_inverse_temperature=cfg.max_inverse_temperature,
            learn_bias=cfg.learn_bias,
            init_bias=cfg.init_bias,
            class_residual=cfg.class_residual,
            freeze_text=cfg.freeze_text,
            freeze_image=cfg.freeze_image,
        )
    return LinearClassifier(
        backbone.clip, len(class_prompts), backbone.model_config["embed_dim"], freeze_image=cfg.freeze_image
    )


def weight_space_ensemble(
    classifier: nn.Module, start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models"): (1 - alpha) x start + alpha x tuned for
    every floating-point tensor, so alpha 0 is the model fine-tuning started from and alpha 1 the fine-tuned one.

    A linear head starts from random weights, not from a zero-shot model, so it has nothing to ensemble with and
    keeps its tuned weights; the MuMIC head's temperature, bias and class residual start at the zero-shot model's.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if set(start) != set(tuned):
        raise ValueError(f"start and tuned weights differ in their tensors: {sorted(set(start) ^ set(tuned))[:5]}")
    keep_tuned = ("head.",) if isinstance(classifier, LinearClassifier) else ()
    mixed = {}
    for name, value in tuned.items():
        if not value.is_floating_point() or name.startswith(keep_tuned):
            mixed[name] = value
            continue
        base = start[name].to(device=value.device, dtype=value.dtype)
        mixed[name] = torch.lerp(base, value, alpha) if 0 < alpha < 1 else (value if alpha == 1 else base).clone()
    return mixed


@dataclass
class LoadedModel:
    classifier: MumicClassifier | LinearClassifier
    image_norm: ImageNorm
    class_names: list[str]
    default_prompts: list[str]
    thresholds: np.ndarray | None
    embedding_dim: int
    metadata: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration = field(default_factory=Calibration)

    @property
    def supports_zero_shot(self) -> bool:
        return isinstance(self.classifier, MumicClassifier)

    @property
    def calibrated_thresholds(self) -> np.ndarray | None:
        """The tuned thresholds on the calibrated scale: each selects the same labels from the calibrated
        probabilities as its raw threshold does from the raw ones."""
        return None if self.thresholds is None else self.calibration.apply(self.thresholds)


def save_model_dir(
    out_dir: Path,
    *,
    classifier: nn.Module,
    backbone_name: str,
    backbone_config: dict,
    model_cfg: ModelConfig,
    image_norm: ImageNorm,
    taxonomy: Taxonomy,
    class_names: list[str],
    class_prompts: list[list[str]],
    thresholds: np.ndarray | None,
    metadata: dict[str, Any],
    seen_images: Iterable[str] | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """Write the directory under a temporary name and swap it in whole: readers never see half a model.

    `seen_images` (sha256 hashes) is written to `seen_images.txt`; None writes no record (the model's training
    data is unknown, as for foundation weights scored zero-shot). `calibration` is stored in `model.json`; None
    stores none, which loads as the identity.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        if seen_images is not None:
            (staging / SEEN_IMAGES_FILE).write_text("".join(f"{sha}\n" for sha in sorted(set(seen_images))))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()},
            staging / "model.safetensors",
        )
        (staging / "architecture").mkdir()
        atomic_write_json(staging / "architecture" / f"{backbone_name}.json", backbone_config)
        save_taxonomy(taxonomy, staging / "taxonomy.yaml")
        atomic_write_json(
            staging / "model.json",
            {
                "format": MODEL_FORMAT,
                "format_version": MODEL_FORMAT_VERSION,
                "backbone": backbone_name,
                "model": model_cfg.model_dump(mode="json"),
                "image_norm": {"size": image_norm.size, "mean": list(image_norm.mean), "std": list(image_norm.std)},
                "class_names": class_names,
                "class_prompts": class_prompts,
                "default_prompts": list(taxonomy.default_prompts),
                "thresholds": None if thresholds is None else [_finite_or_none(t) for t in thresholds],
                "metadata": metadata,
                **({} if calibration is None else {"calibration": calibration.to_json()}),
            },
        )
    return out_dir


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def read_seen_images(model_dir: str | Path) -> frozenset[str] | None:
    """The images a model directory records it trained on; None when it keeps no record."""
    path = Path(model_dir) / SEEN_IMAGES_FILE
    if not path.is_file():
        return None
    return frozenset(line for line in path.read_text(encoding="ascii").splitlines() if line)


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    spec_path = path / "model.json"
    weights_path = path / "model.safetensors"
    if not spec_path.is_file() or not weights_path.is_file():
        raise ModelDirError(f"{path} is not a MuMIC model directory (needs model.json and model.safetensors)")
    spec = read_json(spec_path)
    if spec.get("format") != MODEL_FORMAT or spec.get("format_version") != MODEL_FORMAT_VERSION:
        raise ModelDirError(f"{spec_path}: unknown format {spec.get('format')!r} v{spec.get('format_version')!r}")
    name = spec["backbone"]
    arch_file = path / "architecture" / f"{name}.json"
    if arch_file.is_file():
        register_model_config(name, read_json(arch_file), arch_file.parent)
    # Directories written before the class residual existed have no such weights.
    cfg = ModelConfig.model_validate({"class_residual": False, **spec["model"], "pretrained": None})
    backbone = create_backbone(name, None, device="cpu")
    classifier = build_classifier(cfg, spec["class_prompts"], backbone)
    try:
        state = load_file(weights_path)
    except SafetensorError as exc:
        raise ModelDirError(f"{weights_path} is not a valid safetensors file (it is never unpickled): {exc}") from None
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelDirError(f"{weights_path} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    classifier.to(device).eval()
    norm = spec["image_norm"]
    thresholds = spec.get("thresholds")
    return LoadedModel(
        classifier=classifier,
        image_norm=ImageNorm(int(norm["size"]), tuple(norm["mean"]), tuple(norm["std"])),
        class_names=list(spec["class_names"]),
        default_prompts=list(spec["default_prompts"]),
        thresholds=None if thresholds is None else np.array([np.inf if t is None else t for t in thresholds]),
        embedding_dim=int(backbone.model_config["embed_dim"]),
        metadata=spec.get("metadata", {}),
        calibration=Calibration.from_json(spec.get("calibration")),
    )
