"""The base family's two identity vectors, stored compactly as int8.

``identity`` is the semantic layer's identity head read from the 60-number code (what the paper's
compact code carries); ``descriptor`` is dlib's 128-d descriptor of the aligned crop, computed at
encode time anyway (the semantic encoder reads it). Persons, the identity index and ``search`` use
the descriptor: the head's distances are compressed. dlib's ``chinese_whispers_clustering`` of LFW's
4,511 evaluation photos reaches pairwise F 0.79 at best on the head's vectors, 0.92 on the stored
descriptors and 0.93 on dlib's descriptors of the original photos (README, *Finding people*).

The identity embedding:

A float32 128-d embedding is 512 B a face, twenty times the basic code it is read next to. Each
row keeps ``round(x / scale)`` with ``scale = max|x| / 127``, so every row uses the full int8
range whatever the model's embedding scale (132 B a face). Both columns are plain types that
BigQuery, Spark and DuckDB read natively; the float embedding is ``identity[i] * identity_scale``.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

LEVELS = 127


def pack_identity(vector: Sequence[float] | None) -> tuple[list[int] | None, float | None]:
    """(int8 components, scale) of one embedding; (None, None) for a face without one."""
    if vector is None:
        return None, None
    v = np.asarray(vector, np.float64)
    peak = float(np.abs(v).max()) if v.size else 0.0
    scale = peak / LEVELS if peak > 0 else 1.0
    return np.clip(np.rint(v / scale), -LEVELS, LEVELS).astype(np.int8).tolist(), float(np.float32(scale))


def unpack_identity(identity: pa.ChunkedArray | pa.Array, scale: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, dim) float32 embeddings from the stored columns (rows must all hold one)."""
    if isinstance(identity, pa.ChunkedArray):
        identity = identity.combine_chunks()
    if isinstance(scale, pa.ChunkedArray):
        scale = scale.combine_chunks()
    n = len(identity)
    q = np.asarray(identity.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    return q * np.asarray(scale.to_numpy(zero_copy_only=False), np.float32)[:, None]


# The descriptor: one fixed step for every row, so the stored int8 components are the vector up to a
# constant and any two rows compare without a per-row scale (an index can hold them as they are).
# dlib's components stay within +-0.56 on LFW and UTKFace; the step keeps +-0.635.
DESCRIPTOR_STEP = 0.005
DESCRIPTOR_DIM = 128


def pack_descriptor(vector: Sequence[float] | None) -> list[int] | None:
    """int8 components of one descriptor (None for a face without one)."""
    if vector is None:
        return None
    return np.clip(np.rint(np.asarray(vector, np.float64) / DESCRIPTOR_STEP), -LEVELS, LEVELS).astype(np.int8).tolist()


def descriptor_codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, 128) int8 components of a ``descriptor`` column whose rows all hold one."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if not n:
        return np.zeros((0, DESCRIPTOR_DIM), np.int8)
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.int8).reshape(n, -1)


def unpack_descriptors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(rows, 128) float32 descriptors (in dlib's units) of a ``descriptor`` column."""
    return descriptor_codes(column).astype(np.float32) * np.float32(DESCRIPTOR_STEP)


def roundtrip_descriptor(vector: Sequence[float]) -> np.ndarray:
    """What a stored descriptor reads back as."""
    return np.asarray(pack_descriptor(vector), np.float32) * np.float32(DESCRIPTOR_STEP)


def roundtrip(vector: Sequence[float]) -> np.ndarray:
    """What a stored embedding reads back as."""
    q, s = pack_identity(vector)
    return np.asarray(q, np.float32) * np.float32(s)
