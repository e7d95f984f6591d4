"""Runtime entropy coding of the generative layers, bit-exact across machines.

Each generative layer is a linear transform of its W+ rows to ``k`` latents, rounded to
integers and range-coded (``constriction``) with a discretised Gaussian whose mean and scale
come from the integer symbols of the layers below it (the paper's layer-wise conditioning).

Everything that decides a probability is integer arithmetic frozen at export:
  * the conditioning MLP runs in int64 fixed point on the integer lower-layer symbols;
  * its outputs pick a row of an integer frequency table (scale index x quarter-step mean);
  * the table row is handed to the coder as ``counts / counts.sum()`` in float64, which IEEE
    arithmetic computes identically everywhere.
So a stream written on a GPU decodes to the same symbols on any CPU. Only the float
transforms around the symbols (W+ -> latents before rounding, latents -> W+ after decoding)
run in floating point, and they never influence the bitstream's parsing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import constriction
import numpy as np

from facetier.errors import StreamError, TruncatedStreamError

FRAC_BITS = 16
HALF_RANGE = 128  # symbols are coded as offsets in [-HALF_RANGE, HALF_RANGE] around the predicted mean
N_SCALES = 64
SCALE_MIN = 0.11
SCALE_MAX = 32.0
MEAN_STEPS = 4  # the predicted mean has quarter-symbol resolution
MEAN_LIMIT = 4 * 4096


def scale_table() -> np.ndarray:
    return np.exp(np.linspace(np.log(SCALE_MIN), np.log(SCALE_MAX), N_SCALES))


def log_scale_step() -> float:
    return float((np.log(SCALE_MAX) - np.log(SCALE_MIN)) / (N_SCALES - 1))


def build_frequency_tables(total: int = 1 << 20) -> np.ndarray:
    """Integer tables (N_SCALES, MEAN_STEPS, 2*HALF_RANGE+1) of a discretised Gaussian, every count >= 1."""
    from math import erf, sqrt

    offsets = np.arange(-HALF_RANGE, HALF_RANGE + 1, dtype=np.float64)
    cdf = np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))
    tables = np.zeros((N_SCALES, MEAN_STEPS, offsets.size), np.int64)
    for si, sigma in enumerate(scale_table()):
        for f in range(MEAN_STEPS):
            mu = f / MEAN_STEPS
            p = cdf((offsets + 0.5 - mu) / sigma) - cdf((offsets - 0.5 - mu) / sigma)
            tables[si, f] = np.maximum(1, np.round(p / p.sum() * total)).astype(np.int64)
    return tables


@dataclass(frozen=True)
class FrozenLayerModel:
    """One layer's exported transform and integer conditioning network (numpy only)."""

    name: str
    rows: tuple[int, ...]
    mu: np.ndarray = field(repr=False)  # (d,) float32
    analysis: np.ndarray = field(repr=False)  # (d, k) float32
    synthesis: np.ndarray = field(repr=False)  # (k, d) float32
    w1: np.ndarray = field(repr=False)  # (c, H) int64, scaled 2^F
    b1: np.ndarray = field(repr=False)  # (H,) int64, scaled 2^F
    wm: np.ndarray = field(repr=False)  # (H, k) int64, scaled 2^F, output in quarter symbols
    bm: np.ndarray = field(repr=False)  # (k,) int64, scaled 2^2F
    ws: np.ndarray = field(repr=False)  # (H, k) int64, scaled 2^F, output in scale-table steps
    bs: np.ndarray = field(repr=False)  # (k,) int64, scaled 2^2F

    @property
    def latent_dim(self) -> int:
        return int(self.analysis.shape[1])

    @property
    def context_dim(self) -> int:
        return int(self.w1.shape[0])

    def params(self, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean in quarter symbols, scale index) for each latent, from integer context (c,)."""
        ctx = np.asarray(context, dtype=np.int64).reshape(-1)
        if ctx.size != self.context_dim:
            raise StreamError(f"layer {self.name}: context has {ctx.size} symbols, expected {self.context_dim}")
        h = np.maximum(ctx @ self.w1 + self.b1, 0)
        half = np.int64(1) << np.int64(2 * FRAC_BITS - 1)
        mean4 = (h @ self.wm + self.bm + half) >> np.int64(2 * FRAC_BITS)
        sidx = (h @ self.ws + self.bs + half) >> np.int64(2 * FRAC_BITS)
        return np.clip(mean4, -MEAN_LIMIT, MEAN_LIMIT), np.clip(sidx, 0, N_SCALES - 1)

    def analyse(self, w_rows: np.ndarray) -> np.ndarray:
        """Latents (float) of the flattened W+ rows of this layer."""
        return (w_rows.reshape(-1).astype(np.float64) - self.mu) @ self.analysis.astype(np.float64)

    def synthesise(self, latents: np.ndarray) -> np.ndarray:
        """W+ rows (len(rows), style_dim) from (possibly fractional) latents."""
        flat = self.mu.astype(np.float64) + np.asarray(latents, np.float64) @ self.synthesis.astype(np.float64)
        return flat.reshape(len(self.rows), -1).astype(np.float32)


def _pack(words: np.ndarray) -> bytes:
    raw = words.astype("<u4").tobytes()
    strip = 0
    while strip < 3 and raw and raw[-1 - strip] == 0:
        strip += 1
    return raw[: len(raw) - strip]


def _unpack(payload: bytes) -> np.ndarray:
    pad = (-len(payload)) % 4
    return np.frombuffer(payload + b"\x00" * pad, dtype="<u4").astype(np.uint32)


class LayerEntropyCoder:
    """Codes one layer's integer symbols given the integer symbols of the layers below."""

    def __init__(self, model: FrozenLayerModel, tables: np.ndarray) -> None:
        self.model = model
        self._probs = tables.astype(np.float64) / tables.sum(axis=2, keepdims=True, dtype=np.int64).astype(np.float64)

    def quantise(self, latents: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Integer symbols for ``latents``, clamped into the range the tables can code."""
        mean4, _ = self.model.params(context)
        base = mean4 >> 2
        q = np.rint(latents).astype(np.int64)
        return base + np.clip(q - base, -HALF_RANGE, HALF_RANGE)

    def encode(self, symbols: np.ndarray, context: np.ndarray) -> bytes:
        mean4, sidx = self.model.params(context)
        base, frac = mean4 >> 2, mean4 & 3
        offsets = symbols - base
        if np.any(np.abs(offsets) > HALF_RANGE):
            raise StreamError(f"layer {self.model.name}: symbol outside the coder's range; call quantise() first")
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode((offsets + HALF_RANGE).astype(np.int32), constriction.stream.model.Categorical(perfect=False), self._probs[sidx, frac])
        return _pack(enc.get_compressed())

    def decode(self, payload: bytes, context: np.ndarray) -> np.ndarray:
        mean4, sidx = self.model.params(context)
        base, frac = mean4 >> 2, mean4 & 3
        try:
            dec = constriction.stream.queue.RangeDecoder(_unpack(payload))
            idx = dec.decode(constriction.stream.model.Categorical(perfect=False), self._probs[sidx, frac])
        except (ValueError, RuntimeError) as exc:
            raise TruncatedStreamError(f"layer {self.model.name}: {exc}") from exc
        return base + np.asarray(idx, np.int64) - HALF_RANGE

    def predict(self, context: np.ndarray) -> np.ndarray:
        """The conditional mean of this layer's latents: what a decode without this layer uses."""
        mean4, _ = self.model.params(context)
        return mean4.astype(np.float64) / MEAN_STEPS
