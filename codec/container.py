"""The self-describing container of a layered face code.

Layout (little endian)::

    magic  b"FTL1"
    u8     format version
    u8     len(codec_id), codec_id utf-8
    16 B   weights hash (first 16 bytes of the SHA-256 of the weights)
    u8     number of layers n
    n x    [u8 len(name), name utf-8, u32 payload length, u32 crc32 of payload]
    u32    crc32 of everything above (the header)
    payloads, in table order

Any prefix of the layers is itself a valid container (the writer simply lists fewer layers),
and a reader can stop after the layers it needs.
"""
from __future__ import annotations

import struct
import zlib

from facetier.codec.layers import LayerCode, LayeredCode

from facetier.errors import (
    BadMagicError,
    ChecksumError,
    TruncatedStreamError,
    UnsupportedVersionError,
)

MAGIC = b"FTL1"
FORMAT_VERSION = 1


def _hash_bytes(weights_hash: str) -> bytes:
    raw = bytes.fromhex(weights_hash)[:16]
    return raw.ljust(16, b"\x00")


def to_bytes(code: LayeredCode) -> bytes:
    head = bytearray(MAGIC)
    cid = code.codec_id.encode()
    head += struct.pack("<BB", FORMAT_VERSION, len(cid)) + cid + _hash_bytes(code.weights_hash)
    head += struct.pack("<B", len(code.layers))
    for layer in code.layers:
        name = layer.name.encode()
        head += struct.pack("<B", len(name)) + name + struct.pack("<II", layer.nbytes, layer.crc32)
    head += struct.pack("<I", zlib.crc32(head))
    return bytes(head) + b"".join(layer.payload for layer in code.layers)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TruncatedStreamError(f"stream ends at byte {len(self.data)}, needed {self.pos + n}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]


def from_bytes(data: bytes) -> LayeredCode:
    """Parse and verify a container; raises a typed :class:`StreamError` on any damage."""
    if data[:4] != MAGIC:
        raise BadMagicError(f"not a facetier stream (starts with {bytes(data[:4])!r})")
    r = _Reader(data)
    r.take(4)
    version = r.u8()
    if version != FORMAT_VERSION:
        raise UnsupportedVersionError(f"format version {version}; this facetier reads {FORMAT_VERSION}")
    codec_id = r.take(r.u8()).decode("utf-8", "replace")
    weights_hash = r.take(16).hex()
    table = []
    for _ in range(r.u8()):
        name = r.take(r.u8()).decode("utf-8", "replace")
        table.append((name, r.u32(), r.u32()))
    header_end = r.pos
    if r.u32() != zlib.crc32(data[:header_end]):
        raise ChecksumError("container header checksum mismatch")
    layers = []
    for name, length, crc in table:
        payload = r.take(length)
        if zlib.crc32(payload) != crc:
            raise ChecksumError(f"layer {name!r} checksum mismatch")
        layers.append(LayerCode(name, bytes(payload)))
    return LayeredCode(codec_id, weights_hash, tuple(layers))
