"""Image bitstreams without the container bytes a decoder can restore.

At a few hundred bytes per face the container is a large share of a file: AVIF's boxes cost
~275 B for a 64 px face, WebP's RIFF and VP8 frame header 27 B. A face rung knows its own size and
format, so it stores only what a decoder cannot rebuild:

- **WebP (VP8)**: the 3-byte frame tag and the partitions; the RIFF header, the chunk header,
  the start code and the dimensions are rebuilt.
- **AVIF (AV1 intra)**: the AV1 frame; the boxes and the sequence header are rebuilt from a
  template of the same size (libavif writes them the same for every image of one size; only two
  length fields differ, and those are patched).
- **JPEG XL**: the codestream after the signature and the image header, which depend only on the
  size (from a template, as for AVIF).

Every encode is checked: the container rebuilt from the stripped bytes must equal the encoder's
file byte for byte, else :class:`RawStreamError` (the caller then picks another candidate, or
WebP: ``human_layers.encode_layer``).
"""
from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import imagecodecs
import numpy as np
from PIL import Image, features

from facetier.errors import RawStreamError

WEBP = "webp"
AVIF = "avif"
JPEGXL = "jpegxl"
AVIF_SPEED = 6  # libaom's speed through Pillow; the conventional AVIF points in `facetier rd` use the same
_VP8_START = b"\x9d\x01\x2a"


@dataclass(frozen=True)
class RawFormat:
    """One format's stripped encode and its decode (both at the rung's own size)."""

    name: str
    code: int  # recorded in a rung's header
    encode: Callable[[np.ndarray, int], bytes]  # uint8 RGB, quality 0-100 -> stripped bytes
    decode: Callable[[bytes, int], np.ndarray]  # stripped bytes, size -> uint8 RGB size x size
    container: Callable[[bytes, int], bytes]  # stripped bytes, size -> the format's file


def _pillow_file(img: np.ndarray, fmt: str, quality: int, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, quality=quality, **options)
    return buf.getvalue()


def _pillow_decode(data: bytes) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as exc:  # Pillow raises several types for a bad stream
        raise RawStreamError(f"rung bitstream does not decode: {exc}") from exc


# --- WebP ------------------------------------------------------------------------------------
def webp_container(raw: bytes, size: int) -> bytes:
    if len(raw) < 3:
        raise RawStreamError("WebP rung shorter than its frame tag")
    vp8 = raw[:3] + _VP8_START + struct.pack("<HH", size, size) + raw[3:]
    chunk = b"VP8 " + struct.pack("<I", len(vp8)) + vp8 + (b"\x00" if len(vp8) % 2 else b"")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_encode(img: np.ndarray, quality: int) -> bytes:
    data = _pillow_file(img, "WEBP", quality, method=6)
    if data[12:16] != b"VP8 " or data[23:26] != _VP8_START:
        raise RawStreamError(f"libwebp wrote a {data[12:16]!r} chunk, not a plain lossy VP8 frame")
    n = struct.unpack("<I", data[16:20])[0]
    raw = data[20:23] + data[30:20 + n]
    if webp_container(raw, img.shape[0]) != data:
        raise RawStreamError("WebP container does not rebuild from the stripped bytes")
    return raw


# --- AVIF and JPEG XL: templates --------------------------------------------------------------
# The bytes a decoder restores come from templates captured once from the encoders and shipped in
# ``assets/rung-templates.json``, never from the library installed at decode time: a later libavif
# or libjxl may write its boxes or header bits differently, and a face stored today must decode
# the same then. An encoder that no longer writes what the template says fails the encode-time
# check (RawStreamError) and the face takes another candidate, or WebP.
TEMPLATE_FILE = "rung-templates.json"


@dataclass(frozen=True)
class AvifTemplate:
    header: bytes  # every box up to mdat's payload, with two big-endian u32 lengths to patch
    fields: tuple[int, ...]  # offsets of those lengths: the item's extent length, then mdat's box size
    obu_prefix: bytes  # the temporal delimiter and sequence header, the same for every face of a size


def _avif_file(img: np.ndarray, quality: int) -> bytes:
    return _pillow_file(img, "AVIF", quality, speed=AVIF_SPEED)


def _jxl_file(img: np.ndarray, quality: int) -> bytes:
    return bytes(imagecodecs.jpegxl_encode(img, level=quality, effort=7))


def _split_mdat(data: bytes) -> tuple[bytes, bytes]:
    at = data.find(b"mdat")
    if at < 4 or struct.unpack(">I", data[at - 4:at])[0] != len(data) - at + 4:
        raise RawStreamError("AVIF file does not end with one mdat box")
    return data[:at + 4], data[at + 4:]


def _probes(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two images of one size whose files differ in length (flat grey and noise)."""
    rng = np.random.default_rng(size)
    return np.full((size, size, 3), 128, np.uint8), rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _whole_obus(a: bytes, b: bytes) -> bytes:
    """The OBUs two AV1 payloads share from the start, whole: the temporal delimiter (type 2) and the
    sequence header (type 1); the frame that follows may agree by chance in a byte or two."""
    pos = 0
    while pos + 2 <= min(len(a), len(b)) and (a[pos] >> 3) & 0xF in (1, 2) and not a[pos + 1] & 0x80:
        end = pos + 2 + a[pos + 1]
        if a[pos:end] != b[pos:end]:
            break
        pos = end
    return a[:pos]


def capture_avif_template(size: int) -> AvifTemplate:
    """The template of the AVIF encoder installed here: two files of one size that differ in payload
    length show where the lengths live."""
    (ha, pa), (hb, pb) = (_split_mdat(_avif_file(img, 50)) for img in _probes(size))
    if len(ha) != len(hb):
        raise RawStreamError("libavif writes boxes of different lengths for one size; AVIF rungs cannot be stripped")
    diff = [i for i in range(len(ha)) if ha[i] != hb[i]]
    # a length differs in its low bytes: each run of differing bytes ends where its field ends
    fields = tuple(i - 3 for i in diff if i + 1 not in diff)
    if len(fields) != 2 or fields[1] != len(ha) - 8:
        raise RawStreamError(f"libavif's boxes differ at {diff}: not just the extent and mdat lengths")
    return AvifTemplate(ha, fields, _whole_obus(pa, pb))


def capture_jxl_prefix(size: int) -> bytes:
    """The codestream bytes every image of one size shares (signature and image header), less the last
    shared byte, which may already hold bits of the frame."""
    a, b = (_jxl_file(img, 50) for img in _probes(size))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:max(2, n - 1)]


def capture_templates(sizes: tuple[int, ...]) -> dict:
    """What ``assets/rung-templates.json`` holds, from the encoders installed here."""
    avif = {str(s): {"header": t.header.hex(), "fields": list(t.fields), "obu_prefix": t.obu_prefix.hex()}
            for s in sizes for t in [capture_avif_template(s)]}
    return {"avif": avif, "jpegxl": {str(s): capture_jxl_prefix(s).hex() for s in sizes}}


@functools.cache
def _templates() -> dict:
    return json.loads(resources.files("facetier.codec").joinpath("assets", TEMPLATE_FILE).read_text())


@functools.cache
def avif_template(size: int) -> AvifTemplate:
    t = _templates()["avif"].get(str(size))
    if t is None:
        raise RawStreamError(f"no AVIF rung template for {size} px")
    return AvifTemplate(bytes.fromhex(t["header"]), tuple(t["fields"]), bytes.fromhex(t["obu_prefix"]))


@functools.cache
def jxl_prefix(size: int) -> bytes:
    t = _templates()["jpegxl"].get(str(size))
    if t is None:
        raise RawStreamError(f"no JPEG XL rung template for {size} px")
    return bytes.fromhex(t)


# --- AVIF ------------------------------------------------------------------------------------
def avif_container(raw: bytes, size: int) -> bytes:
    t = avif_template(size)
    payload = t.obu_prefix + raw
    header = bytearray(t.header)
    extent, box = t.fields
    header[extent:extent + 4] = struct.pack(">I", len(payload))
    header[box:box + 4] = struct.pack(">I", len(payload) + 8)
    return bytes(header) + payload


def avif_encode(img: np.ndarray, quality: int) -> bytes:
    data = _avif_file(img, quality)
    t = avif_template(img.shape[0])
    _, payload = _split_mdat(data)
    if not payload.startswith(t.obu_prefix):
        raise RawStreamError("AV1 payload does not start with this size's sequence header")
    raw = payload[len(t.obu_prefix):]
    if avif_container(raw, img.shape[0]) != data:
        raise RawStreamError("AVIF container does not rebuild from the stripped bytes")
    return raw


# --- JPEG XL ---------------------------------------------------------------------------------
def jxl_container(raw: bytes, size: int) -> bytes:
    return jxl_prefix(size) + raw


def jxl_encode(img: np.ndarray, quality: int) -> bytes:
    data = _jxl_file(img, quality)
    prefix = jxl_prefix(img.shape[0])
    if not data.startswith(prefix):
        raise RawStreamError("JPEG XL codestream does not start with this size's header")
    return data[len(prefix):]


def _jxl_decode(data: bytes) -> np.ndarray:
    try:
        return np.asarray(imagecodecs.jpegxl_decode(data))[..., :3]
    except Exception as exc:
        raise RawStreamError(f"rung bitstream does not decode: {exc}") from exc


def _checked(decode: Callable[[bytes], np.ndarray], container: Callable[[bytes, int], bytes]) -> Callable[[bytes, int], np.ndarray]:
    def run(raw: bytes, size: int) -> np.ndarray:
        out = decode(container(raw, size))
        if out.shape != (size, size, 3):
            raise RawStreamError(f"rung decodes to {out.shape}, expected {(size, size, 3)}")
        return out

    return run


FORMATS: dict[str, RawFormat] = {
    WEBP: RawFormat(WEBP, 0, webp_encode, _checked(_pillow_decode, webp_container), webp_container),
    AVIF: RawFormat(AVIF, 1, avif_encode, _checked(_pillow_decode, avif_container), avif_container),
    JPEGXL: RawFormat(JPEGXL, 2, jxl_encode, _checked(_jxl_decode, jxl_container), jxl_container),
}


def available() -> dict[str, RawFormat]:
    """The formats this installation can write (Pillow wheels before 11.2 have no AVIF)."""
    return {k: v for k, v in FORMATS.items() if k != AVIF or features.check("avif")}


def by_code(code: int) -> RawFormat:
    for fmt in FORMATS.values():
        if fmt.code == code:
            return fmt
    raise RawStreamError(f"unknown rung format {code}")
