"""Judging facetier's whole curve against every conventional point of a ``facetier rd`` run.

- **BD-rate** (Bjøntegaard): the mean bytes difference at equal quality, on each curve's upper
  envelope, against each codec and against the envelope of all conventional points pooled
  (every codec, downscaled variants included).
- **Points that beat facetier**: a conventional point at ≤ 2,000 B beats facetier at its bytes
  unless some facetier point with no more bytes is within 1 point of its verification and 0.005
  of its MS-SSIM.
- **Goals**: the best verification facetier reaches within 300 and 400 B, the best MS-SSIM within
  1,700 B, and how each budgeted rung's bytes sat against its budget.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

FACETIER = "facetier"
VARIANT = "variant"
BEAT_MAX_BYTES = 2000
VERIFICATION_TOLERANCE = 0.01
MS_SSIM_TOLERANCE = 0.005


class Point(Protocol):
    codec: str
    setting: str
    bytes_mean: float
    ms_ssim: float
    psnr_db: float
    verification: float | None


def is_conventional(p: Point) -> bool:
    return p.codec != FACETIER and not p.codec.startswith(VARIANT)


def curve(points: list[Any], codec: str) -> list[Any]:
    """One codec's points by rate (facetier's: all of its points, prefixes and layers for people)."""
    return sorted((p for p in points if p.codec == codec), key=lambda p: p.bytes_mean)


def _envelope(pts: list[Any], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Quality and log bytes along the upper envelope: each point that beats every cheaper one."""
    xs, ys, best = [], [], -math.inf
    for p in sorted(pts, key=lambda p: p.bytes_mean):
        v = getattr(p, metric)
        if v is not None and v > best:
            best = v
            xs.append(v)
            ys.append(math.log(p.bytes_mean))
    return np.array(xs), np.array(ys)


def bd_rate(test: list[Any], anchor: list[Any], metric: str) -> float | None:
    """Bjøntegaard delta rate (%) of ``test`` against ``anchor`` on ``metric``: the mean bytes
    difference at equal quality over the range both curves cover (negative = ``test`` needs fewer
    bytes). Piecewise-linear in log bytes, on each curve's upper envelope, so a noisy metric that
    is not monotone in rate (verification) does not break it. None where the curves do not overlap."""
    qt, rt = _envelope(test, metric)
    qa, ra = _envelope(anchor, metric)
    if len(qt) < 2 or len(qa) < 2:
        return None
    lo, hi = max(qt[0], qa[0]), min(qt[-1], qa[-1])
    if hi <= lo:
        return None
    grid = np.linspace(lo, hi, 200)
    diff = float(np.mean(np.interp(grid, qt, rt) - np.interp(grid, qa, ra)))
    return 100.0 * (math.exp(diff) - 1.0)


METRICS = ("ms_ssim", "psnr_db", "verification")


def bd_rates(points: list[Any]) -> dict[str, dict[str, float | None]]:
    """facetier's curve against the envelope of every conventional point, and against each codec at full resolution."""
    ours = curve(points, FACETIER)
    pooled = [p for p in points if is_conventional(p)]
    out = {f"{FACETIER} vs envelope of all conventional points": {m: bd_rate(ours, pooled, m) for m in METRICS}}
    anchors = sorted({p.codec for p in pooled if "@" not in p.codec})
    out.update({f"{FACETIER} vs {a}": {m: bd_rate(ours, curve(points, a), m) for m in METRICS} for a in anchors})
    return out


def beating_points(points: list[Any], max_bytes: float = BEAT_MAX_BYTES) -> list[dict[str, Any]]:
    """Each conventional point at ≤ ``max_bytes`` that no facetier point with no more bytes matches
    (within the tolerances), with the facetier point that comes closest."""
    ours = [p for p in points if p.codec == FACETIER]
    out = []
    for c in sorted((p for p in points if is_conventional(p) and p.bytes_mean <= max_bytes), key=lambda p: p.bytes_mean):
        cheaper = [f for f in ours if f.bytes_mean <= c.bytes_mean]

        def matches(f: Any) -> bool:
            verif_ok = c.verification is None or (f.verification is not None and f.verification >= c.verification - VERIFICATION_TOLERANCE)
            return verif_ok and f.ms_ssim >= c.ms_ssim - MS_SSIM_TOLERANCE

        if any(matches(f) for f in cheaper):
            continue

        def shortfall(f: Any) -> float:
            v = 0.0 if c.verification is None or f.verification is None else max(0.0, c.verification - f.verification) / VERIFICATION_TOLERANCE
            return max(v, max(0.0, c.ms_ssim - f.ms_ssim) / MS_SSIM_TOLERANCE)

        closest = min(cheaper, key=shortfall, default=None)
        out.append({"codec": c.codec, "setting": c.setting, "bytes": round(c.bytes_mean, 1), "verification": c.verification, "ms_ssim": c.ms_ssim,
                    "closest_facetier": None if closest is None else {"setting": closest.setting, "bytes": round(closest.bytes_mean, 1),
                                                                        "verification": closest.verification, "ms_ssim": closest.ms_ssim}})
    return out


def _best(points: list[Any], metric: str, max_bytes: float) -> dict[str, Any] | None:
    pts = [p for p in points if p.codec == FACETIER and p.bytes_mean <= max_bytes and getattr(p, metric) is not None]
    if not pts:
        return None
    p = max(pts, key=lambda p: getattr(p, metric))
    return {"value": getattr(p, metric), "setting": p.setting, "bytes": round(p.bytes_mean, 1)}


def goals(points: list[Any]) -> dict[str, Any]:
    """The issue's figures: best verification within 300 and 400 B, best MS-SSIM within 1,700 B, and
    each budgeted rung's mean and 95th-percentile bytes against its budget."""
    budgets = {p.setting: {"budget": p.budget, "mean_vs_budget": p.layer_bytes_mean / p.budget - 1, "p95_vs_budget": p.layer_bytes_p95 / p.budget - 1}
               for p in points if p.codec == FACETIER and getattr(p, "budget", None) and ", over " not in p.setting}  # same payloads
    return {"verification_within_300_B": _best(points, "verification", 300), "verification_within_400_B": _best(points, "verification", 400),
            "ms_ssim_within_1700_B": _best(points, "ms_ssim", 1700), "budgets": budgets}
