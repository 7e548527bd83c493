"""Classifiers on an open_clip backbone: MuMIC's text-embedding head and the linear-head baseline.

MuMIC scores image i against class c by the cosine s_ic = <v_i, w_c> between the L2-normalised image embedding
and the class text embedding, then p_ic = sigmoid(s_ic / T + b). The class matrix W is recomputed from the text
tower during training (C prompts are cheap) so the class embeddings move into the domain with the image tower,
and is cached while the model is in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClassifierOutput:
    logits: torch.Tensor  # N x C, the input of the sigmoid
    image_features: torch.Tensor  # N x d, L2-normalised
    similarity: torch.Tensor | None = None  # N x C cosines (MuMIC head only)
    temperature: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _text_tower(clip: nn.Module) -> nn.Module:
    """The module holding the text transformer: the CLIP itself, or `clip.text` for custom-text models."""
    return clip.text if hasattr(clip, "text") else clip


def _can_trim(tower: nn.Module) -> bool:
    """Trimming padding is exact only for a causal, argmax/eos-pooled transformer without an appended CLS token."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        hasattr(tower, "token_embedding")
        and getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
        and pool in ("argmax", "eos")
    )


def tokenize_prompts(tokenizer, prompts: Sequence[str], clip: nn.Module) -> torch.Tensor:
    """Token ids cut to the longest real prompt instead of the full context.

    Class prompts are a handful of tokens; padding them to 77 makes the text tower a quarter of a training step.
    With a causal mask the pooled end-of-text position never attends to padding, so the embeddings are unchanged
    (tests/test_model.py checks this against the full-context encoding).
    """
    tokens = tokenizer(list(prompts))
    if not _can_trim(_text_tower(clip)):
        return tokens
    length = int((tokens != 0).sum(dim=1).max())
    return tokens[:, :length].contiguous()


def encode_text(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text encoding (unnormalised), accepting sequences shorter than the context length."""
    tower = _text_tower(clip)
    if not _can_trim(tower) or tokens.shape[1] == tower.positional_embedding.shape[0]:
        return clip.encode_text(tokens)
    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    if getattr(tower, "text_pool_type", getattr(tower, "pool_type", None)) == "eos":
        eos = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        index = (tokens == eos).int().argmax(dim=-1)
    else:
        index = tokens.argmax(dim=-1)
    x = x[torch.arange(x.shape[0], device=x.device), index]
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def text_parameters(clip: nn.Module) -> list[nn.Parameter]:
    visual = {id(p) for p in clip.visual.parameters()}
    skip = {id(getattr(clip, name)) for name in ("logit_scale", "logit_bias") if getattr(clip, name, None) is not None}
    return [p for p in clip.parameters() if id(p) not in visual and id(p) not in skip]


def _disable_clip_logit_params(clip: nn.Module) -> None:
    """CLIP's own contrastive scale/bias are unused here; frozen so DDP does not wait for their gradients."""
    for name in ("logit_scale", "logit_bias"):
        param = getattr(clip, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)


class MumicClassifier(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        tokenizer,
        prompts_per_class: Sequence[Sequence[str]],
        *,
        init_temperature: float | None = 0.07,
        learn_temperature: bool = True,
        max_inverse_temperature: float = 100.0,
        learn_bias: bool = False,
        init_bias: float = 0.0,
        class_residual: bool = False,
        freeze_text: bool = False,
        freeze_image: bool = False,
    ) -> None:
        super().__init__()
        if not prompts_per_class or any(len(p) == 0 for p in prompts_per_class):
            raise ValueError("every class needs at least one prompt")
        self.clip = clip
        self.tokenizer = tokenizer
        _disable_clip_logit_params(clip)
        flat = [text for prompts in prompts_per_class for text in prompts]
        owner = [c for c, prompts in enumerate(prompts_per_class) for _ in prompts]
        self.register_buffer("prompt_tokens", tokenize_prompts(tokenizer, flat, clip), persistent=False)
        self.register_buffer("prompt_owner", torch.tensor(owner, dtype=torch.long), persistent=False)
        self.num_classes = len(prompts_per_class)
        if init_temperature is None:
            log_inv_t = float(clip.logit_scale.detach().reshape(-1)[0])
        else:
            log_inv_t = math.log(1.0 / init_temperature)
        self.log_inv_temperature = nn.Parameter(torch.tensor(log_inv_t), requires_grad=learn_temperature)
        self.bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn_bias)
        self.max_log_inv_temperature = math.log(max_inverse_temperature)
        # W = text embedding + a free residual per class: each class can move (and scale) away from its prompt as
        # fast as a linear head, while the text tower, frozen or tuned, still scores new names (docs/results.md).
        self.class_residual = nn.Parameter(torch.zeros(self.num_classes, _embed_dim(clip))) if class_residual else None
        self.freeze_text = freeze_text
        if freeze_text:
            for p in text_parameters(clip):
                p.requires_grad_(False)
        if freeze_image:
            for p in clip.visual.parameters():
                p.requires_grad_(False)
        self._class_cache: torch.Tensor | None = None

    def train(self, mode: bool = True) -> MumicClassifier:
        # Weights can only have changed if we are or were training; eval() on an eval model keeps the cache.
        if mode or self.training:
            self._class_cache = None
        return super().train(mode)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_inv_temperature.clamp(max=self.max_log_inv_temperature).neg().exp()

    def _pool_classes(self, prompt_features: torch.Tensor, owner: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Average the normalised prompt embeddings of each class and renormalise: one row of W per class."""
        prompt_features = F.normalize(prompt_features.float(), dim=-1)
        summed = torch.zeros(n_classes, prompt_features.shape[1], device=prompt_features.device)
        summed.index_add_(0, owner, prompt_features)
        return F.normalize(summed, dim=-1)

    def class_features(self) -> torch.Tensor:
        """W (C x d): the pooled text embeddings, recomputed with gradients while training the text tower and
        cached otherwise, plus the class residual."""
        trainable_text = self.training and not self.freeze_text
        if trainable_text:
            text = self._pool_classes(encode_text(self.clip, self.prompt_tokens), self.prompt_owner, self.num_classes)
        else:
            if self._class_cache is None:
                with torch.no_grad():
                    self._class_cache = self._pool_classes(
                        encode_text(self.clip, self.prompt_tokens), self.prompt_owner, self.num_classes
                    )
            text = self._class_cache
        return text if self.class_residual is None else text + self.class_residual

    @torch.no_grad()
    def encode_class_prompts(self, prompts_per_class: Sequence[Sequence[str]]) -> torch.Tensor:
        """W rows for classes given only by their prompts: zero-shot scoring of names never trained on."""
        flat = [text for prompts in prompts_per_class for text in prompts]
        owner = torch.tensor([c for c, p in enumerate(prompts_per_class) for _ in p], device=self.prompt_owner.device)
        tokens = tokenize_prompts(self.tokenizer, flat, self.clip).to(self.prompt_tokens.device)
        return self._pool_classes(encode_text(self.clip, tokens), owner, len(prompts_per_class))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def forward(self, images: torch.Tensor, extra_class_features: torch.Tensor | None = None) -> ClassifierOutput:
        return self.score_features(self.image_features(images), extra_class_features)

    def score_features(self, v: torch.Tensor, extra_class_features: torch.Tensor | None = None) -> ClassifierOutput:
        """Scores from normalised image embeddings: what fitting the head on frozen embeddings trains."""
        w = self.class_features()
        if extra_class_features is not None:
            w = torch.cat([w, extra_class_features.to(w)], dim=0)
        similarity = v @ w.T
        temperature = self.temperature
        logits = similarity / temperature + self.bias
        return ClassifierOutput(logits, v, similarity, temperature, self.bias)


class LinearClassifier(nn.Module):
    """Baseline: a free linear layer on the normalised image embedding; the text tower is not used."""

    def __init__(self, clip: nn.Module, num_classes: int, embed_dim: int, *, freeze_image: bool = False) -> None:
        super().__init__()
        self.clip = clip
        self.num_classes = num_classes
        _disable_clip_logit_params(clip)
        for p in text_parameters(clip):
            p.requires_grad_(False)
        if freeze_image:
            for p in clip.visual.parameters():
                p.requires_grad_(False)
        self.head = nn.Linear(embed_dim, num_classes)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def forward(self, images: torch.Tensor, extra_class_features: torch.Tensor | None = None) -> ClassifierOutput:
        return self.score_features(self.image_features(images), extra_class_features)

    def score_features(self, v: torch.Tensor, extra_class_features: torch.Tensor | None = None) -> ClassifierOutput:
        if extra_class_features is not None:
            raise ValueError("a linear-head model has no text tower: it cannot score classes zero-shot")
        return ClassifierOutput(self.head(v), v)


def _embed_dim(clip: nn.Module) -> int:
    projection = getattr(clip, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return int(projection.shape[-1])
    return int(clip.visual.output_dim)
