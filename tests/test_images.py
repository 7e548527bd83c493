"""Safe decoding: every kind of bad file gives its own reason; every good mode comes out as the RGB a viewer shows."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from image_fixtures import encode, png_with_declared_size  # noqa: E402
from image_fixtures import noise as random_pixels  # noqa: E402
from PIL import Image

from mumic_ml import images
from mumic_ml.images import (
    ImageRejected,
    PreprocessCache,
    decode_image,
    normalise_image,
    resize_center_crop,
    sha256_of_image,
)

LIMITS = {"max_pixels": 50_000_000, "min_side": 16}


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Incompressible pixels, so that cutting the file really removes image data."""
    return random_pixels(width, height, seed)


def rejection(source, **limits) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(source, **{**LIMITS, **limits})
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "WEBP", "TIFF"])
def test_good_images_decode_to_rgb(fmt):
    img = decode_image(encode(noise(), fmt), **LIMITS)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_decodes_from_a_path_whatever_its_extension(tmp_path):
    path = tmp_path / "photo.txt"
    path.write_bytes(encode(noise(), "PNG"))
    assert decode_image(path, **LIMITS).size == (64, 48)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert rejection(path).reason == "empty_file"
    assert rejection(b"").reason == "empty_file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_data(fmt):
    data = encode(noise(), fmt)
    exc = rejection(data[: len(data) // 2])
    assert exc.reason == "truncated"
    assert str(exc).startswith(f"truncated image data ({fmt})")


def test_cut_inside_the_header_is_not_called_a_non_image():
    exc = rejection(encode(noise(), "PNG")[:40])
    assert exc.reason in {"truncated", "decode_error"}
    assert "PNG" in str(exc)


@pytest.mark.parametrize(
    ("name", "content"),
    [("notes.jpg", b"just some text, not a photo\n"), ("page.png", b"<!DOCTYPE html><html><body>404</body></html>")],
)
def test_text_and_html_named_as_images(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    exc = rejection(path)
    assert exc.reason == "not_an_image"
    assert "not a recognised image" in str(exc)


@pytest.mark.parametrize("side", [100_000, 10_000, 9_000])
def test_decompression_bomb_is_refused_from_the_header(side):
    """100000^2 trips Pillow's hard error, 10000^2 its warning, 9000^2 only our own limit."""
    exc = rejection(png_with_declared_size(side, side))
    assert exc.reason == "decompression_bomb"


def test_pixel_limit_is_ours_not_only_pillows():
    assert rejection(encode(noise(), "PNG"), max_pixels=64 * 48 - 1).reason == "decompression_bomb"
    assert decode_image(encode(noise(), "PNG"), max_pixels=64 * 48, min_side=16).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize(("size", "ok"), [((1, 1), False), ((15, 40), False), ((40, 15), False), ((16, 16), True)])
def test_minimum_side(size, ok):
    data = encode(Image.new("RGB", size, "white"), "PNG")
    if ok:
        assert decode_image(data, **LIMITS).size == size
    else:
        assert rejection(data).reason == "too_small"


def test_cmyk_jpeg_becomes_rgb():
    img = decode_image(encode(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), "JPEG"), **LIMITS)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=int) - [0, 255, 255]).max() <= 3


@pytest.mark.parametrize(("value", "expected"), [(32768, 128), (1000, 4), (65535, 255), (0, 0)])
def test_sixteen_bit_grey_is_scaled_not_clipped(value, expected):
    source = Image.fromarray(np.full((20, 20), value, dtype=np.uint16))
    assert source.mode == "I;16"
    img = decode_image(encode(source, "PNG"), **LIMITS)
    assert img.mode == "RGB"
    assert (np.asarray(img) == expected).all()


def test_thirty_two_bit_grey_tiff():
    source = Image.fromarray(np.full((20, 20), 32768, dtype=np.int32))
    assert source.mode == "I"
    assert (np.asarray(decode_image(encode(source, "TIFF"), **LIMITS)) == 128).all()


def test_one_bit_image():
    source = Image.new("1", (20, 20), 0)
    source.putpixel((0, 0), 1)
    pixels = np.asarray(decode_image(encode(source, "PNG"), **LIMITS))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[5, 5].tolist() == [0, 0, 0]


def test_palette_transparency_becomes_white():
    source = Image.new("P", (20, 20), 1)
    source.putpalette([0, 0, 0] + [255, 0, 0] + [0, 0, 0] * 254)
    source.putpixel((0, 0), 0)
    pixels = np.asarray(decode_image(encode(source, "PNG", transparency=0), **LIMITS))
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[5, 5].tolist() == [255, 0, 0]


@pytest.mark.parametrize(("mode", "colour"), [("RGBA", (0, 0, 255, 0)), ("LA", (0, 0))])
def test_alpha_is_composited_on_white(mode, colour):
    pixels = np.asarray(decode_image(encode(Image.new(mode, (20, 20), colour), "PNG"), **LIMITS))
    assert (pixels == 255).all()


def test_half_transparent_blends_with_white():
    pixels = np.asarray(decode_image(encode(Image.new("RGBA", (20, 20), (0, 0, 0, 128)), "PNG"), **LIMITS))
    assert np.abs(pixels.astype(int) - 127).max() <= 1


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue", "green")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    pixels = np.asarray(decode_image(data, **LIMITS))
    assert pixels[10, 10].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied():
    """Orientation 6 means 'rotate 90 degrees clockwise to display': the stored top-left lands top-right."""
    stored = Image.new("RGB", (60, 30), "white")
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    img = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert img.size == (30, 60)
    pixels = np.asarray(img, dtype=int)
    assert pixels[4, 25].tolist() == pytest.approx([255, 0, 0], abs=30)
    assert pixels[4, 4].tolist() == pytest.approx([255, 255, 255], abs=30)


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    assert rejection(tmp_path / "nope.png").reason == "missing_file"
    path = tmp_path / "secret.png"
    path.write_bytes(encode(noise(), "PNG"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open", refuse, raising=False)
    exc = rejection(path)
    assert exc.reason == "unreadable" and "Permission denied" in str(exc)


def test_rejections_survive_pickling_between_processes():
    exc = pickle.loads(pickle.dumps(ImageRejected("truncated", "truncated image data (PNG): cut")))
    assert exc.reason == "truncated" and str(exc) == "truncated image data (PNG): cut"


def test_draft_decodes_large_jpegs_at_a_reduced_scale():
    photo = noise(64, 48).resize((1600, 1200))
    jpeg = encode(photo, "JPEG")
    assert decode_image(jpeg, **LIMITS).size == (1600, 1200)
    assert decode_image(jpeg, **LIMITS, draft_side=256).size == (400, 300)
    assert decode_image(jpeg, **LIMITS, draft_side=1000).size == (1600, 1200)
    assert decode_image(encode(photo, "PNG"), **LIMITS, draft_side=256).size == (1600, 1200)


def test_normalise_downscales_keeping_aspect_and_never_upscales():
    assert normalise_image(Image.new("RGB", (1000, 500)), max_side=512).size == (512, 256)
    assert normalise_image(Image.new("RGB", (300, 1200)), max_side=512).size == (128, 512)
    small = Image.new("RGB", (100, 50))
    assert normalise_image(small, max_side=512) is small


def test_hash_follows_pixels_not_files():
    img = noise()
    as_png = decode_image(encode(img, "PNG"), **LIMITS)
    as_bmp = decode_image(encode(img, "BMP"), **LIMITS)
    assert sha256_of_image(as_png) == sha256_of_image(as_bmp) == sha256_of_image(img)
    changed = img.copy()
    changed.putpixel((0, 0), (0, 0, 0) if img.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert sha256_of_image(changed) != sha256_of_image(img)
    jpeg_once = decode_image(encode(img, "JPEG"), **LIMITS)
    jpeg_twice = decode_image(encode(jpeg_once, "JPEG"), **LIMITS)
    assert sha256_of_image(jpeg_once) != sha256_of_image(jpeg_twice)


@pytest.mark.parametrize("size", [(80, 50), (50, 80), (37, 37), (33, 97)])
def test_resize_center_crop_matches_torchvision(size):
    transforms = pytest.importorskip("torchvision.transforms")
    img = noise(*size)
    expected = transforms.CenterCrop(32)(transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC)(img))
    got = resize_center_crop(img, 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(expected))


@pytest.fixture
def stored_image(tmp_path):
    path = tmp_path / "img.png"
    noise(80, 60).save(path)
    return path, sha256_of_image(noise(80, 60))


def test_cache_computes_then_reads_the_file(tmp_path, stored_image, monkeypatch):
    path, sha = stored_image
    cache = PreprocessCache(tmp_path / "cache")
    first = cache.get(path, sha, 32)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert cache.path_for(sha, 32) == tmp_path / "cache" / "32" / sha[:2] / f"{sha}.npy"
    assert cache.path_for(sha, 32).is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cache hit must not decode the image")

    monkeypatch.setattr(images, "decode_image", no_decoding)
    np.testing.assert_array_equal(cache.get(path, sha, 32), first)
    np.testing.assert_array_equal(first, resize_center_crop(Image.open(path), 32))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape"])
def test_damaged_cache_file_is_rebuilt_not_returned(tmp_path, stored_image, damage):
    path, sha = stored_image
    cache = PreprocessCache(tmp_path / "cache")
    good = cache.get(path, sha, 32)
    target = cache.path_for(sha, 32)
    if damage == "garbage":
        target.write_bytes(b"not an array")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:200])
    else:
        np.save(target, np.zeros((16, 16, 3), dtype=np.uint8))
    np.testing.assert_array_equal(cache.get(path, sha, 32), good)
    np.testing.assert_array_equal(np.load(target), good)


def test_failed_cache_write_leaves_no_file(tmp_path, stored_image, monkeypatch):
    path, sha = stored_image
    cache = PreprocessCache(tmp_path / "cache")

    def partial_save(fh, array, allow_pickle):
        fh.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(images.np, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        cache.get(path, sha, 32)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("workers", [0, 2])
def test_warm_fills_every_entry(tmp_path, workers):
    items = []
    for i in range(3):
        img = noise(40 + i, 50, seed=i)
        path = tmp_path / f"{i}.png"
        img.save(path)
        items.append((path, sha256_of_image(img)))
    cache = PreprocessCache(tmp_path / "cache")
    cache.warm(items, 24, workers=workers)
    for path, sha in items:
        np.testing.assert_array_equal(np.load(cache.path_for(sha, 24)), resize_center_crop(Image.open(path), 24))
