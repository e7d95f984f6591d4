"""Spatial rungs: the face for people, coded small first and refined, each rung a plain image codec.

A rung codes the aligned crop at a lower size (or at its own) with WebP, AVIF or JPEG XL, without
the container bytes a decoder can restore (``raw_bitstreams``). A rung is either coded on its own
(``OWN``) or as the difference from the image below it, brought to its size (``PREDICTED``: the
reference is the generated face for the first rung, the rung below for the others). Its first two
bytes record what was chosen, so every rung decodes without outside settings::

    byte 0  format (bits 0-1) | mode (bits 2-3) | size index (bits 4-7, into SIZES)
    byte 1  quality (0-99; informational: the bitstream decodes without it)

Resampling is Pillow's (box down, bicubic up): plain C, the same on every CPU, so the encoder's
reference is the decoder's, bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from facetier.codec import raw_bitstreams
from facetier.errors import ConfigError, RawStreamError

OWN = 0
PREDICTED = 1
MODES = {"own": OWN, "predicted": PREDICTED}
SIZES = (16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 256, 512, 1024)
HEADER_BYTES = 2
MAX_QUALITY = 99  # AVIF at 100 is lossless, with another sequence header than its templates


@dataclass(frozen=True)
class RungCandidate:
    """A way to code a rung: format, size in pixels and mode."""

    fmt: str
    size: int
    mode: int = OWN

    def __post_init__(self) -> None:
        if self.fmt not in raw_bitstreams.FORMATS:
            raise ConfigError(f"unknown rung format {self.fmt!r}; known: {', '.join(raw_bitstreams.FORMATS)}")
        if self.size not in SIZES:
            raise ConfigError(f"rung size {self.size} px is not one of {SIZES}")
        if self.mode not in (OWN, PREDICTED):
            raise ConfigError(f"unknown rung mode {self.mode}")

    @property
    def label(self) -> str:
        mode = "" if self.mode == OWN else "Δ"
        return f"{self.fmt}{mode}@{self.size}"

    @staticmethod
    def parse(text: str) -> RungCandidate:
        """``webp@48``, ``avif@64`` or ``jpegxl@128:predicted``."""
        try:
            fmt, rest = text.split("@")
            size, _, mode = rest.partition(":")
            return RungCandidate(fmt, int(size), MODES[mode or "own"])
        except (ValueError, KeyError):
            raise ConfigError(f"bad rung candidate {text!r}; write FORMAT@PX[:own|predicted], e.g. webp@48") from None


@dataclass(frozen=True)
class CodedRung:
    """One face's rung: the payload stored and the image it decodes to at the crop's size."""

    candidate: RungCandidate
    quality: int
    payload: bytes
    image: np.ndarray

    @property
    def nbytes(self) -> int:
        return len(self.payload)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size:
        return img
    method = Image.BOX if size < img.shape[0] else Image.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size, size), method))


def _header(c: RungCandidate, quality: int) -> bytes:
    fmt = raw_bitstreams.FORMATS[c.fmt].code
    return bytes((fmt | c.mode << 2 | SIZES.index(c.size) << 4, quality))


def read_header(payload: bytes) -> tuple[RungCandidate, int]:
    if len(payload) < HEADER_BYTES:
        raise RawStreamError("rung shorter than its header")
    b0, quality = payload[0], payload[1]
    mode = (b0 >> 2) & 3
    if mode not in (OWN, PREDICTED):
        raise RawStreamError(f"unknown rung mode {mode}")
    return RungCandidate(raw_bitstreams.by_code(b0 & 3).name, SIZES[b0 >> 4], mode), quality


def _target(crop: np.ndarray, reference: np.ndarray | None, c: RungCandidate) -> np.ndarray:
    small = resize(crop, c.size)
    if c.mode == OWN:
        return small
    if reference is None:
        raise ConfigError("a predicted rung needs the image below it")
    return np.clip(small.astype(np.int16) - resize(reference, c.size) + 128, 0, 255).astype(np.uint8)


def _rebuild(small: np.ndarray, reference: np.ndarray | None, c: RungCandidate, crop_size: int) -> np.ndarray:
    if c.mode == PREDICTED:
        if reference is None:
            raise RawStreamError("a predicted rung needs the image below it")
        small = np.clip(resize(reference, c.size).astype(np.int16) + small - 128, 0, 255).astype(np.uint8)
    return resize(small, crop_size)


def decode_rung(payload: bytes, reference: np.ndarray | None, crop_size: int) -> np.ndarray:
    """The face at ``crop_size`` from a rung's payload and the image below it."""
    c, _ = read_header(payload)
    small = raw_bitstreams.FORMATS[c.fmt].decode(payload[HEADER_BYTES:], c.size)
    return _rebuild(small, reference, c, crop_size)


def _encode(crop: np.ndarray, reference: np.ndarray | None, c: RungCandidate, quality: int) -> bytes:
    """The payload of ``crop`` coded as ``c`` at ``quality``, not decoded."""
    if not 0 <= quality <= MAX_QUALITY:
        raise ConfigError(f"rung quality {quality} is outside 0-{MAX_QUALITY}")
    return _header(c, quality) + raw_bitstreams.FORMATS[c.fmt].encode(_target(crop, reference, c), quality)


def _coded(payload: bytes, reference: np.ndarray | None, crop_size: int) -> CodedRung:
    c, quality = read_header(payload)
    return CodedRung(c, quality, payload, decode_rung(payload, reference, crop_size))


def code_rung(crop: np.ndarray, reference: np.ndarray | None, c: RungCandidate, quality: int) -> CodedRung:
    """``crop`` coded as candidate ``c`` at ``quality`` (0-99)."""
    return _coded(_encode(crop, reference, c, quality), reference, crop.shape[0])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


# How fast a face's bytes grow with quality (log bytes per quality step, about): the first step
# from the first try; later steps go through the last two tries (secant on log bytes).
_LOG_BYTES_PER_STEP = {"avif": 0.032, "webp": 0.025, "jpegxl": 0.020}
_FIRST_QUALITY = 30
# AVIF's quality at which an aligned face lands at 250 B, by rung size: 79 - 0.69 px, fitted on
# LFW folds 5-8 crops at 48-96 px (median per size; ad-hoc). A first try there lands near the
# budget, so most faces need two encodes rather than three.
_AVIF_Q250 = (79.0, -0.69)
OVERSHOOT = 0.10  # a rung may pass its budget by this much where that is nearer than the setting below
CLOSE_ENOUGH = 0.04  # log bytes: a try this near the budget ends the search
# what a doubling of bytes buys, roughly, at these rates: candidates that land at different bytes
# are compared at the budget's
_DB_PER_DOUBLING = 4.0


def first_quality(c: RungCandidate, budget: int) -> int:
    """Where the search for ``budget`` starts: AVIF's from the fitted size model, others' at a fixed quality."""
    if c.fmt != raw_bitstreams.AVIF:
        return _FIRST_QUALITY
    q = _AVIF_Q250[0] + _AVIF_Q250[1] * c.size + math.log(budget / 250) / _LOG_BYTES_PER_STEP["avif"]
    return min(max(round(q), 0), MAX_QUALITY)


def fit_budget(crop: np.ndarray, reference: np.ndarray | None, c: RungCandidate, budget: int, max_tries: int = 6) -> CodedRung:
    """The quality of ``c`` whose payload is nearest ``budget`` bytes (on a log scale, and at most
    :data:`OVERSHOOT` over it), found in a few encodes rather than by trying every setting: it stops
    at a try within :data:`CLOSE_ENOUGH` of the budget (on faces, about two tries), or after
    ``max_tries``. Nearest rather than highest-under keeps the mean over many faces at the budget:
    a quality step moves a small face's bytes by several percent. The lowest quality's rung when
    even that is over. Only the chosen try is decoded. Every step depends on this face alone, so
    a face's rung is the same whatever else is in its batch."""
    tries: dict[int, bytes] = {}
    q = first_quality(c, budget)
    for _ in range(max_tries):
        if q not in tries:
            tries[q] = _encode(crop, reference, c, q)
            if abs(math.log(len(tries[q]) / budget)) <= CLOSE_ENOUGH:
                break
        under = [k for k, v in tries.items() if len(v) <= budget]
        over = [k for k, v in tries.items() if len(v) > budget]
        if under and over:
            a, b = max(under), min(over)
            if b - a <= 1:
                break
            la, lb = math.log(len(tries[a])), math.log(len(tries[b]))
            q = round(a + (math.log(budget) - la) / max(lb - la, 1e-6) * (b - a))
            q = min(max(q, a + 1), b - 1)
        else:
            last = max(under) if under else min(over)
            q = round(last + math.log(budget / len(tries[last])) / _LOG_BYTES_PER_STEP[c.fmt])
            q = min(max(q, 0), MAX_QUALITY)
            if q in tries:
                break
    ok = [v for v in tries.values() if len(v) <= budget * (1 + OVERSHOOT)]
    if ok:
        payload = min(ok, key=lambda v: abs(math.log(len(v) / budget)))
    else:
        payload = tries[0] if 0 in tries else _encode(crop, reference, c, 0)
    return _coded(payload, reference, crop.shape[0])


def _score(r: CodedRung, crop: np.ndarray, budget: int) -> float:
    return _psnr(r.image, crop) - _DB_PER_DOUBLING * math.log2(r.nbytes / budget)


def best_within(crop: np.ndarray, reference: np.ndarray | None, candidates: Sequence[RungCandidate], budget: int) -> CodedRung:
    """Per face: each candidate at the quality nearest its budget; the one closest to the crop wins
    (PSNR, brought to the budget's bytes). A candidate whose bitstream cannot be stripped for this
    face is passed over."""
    best: tuple[float, CodedRung] | None = None
    errors = []
    for c in candidates:
        try:
            r = fit_budget(crop, reference, c, budget)
        except RawStreamError as exc:
            errors.append(f"{c.label}: {exc}")
            continue
        score = _score(r, crop, budget) - (1000.0 if r.nbytes > budget * (1 + OVERSHOOT) else 0.0)
        if best is None or score > best[0]:
            best = (score, r)
    if best is None:
        raise RawStreamError("no rung candidate codes this face: " + "; ".join(errors))
    return best[1]
