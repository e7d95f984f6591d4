"""The base family's identity embedding, stored compactly: int8 components and one float32 scale per row.

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


def roundtrip(vector: Sequence[float]) -> np.ndarray:
    """What a stored embedding reads back as."""
    q, s = pack_identity(vector)
    return np.asarray(q, np.float32) * np.float32(s)
