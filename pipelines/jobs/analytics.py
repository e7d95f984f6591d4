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
from dataclasses import dataclass

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from facetier.codec.model import FaceCodec
from facetier.io.images import decode_image
from facetier.io.identity import roundtrip, unpack_identity
from facetier.io.reader import ByteCounter, read_family
from facetier.io.sources import SourceRef, read_source
from facetier.io.table import (
    ALIAS_FAMILY,
    INPUTS_FAMILY,
    BASE_FAMILY,
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
    """How long and how much working memory one SQL query may take (``query``, ``decode --where``,
    ``edit --where``): a cross join of two large families or a sort of a random key over every row
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


def _query_embedding(like: str, base: pa.Table, weights: str | None, device: str) -> tuple[np.ndarray, str | None]:
    """(embedding, face id of the query when it is a row of the table)."""
    ids = base.column("face_id").to_pylist()
    photos = base.column("photo_id").to_pylist()
    for i, (fid, pid) in enumerate(zip(ids, photos)):
        if like in (fid, pid):
            if not base.column("identity")[i].is_valid:
                raise ConfigError(f"face {fid} has no identity embedding (encoded by a model without a semantic base layer)")
            return unpack_identity(base.column("identity").slice(i, 1), base.column("identity_scale").slice(i, 1))[0], fid
    try:
        data = read_source(SourceRef.parse(like))
    except InputError as exc:
        raise ConfigError(f"--like {like!r} is neither a face/photo id of the table nor a readable image: {exc}") from exc
    codec = FaceCodec.load(weights, device=device)
    faces = codec.encode(decode_image(data).rgb, layers=["basic"])
    return roundtrip(codec.describe([faces[0].code])[0]["identity"]), None  # at the precision the table stores


def search(table_root: str, like: str, k: int = 10, *, weights: str | None = None, device: str = "auto") -> SearchResult:
    """The ``k`` faces nearest to ``like`` (an image or a face/photo id) by identity embedding."""
    if k < 1:
        raise ConfigError("-k must be at least 1")
    table = Table(table_root)
    counter = ByteCounter()
    base = read_family(table, BASE_FAMILY, snapshot=table.snapshot(), columns=SEARCH_COLUMNS, counter=counter)
    base = base.filter(pc.is_valid(base.column("identity")))
    if base.num_rows == 0:
        raise ConfigError(f"{table_root} has no faces with identity embeddings")
    query, self_id = _query_embedding(like, base, weights, device)
    emb = unpack_identity(base.column("identity"), base.column("identity_scale"))
    dist = np.sqrt(((emb - query[None]) ** 2).sum(1))
    ids = base.column("face_id").to_pylist()
    if self_id is not None:
        dist[ids.index(self_id)] = np.inf
    order = [int(i) for i in np.argsort(dist, kind="stable") if np.isfinite(dist[i])][:k]
    out = base.take(pa.array(order)).drop_columns(["identity", "identity_scale"])
    out = out.add_column(2, "distance", pa.array(dist[order].astype(np.float32)))
    out = out.add_column(0, "rank", pa.array(np.arange(1, len(order) + 1, dtype=np.int32)))
    return SearchResult(out, counter.total, like)
