"""Analytics over the base family: SQL queries and identity search, with no pixels and no model.

``run_query`` registers only the columns the SQL names, so an attribute query never pulls payloads
or identity embeddings. Search reads the base family's ``identity`` columns (int8 components and a
per-row scale, decoded from the basic layer at encode time; facetier.io.identity) and nothing else; a query image is encoded with
the model first.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from facetier.io.identity import roundtrip, unpack_identity
from facetier.io.reader import ByteCounter, family_files, read_family, read_file
from facetier.io.sources import SourceRef, read_source
from facetier.io.table import (
    ALIAS_FAMILY,
    INPUTS_FAMILY,
    BASE_FAMILY,
    IDENTITY_DIM,
    INDEX_FAMILY,
    REJECT_FAMILY,
    Snapshot,
    Table,
    family_schema,
)

from facetier.errors import ConfigError, InputError, QueryError, QueryLimitError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class QueryLimits:
    """How long and how much working memory one query may take (``query``, ``decode --where``,
    ``edit --where``, ``search``): a cross join of two large families or a sort of a random key over every row
    otherwise runs until the machine is out of memory."""

    seconds: float = 300.0
    memory_mb: int = 2048

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and self.memory_mb > 0):
            raise ConfigError(f"query limits must be positive, got {self.seconds} s and {self.memory_mb} MB")


@dataclass(frozen=True)
class QueryResult:
    table: pa.Table
    bytes_read: int
    table_bytes: int


def sql_words(sql: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}


def referenced_columns(sql: str, schema: pa.Schema) -> list[str]:
    """The family's columns the SQL could touch: a superset (every matching word), so reads stay correct.

    Reading only these keeps an attribute query from pulling payloads and identity embeddings.
    """
    words = sql_words(sql)
    if re.search(r"(^|[\s,.])\*", sql):  # SELECT *, t.*, ", *" - but not count(*)
        return list(schema.names)
    return [n for n in schema.names if n.lower() in words]


QUERY_FAMILIES = (INDEX_FAMILY, BASE_FAMILY, REJECT_FAMILY, ALIAS_FAMILY, INPUTS_FAMILY)


def read_only_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Accept exactly one SELECT (WITH ... SELECT included); anything else is a QueryError before it runs."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from exc
    if len(statements) != 1:
        raise QueryError(f"query takes exactly one SQL statement, got {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(f"query is read-only: a SELECT, not a {statements[0].type.name} statement")


def run_query(table_root: str, sql: str, *, as_of: int | None = None, snapshot: Snapshot | None = None,
              limits: QueryLimits = QueryLimits()) -> QueryResult:
    """One read-only SQL SELECT (DuckDB) over ``faces`` (the index), ``basic`` (the base family), ``rejects``, ``aliases`` and ``inputs``.

    The connection cannot touch files (external access off, configuration locked): the families
    registered here are all a query can read, so ``bytes_read`` counts everything it touched.
    ``as_of`` reads facetier version ``as_of`` of the table (time travel) instead of the latest.
    A query past ``limits`` stops with :class:`QueryLimitError`.
    """
    table = Table(table_root)
    snapshot = snapshot or table.snapshot(as_of)
    counter = ByteCounter()
    words = sql_words(sql)
    # closed explicitly: a connection left to interpreter teardown can abort the process on exit
    config = {"enable_external_access": False, "memory_limit": f"{limits.memory_mb}MB", "lock_configuration": True}
    with duckdb.connect(config=config) as con:
        read_only_statement(con, sql)
        for family in QUERY_FAMILIES:
            if family not in words:
                continue
            cols = referenced_columns(sql, family_schema(family)) or [family_schema(family).names[0]]
            con.register(family, read_family(table, family, snapshot=snapshot, columns=cols, counter=counter))
        timer = threading.Timer(limits.seconds, con.interrupt)
        timer.start()
        try:
            result = con.sql(sql).to_arrow_table()
        except duckdb.InterruptException as exc:
            raise QueryLimitError(f"the query ran past its time limit of {limits.seconds:g} s (--query-seconds)") from exc
        except duckdb.OutOfMemoryException as exc:
            raise QueryLimitError(f"the query needed more than its memory limit of {limits.memory_mb} MB (--query-memory-mb)") from exc
        except duckdb.Error as exc:
            raise QueryError(str(exc)) from exc
        finally:
            timer.cancel()
    return QueryResult(result, counter.total, sum(table.family_bytes(snapshot).values()))


SEARCH_COLUMNS = ["face_id", "photo_id", "age", "gender", "race", "identity", "identity_scale"]


@dataclass(frozen=True)
class SearchResult:
    table: pa.Table  # rank, face_id, photo_id, distance, age, gender, race
    bytes_read: int
    query: str


def _stored_embedding(table: Table, snapshot: Snapshot, like: str, counter: ByteCounter) -> tuple[np.ndarray, str] | None:
    """(embedding, face id) when ``like`` is a face or photo id of the table: a point lookup (the files'
    statistics find the one that holds it)."""
    for column in ("face_id", "photo_id"):
        rows = read_family(table, BASE_FAMILY, snapshot=snapshot, columns=SEARCH_COLUMNS, filters=[(column, "=", like)], counter=counter)
        if rows.num_rows:
            fid = rows.column("face_id")[0].as_py()
            if not rows.column("identity")[0].is_valid:
                raise ConfigError(f"face {fid} has no identity embedding (encoded by a model without a semantic base layer)")
            return unpack_identity(rows.column("identity").slice(0, 1), rows.column("identity_scale").slice(0, 1))[0], fid
    return None


def _query_embedding(table: Table, snapshot: Snapshot, like: str, weights: str | None, device: str,
                     counter: ByteCounter) -> tuple[np.ndarray, str | None]:
    """(embedding, face id of the query when it is a row of the table)."""
    if (stored := _stored_embedding(table, snapshot, like, counter)) is not None:
        return stored
    try:
        data = read_source(SourceRef.parse(like))
    except InputError as exc:
        raise ConfigError(f"--like {like!r} is neither a face/photo id of the table nor a readable image: {exc}") from exc
    codec = FaceCodec.load(weights, device=device)
    faces = codec.encode(decode_image(data).rgb, layers=["basic"])
    return roundtrip(codec.describe([faces[0].code])[0]["identity"]), None  # at the precision the table stores


def _nearest(rows: pa.Table, query: np.ndarray, self_id: str | None, k: int) -> pa.Table:
    """The ``k`` rows of ``rows`` nearest ``query``, with a ``distance`` column (the query's own face left out)."""
    emb = unpack_identity(rows.column("identity"), rows.column("identity_scale"))
    dist = np.sqrt(((emb - query[None]) ** 2).sum(1))
    if self_id is not None:
        dist[np.asarray(pc.equal(rows.column("face_id"), self_id).fill_null(False))] = np.inf
    order = [int(i) for i in np.argsort(dist, kind="stable")[:k] if np.isfinite(dist[i])]
    return rows.take(pa.array(order, pa.int64())).append_column("distance", pa.array(dist[order].astype(np.float32)))


def search(table_root: str, like: str, k: int = 10, *, weights: str | None = None, device: str = "auto",
           limits: QueryLimits = QueryLimits()) -> SearchResult:
    """The ``k`` faces nearest to ``like`` (an image or a face/photo id) by identity embedding.

    The base family is scanned a file at a time and a slice of rows at a time, keeping only the best
    ``k`` so far: memory stays within ``limits.memory_mb`` however large the table, and the scan stops
    with :class:`QueryLimitError` past ``limits.seconds``."""
    if k < 1:
        raise ConfigError("-k must be at least 1")
    table = Table(table_root)
    snapshot = table.snapshot()
    counter = ByteCounter()
    query, self_id = _query_embedding(table, snapshot, like, weights, device, counter)
    deadline = time.monotonic() + limits.seconds
    rows_per_slice = _rows_per_slice(limits)
    best: pa.Table | None = None
    for rel in family_files(table, BASE_FAMILY, snapshot):
        part = read_file(table, rel, BASE_FAMILY, columns=SEARCH_COLUMNS, counter=counter)
        part = part.filter(pc.is_valid(part.column("identity")))
        for at in range(0, part.num_rows, rows_per_slice):
            found = _nearest(part.slice(at, rows_per_slice), query, self_id, k)
            best = found if best is None else _top(pa.concat_tables([best, found]), k)
            if time.monotonic() > deadline:
                raise QueryLimitError(f"search ran past its time limit of {limits.seconds:g} s (--query-seconds)")
    if best is None:
        raise ConfigError(f"{table_root} has no faces with identity embeddings")
    out = best.drop_columns(["identity", "identity_scale"])
    distance = out.column("distance")
    out = out.drop_columns(["distance"]).add_column(2, "distance", distance)
    out = out.add_column(0, "rank", pa.array(np.arange(1, out.num_rows + 1, dtype=np.int32)))
    return SearchResult(out, counter.total, like)


def _rows_per_slice(limits: QueryLimits) -> int:
    """Rows one step of the scan holds: the float32 components, their difference to the query and its squares."""
    return max(1024, limits.memory_mb * 2**20 // (4 * 4 * IDENTITY_DIM))


def _top(rows: pa.Table, k: int) -> pa.Table:
    order = pc.sort_indices(rows, sort_keys=[("distance", "ascending"), ("face_id", "ascending")])
    return rows.take(order.slice(0, k))
