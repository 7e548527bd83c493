"""The one configuration: `params.yaml`, validated into typed, frozen objects.

DVC reads the same file for stage parameters, the CLI loads it through `load_params`, and the orchestration
builds the same objects. Unknown keys and bad values are errors that name the key's full path, because a typo in
a config file that silently falls back to a default is the most expensive kind of bug in training pipelines.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS_FILE = "params.yaml"
# `model.pretrained` value naming the project's own foundation: the checkpoint `mumic pretrain` writes under
# `paths.foundation`. Any other value is an open_clip tag or a checkpoint file.
DEMO_FOUNDATION = "demo-foundation"


class ConfigError(ValueError):
    """params.yaml is missing, malformed or holds a bad value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(_Section):
    """The procedural demo world: the bundled stand-in for a labelled photo collection."""

    n_images: int = Field(3000, ge=10)
    image_size: int = Field(64, ge=16, le=1024)
    seed: int = 0


class IngestConfig(_Section):
    max_side: int = Field(512, ge=16, description="Longer side of stored normalised images, in pixels.")
    min_side: int = Field(16, ge=1, description="Images with a shorter side below this are rejected.")
    max_pixels: int = Field(50_000_000, ge=1, description="Declared pixel count above which a file is a bomb.")
    workers: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _sides(self) -> IngestConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must not exceed max_side ({self.max_side})")
        return self


class SplitConfig(_Section):
    fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15})
    seed: int = 0

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        missing = {"train", "val", "test"} - set(value)
        if missing:
            raise ValueError(f"needs the splits train, val and test; missing {sorted(missing)}")
        if any(f <= 0 for f in value.values()):
            raise ValueError("every fraction must be positive")
        if abs(sum(value.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {sum(value.values()):.6f}")
        return value


class Head(enum.StrEnum):
    MUMIC = "mumic"  # cosine to class text embeddings, tempered sigmoid
    LINEAR = "linear"  # free linear layer on the image embedding (baseline)


class ModelConfig(_Section):
    backbone: str = Field("mumic-tiny", description="open_clip model name, e.g. ViT-B-32, or a project config.")
    pretrained: str | None = Field(
        None,
        description="open_clip pretrained tag (e.g. 'openai', 'laion2b_s34b_b79k'), a local checkpoint file, "
        f"'{DEMO_FOUNDATION}' (the checkpoint `mumic pretrain` writes under paths.foundation), or null for "
        "random initialisation.",
    )
    head: Head = Head.MUMIC
    init_temperature: float | None = Field(
        0.2, gt=0, description="Initial T of sigmoid(s / T + b); null takes it from the backbone's logit scale."
    )
    learn_temperature: bool = True
    max_inverse_temperature: float = Field(100.0, gt=1, description="Clamp on 1/T, as CLIP clamps its logit scale.")
    learn_bias: bool = False
    init_bias: float = 0.0
    class_residual: bool = Field(
        True,
        description="Learn a vector per class added to its text embedding, starting at zero (so training starts "
        "from zero-shot); classes named only at predict time use their text embedding alone.",
    )
    freeze_text: bool = Field(
        True,
        description="Keep the text tower as pretrained; the class residual adapts the trained classes "
        "(docs/results.md: tuning it learned the label noise).",
    )
    freeze_image: bool = False


class Loss(enum.StrEnum):
    TEMPERED_SIGMOID_BCE = "tempered_sigmoid_bce"
    BCE = "bce"
    ASL = "asl"


class Precision(enum.StrEnum):
    AUTO = "auto"  # bf16 autocast on CUDA where supported, fp16 with a grad scaler otherwise, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class AsymmetricLossConfig(_Section):
    gamma_neg: float = Field(2.0, ge=0)
    gamma_pos: float = Field(1.0, ge=0)
    clip: float = Field(0.05, ge=0, lt=1)


class LabelNoiseConfig(_Section):
    """Simulated annotation noise, applied to the training split only (the demo world's noisy-label setting)."""

    missing: float = Field(0.0, ge=0, lt=1, description="Probability that a true label is dropped.")
    spurious: float = Field(0.0, ge=0, lt=1, description="Probability that a false label is added.")
    seed: int = 0


class LargeLossMode(enum.StrEnum):
    """What happens to the negatives with the largest loss (Kim et al., "Large Loss Matters in Weakly Supervised
    Multi-Label Classification", CVPR 2022)."""

    REJECT = "reject"  # LL-R: left out of the loss, like an unknown label
    CORRECT = "correct"  # LL-Ct: counted as positives for that step


class LargeLossConfig(_Section):
    """A missing positive is a negative the model disagrees with, so its loss is large: each batch, the given share of
    its known entries with the largest loss among the labelled negatives is rejected or corrected. The share is
    `rate_per_epoch` x the epoch index (none in the first epoch, while the model learns the clean patterns first),
    at most `max_rate`."""

    mode: LargeLossMode | None = Field(None, description="reject | correct; null: off.")
    rate_per_epoch: float = Field(
        0.05, ge=0, le=1, description="Growth of the modified share per epoch (the paper's delta_rel)."
    )
    max_rate: float = Field(0.2, ge=0, lt=1, description="Cap on the share of a batch's entries modified.")


class WiseFtConfig(_Section):
    """WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the exported weights are
    (1 - alpha) x the starting weights + alpha x the fine-tuned ones, for every tuned tensor with a starting value
    (a linear head has none and stays fine-tuned)."""

    alpha: float | None = Field(None, ge=0, le=1, description="Mixing weight of the fine-tuned model; null: off.")
    alpha_grid: list[float] = Field(
        default_factory=list, description="Choose alpha among these by validation GAP@k (recorded in the model)."
    )

    @field_validator("alpha_grid")
    @classmethod
    def _grid(cls, values: list[float]) -> list[float]:
        if any(not 0 <= a <= 1 for a in values):
            raise ValueError(f"every alpha must be in [0, 1], got {values}")
        return values

    @model_validator(mode="after")
    def _one_way(self) -> WiseFtConfig:
        if self.alpha is not None and self.alpha_grid:
            raise ValueError("set alpha or alpha_grid, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.alpha is not None or bool(self.alpha_grid)


class PseudoLabelMode(enum.StrEnum):
    """What happens to a labelled negative that the audit's out-of-fold head scores as present."""

    POSITIVE = "positive"  # counted as a positive
    UNKNOWN = "unknown"  # left out of the loss, like an unknown label


class PseudoLabelConfig(_Section):
    """Audit pseudo-labels: before fine-tuning, every training image is scored out of fold as the label audit scores
    it (`audit.folds`, `audit.head_steps`, ...), on the image tower of the weights fine-tuning starts from, and the
    labelled negatives scored at least `min_score` become positives or unknown entries for the whole run."""

    mode: PseudoLabelMode | None = Field(None, description="positive | unknown; null: off.")
    min_score: float = Field(0.5, gt=0, lt=1, description="Out-of-fold probability from which a negative is flipped.")


class LinearProbeConfig(_Section):
    """LP-FT (Kumar et al., "Fine-tuning can distort pretrained features", ICLR 2022): before fine-tuning, the head
    alone (class residual, temperature, bias; or a linear head) is fitted to the train split's embeddings under the
    starting weights, so the first fine-tuning steps do not push the image tower towards a head that is still wrong."""

    steps: int = Field(100, ge=0, description="Full-batch AdamW steps on the frozen embeddings; 0: off.")
    lr: float = Field(3e-2, gt=0, description="Learning rate of those steps.")


class TrainConfig(_Section):
    loss: Loss = Loss.ASL
    asl: AsymmetricLossConfig = AsymmetricLossConfig()
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1)
    accumulation_steps: int = Field(1, ge=1)
    lr_image: float = Field(5e-4, ge=0, description="Peak learning rate of the image tower.")
    lr_text: float = Field(5e-4, ge=0, description="Peak learning rate of the text tower.")
    lr_head: float = Field(
        3e-2, ge=0, description="Peak learning rate of temperature, bias, class residual and a linear head."
    )
    weight_decay: float = Field(0.05, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    min_lr_fraction: float = Field(0.05, ge=0, le=1, description="Cosine floor as a fraction of the peak.")
    grad_clip_norm: float | None = Field(1.0, gt=0)
    precision: Precision = Precision.AUTO
    channels_last: bool = True
    compile: bool = False
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    deterministic: bool = True
    hflip: bool = True
    early_stopping_patience: int | None = Field(5, ge=1, description="Epochs without a val GAP@10 gain.")
    checkpoint_every_steps: int | None = Field(None, ge=1, description="Also checkpoint mid-epoch.")
    keep_checkpoints: int = Field(2, ge=1)
    held_out_classes: list[str] = Field(
        default_factory=list, description="Classes removed from training labels, kept for zero-shot evaluation."
    )
    label_noise: LabelNoiseConfig = LabelNoiseConfig()
    partial_labels: bool = Field(
        False,
        description="Leave a manifest's unknown_labels out of the loss (masked); false counts them as negatives.",
    )
    large_loss: LargeLossConfig = LargeLossConfig()
    pseudo_labels: PseudoLabelConfig = PseudoLabelConfig()
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    wise_ft: WiseFtConfig = WiseFtConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


class ContrastiveLoss(enum.StrEnum):
    CLIP = "clip"  # symmetric InfoNCE over the batch (open_clip.ClipLoss)
    SIGLIP = "siglip"  # sigmoid loss on every image-caption pair, with a learned bias (open_clip.SigLipLoss)


class FoundationRefresh(enum.StrEnum):
    """When the foundation step pretrains again instead of reusing the checkpoint it already has."""

    CONFIG = "config"  # only when model.backbone or the pretrain recipe changed: new batches reuse the foundation
    DATA = "data"  # also when the train split changed (every new batch pretrains from scratch)
    ALWAYS = "always"  # on every run


class PretrainConfig(_Section):
    """Contrastive image-caption pretraining of `model.backbone`: the demo world's stand-in for CLIP weights."""

    refresh: FoundationRefresh = Field(
        FoundationRefresh.CONFIG, description="When to pretrain again rather than reuse the existing foundation."
    )
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2, description="Images per step; the other captions of the batch are the negatives.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    min_lr_fraction: float = Field(0.02, ge=0, le=1, description="Cosine floor as a fraction of the peak.")
    grad_clip_norm: float | None = Field(1.0, gt=0)
    loss: ContrastiveLoss = ContrastiveLoss.CLIP
    seed: int = 0
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    precision: Precision = Precision.AUTO
    hflip: bool = Field(True, description="Captions never say left or right, so mirrored images keep them true.")

    _device = field_validator("device")(TrainConfig._device.__func__)

    def recipe(self) -> dict[str, Any]:
        """The settings that shape the weights; `refresh` only says when to apply them."""
        return self.model_dump(mode="json", exclude={"refresh"})


class EvaluateConfig(_Section):
    k: int = Field(10, ge=1)
    top_n_classes: int = Field(20, ge=1, description="mAP is also reported over this many most frequent classes.")
    batch_size: int = Field(256, ge=1)


class AuditBackbone(enum.StrEnum):
    """Whose image tower embeds the training images for the label audit."""

    FOUNDATION = "foundation"  # the weights fine-tuning starts from: they never saw a label
    MODEL = "model"  # the fine-tuned model's tower: trained on the labels being audited


class AuditConfig(_Section):
    """The label audit (`mumic audit`, asset label_audit): out-of-fold scores of the training images by k-fold
    cross-fitting of a linear head on frozen image embeddings."""

    folds: int = Field(5, ge=2, description="Each image is scored by a head fitted on the other folds.")
    seed: int = Field(0, description="How images are dealt into folds.")
    backbone: AuditBackbone = Field(
        AuditBackbone.FOUNDATION, description="foundation (never saw a label) or model (the fine-tuned tower)."
    )
    head_steps: int = Field(300, ge=1, description="Full-batch Adam steps of each fold's linear head.")
    head_lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-3, ge=0, description="L2 penalty on the head's weights.")
    batch_size: int = Field(256, ge=1, description="Images per forward pass when embedding.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N' for the embeddings.")
    suspects: int = Field(1000, ge=1, description="Suspects of each kind written to suspects.csv.")
    report_rows: int = Field(200, ge=1, description="Suspects of each kind shown in report.html.")

    _device = field_validator("device")(TrainConfig._device.__func__)


class PredictConfig(_Section):
    top_k: int = Field(5, ge=1)
    threshold: float | None = Field(None, ge=0, le=1, description="Keep labels above this probability.")
    batch_size: int = Field(64, ge=1)


class TagConfig(_Section):
    """`mumic tag` and the catalogue_tags asset: an unlabelled collection tagged in chunks a killed run resumes."""

    top_k: int = Field(5, ge=1)
    threshold: float | None = Field(
        None, ge=0, le=1, description="One probability cut for every class; null: the model's tuned thresholds."
    )
    batch_size: int = Field(64, ge=1)
    workers: int | None = Field(
        None,
        ge=0,
        description="Decoding processes beside the model; 0 decodes in its process; null: none on a CPU, where the "
        "lanes decode beside each other's forward passes, and one per spare core (at most 4) on a GPU.",
    )
    chunk_size: int = Field(2048, ge=1, description="Images per committed part: the most a killed run redoes.")


class ExpectationsConfig(_Section):
    """The Great Expectations suite over the ingested manifest (`mumic validate`, asset validated_labels)."""

    min_labels_per_image: int = Field(1, ge=0)
    max_labels_per_image: int = Field(30, ge=1)
    min_positives_per_class: int = Field(5, ge=0, description="Classes with fewer images are flagged.")
    min_positives_blocking: bool = Field(False, description="A rare class stops the run (default: a warning).")

    @model_validator(mode="after")
    def _label_range(self) -> ExpectationsConfig:
        if self.min_labels_per_image > self.max_labels_per_image:
            raise ValueError(
                f"min_labels_per_image ({self.min_labels_per_image}) must not exceed "
                f"max_labels_per_image ({self.max_labels_per_image})"
            )
        return self


class GateConfig(_Section):
    """What a model must show on the test split before it is registered or promoted."""

    min_gap_at_10: float = Field(0.5, ge=0, le=1, description="Absolute GAP@10 floor.")
    champion_tolerance: float = Field(0.0, ge=0, le=1, description="How far below the champion still passes.")


class MlflowConfig(_Section):
    """Embedded default store; the MLFLOW_TRACKING_URI environment variable, and before it a store the Dagster
    `mlflow` resource names, win over `tracking_uri`."""

    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: Path = Path("mlartifacts")
    experiment: str = "mumic"
    registered_model: str = "mumic"


class ScheduleConfig(_Section):
    retrain_cron: str = Field("0 3 * * 1", description="When retrain_schedule runs (cron, in `timezone`).")
    timezone: str = "UTC"

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError(f"must be a 5-field cron expression, got {value!r}")
        return value


class PathsConfig(_Section):
    """Where each step reads and writes, relative to the repository root."""

    demo: Path = Path("data/incoming/demo")
    ingested: Path = Path("data/ingested")
    splits: Path = Path("data/splits")
    cache: Path = Path(".cache/preprocess")
    run: Path = Path("runs/train")
    model: Path = Path("models/mumic")
    foundation: Path = Path("models/foundation")
    reports: Path = Path("reports")
    incoming: Path = Path("data/incoming")
    taxonomy: Path = Path("data/incoming/demo/taxonomy.yaml")
    validation: Path = Path("reports/validation")
    unlabelled: Path = Path("data/unlabelled")


class Params(_Section):
    demo: DemoConfig = DemoConfig()
    ingest: IngestConfig = IngestConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    audit: AuditConfig = AuditConfig()
    predict: PredictConfig = PredictConfig()
    tag: TagConfig = TagConfig()
    expectations: ExpectationsConfig = ExpectationsConfig()
    gate: GateConfig = GateConfig()
    mlflow: MlflowConfig = MlflowConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    paths: PathsConfig = PathsConfig()

    @model_validator(mode="after")
    def _loss_matches_head(self) -> Params:
        if self.train.loss is Loss.TEMPERED_SIGMOID_BCE and self.model.head is not Head.MUMIC:
            raise ValueError("train.loss 'tempered_sigmoid_bce' needs model.head 'mumic'")
        if self.train.loss is Loss.BCE and self.model.head is Head.MUMIC:
            raise ValueError("model.head 'mumic' trains with train.loss 'tempered_sigmoid_bce' (or 'asl'), not 'bce'")
        towers_frozen = self.model.freeze_image and self.model.freeze_text
        head_fixed = self.model.head is Head.MUMIC and not (self.model.learn_temperature or self.model.learn_bias)
        if towers_frozen and head_fixed:
            raise ValueError("nothing to train: both towers frozen and no learned temperature or bias")
        return self

    def updated(self, overrides: dict[str, Any]) -> Params:
        """A copy with dotted-key overrides applied ({'train.epochs': 2}), validated like the file."""
        data = self.model_dump(mode="json")
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if not isinstance(node.get(key), dict):
                    raise ConfigError(f"unknown parameter {dotted!r}")
                node = node[key]
            if leaf not in node:
                raise ConfigError(f"unknown parameter {dotted!r}")
            node[leaf] = value
        return params_from_dict(data, source="overrides")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"  {where}: {message}")
    return f"{source}: invalid configuration\n" + "\n".join(lines)


def params_from_dict(data: Any, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_params(path: str | Path) -> Params:
    """Load params.yaml. A missing file is an error, never the defaults: a command started outside the project
    would otherwise train from random initialisation on a schedule nobody configured."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file not found: {path.absolute()}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return params_from_dict(data, source=str(path))
