"""Safe image loading and the two preprocessing rules of the paper.

`load_image` is the one door for untrusted image bytes (CLI arguments, uploads, gRPC requests):
it bounds the file size and the pixel count *before* decoding, accepts only common still-image
formats, applies the EXIF orientation and always returns an 8-bit RGB image. Every failure is an
`ImageError` with a message fit for an API client.

Preprocessing (paper, section 5.1):
- reference / video frames: resize preserving aspect ratio so the image covers H x W, centre-crop;
- garment: resize preserving aspect ratio to fit inside H x W, centre-pad (white by default).

Sizes are (height, width) in pixels in arguments; PIL's own `.size` is (width, height).

No torch here (the CPU-only gateway decodes uploads with `load_image`): image <-> tensor
conversion is in `shared.media.image_tensors`.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
# Exceptions that PIL decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, KeyError, TypeError)


class ImageError(ValueError):
    """The input is not a usable image (missing, too large, corrupt, unsupported)."""


def load_image(
    source: str | Path | bytes,
    *,
    max_bytes: int = 20 * 2**20,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
) -> Image.Image:
    """Read an image from a path or from bytes and return it as a decoded 8-bit RGB image.

    Limits: `max_bytes` on the encoded size (bytes), `max_pixels` on width x height (checked from
    the header, before decoding), `min_side` on both sides (pixels). Animated GIF/TIFF: first frame.
    """
    data = _read_bytes(source, max_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img: Image.Image = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))  # parses the header only
        except Image.UnidentifiedImageError:
            raise ImageError(f"not a supported image (allowed formats: {', '.join(ALLOWED_FORMATS)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(_bomb_message(e, max_pixels)) from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"corrupt image header: {e}") from None

        width, height = img.size
        if width * height > max_pixels:
            pixels = width * height
            raise ImageError(f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}")
        if min(width, height) < min_side:
            raise ImageError(f"image is {width}x{height}, smaller than {min_side} pixels on a side")
        try:
            img.seek(0)  # first frame of animated GIF / multi-page TIFF
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(_bomb_message(e, max_pixels)) from None
        except _DECODE_ERRORS as e:
            raise ImageError(f"corrupt or truncated {img.format} image: {e}") from None

    try:
        img = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS:
        pass  # unreadable EXIF: keep the pixels as stored
    return _to_rgb(img)


def _bomb_message(error: Exception, max_pixels: int) -> str:
    """PIL refused the header as a decompression bomb: quote *our* limit when the image is over it,
    else say that PIL's own bomb limit refused it (a configured limit above PIL's)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = int(found.group(1)) if found else None
    if pixels is None or pixels > max_pixels:
        size = f"{pixels} pixels" if pixels is not None else "too many pixels"
        return f"image has {size}, over the limit of {max_pixels}"
    return f"image has {pixels} pixels: refused as a decompression bomb by the image decoder's own limit"


def _read_bytes(source: str | Path | bytes, max_bytes: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"no such file: {path}")
        if not path.is_file():
            raise ImageError(f"not a regular file: {path}")
        if path.stat().st_size > max_bytes:
            raise ImageError(f"file is {path.stat().st_size} bytes, more than the limit of {max_bytes}: {path}")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # bounded even if the file grows meanwhile
    if len(data) > max_bytes:
        raise ImageError(f"image is more than the limit of {max_bytes} bytes")
    if not data:
        raise ImageError("image is empty (0 bytes)")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit is scaled, not clipped."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img, dtype=np.float64)  # [H, W]
        if img.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range -> 8-bit range
        img = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))  # uint8 [H, W] -> mode L
    if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:
        raise ImageError(f"unsupported colour mode {img.mode}: {e}") from None


def prepare_reference(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize preserving aspect ratio so the image covers height x width, then centre-crop to it."""
    return ImageOps.fit(img, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def prepare_garment(
    img: Image.Image, height: int, width: int, fill: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Resize preserving aspect ratio to fit inside height x width, then centre-pad with `fill`."""
    return ImageOps.pad(img, (width, height), method=Image.Resampling.LANCZOS, color=fill, centering=(0.5, 0.5))
