"""Image files decoded in batches ahead of a model, by worker processes that import no more than Pillow and numpy.

A worker is spawned, not forked (its parent holds torch's threads, and maybe Dagster's, whose locks a forked child
would inherit), so what it imports is paid at every start: this module keeps it to the decoder, not torch or
open_clip. Decoding and preprocessing are `mumic predict`'s, so the arrays are the ones it would score.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from typing import NamedTuple

import numpy as np

from mumic_ml.images import DEFAULT_MAX_PIXELS, ImageRejected, decode_image, resize_center_crop


class ImageEntry(NamedTuple):
    key: str  # the image's name in an output: its path under a folder, or as a manifest writes it
    path: str  # where it is read from


class DecodedBatch(NamedTuple):
    entries: Sequence[ImageEntry]
    pixels: np.ndarray | None  # N_readable x size x size x 3 uint8, the readable images in order
    errors: dict[int, str]  # position in `entries` -> why that image could not be read


def read_image(path: str, size: int) -> np.ndarray:
    """`mumic predict`'s decoding and preprocessing: the (size, size, 3) uint8 array the model's preparer takes."""
    return resize_center_crop(decode_image(path, max_pixels=DEFAULT_MAX_PIXELS, min_side=1), size)


def decode_batch(paths: Sequence[str], size: int) -> tuple[np.ndarray | None, dict[int, str]]:
    arrays, errors = [], {}
    for i, path in enumerate(paths):
        try:
            arrays.append(read_image(path, size))
        except ImageRejected as exc:
            errors[i] = f"{exc.reason}: {exc}"
    return (np.stack(arrays) if arrays else None), errors


class BatchDecoder:
    """Decodes batches of image files in their order, by `workers` spawned processes (0: in the caller's).

    A context manager: the workers start on entry, so that they import while the caller is still loading its model,
    and stop on exit with any decoding not yet begun cancelled.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> BatchDecoder:
        if self.workers > 0:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(self.workers):  # the pool starts a process per task while none is idle
                self._pool.submit(_started)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def decode(self, batches: Iterable[Sequence[ImageEntry]], size: int) -> Iterator[Callable[[], DecodedBatch]]:
        """The batches, in order, each as a call that returns it decoded.

        Without workers the call decodes in the thread that makes it, so a caller that runs the calls in several
        threads decodes that many batches at once (Pillow lets go of the GIL while it decompresses). With workers,
        up to two batches per worker are decoding ahead of the calls and the call waits for its batch. Batches are
        drawn from `batches` only that far ahead, so a listing of any length holds memory for those alone; if
        drawing the next one fails, the batches already begun are handed out before the error.
        """
        if self._pool is None:
            for entries in batches:
                yield partial(_decoded, entries, size)
            return
        in_flight: deque[tuple[Sequence[ImageEntry], Future]] = deque()
        source = iter(batches)
        while True:
            try:
                entries = next(source)
            except StopIteration:
                break
            except Exception:
                while in_flight:
                    yield partial(_collected, *in_flight.popleft())
                raise
            in_flight.append((entries, self._pool.submit(decode_batch, [e.path for e in entries], size)))
            if len(in_flight) > 2 * self.workers:
                yield partial(_collected, *in_flight.popleft())
        while in_flight:
            yield partial(_collected, *in_flight.popleft())


def _decoded(entries: Sequence[ImageEntry], size: int) -> DecodedBatch:
    return DecodedBatch(entries, *decode_batch([e.path for e in entries], size))


def _collected(entries: Sequence[ImageEntry], future: Future) -> DecodedBatch:
    return DecodedBatch(entries, *future.result())


def _started() -> None:
    """A worker's first task: importing this module (the decoder) is the work."""
