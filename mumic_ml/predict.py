"""Prediction and embedding export with a trained model directory (`mumic predict`, `mumic embed`).

Images are decoded by the same defensive decoder as ingestion and preprocessed exactly as the training cache
was built (shorter side resized, centre crop), so scores at serving time match scores at evaluation time. Scores
are the sigmoid probabilities after the model directory's post-hoc calibration (`mumic_ml.calibration`; none for a
directory written before it existed), so `threshold` cuts the numbers the caller sees.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mumic_ml.data import ImagePreparer
from mumic_ml.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, resize_center_crop
from mumic_ml.model_io import LoadedModel, load_model_dir
from mumic_ml.taxonomy import class_prompts, normalise_label

ImageSource = str | os.PathLike | bytes


@dataclass
class Prediction:
    image: str
    labels: list[str]
    scores: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image": self.image, "labels": self.labels, "scores": self.scores}
        if self.error is not None:
            out["error"] = self.error
        return out


class Predictor:
    """A loaded model plus its preprocessing; `predict` never fails the whole batch for one bad image."""

    def __init__(self, model: LoadedModel, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        self.model = model
        self.device = torch.device(device)
        self.model.classifier.to(self.device).eval()
        self.preparer = ImagePreparer(model.image_norm, self.device)
        self.batch_size = batch_size

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", batch_size: int = 64) -> Predictor:
        return cls(load_model_dir(model_dir, device=device), device=device, batch_size=batch_size)

    @property
    def embedding_dim(self) -> int:
        return self.model.embedding_dim

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    def extra_class_features(self, extra_classes: Sequence[str]) -> tuple[list[str], torch.Tensor | None]:
        known = {normalise_label(n) for n in self.model.class_names}
        extra = [n.strip() for n in extra_classes if n.strip() and normalise_label(n) not in known]
        extra = list(dict.fromkeys(extra))
        if not extra:
            return [], None
        if not self.model.supports_zero_shot:
            raise ValueError("this model has a linear head and cannot score extra classes zero-shot")
        prompts = [class_prompts(name, self.model.default_prompts) for name in extra]
        return extra, self.model.classifier.encode_class_prompts(prompts)

    def _load(self, source: ImageSource) -> np.ndarray:
        img = decode_image(source, max_pixels=DEFAULT_MAX_PIXELS, min_side=1)
        return resize_center_crop(img, self.model.image_norm.size)

    def _batches(
        self, images: Sequence[ImageSource], errors: list[str | None]
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Model-ready batches with the indices they hold; unreadable images are skipped and noted in `errors`."""
        for start in range(0, len(images), self.batch_size):
            arrays, rows = [], []
            for i in range(start, min(start + self.batch_size, len(images))):
                try:
                    arrays.append(self._load(images[i]))
                    rows.append(i)
                except ImageRejected as exc:
                    errors[i] = f"{exc.reason}: {exc}"
            if arrays:
                yield rows, self.preparer(torch.from_numpy(np.stack(arrays)))

    @torch.no_grad()
    def probabilities(
        self, images: Sequence[ImageSource], extra_classes: Sequence[str] = ()
    ) -> tuple[list[str], np.ndarray, list[str | None]]:
        """Class names, an N x C matrix of calibrated probabilities (NaN rows for unreadable images) and per-image
        errors.

        The model directory's calibration (fitted on the trained classes' validation scores) applies to every
        column, extra classes included: it is one increasing map for all, so it never reorders classes.
        """
        names, extra = self.extra_class_features(extra_classes)
        all_names = self.class_names + names
        probs = np.full((len(images), len(all_names)), np.nan, dtype=np.float32)
        errors: list[str | None] = [None] * len(images)
        for rows, batch in self._batches(images, errors):
            out = self.model.classifier(batch, extra)
            probs[rows] = torch.sigmoid(out.logits.float()).cpu().numpy()
        return all_names, self.model.calibration.apply(probs), errors

    def predict(
        self,
        images: Sequence[ImageSource],
        *,
        top_k: int = 5,
        threshold: float | None = None,
        extra_classes: Sequence[str] = (),
    ) -> list[Prediction]:
        names, probs, errors = self.probabilities(images, extra_classes)
        results = []
        for i, source in enumerate(images):
            label = "<bytes>" if isinstance(source, bytes) else str(source)
            if errors[i] is not None:
                results.append(Prediction(label, [], [], errors[i]))
                continue
            order = np.argsort(-probs[i], kind="stable")[:top_k]
            if threshold is not None:
                order = [j for j in order if probs[i, j] >= threshold]
            results.append(Prediction(label, [names[j] for j in order], [round(float(probs[i, j]), 6) for j in order]))
        return results

    @torch.no_grad()
    def embed(self, images: Sequence[ImageSource]) -> tuple[np.ndarray, list[str | None]]:
        """L2-normalised image embeddings (N x d; NaN rows for unreadable images) for search and de-duplication."""
        errors: list[str | None] = [None] * len(images)
        matrix = np.full((len(images), self.embedding_dim), np.nan, dtype=np.float32)
        for rows, batch in self._batches(images, errors):
            matrix[rows] = self.model.classifier.image_features(batch).float().cpu().numpy()
        return matrix, errors
