"""The image codecs an archive team would use instead of facetier, behind one interface.

Each codes an aligned face crop (uint8 RGB) at a quality setting and gives back the stored file's
bytes and the decoded crop. ``scale`` < 1 codes the crop downscaled (area filter) and scales the
decode back up (bicubic): the careful way to reach a few hundred bytes with a block codec.

Availability is checked, not assumed: a codec whose encoder is not installed (HEIC needs
pillow-heif's x265) is skipped with the reason. VVC, the paper's anchor, has no encoder that
installs offline from PyPI, so it is not here.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from facetier.errors import ConfigError

Encoder = Callable[[np.ndarray, int], bytes]
Decoder = Callable[[bytes], np.ndarray]


@dataclass(frozen=True)
class ImageCodec:
    """A conventional codec: ``qualities`` run from its lowest setting up (higher = more bytes)."""

    name: str
    library: str
    qualities: tuple[int, ...]
    encode: Encoder
    decode: Decoder

    def code(self, crop: np.ndarray, quality: int, scale: float = 1.0) -> tuple[bytes, np.ndarray]:
        """The stored bytes of ``crop`` at ``quality`` (downscaled by ``scale`` first) and its decode at the crop's size."""
        size = crop.shape[0]
        small = crop if scale == 1.0 else np.asarray(Image.fromarray(crop).resize((round(size * scale),) * 2, Image.BOX))
        data = self.encode(np.ascontiguousarray(small), quality)
        out = self.decode(data)
        if out.shape[:2] != (size, size):
            out = np.asarray(Image.fromarray(out).resize((size, size), Image.BICUBIC))
        return data, out

    def header_bytes(self) -> int:
        """The format's fixed overhead, estimated as the file of a flat 8x8 image at the lowest setting."""
        return len(self.encode(np.full((8, 8, 3), 128, np.uint8), self.qualities[0]))


def _pillow(fmt: str, **options: object) -> tuple[Encoder, Decoder]:
    def encode(img: np.ndarray, quality: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt, quality=quality, **options)
        return buf.getvalue()

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    return encode, decode


def _jpegxl() -> tuple[Encoder, Decoder]:
    import imagecodecs

    def encode(img: np.ndarray, quality: int) -> bytes:
        return bytes(imagecodecs.jpegxl_encode(img, level=quality, effort=7))

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(imagecodecs.jpegxl_decode(data))[..., :3]

    return encode, decode


def _heic_ready() -> str | None:
    """None when HEIC can be written here, else why not."""
    try:
        import pillow_heif
    except ImportError:
        return "pillow-heif is not installed (pip install -e '.[eval]')"
    if "x265" not in pillow_heif.libheif_info().get("encoders", {}):
        return "pillow-heif has no x265 encoder on this platform"
    pillow_heif.register_heif_opener()
    return None


def _avif_ready() -> str | None:
    from PIL import features

    return None if features.check("avif") else "this Pillow build has no AVIF support (Pillow >= 11.2 wheels have it)"


# The quality grid every codec is swept over, lowest first (0-100, each library's own scale).
# 95 is left out by default: at 128 px every codec's file is then 4-10 KB, far above the
# <= 2,000 B this comparison is about, and on the full LFW protocol AVIF and HEIC spent a tenth of
# the run there (measured); ``facetier rd --qualities ...,95`` puts it back.
STEPS = (0, 10, 25, 40, 60, 80)

# Lossy settings only: the crop is the target.
_CANDIDATES: dict[str, tuple[str, Callable[[], str | None], Callable[[], tuple[Encoder, Decoder]]]] = {
    "jpeg": ("libjpeg via Pillow (optimised Huffman tables)", lambda: None, lambda: _pillow("JPEG", optimize=True)),
    "webp": ("libwebp via Pillow", lambda: None, lambda: _pillow("WEBP", method=6)),
    "avif": ("libavif / AV1 intra via Pillow", _avif_ready, lambda: _pillow("AVIF", speed=6)),
    "heic": ("libheif / x265 HEVC intra via pillow-heif", _heic_ready, lambda: _pillow("HEIF")),
    "jpegxl": ("libjxl via imagecodecs (lossy, effort 7)", lambda: None, _jpegxl),
}


def conventional_codecs(names: list[str] | None = None, qualities: tuple[int, ...] = STEPS) -> tuple[list[ImageCodec], dict[str, str]]:
    """The codecs that work here (in the order asked), each swept over ``qualities``, and, for each
    that does not work here, the reason."""
    if not qualities or any(not 0 <= q <= 100 for q in qualities) or list(qualities) != sorted(set(qualities)):
        raise ConfigError(f"qualities must rise strictly within 0-100, not {list(qualities)}")
    wanted = list(_CANDIDATES) if names is None else names
    if unknown := [n for n in wanted if n not in _CANDIDATES]:
        raise ConfigError(f"unknown codecs {unknown}; known: {', '.join(_CANDIDATES)}")
    codecs, skipped = [], {}
    for name in wanted:
        library, ready, build = _CANDIDATES[name]
        why = ready()
        if why is not None:
            skipped[name] = why
            continue
        encode, decode = build()
        # libjpeg treats quality 0 as 1; say what it codes
        steps = tuple(dict.fromkeys(max(q, 1) for q in qualities)) if name == "jpeg" else qualities
        codecs.append(ImageCodec(name, library, steps, encode, decode))
    skipped["vvc"] = "no VVC encoder installs offline from PyPI (the paper's anchor, VTM, is a separate C++ build)"
    return codecs, skipped
