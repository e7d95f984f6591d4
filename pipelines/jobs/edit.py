"""Compressed-domain edits: move attribute coordinates of the basic code and decode.

Edits decode the basic layer's integer code, move attribute coordinates and decode W+ from the
edited code, with the face's own middle/enhanced layers on top: no pixels go back through the
encoder. The result is image files (the decode job: any engine, any fsspec URI, manifest,
paste-back, gallery), or new rows of a table.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from facetier.codec.model import FaceCodec
from facetier.codec.semantic import require_finite_edits
from facetier.io.commit import commit, finish_pending
from facetier.io.reader import read_family
from facetier.io.table import INDEX_FAMILY, Table
from facetier.pipelines.jobs.analytics import QueryLimits
from facetier.pipelines.jobs.decode import DecodeOptions, DecodeResult, run_decode
from facetier.pipelines.jobs.records import JobContext, write_shard
from facetier.pipelines.jobs.selection import select
from facetier.pipelines.jobs.stored_codes import index_rows, read_codes

from facetier.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditResult:
    edited: int
    outputs: tuple[str, ...]  # image URIs, or the new face ids when writing to a table
    table_version: int | None
    failures: tuple = ()  # selected faces that could not be edited (typed: id, error_class, message)
    job: DecodeResult | None = None  # the image job's summary (manifest, gallery, timings)


def edit(
    table_root: str,
    where: str | None,
    edits: Mapping[str, str],
    out: str,
    *,
    upto: str = "enhanced",
    as_table: bool = False,
    weights: str | None = None,
    device: str = "auto",
    limit: int | None = None,
    ids: Sequence[str] = (),
    opts: DecodeOptions | None = None,
) -> EditResult:
    """Edit the selected faces (``where`` and/or ``ids``) and write images (``out`` a folder or URI,
    through the decode job's engines) or new rows (``out`` a table)."""
    if not edits:
        raise ConfigError("nothing to edit: give at least one --set NAME=VALUE")
    require_finite_edits(edits)
    if not (as_table or Table(out).exists()):
        job = run_decode(table_root, ids, upto, out, opts, where=where, edits=tuple(sorted(edits.items())), weights=weights, device=device, limit=limit)
        return EditResult(job.written + job.present, tuple(f.path for f in job.files), None, job.failures, job)
    codec = FaceCodec.load(weights, device=device)
    if codec.semantic is None:
        raise ConfigError(f"{codec.codec_id} has no semantic base layer: nothing to edit")
    if upto not in codec.plan.names:
        raise ConfigError(f"--upto must be one of the generative layers {codec.plan.names}")
    selection = select(table_root, ids=ids, ids_file=opts.ids_file if opts else None, where=where, limit=limit,
                       limits=opts.query_limits if opts else QueryLimits())
    if not selection.units:
        return EditResult(0, (), None, selection.failures)
    table = Table(table_root)
    snapshot = table.snapshot()
    rows, failures = index_rows(table, list(selection.units), snapshot)
    codes_by_id, failed = read_codes(table, rows, list(codec.plan.names[: codec.plan.index(upto) + 1]), snapshot)
    failures = [*selection.failures, *failures, *failed]
    rows = [r for r in rows if r["face_id"] in codes_by_id]
    if not rows:
        return EditResult(0, (), None, tuple(failures))
    symbols = [codec.decode_symbols(codes_by_id[r["face_id"]], upto) for r in rows]
    edited = codec.semantic.edit(np.stack([s[0] for s in symbols]).astype(np.float64), edits)
    edited_sym = [codec.coders[0].quantise(e, np.zeros(0, np.int64)) for e in edited]
    return replace(_write_rows(codec, out, rows, edited_sym, symbols, edits), failures=tuple(failures))


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
    finish_pending(table)
    snapshot = table.snapshot_or_empty()
    shard_id = "edit-" + hashlib.sha256((spec + "|" + ",".join(r["face_id"] for r in rows)).encode()).hexdigest()[:16]
    ids = tuple(f"{it['photo_id']}-0" for it in items)
    if snapshot.version and set(ids) <= set(read_family(table, INDEX_FAMILY, columns=["face_id"], filters=[("face_id", "in", list(ids))],
                                                         snapshot=snapshot).column("face_id").to_pylist()):
        return EditResult(len(items), ids, snapshot.version)  # the same edit of the same faces is in the table already
    for it in items:
        it["shard_id"] = shard_id
    ctx = JobContext(out, "", codec.codec_id, codec.weights_hash, codec.config.alignment, tuple(codec.plan.names))
    entry = write_shard(ctx, shard_id, items)
    version = commit(table, snapshot.version, [entry])
    table.remove_done_markers([shard_id])
    return EditResult(len(items), ids, version)
