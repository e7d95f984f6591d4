"""Compressed-domain edits: move attribute coordinates of the basic code and decode.

Edits decode the basic layer's integer code, move attribute coordinates and decode W+ from the
edited code, with the face's own middle/enhanced layers on top: no pixels go back through the
encoder. The result is PNGs in a folder, or new rows of a table.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from facetier.codec.layers import LayeredCode
from facetier.codec.model import FaceCodec
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.records import JobContext, write_shard
from facetier.pipelines.jobs.stored_codes import FaceFailure, index_rows, read_codes
from PIL import Image

from facetier.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditResult:
    edited: int
    outputs: tuple[str, ...]  # image paths, or the new face ids when writing to a table
    table_version: int | None
    failures: tuple[FaceFailure, ...] = ()  # selected faces whose stored layers failed their checks


def _select(table_root: str, where: str) -> list[str]:
    res = run_query(table_root, f"SELECT face_id FROM basic WHERE {where} ORDER BY face_id")
    return res.table.column("face_id").to_pylist()


def _codes(table: Table, face_ids: list[str], families: Sequence[str]) -> tuple[list[LayeredCode], list[dict], list[FaceFailure]]:
    """The verified codes of the faces that have them (with their index rows), and the faces that fail."""
    manifest = table.manifest()
    rows, failures = index_rows(table, face_ids, manifest)
    codes, failed = read_codes(table, rows, families, manifest)
    kept = [r for r in rows if r["face_id"] in codes]
    return [codes[r["face_id"]] for r in kept], kept, failures + failed


def edit(
    table_root: str,
    where: str,
    edits: Mapping[str, str],
    out: str,
    *,
    upto: str = "enhanced",
    as_table: bool = False,
    weights: str | None = None,
    device: str = "auto",
    limit: int | None = None,
) -> EditResult:
    """Edit the faces matching ``where`` and write images (``out`` a folder) or new rows (``out`` a table)."""
    if not edits:
        raise ConfigError("nothing to edit: give at least one --set NAME=VALUE")
    codec = FaceCodec.load(weights, device=device)
    if codec.semantic is None:
        raise ConfigError(f"{codec.codec_id} has no semantic base layer: nothing to edit")
    if upto not in codec.plan.names:
        raise ConfigError(f"--upto must be one of the generative layers {codec.plan.names}")
    table = Table(table_root)
    face_ids = _select(table_root, where)[:limit]
    if not face_ids:
        return EditResult(0, (), None)
    families = list(codec.plan.names[: codec.plan.index(upto) + 1])
    codes, rows, failures = _codes(table, face_ids, families)
    if not codes:
        return EditResult(0, (), None, tuple(failures))
    symbols = [codec.decode_symbols(c, upto) for c in codes]
    edited = codec.semantic.edit(np.stack([s[0] for s in symbols]).astype(np.float64), edits)
    coder0 = codec.coders[0]
    edited_sym = [coder0.quantise(e, np.zeros(0, np.int64)) for e in edited]
    wplus = np.stack([codec.wplus_from_symbols([e, *s[1:]]) for e, s in zip(edited_sym, symbols)])
    if as_table or Table(out).exists():
        return replace(_write_rows(codec, out, rows, edited_sym, symbols, edits), failures=tuple(failures))
    images = codec.synthesise(wplus)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tag = _edit_tag(edits)
    paths = []
    for row, img in zip(rows, images):
        p = folder / f"{row['face_id']}_{tag}.png"
        Image.fromarray(np.ascontiguousarray(img)).save(p)
        paths.append(str(p))
    return EditResult(len(paths), tuple(paths), None, tuple(failures))


def _edit_tag(edits: Mapping[str, str]) -> str:
    return "_".join(f"{k}{v}" for k, v in sorted(edits.items())).replace("=", "").replace("/", "")


def _write_rows(codec: FaceCodec, out: str, rows: list[dict], edited_sym: list[np.ndarray], symbols: list[list[np.ndarray]], edits: Mapping[str, str]) -> EditResult:
    """Append the edited faces to a table as new rows: the base re-coded, upper layers re-coded in its context."""
    spec = json.dumps(sorted(edits.items()))
    items = []
    described = codec.describe_base(np.stack(edited_sym).astype(np.float64))
    for row, base, syms, columns in zip(rows, edited_sym, symbols, described):
        context = np.zeros(0, np.int64)
        layers = {}
        for coder, sym in zip(codec.coders, [base, *syms[1:]]):
            sym = coder.quantise(sym.astype(np.float64), context)
            layers[coder.model.name] = coder.encode(sym, context)
            context = np.concatenate([context, sym])
        photo_id = hashlib.sha256(f"{row['photo_id']}|{row['face_index']}|{spec}".encode()).hexdigest()[:32]
        meta = {"box": row["box"], "landmarks": row["landmarks"], "transform": row["transform"], "source_size": [row["source_width"], row["source_height"]],
                "score": row["detector_score"]}
        items.append({"kind": "face", "shard_id": "", "source_uri": f"edit:{row['face_id']}?{'&'.join(f'{k}={v}' for k, v in sorted(edits.items()))}",
                      "photo_id": photo_id, "face_index": 0, "meta": json.dumps(meta), "layers": layers, "semantic": columns, "original": None})
    table = Table(out)
    manifest = table.manifest_or_empty()
    shard_id = "edit-" + hashlib.sha256((spec + "|" + ",".join(r["face_id"] for r in rows)).encode()).hexdigest()[:16]
    ids = tuple(f"{it['photo_id']}-0" for it in items)
    if any(s.shard_id == shard_id for s in manifest.shards):  # the same edit of the same faces is in the table already
        return EditResult(len(items), ids, manifest.version)
    for it in items:
        it["shard_id"] = shard_id
    ctx = JobContext(out, "", codec.codec_id, codec.weights_hash, codec.config.alignment, tuple(codec.plan.names), frozenset())
    entry = write_shard(ctx, shard_id, items)
    new = table.commit(manifest.version, [*manifest.shards, entry])
    table.remove_done_markers([shard_id])
    return EditResult(len(items), ids, new.version)
