"""Seconds per named stage of encoding, carried with the work rather than kept in a global.

Encode work moves between processes (Beam DoFns, Ray actors, local workers), so each face item
carries the seconds spent on it and the shard writer adds them up: the job summary and
``facetier bench`` report time per stage per face on every engine the same way. A batch's time
is shared equally by its faces.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# The order stages happen in, for reports; unknown names sort after these.
STAGE_ORDER = ("read", "decode", "detect_align", "original_jxl", "descriptor", "encoder", "semantic_entropy",
               "synthesis", "residual_jxl", "write")


class StageTimes(dict[str, float]):
    """stage name -> seconds; ``with times.stage("encoder"): ...`` adds the block's wall time."""

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start

    def add(self, other: Mapping[str, float], share: float = 1.0) -> None:
        for k, v in other.items():
            self[k] = self.get(k, 0.0) + v * share

    def ordered(self) -> dict[str, float]:
        rank = {n: i for i, n in enumerate(STAGE_ORDER)}
        return {k: self[k] for k in sorted(self, key=lambda k: (rank.get(k, len(rank)), k))}


def per_face_ms(seconds: Mapping[str, float], faces: int) -> dict[str, float]:
    """Milliseconds per face of each stage (in stage order)."""
    times = StageTimes(seconds)
    return {k: 1000.0 * v / max(faces, 1) for k, v in times.ordered().items()}


def render_stages(seconds: Mapping[str, float], faces: int) -> str:
    """A small table: stage, ms per face, share of the total."""
    ms = per_face_ms(seconds, faces)
    total = sum(ms.values()) or 1.0
    lines = [f"{'stage':<18}{'ms/face':>9}{'share':>8}"]
    lines += [f"{k:<18}{v:>9.1f}{100 * v / total:>7.1f}%" for k, v in ms.items()]
    lines.append(f"{'total':<18}{sum(ms.values()):>9.1f}  (sum over stages; stages that overlap count in full)")
    return "\n".join(lines)
