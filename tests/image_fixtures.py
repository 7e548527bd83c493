"""Images made in memory for the decoding, ingest and bad-input tests (no binary fixture is committed), and the
reading of figures that metadata carries inline."""

import base64
import io
import re
import struct
import zlib

import numpy as np
from PIL import Image


def noise(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image: the shape of a decompression bomb without the payload."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


INLINE_PNG = re.compile(r"^!\[[^\]]+\]\(data:image/png;base64,([A-Za-z0-9+/]+=*)\)$")


def inline_png(markdown: str) -> tuple[bytes, Image.Image]:
    """The PNG of a Markdown image with a data URI (`![title](data:image/png;base64,...)`), decoded and opened."""
    match = INLINE_PNG.match(markdown)
    assert match, markdown[:80]
    png = base64.b64decode(match[1], validate=True)
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.format == "PNG"
    return png, image
