"""Analytics over the base family: read-only SQL, with no pixels and no model.

``run_query`` registers only the columns the SQL names, so an attribute query never pulls payloads
or identity vectors. Identity search is facetier.pipelines.jobs.identity_search.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

import duckdb
import pyarrow as pa
from facetier.io.reader import ByteCounter, read_family
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

from facetier.io.derived import PERSONS_KIND
from facetier.pipelines.jobs.persons import persons_rows

from facetier.errors import ConfigError, QueryError, QueryLimitError

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
    """One read-only SQL SELECT (DuckDB) over ``faces`` (the index), ``basic`` (the base family), ``rejects``, ``aliases``, ``inputs``
    and ``persons`` (``facetier cluster``'s person id per face, as of the newest clustering at or before the version read).

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
        if PERSONS_KIND in words:  # derived, not a column family: the newest clustering at or before this version
            con.register(PERSONS_KIND, persons_rows(table, snapshot.version))
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
