"""Which faces a decode or edit job produces: ids, a file of ids, or SQL over the base family and index.

The selection is resolved by the query engine reading only the columns it needs (face and photo
ids, and whatever columns the condition names): the faces index is never loaded whole into
Python. Ids the table does not hold are failures of the job (``NotInTableError``), not a crash.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
from facetier.io.reader import ByteCounter, read_family
from facetier.io.table import INDEX_FAMILY, Snapshot, Table
from facetier.pipelines.jobs.analytics import QueryLimits, run_query
from facetier.pipelines.jobs.stored_codes import FaceFailure

from facetier.errors import ConfigError, NotInTableError


@dataclass(frozen=True)
class Selection:
    """The units a job produces (face ids; photo ids for ``original``) and the ids it cannot."""

    units: tuple[str, ...]
    failures: tuple[FaceFailure, ...]
    bytes_read: int

    @property
    def size(self) -> int:
        return len(self.units) + len(self.failures)


def read_ids_file(uri: str) -> list[str]:
    """Whitespace-separated ids from a local path or any fsspec URI."""
    try:
        with fsspec.open(uri, "rt") as fh:
            return [s for s in fh.read().split() if s]
    except FileNotFoundError:
        raise ConfigError(f"--ids-file {uri} does not exist") from None


def select(table_root: str, *, ids: Sequence[str] = (), ids_file: str | None = None, where: str | None = None,
           by_photo: bool = False, limit: int | None = None, snapshot: Snapshot | None = None,
           limits: QueryLimits = QueryLimits()) -> Selection:
    """Resolve ids and/or a SQL condition into sorted, distinct units; ``by_photo`` gives photo ids."""
    if limit is not None and limit < 0:  # a negative slice would silently drop faces from the end
        raise ConfigError(f"--limit must be 0 or more, got {limit}")
    wanted = list(ids) + (read_ids_file(ids_file) if ids_file else [])
    if not wanted and where is None:
        raise ConfigError("say which faces: --ids, --ids-file or --where")
    units: set[str] = set()
    failures: list[FaceFailure] = []
    counter = ByteCounter()
    if where is not None:
        sql = (f"SELECT DISTINCT {'photo_id' if by_photo else 'face_id'} AS unit FROM faces LEFT JOIN basic USING (face_id, photo_id) "
               f"WHERE ({where})")
        res = run_query(table_root, sql, snapshot=snapshot, limits=limits)
        units.update(res.table.column("unit").to_pylist())
        counter.add(res.bytes_read)
    if wanted:
        table = Table(table_root)
        either = [[("face_id", "in", sorted(set(wanted)))], [("photo_id", "in", sorted(set(wanted)))]]
        index = read_family(table, INDEX_FAMILY, columns=["face_id", "photo_id"], filters=either, counter=counter, snapshot=snapshot)
        face_ids, photo_ids = index.column("face_id").to_pylist(), index.column("photo_id").to_pylist()
        known = set(face_ids) | set(photo_ids)
        asked = set(wanted)
        for fid, pid in zip(face_ids, photo_ids):
            if fid in asked or pid in asked:
                units.add(pid if by_photo else fid)
        failures = [FaceFailure.of(m, NotInTableError(f"{m} is neither a face id nor a photo id of {table_root}")) for m in sorted(asked - known)]
    ordered = sorted(units)
    return Selection(tuple(ordered[:limit] if limit is not None else ordered), tuple(failures), counter.total)

