"""``facetier search``: faces of the same person as an image or a stored face, from the base family alone.

Distances are between dlib descriptors as the base family stores them (facetier.io.identity). With a
current identity index (``facetier index``) candidates come from the index, whose codes are the
stored vectors, so its distances are exact; without one, or with a stale one, the base family is
scanned a file and a slice at a time within the query limits. The result says which. Tables written
before facetier stored descriptors are searched by the ``identity`` column instead (the semantic
layer's identity head), and the result says that too.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from facetier.codec.model import FaceCodec
from facetier.io.identity import (
    DESCRIPTOR_STEP,
    descriptor_codes,
    pack_descriptor,
    roundtrip,
    unpack_identity,
)
from facetier.io.images import decode_image
from facetier.io.reader import ByteCounter, family_files, read_family, read_file
from facetier.io.sources import SourceRef, read_source
from facetier.io.table import BASE_FAMILY, Snapshot, Table
from facetier.pipelines.jobs.analytics import QueryLimits, run_query
from facetier.pipelines.jobs.identity_index import current_index, search_index, within_index

from facetier.errors import ConfigError, InputError, QueryLimitError

log = logging.getLogger(__name__)

DESCRIPTOR, IDENTITY = "descriptor", "identity"
ATTRIBUTES = ["age", "gender", "race"]
VECTOR_COLUMNS = {DESCRIPTOR: ["descriptor"], IDENTITY: ["identity", "identity_scale"]}
BYTES_PER_ROW = 4 * 4 * 128  # float32 components, their difference to the query and its square


@dataclass(frozen=True)
class SearchResult:
    table: pa.Table  # rank, face_id, photo_id, distance, age, gender, race
    bytes_read: int
    query: str
    method: str  # which index generation answered, or why the base family was scanned
    space: str  # "descriptor", or "identity" for tables written before descriptors were stored
    without_vector: int = 0  # rows the scan skipped for having no vector in ``space``


@dataclass(frozen=True)
class QueryVector:
    space: str
    vector: np.ndarray  # int8 codes (descriptor) or float32 (identity)
    face_id: str | None  # the query's own face when it is a row of the table


def _stored_vector(table: Table, snapshot: Snapshot, like: str, counter: ByteCounter) -> QueryVector | None:
    """The vector of ``like`` when it is a face or photo id of the table (a point lookup)."""
    columns = ["face_id", "descriptor", "identity", "identity_scale"]
    for column in ("face_id", "photo_id"):
        rows = read_family(table, BASE_FAMILY, snapshot=snapshot, columns=columns, filters=[(column, "=", like)], counter=counter)
        if not rows.num_rows:
            continue
        fid = rows.column("face_id")[0].as_py()
        if rows.column("descriptor")[0].is_valid:
            return QueryVector(DESCRIPTOR, descriptor_codes(rows.column("descriptor").slice(0, 1))[0], fid)
        if rows.column("identity")[0].is_valid:
            return QueryVector(IDENTITY, unpack_identity(rows.column("identity").slice(0, 1), rows.column("identity_scale").slice(0, 1))[0], fid)
        raise ConfigError(f"face {fid} has no identity vector (encoded by a model without a semantic base layer)")
    return None


def _image_vector(like: str, weights: str | None, device: str, space: str) -> QueryVector:
    try:
        data = read_source(SourceRef.parse(like))
    except InputError as exc:
        raise ConfigError(f"--like {like!r} is neither a face/photo id of the table nor a readable image: {exc}") from exc
    codec = FaceCodec.load(weights, device=device)
    crop = codec.align(decode_image(data).rgb)[0].crop[None]
    descriptors = codec.descriptors(crop)
    if space == DESCRIPTOR and descriptors is not None:
        return QueryVector(DESCRIPTOR, np.asarray(pack_descriptor(descriptors[0]), np.int8), None)  # at the precision the table stores
    codes = codec.encode_crops(crop, layers=["basic"], descriptors=descriptors)
    return QueryVector(IDENTITY, roundtrip(codec.describe(codes)[0]["identity"]), None)


def _table_space(table: Table, snapshot: Snapshot) -> str:
    """Descriptors when the newest base-family file holds them (tables written before do not)."""
    files = family_files(table, BASE_FAMILY, snapshot)
    if not files:
        raise ConfigError(f"{table.root} has no faces")
    column = read_file(table, files[-1], BASE_FAMILY, columns=["descriptor"]).column("descriptor")
    return DESCRIPTOR if column.null_count < len(column) else IDENTITY


def _distances(rows: pa.Table, query: QueryVector) -> np.ndarray:
    if query.space == DESCRIPTOR:
        diff = descriptor_codes(rows.column("descriptor")).astype(np.float32) - query.vector.astype(np.float32)[None]
        return np.sqrt((diff**2).sum(1)) * DESCRIPTOR_STEP
    emb = unpack_identity(rows.column("identity"), rows.column("identity_scale"))
    return np.sqrt(((emb - query.vector[None]) ** 2).sum(1))


def _nearest(rows: pa.Table, query: QueryVector, k: int | None, within: float | None) -> pa.Table:
    """Rows of ``rows`` nearest ``query`` (the ``k`` nearest, or all within ``within``), with a ``distance`` column."""
    dist = _distances(rows, query)
    if query.face_id is not None:
        dist[np.asarray(pc.equal(rows.column("face_id"), query.face_id).fill_null(False))] = np.inf
    if within is not None:
        dist[dist > within] = np.inf
    order = [int(i) for i in np.argsort(dist, kind="stable")[: k or len(dist)] if np.isfinite(dist[i])]
    return rows.take(pa.array(order, pa.int64())).append_column("distance", pa.array(dist[order].astype(np.float32)))


def _top(rows: pa.Table, k: int | None) -> pa.Table:
    order = pc.sort_indices(rows, sort_keys=[("distance", "ascending"), ("face_id", "ascending")])
    return rows.take(order if k is None else order.slice(0, k))


def _rows_per_slice(limits: QueryLimits) -> int:
    return max(1024, limits.memory_mb * 2**20 // BYTES_PER_ROW)


def _allowed_faces(table_root: str, where: str | None, snapshot: Snapshot, limits: QueryLimits, counter: ByteCounter) -> pa.Array | None:
    if where is None:
        return None
    res = run_query(table_root, f"SELECT face_id FROM basic WHERE ({where})", snapshot=snapshot, limits=limits)
    counter.add(res.bytes_read)
    return res.table.column("face_id").combine_chunks()


def _scan(table: Table, snapshot: Snapshot, query: QueryVector, k: int | None, within: float | None, allowed: pa.Array | None,
          limits: QueryLimits, counter: ByteCounter) -> tuple[pa.Table | None, int]:
    deadline = time.monotonic() + limits.seconds
    rows_per_slice = _rows_per_slice(limits)
    columns = ["face_id", "photo_id", *ATTRIBUTES, *VECTOR_COLUMNS[query.space]]
    best, without = None, 0
    for rel in family_files(table, BASE_FAMILY, snapshot):
        part = read_file(table, rel, BASE_FAMILY, columns=columns, counter=counter)
        valid = pc.is_valid(part.column(VECTOR_COLUMNS[query.space][0]))
        without += part.num_rows - pc.sum(valid.cast(pa.int64())).as_py() if part.num_rows else 0
        part = part.filter(valid)
        if allowed is not None:
            part = part.filter(pc.is_in(part.column("face_id"), value_set=allowed))
        for at in range(0, part.num_rows, rows_per_slice):
            found = _nearest(part.slice(at, rows_per_slice), query, k, within)
            best = found if best is None else _top(pa.concat_tables([best, found]), k)
            if time.monotonic() > deadline:
                raise QueryLimitError(f"search ran past its time limit of {limits.seconds:g} s (--query-seconds)")
    return (None if best is None else best.drop_columns(VECTOR_COLUMNS[query.space])), int(without)


def _from_index(table: Table, loaded, query: QueryVector, k: int | None, within: float | None, allowed: pa.Array | None,
                counter: ByteCounter) -> pa.Table:
    allowed_ids = None
    if allowed is not None:
        allowed_ids = loaded.ids[np.asarray(pc.is_in(loaded.face_ids, value_set=allowed).fill_null(False))]
    if within is not None:
        dist, rows = within_index(loaded, query.vector, within, allowed=allowed_ids)
    else:
        dist, rows = search_index(loaded, query.vector[None], k + 1, allowed=allowed_ids)  # one more: the query's own face
        dist, rows = dist[0], rows[0]
    keep = rows >= 0
    dist, rows = dist[keep], rows[keep]
    found = pa.table({"face_id": loaded.face_ids.take(pa.array(rows)), "photo_id": loaded.photo_ids.take(pa.array(rows)),
                      "distance": pa.array(dist.astype(np.float32))})
    if query.face_id is not None:
        found = found.filter(pc.not_equal(found.column("face_id"), query.face_id))
    found = _top(found, k)
    # the attributes of the answer only: each read touches the files holding it
    files = sorted(set(loaded.files.take(pa.array(rows)).to_pylist()))
    ids = found.column("face_id").to_pylist()
    attrs = read_family(table, BASE_FAMILY, columns=["face_id", *ATTRIBUTES], filters=[("face_id", "in", ids)] if ids else None,
                        only_files=files, counter=counter) if ids else None
    return _with_attributes(found, attrs)


def _with_attributes(found: pa.Table, attrs: pa.Table | None) -> pa.Table:
    by_id = {} if attrs is None else {r["face_id"]: r for r in attrs.to_pylist()}
    rows = found.to_pylist()
    return pa.table({"face_id": [r["face_id"] for r in rows], "photo_id": [r["photo_id"] for r in rows],
                     **{a: [by_id.get(r["face_id"], {}).get(a) for r in rows] for a in ATTRIBUTES},
                     "distance": pa.array([r["distance"] for r in rows], pa.float32())})


def search(table_root: str, like: str, k: int | None = 10, *, within: float | None = None, where: str | None = None,
           as_of: int | None = None, use_index: bool = True, weights: str | None = None, device: str = "auto",
           limits: QueryLimits = QueryLimits()) -> SearchResult:
    """Faces of the table nearest ``like`` (an image, or a face/photo id of the table): the ``k`` nearest,
    or with ``within`` every face closer than that descriptor distance (0.45 is the clustering's
    same-person distance); ``where`` restricts the answer by SQL over the base family's columns."""
    if within is None and (k is None or k < 1):
        raise ConfigError("-k must be at least 1")
    if within is not None and not (np.isfinite(within) and within > 0):
        raise ConfigError(f"--within must be a positive distance, got {within}")
    k = None if within is not None else k
    table = Table(table_root)
    snapshot = table.snapshot(as_of)
    counter = ByteCounter()
    query = _stored_vector(table, snapshot, like, counter)
    if query is None:
        query = _image_vector(like, weights, device, _table_space(table, snapshot))
    allowed = _allowed_faces(table_root, where, snapshot, limits, counter)
    loaded, method = (current_index(table, snapshot) if use_index and query.space == DESCRIPTOR
                      else (None, "scanning the base family" + ("" if use_index else " (--no-index)")))
    without = 0
    if loaded is not None:
        found = _from_index(table, loaded, query, k, within, allowed, counter)
    else:
        found, without = _scan(table, snapshot, query, k, within, allowed, limits, counter)
        if found is None:
            raise ConfigError(f"{table_root} has no faces with a {query.space} vector")
        found = _with_attributes(found.select(["face_id", "photo_id", "distance"]), found)
    if query.space == IDENTITY:
        method += "; by the identity column (this table was written before facetier stored descriptors)"
    out = found.select(["face_id", "photo_id", "distance", *ATTRIBUTES])
    out = out.add_column(0, "rank", pa.array(np.arange(1, out.num_rows + 1, dtype=np.int32)))
    return SearchResult(out, counter.total, like, method, query.space, without)
