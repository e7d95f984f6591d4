"""The two layers above the generative ones.

``residual`` as tables before the rungs wrote it: the halved difference between the aligned source
crop and the full generative decode, a bare JPEG XL codestream. New tables hold a rung there
(``human_layers``); this format is still decoded, and :func:`encode_residual` makes it for tests.

``original``: the source file, losslessly. JPEGs go through JPEG XL's JPEG recompression, which
reconstructs the original file bit for bit (checked at encode time; if the round trip is not
exact, or for any other format, the bytes are stored as they are, zstd-compressed).
"""
from __future__ import annotations

import functools
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np

from facetier.errors import CorruptImageError, StreamError

log = logging.getLogger(__name__)

_ORIG_JXL = 1
_ORIG_ZSTD = 2


def encode_residual(source_crop: np.ndarray, generated: np.ndarray, quality: int) -> bytes:
    """Code ``source - generated`` (uint8 RGB crops of one size) as a JPEG XL image centred on 128:
    the residual of tables written before the rungs."""
    diff = source_crop.astype(np.int16) - generated.astype(np.int16)
    # Halving keeps the full +-255 range representable; residual detail is small in practice.
    shifted = np.clip(np.round(diff / 2) + 128, 0, 255).astype(np.uint8)
    return imagecodecs.jpegxl_encode(shifted, level=quality, effort=7)


@functools.cache
def pool() -> ThreadPoolExecutor:
    """Threads for the image codecs of a batch of faces, one per core."""
    return ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="facetier-image")


def apply_residual(generated: np.ndarray, payload: bytes) -> np.ndarray:
    try:
        shifted = imagecodecs.jpegxl_decode(payload)
    except Exception as exc:  # imagecodecs raises its own error types per codec
        raise StreamError(f"residual layer does not decode: {exc}") from exc
    if shifted.shape != generated.shape:
        raise StreamError(f"residual layer is {shifted.shape}, the face is {generated.shape}")
    out = generated.astype(np.int16) + (shifted.astype(np.int16) - 128) * 2
    return np.clip(out, 0, 255).astype(np.uint8)


def encode_original(data: bytes, *, is_jpeg: bool) -> bytes:
    """Lossless container for the source file's bytes."""
    if is_jpeg:
        try:
            jxl = imagecodecs.jpegxl_encode_jpeg(data)
            if imagecodecs.jpegxl_decode_jpeg(jxl) == data:
                return struct.pack("<B", _ORIG_JXL) + jxl
            log.debug("JPEG XL recompression not bit-exact; storing bytes")
        except Exception as exc:  # not every JPEG variant can be recompressed (e.g. arithmetic coding)
            log.debug("JPEG XL recompression failed (%s); storing bytes", exc)
    return struct.pack("<B", _ORIG_ZSTD) + imagecodecs.zstd_encode(data, level=19)


def decode_original(payload: bytes) -> bytes:
    if not payload:
        raise StreamError("empty original layer")
    kind, body = payload[0], payload[1:]
    try:
        if kind == _ORIG_JXL:
            return imagecodecs.jpegxl_decode_jpeg(body)
        if kind == _ORIG_ZSTD:
            return imagecodecs.zstd_decode(body)
    except Exception as exc:
        raise CorruptImageError(f"original layer does not decode: {exc}") from exc
    raise StreamError(f"unknown original-layer kind {kind}")
