"""Per-record logic of the encode job, written once and called by every engine adapter.

Items flowing between stages are plain dicts (picklable, Arrow-friendly), one per face or per
rejected input (inputs the table already holds never reach a worker: the driver leaves them out):

    kind: "face" | "reject";  shard_id; source_uri; source_key; photo_id
    face:   face_index, crop (S,S,3 uint8), meta (json), original (bytes | None),
            descriptor (128 float32, when the model's descriptor re-detects the face on the CPU stage)
    reject: error_class, message
    every item: times ({stage: seconds} spent on it; an input's and a batch's time shared by its faces)
after encoding, faces also carry ``layers``: {layer name: payload bytes}.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from facetier.codec.align import AlignmentConfig, FaceDetector, align_faces
from facetier.codec.face_descriptor import FaceDescriptor
from facetier.codec.image_layers import encode_original
from facetier.codec.layers import HUMAN_LAYERS, ORIGINAL
from facetier.codec.stage_times import StageTimes
from facetier.io.identity import pack_descriptor, pack_identity
from facetier.io.images import decode_image
from facetier.io.sources import (
    MAX_SOURCE_BYTES,
    SourceRef,
    content_id,
    read_source,
    storable_uri,
)
from facetier.io.table import (
    ALIAS_FAMILY,
    ATTRIBUTE_FIELDS,
    BASE_FAMILY,
    INDEX_FAMILY,
    INPUTS_FAMILY,
    LAYER_FAMILIES,
    ORIGINAL_FAMILY,
    REJECT_FAMILY,
    ShardEntry,
    Table,
    family_schema,
)

from facetier.errors import FacetierError, InputError

log = logging.getLogger(__name__)

# inputs rejected before hashing for what their name is: never read again. Every other input rejected
# before hashing (a read that failed: permissions, a dangling link, a mount, a network error) is retried.
PERMANENT = frozenset({"UnsafeMemberError"})
BASE_COLUMNS = tuple(f.name for f in ATTRIBUTE_FIELDS) + ("identity",)


@dataclass(frozen=True)
class ShardSpec:
    """A deterministic slice of the inputs; its id fixes which inputs and which model."""

    shard_id: str
    sources: tuple[str, ...]
    keys: tuple[int | None, ...] = ()  # source keys (name + listing fingerprint), aligned with ``sources``; None: unknown

    def inputs(self) -> Iterable[tuple[str, int | None]]:
        """(source, its source key) for each input."""
        return zip(self.sources, self.keys or (None,) * len(self.sources))


@dataclass(frozen=True)
class JobContext:
    """What every worker needs; small and picklable."""

    table_root: str
    weights_path: str
    codec_id: str
    weights_hash: str
    alignment: AlignmentConfig
    layers: tuple[str, ...]
    device: str = "auto"
    batch_size: int = 16
    descriptor: str = ""  # the model's face descriptor id (the detected-chip method runs on the CPU stage)
    max_source_bytes: int = MAX_SOURCE_BYTES
    residual_quality: int | None = None  # of the residual layer; None: the default
    rung_bytes: tuple[tuple[str, int], ...] = ()  # budgets of the preview and detail rungs; () the defaults
    human_layers: str = ""  # how the layers for people are coded, in words (recorded with their files)
    # torch threads per encoder worker; 0 leaves torch's default (all cores). Several workers sharing
    # one machine each get their share, or their thread pools fight over the cores (Beam x2 on 2 cores
    # ran at half the speed of one worker).
    torch_threads: int = 0


def load_worker_codec(ctx: JobContext) -> Any:
    """The codec of one encoder worker, with the worker's share of the machine's threads."""
    import torch
    from facetier.codec.model import FaceCodec

    if ctx.torch_threads:
        torch.set_num_threads(ctx.torch_threads)
    return FaceCodec.load(ctx.weights_path, device=ctx.device)


def shared_machine_threads(workers: int) -> int:
    """torch threads for each of ``workers`` encoder workers running on this machine."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def _reject(shard_id: str, source: str, photo_id: str | None, error_class: str, message: str, key: int | None = None) -> dict[str, Any]:
    return {"kind": "reject", "shard_id": shard_id, "source_uri": source, "source_key": key, "photo_id": photo_id, "error_class": error_class,
            "message": message[:2000]}


def prepare_source(shard_id: str, source: str, ctx: JobContext, detector: FaceDetector,
                   descriptor: FaceDescriptor | None = None, key: int | None = None) -> list[dict[str, Any]]:
    """Read, hash, decode and align one input (and describe its faces); never raises for a bad input.
    ``key`` is the input's source key, recorded on its rows."""
    photo_id = None
    times = StageTimes()
    try:
        with times.stage("read"):
            data = read_source(SourceRef.parse(source), ctx.max_source_bytes)
            photo_id = content_id(data)
        with times.stage("decode"):
            image = decode_image(data, draft_size=None)
        with times.stage("detect_align"):
            faces = align_faces(image.rgb, detector)
        with times.stage("original_jxl"):
            original = encode_original(data, is_jpeg=image.format == "JPEG") if ORIGINAL in ctx.layers else None
        with times.stage("descriptor"):
            descriptors = list(descriptor.embed_crops(np.stack([f.crop for f in faces]))) if descriptor is not None else [None] * len(faces)
    except InputError as exc:
        return [{**_reject(shard_id, source, photo_id, exc.error_class, str(exc), key), "times": times}]
    except Exception as exc:  # a bug or an unexpected library error must not kill the job or lose the record
        log.exception("unexpected error preparing %s", source)
        return [{**_reject(shard_id, source, photo_id, f"Unexpected{type(exc).__name__}", str(exc), key), "times": times}]
    items = []
    share = StageTimes()
    share.add(times, 1.0 / len(faces))
    for f, desc in zip(faces, descriptors):
        meta = {"box": list(f.detection.box), "landmarks": f.detection.landmarks.reshape(-1).tolist(), "transform": f.transform.reshape(-1).tolist(),
                "source_size": list(f.source_size), "score": f.detection.score}
        items.append({"kind": "face", "shard_id": shard_id, "source_uri": source, "source_key": key, "photo_id": photo_id, "face_index": f.face_index,
                      "crop": f.crop, "meta": json.dumps(meta), "original": original if f.face_index == 0 else None, "source_bytes": len(data),
                      "descriptor": desc, "times": StageTimes(share)})
    return items


def encode_items(codec: Any, items: Sequence[dict[str, Any]], layers: Sequence[str], human: Any = None) -> list[dict[str, Any]]:
    """Encode the face items of a batch; other items pass through unchanged. A face's bytes do not
    depend on the batch (the codec runs its networks on fixed micro-batches)."""
    faces = [i for i in items if i["kind"] == "face"]
    if faces:
        wanted = [n for n in layers if n != ORIGINAL]
        descs = [f.get("descriptor") for f in faces]
        times = StageTimes()
        try:
            crops = np.stack([f["crop"] for f in faces])
            if all(d is not None for d in descs):
                descriptors = np.stack(descs)
            else:
                with times.stage("descriptor"):
                    descriptors = codec.descriptors(crops)
            codes = codec.encode_crops(crops, layers=wanted, times=times, human=human, descriptors=descriptors)
        except FacetierError as exc:
            if len(faces) > 1:  # find the face that fails: the others of the batch are not at fault
                return [out for it in items for out in encode_items(codec, [it], layers, human)]
            return [_reject(i["shard_id"], i["source_uri"], i["photo_id"], exc.error_class, str(exc), i.get("source_key")) if i["kind"] == "face" else i
                    for i in items]
        with times.stage("semantic_entropy"):
            described = codec.describe(codes) if codec.semantic is not None and BASE_FAMILY in layers else [None] * len(codes)
        for i, (item, code, columns) in enumerate(zip(faces, codes, described)):
            item["layers"] = {layer.name: layer.payload for layer in code.layers}
            item["semantic"] = None if columns is None else {**columns, "descriptor": None if descriptors is None else descriptors[i]}
            item["times"] = StageTimes(item.get("times") or {})
            item["times"].add(times, 1.0 / len(faces))
    return list(items)


def _base_columns(semantic: dict[str, Any] | None) -> dict[str, Any]:
    """The base family's typed columns from what the semantic layer decoded (nulls without one)."""
    columns = {f: (semantic or {}).get(f) for f in BASE_COLUMNS}
    columns["identity"], columns["identity_scale"] = pack_identity(columns["identity"])
    columns["descriptor"] = pack_descriptor((semantic or {}).get("descriptor"))
    return columns


def write_shard(ctx: JobContext, shard_id: str, results: Iterable[dict[str, Any]]) -> ShardEntry:
    """Write one shard's families, then its done marker (last, so a marker means complete)."""
    write_started = time.perf_counter()
    results = sorted(results, key=lambda r: (r["source_uri"], r.get("face_index", -1), r["kind"]))
    table = Table(ctx.table_root)
    faces = [r for r in results if r["kind"] == "face"]
    rejects = [r for r in results if r["kind"] == "reject"]
    # the same bytes under several names: stored once (under the first name), the other names as aliases
    first_name: dict[str, str] = {}
    for r in faces + [r for r in rejects if r["photo_id"]]:
        first_name.setdefault(r["photo_id"], r["source_uri"])
    duplicates = {(r["photo_id"], r["source_uri"]) for r in faces + rejects if r["photo_id"] and first_name[r["photo_id"]] != r["source_uri"]}
    keys = {r["source_uri"]: r.get("source_key") for r in results}
    cols: dict[str, dict[str, list]] = {}

    def add(family: str, **row: Any) -> None:
        fam = cols.setdefault(family, {name: [] for name in family_schema(family).names})
        for k, v in row.items():
            fam[k].append(v)

    for r in faces:
        if (r["photo_id"], r["source_uri"]) in duplicates:
            continue
        meta = json.loads(r["meta"])
        face_id = f"{r['photo_id']}-{r['face_index']}"
        uri, raw = storable_uri(r["source_uri"])
        add(INDEX_FAMILY, face_id=face_id, photo_id=r["photo_id"], face_index=r["face_index"], source_uri=uri, source_uri_raw=raw, box=meta["box"],
            landmarks=meta["landmarks"], transform=meta["transform"], source_width=meta["source_size"][0], source_height=meta["source_size"][1],
            detector_score=meta["score"], codec_id=ctx.codec_id, weights_hash=ctx.weights_hash, status="encoded")
        for name, payload in r["layers"].items():
            if name in LAYER_FAMILIES:
                extra = _base_columns(r.get("semantic")) if name == BASE_FAMILY else {}
                add(name, face_id=face_id, photo_id=r["photo_id"], payload=payload, nbytes=len(payload), crc32=zlib.crc32(payload), **extra)
        if r.get("original") is not None:
            add(ORIGINAL_FAMILY, photo_id=r["photo_id"], source_uri=uri, source_uri_raw=raw, payload=r["original"], nbytes=len(r["original"]),
                source_bytes=r["source_bytes"])
    for photo_id, source in sorted(duplicates):
        uri, raw = storable_uri(source)
        add(ALIAS_FAMILY, photo_id=photo_id, source_uri=uri, source_uri_raw=raw)
    for r in rejects:
        if (r["photo_id"], r["source_uri"]) in duplicates:
            continue
        uri, raw = storable_uri(r["source_uri"])
        add(REJECT_FAMILY, source_uri=uri, source_uri_raw=raw, photo_id=r["photo_id"], error_class=r["error_class"], message=storable_uri(r["message"])[0], codec_id=ctx.codec_id, weights_hash=ctx.weights_hash)
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in faces + rejects:
        by_source.setdefault(r["source_uri"], []).append(r)
    for source, key in sorted(keys.items()):
        uri, raw = storable_uri(source)
        photo_id, outcome, error_class = _outcome(source, by_source.get(source, []), duplicates)
        add(INPUTS_FAMILY, source_uri=uri, source_uri_raw=raw, source_key=key, photo_id=photo_id, weights_hash=ctx.weights_hash, outcome=outcome,
            error_class=error_class, layers=",".join(ctx.layers))
    files, rows, nbytes, fstats = {}, {}, {}, {}
    for family, data in cols.items():
        arrow = pa.Table.from_pydict(data, schema=family_schema(family))
        # the rung headers record each face's format, size and quality; the budgets are the job's
        extra = {"human_layers": ctx.human_layers} if family in HUMAN_LAYERS else None
        files[family], nbytes[family], fstats[family] = table.write_family(family, shard_id, arrow, ctx.codec_id, ctx.weights_hash, extra)
        rows[family] = arrow.num_rows
    sources = {r["source_uri"] for r in results}
    stats = {
        "inputs": len(sources),
        "encoded_inputs": len({r["source_uri"] for r in faces}),
        "faces": len(faces) - sum(1 for r in faces if (r["photo_id"], r["source_uri"]) in duplicates),
        "aliases": len(duplicates),
        # per input: one with any face stored is encoded, even if another of its faces was rejected
        "rejected": len({r["source_uri"] for r in rejects} - {r["source_uri"] for r in faces}),
        "rejects_by_class": dict(Counter(r["error_class"] for r in rejects)),
        "stage_seconds": _stage_seconds(results, time.perf_counter() - write_started),
        "finished_at": time.time(),  # wall clock, for the job's steady rate: polling markers misses shards that end together
        # the writing process's peak so far: Ray's and Dataflow's workers are not the driver's children
        "worker_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if set(ctx.layers) & set(HUMAN_LAYERS):
        stats["human_layers"] = ctx.human_layers
    entry = ShardEntry(shard_id, ctx.codec_id, ctx.weights_hash, files, rows, nbytes,
                       tuple(sorted({r["photo_id"] for r in faces} | {r["photo_id"] for r in rejects if r["photo_id"]})), stats, fstats)
    table.write_done_marker(entry)
    return entry


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _outcome(source: str, mine: list[dict[str, Any]], duplicates: set[tuple[str, str]]) -> tuple[str | None, str, str | None]:
    """(photo id, outcome, error class) of one input from its face and reject items: ``stored`` when its
    photo's rows are under this name, ``alias`` when they are under another, else ``rejected`` (its reject row tells why)."""
    photo_id = next((r["photo_id"] for r in mine if r["photo_id"]), None)
    if photo_id is not None and (photo_id, source) in duplicates:
        return photo_id, "alias", None
    if any(r["kind"] == "face" for r in mine):
        return photo_id, "stored", None
    return photo_id, "rejected", next((r["error_class"] for r in mine if r["kind"] == "reject"), None)


def _stage_seconds(results: Iterable[dict[str, Any]], write_seconds: float) -> dict[str, float]:
    total = StageTimes(write=write_seconds)
    for r in results:
        total.add(r.get("times") or {})
    return {k: round(v, 6) for k, v in total.ordered().items()}
