"""On-demand decode: face ids -> images at a chosen layer prefix, or the source files."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facetier.codec.layers import ORIGINAL, LayeredCode
from facetier.codec.model import DecodedFace, FaceCodec
from facetier.io.images import sniff_format
from facetier.io.table import Table
from facetier.pipelines.jobs.stored_codes import FaceFailure, index_rows, read_codes, read_originals
from PIL import Image

from facetier.errors import ConfigError, FacetierError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedFile:
    face_id: str
    path: str
    layers_used: tuple[str, ...]
    generated: bool


@dataclass(frozen=True)
class DecodeResult:
    """What a decode wrote and what it could not: selected = written + failed."""

    files: tuple[DecodedFile, ...]
    failures: tuple[FaceFailure, ...]

    @property
    def selected(self) -> int:
        return len(self.files) + len(self.failures)


def run_decode(table_root: str, ids: Sequence[str], upto: str, out_dir: str, *, weights: str | None = None, fmt: str = "png",
               device: str = "auto") -> DecodeResult:
    """Decode faces (by face id or photo id) at ``upto`` into ``out_dir``; ``original`` writes the source file.

    A face whose stored layers fail their checks, or sit in a file that cannot be read, is a
    failure of this run (typed, naming the file); the other faces are still written.
    """
    table = Table(table_root)
    manifest = table.manifest()
    rows, failures = index_rows(table, ids, manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if upto == ORIGINAL:
        originals, failed = read_originals(table, sorted({r["photo_id"] for r in rows}), manifest)
        written = []
        for pid, data in sorted(originals.items()):
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(sniff_format(data) or "", "bin")
            p = out / f"{pid}.{ext}"
            p.write_bytes(data)
            written.append(DecodedFile(pid, str(p), (ORIGINAL,), generated=False))
        return DecodeResult(tuple(written), tuple(failures + failed))
    codec = FaceCodec.load(weights, device=device)
    if upto not in codec.layer_names or upto == ORIGINAL:
        raise ConfigError(f"--upto must be one of {codec.layer_names}")
    needed = list(codec.plan.names[: codec.plan.index(upto) + 1]) if upto in codec.plan.names else list(codec.plan.names) + [upto]
    codes, failed = read_codes(table, rows, needed, manifest)
    failures += failed
    written = []
    for fid, decoded in decode_each(codec, codes, upto, failures):
        p = out / f"{fid}_{upto}.{fmt}"
        Image.fromarray(np.ascontiguousarray(decoded.image)).save(p)
        written.append(DecodedFile(fid, str(p), decoded.layers_used, decoded.generated))
    return DecodeResult(tuple(written), tuple(failures))


def decode_each(codec: FaceCodec, codes: dict[str, LayeredCode], upto: str, failures: list[FaceFailure]) -> list[tuple[str, DecodedFace]]:
    """Decode ``codes`` in one batch; if the batch fails, face by face, so one bad stream fails alone (into ``failures``)."""
    ids = sorted(codes)
    try:
        return list(zip(ids, codec.decode_many([codes[i] for i in ids], upto)))
    except FacetierError:
        pass
    out = []
    for fid in ids:
        try:
            out.append((fid, codec.decode_many([codes[fid]], upto)[0]))
        except FacetierError as exc:
            failures.append(FaceFailure.of(fid, exc))
    return out
