"""Safe image decoding, normalisation, content hashing and the preprocessing cache.

Every image that enters the system comes from an untrusted folder, so decoding is defensive: the format is
identified from the bytes, the declared size is checked before any pixel is decoded (decompression bombs), the
whole file is decoded so truncation is caught at ingest rather than mid-training, and every failure becomes an
`ImageRejected` with a short reason code that the rejection table can count.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import warnings
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000

# Formats we let Pillow parse. Restricting the list keeps rarely used, lenient parsers (which may "recognise" a
# text file) away from untrusted input. Multi-picture JPEGs (MPO, from phones) open through the JPEG parser.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")

# Leading bytes of the accepted formats, used only to word the message when Pillow cannot read the header.
_MAGIC = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageRejected(Exception):
    """An image that cannot be used; `reason` is a stable code, str(exc) says what is wrong in words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Rejections travel back from worker processes; the default pickling would drop `reason`.
        return type(self), (self.reason, str(self))


def decode_image(
    source: str | os.PathLike | bytes, *, max_pixels: int, min_side: int, draft_side: int | None = None
) -> Image.Image:
    """Decode `source` (a path or the file's bytes) into a fully loaded RGB image, or raise ImageRejected.

    Reason codes: empty_file, missing_file, unreadable, not_an_image, decompression_bomb, too_small, truncated,
    decode_error. Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) also applies, so the effective pixel limit is
    the smaller of the two. `draft_side`, for callers that will downscale anyway, lets a large JPEG be decoded at
    1/2, 1/4 or 1/8 scale (in the DCT, several times faster) while both sides stay >= draft_side; the size
    limits are checked on the declared size either way.
    """
    limits = {"max_pixels": max_pixels, "min_side": min_side, "draft_side": draft_side}
    if isinstance(source, bytes):
        return _decode_stream(io.BytesIO(source), len(source), **limits)
    try:
        with open(source, "rb") as fh:
            return _decode_stream(fh, os.fstat(fh.fileno()).st_size, **limits)
    except FileNotFoundError as exc:
        raise ImageRejected("missing_file", f"file not found: {source}") from exc
    except OSError as exc:
        raise ImageRejected("unreadable", f"cannot read file: {exc.strerror or exc}") from exc


def _decode_stream(
    fh: io.BufferedIOBase, n_bytes: int, *, max_pixels: int, min_side: int, draft_side: int | None
) -> Image.Image:
    if n_bytes == 0:
        raise ImageRejected("empty_file", "file is empty (0 bytes)")
    head = fh.read(16)
    fh.seek(0)
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice its limit; a warning is as good as a bomb to us.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fh, formats=ACCEPTED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected("decompression_bomb", f"declared image size is too large: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise _unidentified(head, n_bytes) from exc
        except Exception as exc:
            raise _decode_failure(None, exc) from exc
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "decompression_bomb",
                    f"declared size {width}x{height} ({width * height} pixels) exceeds the limit of {max_pixels}",
                )
            if min(width, height) < min_side:
                raise ImageRejected("too_small", f"image is {width}x{height}; both sides must be >= {min_side}")
            try:
                im.seek(0)
                if draft_side:
                    im.draft(None, (draft_side, draft_side))
                im.load()
                upright = ImageOps.exif_transpose(im)
                return to_rgb(upright)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise ImageRejected("decompression_bomb", f"image is too large: {exc}") from exc
            except Exception as exc:
                # Pillow's format plugins raise many exception types on malformed data; one bad file must only
                # reject itself.
                raise _decode_failure(im.format, exc) from exc


def _unidentified(head: bytes, n_bytes: int) -> ImageRejected:
    """Names the kind of file, never its bytes: the message may reach a client that must not read server files."""
    for magic, fmt in _MAGIC.items():
        if head.startswith(magic):
            return ImageRejected("decode_error", f"starts like a {fmt} file but its header is corrupt or truncated")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageRejected("decode_error", "starts like a WEBP file but its header is corrupt or truncated")
    return ImageRejected(
        "not_an_image",
        f"not a recognised image format (accepted: {', '.join(ACCEPTED_FORMATS)}); "
        f"the file ({n_bytes} bytes) looks like {_file_kind(head)}",
    )


def _file_kind(head: bytes) -> str:
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut off by the 16-byte window is still text
        text = head[: exc.start].decode("utf-8") if exc.reason == "unexpected end of data" else None
    if text is not None and all(ch.isprintable() or ch.isspace() for ch in text):
        return "text"
    return "binary data of an unknown format"


# Quoted values in a decoder's message (Pillow quotes chunk names and headers, as `b'...'`) are file content.
_QUOTED = re.compile(r"""(?<!\w)b?(['"])(?:\\.|(?!\1).)*\1""", re.DOTALL)


def _decode_failure(fmt: str | None, exc: Exception) -> ImageRejected:
    label = f" ({fmt})" if fmt else ""
    if isinstance(exc, UnicodeError):  # its message quotes the offending bytes
        message = type(exc).__name__
    else:
        message = _QUOTED.sub("<file data>", str(exc)) or type(exc).__name__
    if isinstance(exc, OSError) and "truncated" in message.lower():
        return ImageRejected("truncated", f"truncated image data{label}: {message}")
    return ImageRejected("decode_error", f"cannot decode image{label}: {message}")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB so that every image looks the way a viewer would show it.

    Transparent pixels become white (as on a web page), high-bit-depth grey is scaled rather than clipped.
    """
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = _high_depth_to_l(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float grey to 8 bits.

    Integer data that fits in 0..65535 is treated as 16-bit and float data in 0..1 as unit range; anything else has
    no declared range, so it is stretched from its minimum to its maximum.
    """
    values = np.asarray(im).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if im.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif im.mode != "F" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if "transparency" in im.info:
        grey.info["transparency"] = int(np.clip(np.rint(im.info["transparency"] / 257.0), 0, 255))
    return grey


def normalise_image(img: Image.Image, *, max_side: int) -> Image.Image:
    """Downscale (never upscale) so the longer side is at most `max_side`, keeping the aspect ratio."""
    width, height = img.size
    longer = max(width, height)
    if longer <= max_side:
        return img
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def sha256_of_image(img: Image.Image) -> str:
    """Hash of the decoded pixels (mode, size and bytes), not of the file.

    The same picture stored under two names, or re-saved losslessly (PNG to PNG, PNG to BMP), hashes the same.
    A lossy re-encoding (JPEG saved again) changes the pixels, so it hashes differently: this finds exact
    duplicates only.
    """
    digest = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bicubic) and crop the centre square: open_clip's eval preprocessing.

    Output sizes and crop offsets follow torchvision's Resize(int) and CenterCrop, so cached arrays equal what
    the open_clip transform would produce from the same image.
    """
    img = to_rgb(img)
    width, height = img.size
    if min(width, height) != size:
        new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        img = img.resize(new_size, Image.Resampling.BICUBIC)
        width, height = new_size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)


class PreprocessCache:
    """Model-ready pixel arrays, computed once per (image, size) so the training loader never decodes PNGs.

    Files live at `root/<size>/<sha[:2]>/<sha>.npy` and are written to a temporary name and renamed, so a reader
    sees a complete array or none; an unreadable or wrongly shaped file is treated as a miss and rebuilt. Entries
    are not fsynced: a cache can be rebuilt, and syncing each small file cost several times the decoding
    (docs/benchmarks.md, "Scale").
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str, size: int) -> Path:
        return self.root / str(size) / sha256[:2] / f"{sha256}.npy"

    def get(self, image_path: str | os.PathLike, sha256: str, size: int) -> np.ndarray:
        """The (size, size, 3) uint8 array for the image whose normalised-content hash is `sha256`.

        On a miss the image is decoded (ImageRejected if it cannot be) and the array stored for next time.
        """
        cached = self._load(self.path_for(sha256, size), size)
        if cached is not None:
            return cached
        return self._compute(image_path, sha256, size)

    def warm(self, items: Iterable[tuple[str | os.PathLike, str]], size: int, workers: int = 0) -> None:
        """Fill the cache ahead of training; `workers` > 0 spreads the decoding over that many processes."""
        missing = [(str(p), sha) for p, sha in items if not self.path_for(sha, size).is_file()]
        if workers <= 0 or len(missing) < 2:
            for image_path, sha in missing:
                self._compute(image_path, sha, size)
            return
        # spawn, not fork: the parent may be a training process holding torch threads and locks.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            chunksize = max(1, len(missing) // (workers * 8))
            args = [(str(self.root), p, sha, size) for p, sha in missing]
            for _ in pool.map(_fill_cache_entry, args, chunksize=chunksize):
                pass

    def _compute(self, image_path: str | os.PathLike, sha256: str, size: int) -> np.ndarray:
        img = decode_image(image_path, max_pixels=DEFAULT_MAX_PIXELS, min_side=1)
        array = resize_center_crop(img, size)
        target = self.path_for(sha256, size)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return array

    @staticmethod
    def _load(path: Path, size: int) -> np.ndarray | None:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if array.shape != (size, size, 3) or array.dtype != np.uint8:
            return None
        return array


def _fill_cache_entry(args: tuple[str, str, str, int]) -> None:
    root, image_path, sha256, size = args
    PreprocessCache(root)._compute(image_path, sha256, size)
