"""``facetier rd --variants``: ways to code the face for people above the generative prefix, measured
side by side before one is built into the table.

Each variant is a chain of rungs (``codec.rungs``) on top of the full generative decode: the first
rung's reference is the generated face, each later rung's the rung below. A rung is coded at a
fixed quality or, per face, at the best candidate that fits a byte budget. A variant's bytes per
face are the generative prefix's plus every rung's (headers included, containers not: the
decoder rebuilds them), so it is a point a facetier table could store.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from facetier.codec import rungs
from facetier.codec.rungs import OWN, PREDICTED, RungCandidate

VARIANT = "variant"


@dataclass(frozen=True)
class Step:
    """One rung of a variant: a candidate at a fixed quality, or the best of several in a budget."""

    candidates: tuple[RungCandidate, ...]
    quality: int | None = None
    budget: int | None = None

    def code(self, crop: np.ndarray, reference: np.ndarray) -> rungs.CodedRung:
        if self.budget is not None:
            return rungs.best_within(crop, reference, self.candidates, self.budget)
        assert self.quality is not None and len(self.candidates) == 1
        return rungs.code_rung(crop, reference, self.candidates[0], self.quality)

    @property
    def label(self) -> str:
        what = "|".join(c.label for c in self.candidates)
        return f"{what} {'≤' + str(self.budget) + ' B' if self.budget is not None else 'q=' + str(self.quality)}"


@dataclass(frozen=True)
class Variant:
    family: str  # the curve it belongs to
    steps: tuple[Step, ...]

    @property
    def setting(self) -> str:
        return " + ".join(s.label for s in self.steps)


def _q(fmt: str, size: int, q: int, mode: int = OWN) -> Step:
    return Step((RungCandidate(fmt, size, mode),), quality=q)


BUDGET_CANDIDATES = (RungCandidate("webp", 48), RungCandidate("webp", 64), RungCandidate("avif", 64), RungCandidate("avif", 80))


def default_variants(crop_size: int) -> list[Variant]:
    """The issue's list, trimmed to the settings that land between ~100 and ~2,000 B at 128 px."""
    full = crop_size
    v: list[Variant] = []
    v += [Variant("difference, not halved (JPEG XL)", (_q("jpegxl", full, q, PREDICTED),)) for q in (0, 10, 25, 40)]
    v += [Variant("crop direct (JPEG XL)", (_q("jpegxl", full, q),)) for q in (0, 10, 25)]
    v += [Variant("crop direct (AVIF)", (_q("avif", full, q),)) for q in (25, 40, 60)]
    v += [Variant("low frequencies from generated (WebP@48)", (_q("webp", 48, q, PREDICTED),)) for q in (10, 25, 40)]
    v += [Variant("low frequencies from generated (AVIF@64)", (_q("avif", 64, q, PREDICTED),)) for q in (25, 40)]
    v += [Variant(f"rung {fmt}@{s}", (_q(fmt, s, q),)) for fmt, s, qs in
          (("webp", 48, (10, 25, 40)), ("webp", 64, (10, 25, 40)), ("avif", 64, (40, 60)), ("avif", 80, (25, 40)), ("jpegxl", 64, (10, 25)))
          for q in qs]
    v += [Variant("webp@64 on webp@48 q=10", (_q("webp", 48, 10), _q("webp", 64, q, PREDICTED))) for q in (0, 10)]
    v += [Variant("full (AVIF) on avif@64 q=40", (_q("avif", 64, 40), _q("avif", full, q, PREDICTED))) for q in (25, 40)]
    v += [Variant("per-face best in a budget", (Step(BUDGET_CANDIDATES, budget=b),)) for b in (160, 230, 330)]
    return v


def code_variant(variant: Variant, crops: np.ndarray, generated: Sequence[np.ndarray], pool: ThreadPoolExecutor) -> tuple[list[int], np.ndarray]:
    """Every face through the variant's rungs: bytes above the generative prefix and the top decode."""
    def one(pair: tuple[np.ndarray, np.ndarray]) -> tuple[int, np.ndarray]:
        crop, image = pair
        total = 0
        for step in variant.steps:
            coded = step.code(crop, image)
            total += coded.nbytes
            image = coded.image
        return total, image

    out = list(pool.map(one, zip(crops, generated), chunksize=32))
    return [n for n, _ in out], np.stack([img for _, img in out])
