"""What a committed table already holds for one model, read from the families' columns.

Planning reads only id columns (and Delta statistics prune files that cannot match), never a
list kept in JSON: the photos the model already encoded or rejected, the names rejected for what
they are, and, at commit time, the committed rows a run replaces.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from facetier.io.commit import FileAdd
from facetier.io.reader import read_family
from facetier.io.rewrite import drop_committed_rows
from facetier.io.sources import key_of, storable_uri
from facetier.io.table import INDEX_FAMILY, PHOTO_FAMILIES, REJECT_FAMILY, Snapshot, Table
from facetier.pipelines.jobs.records import PERMANENT


@dataclass(frozen=True)
class KnownInputs:
    """What a run with one model may skip."""

    photo_ids: frozenset[str]  # encoded, or rejected after hashing, by this model
    unread_sources: frozenset[str]  # source keys rejected for their names by this model: never read again


def known_inputs(table: Table, snapshot: Snapshot, weights_hash: str) -> KnownInputs:
    if snapshot.version == 0:
        return KnownInputs(frozenset(), frozenset())
    mine = [("weights_hash", "=", weights_hash)]
    faces = read_family(table, INDEX_FAMILY, columns=["photo_id"], filters=mine, snapshot=snapshot)
    rejects = read_family(table, REJECT_FAMILY, columns=["photo_id", "source_uri", "source_uri_raw", "error_class"], filters=mine, snapshot=snapshot)
    ids = set(faces.column("photo_id").to_pylist()) | {p for p in rejects.column("photo_id").to_pylist() if p}
    unread = {key_of(u, raw) for p, u, raw, cls in zip(*(rejects.column(c).to_pylist() for c in ("photo_id", "source_uri", "source_uri_raw", "error_class")))
              if p is None and cls in PERMANENT}
    return KnownInputs(frozenset(ids), frozenset(unread))


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
    model can have written one, since this model's photos were skipped), and this model's rejects of
    inputs the run read again after a failed read."""
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
        retried_here = [p is None and cls not in PERMANENT and w == weights_hash and (u, raw) in read_again for p, u, raw, cls, w in zip(*cols)]
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
