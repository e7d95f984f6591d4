"""On-demand decode: face ids -> images at a chosen layer prefix, or the source files."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from facetier.codec.layers import ORIGINAL, LayerCode, LayeredCode
from facetier.codec.model import FaceCodec
from facetier.io.images import sniff_format
from facetier.io.reader import read_family
from facetier.io.table import (
    INDEX_FAMILY,
    LAYER_FAMILIES,
    ORIGINAL_FAMILY,
    Manifest,
    Table,
)
from PIL import Image

from facetier.errors import ConfigError, MissingLayerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodedFile:
    face_id: str
    path: str
    layers_used: tuple[str, ...]
    generated: bool


def run_decode(table_root: str, ids: Sequence[str], upto: str, out_dir: str, *, weights: str | None = None, fmt: str = "png", device: str = "auto") -> list[DecodedFile]:
    """Decode faces (by face id or photo id) at ``upto`` into ``out_dir``; ``original`` writes the source file."""
    table = Table(table_root)
    manifest = table.manifest()
    wanted = set(ids)
    index = read_family(table, INDEX_FAMILY, manifest=manifest).to_pylist()
    rows = [r for r in index if r["face_id"] in wanted or r["photo_id"] in wanted]
    missing = wanted - {r["face_id"] for r in rows} - {r["photo_id"] for r in rows}
    if missing:
        raise ConfigError(f"not in table {table_root}: {sorted(missing)[:5]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if upto == ORIGINAL:
        photos = sorted({r["photo_id"] for r in rows})
        orig = read_family(table, ORIGINAL_FAMILY, manifest=manifest, filters=[("photo_id", "in", photos)]).to_pylist()
        from facetier.codec.image_layers import decode_original

        written = []
        for r in orig:
            data = decode_original(r["payload"])
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(sniff_format(data) or "", "bin")
            p = out / f"{r['photo_id']}.{ext}"
            p.write_bytes(data)
            written.append(DecodedFile(r["photo_id"], str(p), (ORIGINAL,), generated=False))
        return written
    codec = FaceCodec.load(weights, device=device)
    if upto not in codec.layer_names or upto == ORIGINAL:
        raise ConfigError(f"--upto must be one of {codec.layer_names}")
    needed = list(codec.plan.names[: codec.plan.index(upto) + 1]) if upto in codec.plan.names else list(codec.plan.names) + [upto]
    codes = layered_codes(table, rows, needed, manifest=manifest)
    decoded = codec.decode_many(codes, upto)
    written = []
    for r, d in zip(rows, decoded):
        p = out / f"{r['face_id']}_{upto}.{fmt}"
        Image.fromarray(np.ascontiguousarray(d.image)).save(p)
        written.append(DecodedFile(r["face_id"], str(p), d.layers_used, d.generated))
    return written


def layered_codes(table: Table, rows: list[dict], families: Sequence[str], *, manifest: Manifest | None = None) -> list[LayeredCode]:
    """The coded layers ``families`` (lowest first) of the faces in ``rows`` (rows of the faces index)."""
    manifest = manifest or table.manifest()
    face_ids = [r["face_id"] for r in rows]
    payloads: dict[str, dict[str, bytes]] = {fid: {} for fid in face_ids}
    for fam in families:
        if fam not in LAYER_FAMILIES:
            continue
        for r in read_family(table, fam, manifest=manifest, columns=["face_id", "payload"], filters=[("face_id", "in", face_ids)]).to_pylist():
            payloads[r["face_id"]][fam] = r["payload"]
    codes = []
    for r in rows:
        layers = []
        for fam in families:
            if fam not in payloads[r["face_id"]]:
                raise MissingLayerError(f"face {r['face_id']} has no {fam!r} layer in the table")
            layers.append(LayerCode(fam, payloads[r["face_id"]][fam]))
        codes.append(LayeredCode(r["codec_id"], r["weights_hash"], tuple(layers)))
    return codes
