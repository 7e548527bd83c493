"""Training data: split manifests to label matrices, cached uint8 images, deterministic batch order.

Images travel as uint8 HWC arrays from the preprocessing cache and are converted to normalised float tensors on
the training device (`prepare_images`): a quarter of the bytes through the loader, and the arithmetic happens on
the accelerator instead of in loader workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mumic_ml.backbone import ImageNorm
from mumic_ml.images import PreprocessCache

# Below this many bytes a split is held in memory after the first pass; above it, items stream from the cache.
PRELOAD_LIMIT_BYTES = 2 * 1024**3
# Stride between the parts of a built seed: within one run seed, epochs and batches below it never share a seed.
SEED_STRIDE = 1_000_003


def batch_seed(seed: int, epoch: int, *, batch: int | None = None) -> int:
    """The random seed of an epoch's batch order, or of one batch's flips when `batch` is given.

    A pure function of its arguments: a resumed run draws exactly the batches and flips of an uninterrupted one,
    and pretraining with the same seed writes the same bytes. Changing it changes every seeded run's numbers.
    """
    epoch_seed = seed * SEED_STRIDE + epoch
    return epoch_seed if batch is None else epoch_seed * SEED_STRIDE + batch


def read_split(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split manifest not found: {path}")
    frame = pd.read_parquet(path)
    missing = {"path", "sha256", "labels"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return frame


def data_fingerprint(frames: Mapping[str, pd.DataFrame]) -> str:
    """Identifies the exact images and labels of every split, independent of file locations."""
    digest = hashlib.sha256()
    for name in sorted(frames):
        frame = frames[name]
        digest.update(name.encode())
        for sha, labels in zip(frame["sha256"], frame["labels"]):
            digest.update(f"{sha}:{'|'.join(sorted(labels))};".encode())
    return digest.hexdigest()


def label_matrix(label_lists: Sequence[Sequence[str]], class_names: Sequence[str]) -> np.ndarray:
    """Multi-hot float32 matrix; labels outside `class_names` (e.g. held-out classes) are left out on purpose."""
    index = {name: i for i, name in enumerate(class_names)}
    matrix = np.zeros((len(label_lists), len(class_names)), dtype=np.float32)
    for row, labels in enumerate(label_lists):
        for label in labels:
            col = index.get(label)
            if col is not None:
                matrix[row, col] = 1.0
    return matrix


def split_targets(frame: pd.DataFrame, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A split's multi-hot targets and the mask of known entries (bool, images x classes).

    An entry is known when the image lists the class in `labels` (positive) or not in `unknown_labels` (negative,
    verified or simply not listed); a class in `unknown_labels` is unknown and its target 0, so a caller that
    ignores the mask counts it as a negative. Without an `unknown_labels` column every entry is known.
    """
    targets = label_matrix(frame["labels"], class_names)
    if "unknown_labels" not in frame.columns:
        return targets, np.ones(targets.shape, dtype=bool)
    return targets, label_matrix(frame["unknown_labels"], class_names) == 0


class CachedImageDataset(Dataset):
    """(uint8 HxWx3 tensor, target vector, known mask) triples read through the preprocessing cache.

    `known` (bool, as `split_targets` builds it) defaults to every entry known.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        root: Path,
        targets: np.ndarray,
        cache: PreprocessCache,
        size: int,
        preload: bool | None = None,
        known: np.ndarray | None = None,
    ) -> None:
        if len(frame) != len(targets):
            raise ValueError(f"{len(frame)} images but {len(targets)} target rows")
        if known is not None and np.shape(known) != np.shape(targets):
            raise ValueError(f"known mask of shape {np.shape(known)} for targets of shape {np.shape(targets)}")
        self.paths = [str(Path(root) / p) for p in frame["path"]]
        self.shas = list(frame["sha256"])
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.known = (
            torch.ones(self.targets.shape, dtype=torch.bool)
            if known is None
            else torch.from_numpy(np.ascontiguousarray(known, dtype=bool))
        )
        self.cache = cache
        self.size = size
        if preload is None:
            preload = len(self.paths) * size * size * 3 <= PRELOAD_LIMIT_BYTES
        self.images: torch.Tensor | None = None
        if preload:
            # Filled in place: stacking a list of arrays held every image twice at the peak.
            images = np.empty((len(self.paths), size, size, 3), dtype=np.uint8)
            for i in range(len(self.paths)):
                images[i] = self._read(i)
            self.images = torch.from_numpy(images)

    def _read(self, i: int) -> np.ndarray:
        return self.cache.get(self.paths[i], self.shas[i], self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.images[i] if self.images is not None else torch.from_numpy(self._read(i))
        return image, self.targets[i], self.known[i]


def epoch_batches(
    n_items: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1, shuffle: bool = True
) -> list[list[int]]:
    """The batches of one epoch for one rank: a pure function of (seed, epoch), so a resumed run replays it exactly.

    Every rank sees the same permutation and takes an interleaved share; incomplete trailing batches are dropped
    when shuffling (training) so every step has the same shape, and kept otherwise (evaluation).
    """
    if shuffle:
        generator = torch.Generator().manual_seed(batch_seed(seed, epoch))
        order = torch.randperm(n_items, generator=generator).tolist()
    else:
        order = list(range(n_items))
    share = order[rank::world_size]
    if shuffle and world_size > 1:
        # Equal step counts on every rank, or DDP's collectives would wait forever on the longer one.
        share = share[: n_items // world_size]
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    if shuffle and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


@dataclass(frozen=True)
class ImagePreparer:
    """uint8 NHWC batch -> normalised float NCHW on the device, with optional seeded horizontal flips."""

    norm: ImageNorm
    device: torch.device
    channels_last: bool = False

    def __call__(self, images: torch.Tensor, flip_generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        if flip_generator is not None:
            flip = torch.rand(x.shape[0], generator=flip_generator) < 0.5
            x = torch.where(flip.to(self.device)[:, None, None, None], x.flip(-1), x)
        mean = torch.tensor(self.norm.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.norm.std, device=self.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
