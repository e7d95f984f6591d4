"""Reading a column family for analytics and point lookups, counting the bytes actually read."""
from __future__ import annotations

import posixpath
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from facetier.io.storage import storage_error
from facetier.io.table import Snapshot, Table, family_schema, reading_log

from facetier.errors import TableCorruptError


class _CountingFile:
    """A read-only file wrapper that counts bytes returned by ``read`` (what Parquet fetched)."""

    def __init__(self, fh: Any, counter: ByteCounter) -> None:
        self._fh, self._counter = fh, counter
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._counter.add(len(data))
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True
        self._fh.close()


@dataclass
class ByteCounter:
    total: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n


def read_family(
    table: Table,
    family: str,
    *,
    columns: Sequence[str] | None = None,
    filters: list | None = None,
    snapshot: Snapshot | None = None,
    counter: ByteCounter | None = None,
    unreadable: list[str] | None = None,
    with_file: bool = False,
    only_files: Sequence[str] | None = None,
) -> pa.Table:
    """One column family's rows at a committed snapshot (the latest by default).

    The family's Delta log names its files and their statistics; files whose statistics rule out
    ``filters`` are never opened, the rest are opened without read-ahead so projection holds.
    A file that cannot be read raises :class:`TableCorruptError` naming it, or, when ``unreadable``
    is a list, is appended to it and skipped (so the rest of the table still serves). With
    ``with_file`` a ``__file`` column names each row's file (relative to the root); ``only_files``
    reads just those files (of the family at the snapshot).
    """
    snap = snapshot or table.snapshot()
    counter = counter or ByteCounter()
    parts = []
    for rel in family_files(table, family, snap, filters) if only_files is None else only_files:
        try:
            part = read_file(table, rel, family, columns=columns, filters=filters, counter=counter)
        except TableCorruptError:
            if unreadable is None:
                raise
            unreadable.append(rel)
            continue
        parts.append(part.append_column("__file", pa.array([rel] * part.num_rows, pa.string())) if with_file else part)
    if not parts:
        schema = family_schema(family)
        empty = schema.empty_table()
        empty = empty.select(list(columns)) if columns else empty
        return empty.append_column("__file", pa.array([], pa.string())) if with_file else empty
    return pa.concat_tables(parts)


def family_files(table: Table, family: str, snapshot: Snapshot, filters: list | None = None) -> list[str]:
    """The files (relative to the root) of ``family`` at ``snapshot`` whose Delta statistics may match ``filters``."""
    snapshot.require(family)
    if not snapshot.has(family):
        return []
    dt = table.delta(family, snapshot.family_versions[family])
    if dt is None:
        return []
    expr = pq.filters_to_expression(filters) if filters else None
    with reading_log(dt):
        dataset = dt.to_pyarrow_dataset()
        return sorted(f"{family}/{posixpath.basename(frag.path)}" for frag in dataset.get_fragments(filter=expr))


def read_file(table: Table, rel: str, family: str, *, columns: Sequence[str] | None = None, filters: list | None = None,
              counter: ByteCounter | None = None) -> pa.Table:
    """One committed file of a family (path relative to the table root), conformed to the family's schema."""
    if unknown := set(columns or ()) - set(family_schema(family).names):
        raise ValueError(f"the {family} family has no columns {sorted(unknown)}")
    # cache_type="none": fsspec's default read-ahead would fetch far more than the columns asked for
    open_kw = {} if table.is_local else {"cache_type": "none"}
    try:
        with table.fs.open(table._p(rel), "rb", **open_kw) as fh:
            counting = _CountingFile(fh, counter or ByteCounter())
            # every byte wanted: one read, not one per column chunk (what pre-buffering did before it went, below)
            source = pa.BufferReader(counting.read()) if columns is None and filters is None else pa.PythonFile(counting, mode="r")
            return _read_part(source, family, columns, filters)
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:  # ValueError: a damaged footer's names need not be UTF-8
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and (refused := storage_error(exc, table.uri(rel))) is not None:
            raise refused from exc
        raise TableCorruptError(f"{table.uri(rel)} ({family} family) cannot be read: {type(exc).__name__}: {str(exc)[:300]}") from exc


def read_body(table: Table, rel: str, family: str) -> bytes:
    """Every byte of one committed file; a missing or unreadable file is a :class:`TableCorruptError`, storage
    that refuses a :class:`StorageError`."""
    try:
        return table.fs.cat_file(table._p(rel))
    except FileNotFoundError as exc:
        raise TableCorruptError(f"{table.uri(rel)} ({family} family) is missing: {exc}") from exc
    except OSError as exc:
        if (refused := storage_error(exc, table.uri(rel))) is not None:
            raise refused from exc
        raise TableCorruptError(f"{table.uri(rel)} ({family} family) cannot be read: {type(exc).__name__}: {str(exc)[:300]}") from exc


def parse_body(body: bytes, rel: str, family: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A file's bytes (from :func:`read_body`) as the family's rows."""
    try:
        return _read_part(pa.BufferReader(body), family, columns, None)
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:  # ValueError: a damaged footer's names need not be UTF-8
        raise TableCorruptError(f"{rel} ({family} family) cannot be read: {type(exc).__name__}: {str(exc)[:300]}") from exc


def _read_part(source: pa.NativeFile, family: str, columns: Sequence[str] | None, filters: list | None) -> pa.Table:
    """One shard file, conformed to the family's current schema.

    Files written before a column existed (a base family from a model without the semantic
    layer) read as nulls in that column instead of failing the whole query.
    """
    schema = family_schema(family)
    wanted = list(columns) if columns else list(schema.names)
    # Neither pre-buffering nor Arrow's threads: reading through a Python file object, both left Arrow
    # threads that called back into Python after read_table returned, and at interpreter exit the
    # process aborted ("terminate called without an active exception"; pyarrow 25.0.1: 12 of 16 point
    # lookups with pre-buffering, 3 of 20 with threads alone, 0 of 24 with neither). Every read then
    # happens on the calling thread; a whole file is one read (``read_file``).
    try:
        return pq.read_table(source, columns=wanted, filters=filters, pre_buffer=False, use_threads=False)
    except pa.ArrowInvalid:  # a file older than one of the columns (or a damaged one: the retry tells)
        source.seek(0)
        present = set(pq.read_schema(source).names)
        source.seek(0)
    part = pq.read_table(source, columns=[c for c in wanted if c in present], filters=filters, pre_buffer=False, use_threads=False)
    for name in wanted:
        if name not in present:
            part = part.append_column(schema.field(name), pa.nulls(part.num_rows, schema.field(name).type))
    return part.select(wanted).cast(pa.schema([schema.field(n) for n in wanted]))
