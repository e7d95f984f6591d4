"""Robust decoding of untrusted image bytes into RGB arrays.

Handles EXIF orientation, greyscale / CMYK / palette / alpha images, progressive JPEGs, a pixel
limit against decompression bombs, zero-byte, truncated and non-image files, and files whose
extension lies (the format is sniffed from the bytes, never from the name).
"""
from __future__ import annotations

import io as _stdio
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from facetier.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageTooLargeError,
    NotAnImageError,
)

DEFAULT_MAX_PIXELS = 64_000_000
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO"})
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})  # 16- and 32-bit greyscale


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (H, W, 3) uint8
    format: str  # as sniffed from the bytes, e.g. "JPEG"
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """The container format from magic bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> DecodedImage:
    """Decode bytes to upright RGB; every failure is a typed :class:`InputError`.

    ``draft_size`` lets JPEG decode at a reduced scale (libjpeg DCT scaling) when only a crop of
    about that many pixels per side is needed; it is several times faster on large photos.
    """
    if not data:
        raise EmptyFileError("zero-byte file")
    fmt = sniff_format(data)
    if fmt is None:
        raise NotAnImageError(f"not a supported image (starts with {data[:8]!r})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(_stdio.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise ImageTooLargeError(f"{img.width}x{img.height} exceeds the {max_pixels} pixel limit")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    except ImageTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except UnidentifiedImageError as exc:
        # the magic bytes said it is an image; the rest does not parse
        raise CorruptImageError(f"{fmt} with a damaged header: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"{fmt}: {exc}") from exc
    rgb = to_rgb8(img)
    return DecodedImage(rgb=rgb, format=fmt, width=rgb.shape[1], height=rgb.shape[0])


def to_rgb8(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB of any mode Pillow opens, scaled to its full range.

    Pillow's own ``convert("RGB")`` clips 16- and 32-bit greyscale to 255 instead of scaling it,
    which turns a 16-bit grey PNG almost white (and its face undetectable).
    """
    if img.mode in WIDE_GREY_MODES or img.mode == "F":
        return np.repeat(_grey8(img)[..., None], 3, axis=2)
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[-1])
        img = background
    elif img.mode != "RGB":
        img = img.convert("RGB")  # 1-bit, greyscale, CMYK (PIL inverts Adobe CMYK), YCbCr, LAB, palette
    return np.asarray(img, dtype=np.uint8)


def _grey8(img: Image.Image) -> np.ndarray:
    """8-bit grey from a 16-bit, 32-bit integer or float image.

    ``I;16*`` spans 0-65535. ``I`` (32-bit) holds 16-bit data in practice (TIFF, old PNG
    readers): 0-65535 when any value exceeds 255, else 0-255. ``F`` is taken as 0-1 when its
    maximum is at most 1, else as 0-255.
    """
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        top = 1.0 if np.nanmax(a, initial=0.0) <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
        top = 65535.0
    else:
        top = 65535.0 if a.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(np.nan_to_num(a) * (255.0 / top)), 0, 255).astype(np.uint8)
