"""Safe image loading and reference/garment preprocessing."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops

from shared.media.image_tensors import from_tensor, to_tensor
from shared.media.images import (
    ImageError,
    load_image,
    prepare_garment,
    prepare_reference,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_1bit(width: int, height: int, with_data: bool = True) -> bytes:
    """A black 1-bit grayscale PNG built by hand: tiny on disk, width x height pixels when decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    idat = b""
    if with_data:
        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        comp = zlib.compressobj(9)
        block = row * 1000
        parts = [comp.compress(block) for _ in range(height // 1000)]
        parts += [comp.compress(row * (height % 1000)), comp.flush()]
        idat = _png_chunk(b"IDAT", b"".join(parts))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + idat + _png_chunk(b"IEND", b"")


# ---- rejection -----------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 100, np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), b"hi\n" * 50],
    ids=["empty", "zeros", "random", "text"],
)
def test_not_an_image(data: bytes) -> None:
    with pytest.raises(ImageError):
        load_image(data)


def test_text_file(tmp_path) -> None:
    path = tmp_path / "garment.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(fmt: str) -> None:
    data = _encode(_noise(64, 64), fmt)
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])


def test_corrupt_png_data() -> None:
    data = bytearray(_encode(_noise(64, 64), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 60] = b"\xff" * 50  # garbage inside the compressed stream
    with pytest.raises(ImageError):
        load_image(bytes(data))


def test_unsupported_format() -> None:
    with pytest.raises(ImageError, match="not a supported image"):
        load_image(_encode(_noise(32, 32), "PPM"))


def test_byte_limit(tmp_path) -> None:
    data = _encode(_noise(64, 64), "PNG")
    with pytest.raises(ImageError, match="limit"):
        load_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="limit"):
        load_image(path, max_bytes=len(data) - 1)
    assert load_image(path, max_bytes=len(data)).size == (64, 64)


def test_too_small() -> None:
    with pytest.raises(ImageError, match="smaller than 16"):
        load_image(_encode(_noise(64, 8), "PNG"))


def test_bomb_header_only() -> None:
    # A header claiming 100000 x 100000 pixels and no pixel data at all.
    with pytest.raises(ImageError, match=r"pixels|bomb"):
        load_image(_png_1bit(100_000, 100_000, with_data=False))
    # Under PIL's own bomb threshold but over ours: refused by max_pixels before decoding.
    with pytest.raises(ImageError, match="over the limit of 40000000"):
        load_image(_png_1bit(8000, 8000, with_data=False))


def test_real_bomb_refused_before_decode() -> None:
    data = _png_1bit(20_000, 20_000)  # 400 Mpixel, ~50 KB on disk
    assert len(data) < 200_000
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="400000000 pixels"):
        load_image(data)
    with pytest.raises(ImageError, match="over the limit of 40000000"):  # under PIL's threshold, over ours
        load_image(_png_1bit(7_000, 7_000))
    # With our limit lifted, PIL's decompression-bomb check still refuses it (error and warning ranges).
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(data, max_pixels=10**12)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(_png_1bit(10_000, 10_000), max_pixels=10**12)  # 100 Mpixel: PIL only warns
    assert time.perf_counter() - t0 < 2.0, "a bomb must be refused from its header, not decoded"


# ---- accepted formats and modes ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_allowed_formats(fmt: str) -> None:
    img = load_image(_encode(Image.new("RGB", (40, 30), RED), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_path_and_bytes_agree(tmp_path) -> None:
    data = _encode(_noise(48, 32), "PNG")
    path = tmp_path / "n.png"
    path.write_bytes(data)
    assert load_image(str(path)).tobytes() == load_image(data).tobytes() == _noise(48, 32).tobytes()


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert load_image(data).getpixel((5, 5)) == RED


def _half_transparent(mode: str) -> Image.Image:
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    return img.convert(mode) if mode != "RGBA" else img


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_composited_on_white(mode: str) -> None:
    img = load_image(_encode(_half_transparent(mode), "PNG"))
    assert img.mode == "RGB"
    assert img.getpixel((4, 4)) == WHITE
    assert img.getpixel((28, 4)) == (RED if mode == "RGBA" else (76, 76, 76))


def test_palette_with_transparency() -> None:
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(0, (0, 0, 16, 32))
    out = load_image(_encode(img, "PNG", transparency=0))
    assert out.getpixel((4, 4)) == WHITE and out.getpixel((28, 4)) == RED


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        (Image.new("L", (32, 32), 100), "PNG", (100, 100, 100)),
        (Image.new("1", (32, 32), 1), "PNG", WHITE),
        (Image.new("RGB", (32, 32), GREEN).convert("P"), "PNG", GREEN),
        (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "TIFF", RED),
        (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", RED),
        (Image.new("I;16", (32, 32), 65535), "PNG", WHITE),
        (Image.new("I;16", (32, 32), 32896), "PNG", (128, 128, 128)),
        (Image.new("I;16", (32, 32), 32896), "TIFF", (128, 128, 128)),
    ],
    ids=["L", "1", "P", "CMYK-tiff", "CMYK-jpeg", "16bit-white", "16bit-mid", "16bit-tiff"],
)
def test_modes_to_rgb(img: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    out = load_image(_encode(img, fmt))
    assert out.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(out.getpixel((16, 16)), expected)), out.getpixel((16, 16))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation(fmt: str) -> None:
    img = Image.new("RGB", (64, 32), RED)  # stored landscape: left red, right blue
    img.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_image(_encode(img, fmt, exif=exif.tobytes()))
    assert out.size == (32, 64)  # displayed portrait
    top, bottom = out.getpixel((16, 8)), out.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


# ---- preprocessing -------------------------------------------------------------------


def _stripes(width: int, height: int) -> Image.Image:
    """Three vertical stripes red | green | blue."""
    img = Image.new("RGB", (width, height), RED)
    img.paste(GREEN, (width // 3, 0, 2 * width // 3, height))
    img.paste(BLUE, (2 * width // 3, 0, width, height))
    return img


@pytest.mark.parametrize(("size", "hw"), [((300, 100), (96, 128)), ((100, 300), (96, 128)), ((50, 50), (704, 1280))])
def test_prepare_reference_covers_and_centre_crops(size: tuple[int, int], hw: tuple[int, int]) -> None:
    h, w = hw
    out = prepare_reference(_stripes(*size), h, w)
    assert out.size == (w, h) and out.mode == "RGB"
    assert ImageChops.difference(out, Image.new("RGB", out.size, WHITE)).getbbox() == (0, 0, w, h)
    assert out.getpixel((w // 2, h // 2)) == GREEN  # centre stays centre
    if size == (300, 100):  # wide source: 288 x 96 after the cover resize, 80 px cut on each side
        assert out.getpixel((2, h // 2))[0] > 200 and out.getpixel((w - 3, h // 2))[2] > 200


@pytest.mark.parametrize("size", [(50, 200), (400, 100), (128, 96), (30, 30)])
def test_prepare_garment_pads_and_keeps_aspect(size: tuple[int, int]) -> None:
    h, w = 96, 128
    src_w, src_h = size
    out = prepare_garment(Image.new("RGB", size, RED), h, w)
    assert out.size == (w, h) and out.mode == "RGB"
    left, top, right, bottom = ImageChops.difference(out, Image.new("RGB", out.size, WHITE)).getbbox()
    bw, bh = right - left, bottom - top
    assert bw == w or bh == h, "the garment must touch two opposite borders (fit, not shrink)"
    assert abs(bw / bh - src_w / src_h) <= 0.05 * src_w / src_h + 1 / min(bw, bh), (bw, bh)
    assert abs(left - (w - right)) <= 1 and abs(top - (h - bottom)) <= 1, "padding must be centred"


def test_prepare_garment_fill_colour() -> None:
    out = prepare_garment(Image.new("RGB", (50, 200), RED), 96, 128, fill=(0, 0, 0))
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_tensor_round_trip() -> None:
    img = _noise(40, 24)
    t = to_tensor(img)
    assert t.shape == (3, 24, 40) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    assert to_tensor(Image.new("RGB", (16, 16), (0, 0, 0))).eq(-1).all()
    assert to_tensor(Image.new("RGB", (16, 16), WHITE)).eq(1).all()
    assert from_tensor(t).tobytes() == img.tobytes()
    assert from_tensor(torch.full((3, 4, 4), 5.0)).getpixel((0, 0)) == WHITE
