"""What a committed table already holds for one model, read from the families' columns.

Planning reads one 8-byte column (and Delta statistics prune files another model wrote), never a
list kept in JSON: the inputs the model already encoded, rejected or aliased, by source key (name
and listing fingerprint); at commit time, the photos of a run the model already stores under other
names, and the committed rows a run replaces.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from facetier.io.commit import FileAdd
from facetier.io.reader import family_files, read_family, read_file
from facetier.io.rewrite import drop_committed_rows
from facetier.io.sources import storable_uri
from facetier.io.table import ALIAS_FAMILY, INDEX_FAMILY, PHOTO_FAMILIES, REJECT_FAMILY, Snapshot, Table
from facetier.pipelines.jobs.records import PERMANENT


def held_sources(table: Table, snapshot: Snapshot, weights_hash: str, keys: Sequence[int | None]) -> list[bool]:
    """For each input's source key, whether this model already holds the input: an anti-join against the
    ``source_key`` columns of this model's rows in faces, rejects (except failed reads, which are
    retried) and aliases. One family file at a time, in Arrow, so memory does not grow with the table."""
    wanted = pa.array(sorted({k for k in keys if k is not None}), pa.int64())
    if snapshot.version == 0 or not len(wanted):
        return [False] * len(keys)
    mine = [("weights_hash", "=", weights_hash)]
    held: set[int] = set()
    for family in (INDEX_FAMILY, REJECT_FAMILY, ALIAS_FAMILY):
        columns = ["source_key", "photo_id", "error_class"] if family == REJECT_FAMILY else ["source_key"]
        for rel in family_files(table, family, snapshot, mine):
            part = read_file(table, rel, family, columns=columns, filters=mine)
            if family == REJECT_FAMILY:  # a read that failed says nothing about the bytes: read again
                failed_read = pc.and_(pc.is_null(part.column("photo_id")), pc.invert(pc.is_in(part.column("error_class"), pa.array(sorted(PERMANENT)))))
                part = part.filter(pc.invert(failed_read))
            column = part.column("source_key")
            held.update(column.filter(pc.is_in(column, wanted)).to_pylist())
    return [k is not None and k in held for k in keys]


def held_photos(table: Table, snapshot: Snapshot, weights_hash: str, photo_ids: Collection[str]) -> frozenset[str]:
    """Which of ``photo_ids`` this model already stores (faces or rejects): bytes found again under a new
    name, or under a name whose listing changed while its bytes did not."""
    wanted = pa.array(sorted(set(photo_ids)), pa.string())
    if snapshot.version == 0 or not len(wanted):
        return frozenset()
    mine = [("weights_hash", "=", weights_hash)]
    held: set[str] = set()
    for family in (INDEX_FAMILY, REJECT_FAMILY):
        for rel in family_files(table, family, snapshot, mine):
            column = read_file(table, rel, family, columns=["photo_id"], filters=mine).column("photo_id")
            held.update(column.filter(pc.is_in(column, wanted)).to_pylist())
    return frozenset(held)


@dataclass(frozen=True)
class Replacement:
    removes: dict[str, list[str]]
    adds: dict[str, list[FileAdd]]
    older_rows: int  # rows other models wrote for photos this run encoded

    @property
    def empty(self) -> bool:
        return not any(self.removes.values())


def replaced_rows(table: Table, snapshot: Snapshot, weights_hash: str, encoded: Collection[str], sources: Collection[str], tag: str) -> Replacement:
    """The committed rows this run's commit replaces: every row of a photo the run encoded (only another
    model can have written one, since this model's photos were skipped), and this model's rejects made
    before hashing (a failed read; a name rejected by an older table without source keys) of inputs the run read again."""
    removes: dict[str, list[str]] = {}
    adds: dict[str, list[FileAdd]] = {}
    older = 0
    if snapshot.version == 0:
        return Replacement(removes, adds, 0)
    encoded = set(encoded)
    others = [[("weights_hash", "<", weights_hash)], [("weights_hash", ">", weights_hash)]]
    stale = set()
    for fam in (INDEX_FAMILY, REJECT_FAMILY):
        rows = read_family(table, fam, columns=["photo_id"], filters=others, snapshot=snapshot)
        stale |= {p for p in rows.column("photo_id").to_pylist() if p in encoded}
    wanted = pa.array(sorted(stale), pa.string())

    def keep_fresh(t: pa.Table) -> list[bool]:
        return pc.invert(pc.is_in(t.column("photo_id"), wanted)).fill_null(True).to_pylist()

    read_again = {storable_uri(k) for k in sources}

    def keep_rows(t: pa.Table) -> list[bool]:  # rejects: neither another model's row of a photo encoded now, nor a retried read failure
        cols = (t.column(c).to_pylist() for c in ("photo_id", "source_uri", "source_uri_raw", "error_class", "weights_hash"))
        # a reject made before hashing is about the name, not the bytes: this run's outcome for the name replaces it
        retried_here = [p is None and w == weights_hash and (u, raw) in read_again for p, u, raw, _, w in zip(*cols)]
        return [k and not r for k, r in zip(keep_fresh(t), retried_here)]

    for fam in PHOTO_FAMILIES:
        if fam == REJECT_FAMILY:  # one pass: a compacted file can hold both kinds of row
            r, a, _ = drop_committed_rows(table, snapshot, fam, keep_rows, tag, None if stale else [("weights_hash", "=", weights_hash)])
        elif stale:
            r, a, n = drop_committed_rows(table, snapshot, fam, keep_fresh, tag, [("photo_id", "in", sorted(stale))])
            older += n if fam == INDEX_FAMILY else 0
        else:
            continue
        removes.setdefault(fam, []).extend(r)
        adds.setdefault(fam, []).extend(a)
    return Replacement(removes, adds, older)
