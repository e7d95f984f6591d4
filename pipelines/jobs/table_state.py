"""What a committed table already holds for one model, read from the families' columns.

Planning reads the ``inputs`` family (one row per input a model consumed), never a list kept in
JSON: Delta statistics prune the files another model wrote and the files whose name range holds
none of the listed names, and the rest is an anti-join on the 8-byte source key (name and listing
fingerprint). At commit time: the photos of a run the model already stores under other names, and
the committed rows a run replaces.
"""
from __future__ import annotations

import bisect
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from facetier.io.commit import FileAdd
from facetier.io.reader import read_family, read_file
from facetier.io.rewrite import drop_committed_rows
from facetier.io.sources import storable_uri
from facetier.io.table import INDEX_FAMILY, INPUTS_FAMILY, PHOTO_FAMILIES, REJECT_FAMILY, Snapshot, Table, add_actions
from facetier.pipelines.jobs.records import PERMANENT


# Delta writers other than facetier (compaction) may cut long string statistics to a prefix: a bound that
# long is widened so a name that starts with it still counts as inside the file's range.
_CUT_STATS = 32


def model_files(table: Table, family: str, snapshot: Snapshot, weights_hash: str, names: Sequence[str] | None = None) -> list[tuple[str, bool]]:
    """(file, whether every row in it is this model's) for the family's files that may hold rows of the
    model, from the Delta statistics: a file one model wrote is read without a row filter. With
    ``names`` (sorted ``source_uri`` values), only files whose name range holds one of them."""
    snapshot.require(family)
    if not snapshot.has(family):
        return []
    dt = table.delta(family, snapshot.family_versions[family])
    if dt is None:
        return []
    actions = add_actions(dt)
    if not actions.num_rows:
        return []

    def stat(name: str) -> list:
        return actions.column(name).to_pylist() if name in actions.column_names else [None] * actions.num_rows

    out = []
    for path, low, high, name_lo, name_hi in sorted(zip(actions.column("path").to_pylist(), stat("min.weights_hash"), stat("max.weights_hash"),
                                                       stat("min.source_uri"), stat("max.source_uri"))):
        if low is not None and high is not None and not low <= weights_hash <= high:
            continue
        if names is not None and name_lo is not None and name_hi is not None:
            upper = name_hi + "\U0010ffff" if len(name_hi) >= _CUT_STATS else name_hi
            at = bisect.bisect_left(names, name_lo)
            if at == len(names) or names[at] > upper:
                continue
        out.append((f"{family}/{path}", low is not None and low == high == weights_hash))
    return out


def _covers(stored: pa.ChunkedArray | pa.Array, layers: Collection[str]) -> pa.Array:
    """Per inputs row, whether the layers its run stored include ``layers`` (null: a row from before the
    column, taken as every layer)."""
    need = set(layers)
    return pa.array([v is None or need <= set(v.split(",")) for v in stored.to_pylist()], pa.bool_())


def held_sources(table: Table, snapshot: Snapshot, weights_hash: str, sources: Sequence[tuple[str, int | None]],
                 layers: Collection[str] = ()) -> list[bool]:
    """For each (source, source key), whether this model already consumed that input with those bytes, and
    stored every one of ``layers`` for it (:func:`held_keys`)."""
    held = held_keys(table, snapshot, weights_hash, sources, layers)
    return [k is not None and k in held for _, k in sources]


def held_keys(table: Table, snapshot: Snapshot, weights_hash: str, sources: Sequence[tuple[str, int | None]],
              layers: Collection[str] = ()) -> dict[int, set[str | None]]:
    """The source keys of ``sources`` this model already consumed, with the photo ids they brought (None:
    rejected before hashing; several when ``--verify-content`` found new bytes under an unchanged listing): an anti-join of the keys against the ``inputs`` family's ``source_key``
    column. Inputs whose read failed do not count (they are read again), nor do photos stored with fewer
    layers than ``layers`` (read again, to be stored whole). Only files whose name range holds one of
    the names are opened, one at a time, in Arrow: an archive that grows by new names reads little of a
    large table."""
    wanted = pa.array(sorted({k for _, k in sources if k is not None}), pa.int64())
    if snapshot.version == 0 or not len(wanted):
        return {}
    names = sorted({storable_uri(s)[0] for s, k in sources if k is not None})
    held: dict[int, set[str | None]] = {}
    for rel, only_mine in model_files(table, INPUTS_FAMILY, snapshot, weights_hash, names):
        part = read_file(table, rel, INPUTS_FAMILY, columns=["source_key", "photo_id", "error_class", "outcome", "layers"],
                         filters=None if only_mine else [("weights_hash", "=", weights_hash)])
        failed_read = pc.and_(pc.is_null(part.column("photo_id")), pc.invert(pc.is_in(part.column("error_class"), pa.array(sorted(PERMANENT)))))
        partial = pc.and_(pc.equal(part.column("outcome"), "stored").fill_null(False), pc.invert(_covers(part.column("layers"), layers)))
        part = part.filter(pc.invert(pc.or_(pc.fill_null(failed_read, False), partial)))
        part = part.filter(pc.is_in(part.column("source_key"), wanted))
        for key, photo in zip(part.column("source_key").to_pylist(), part.column("photo_id").to_pylist()):
            held.setdefault(key, set()).add(photo)
    return held


def partial_photos(table: Table, snapshot: Snapshot, weights_hash: str, layers: Collection[str], photo_ids: Collection[str]) -> frozenset[str]:
    """Which of ``photo_ids`` this model stores without every one of ``layers`` (an earlier run asked for
    fewer): such a photo is not held, and this run's rows replace its rows whole."""
    wanted = pa.array(sorted(set(photo_ids)), pa.string())
    if snapshot.version == 0 or not len(wanted):
        return frozenset()
    whole: set[str] = set()
    partial: set[str] = set()
    for rel, only_mine in model_files(table, INPUTS_FAMILY, snapshot, weights_hash):
        part = read_file(table, rel, INPUTS_FAMILY, columns=["photo_id", "outcome", "layers"],
                         filters=None if only_mine else [("weights_hash", "=", weights_hash)])
        part = part.filter(pc.and_(pc.is_in(part.column("photo_id"), wanted).fill_null(False), pc.equal(part.column("outcome"), "stored").fill_null(False)))
        covered = _covers(part.column("layers"), layers)
        whole.update(part.column("photo_id").filter(covered).to_pylist())
        partial.update(part.column("photo_id").filter(pc.invert(covered)).to_pylist())
    return frozenset(partial - whole)


def held_photos(table: Table, snapshot: Snapshot, weights_hash: str, photo_ids: Collection[str]) -> frozenset[str]:
    """Which of ``photo_ids`` this model already stores (faces or rejects): bytes found again under a new
    name, or under a name whose listing changed while its bytes did not."""
    wanted = pa.array(sorted(set(photo_ids)), pa.string())
    if snapshot.version == 0 or not len(wanted):
        return frozenset()
    held: set[str] = set()
    for family in (INDEX_FAMILY, REJECT_FAMILY):
        for rel, only_mine in model_files(table, family, snapshot, weights_hash):
            filters = None if only_mine else [("weights_hash", "=", weights_hash)]
            column = read_file(table, rel, family, columns=["photo_id"], filters=filters).column("photo_id")
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


REJECT_KEYS = ("photo_id", "source_uri", "source_uri_raw", "error_class", "weights_hash")
INPUT_KEYS = ("photo_id", "source_uri", "source_uri_raw", "weights_hash")


def replaced_rows(table: Table, snapshot: Snapshot, weights_hash: str, encoded: Collection[str], sources: Collection[str], tag: str,
                  partial: Collection[str] = frozenset()) -> Replacement:
    """The committed rows this run's commit replaces: every row of a photo the run encoded that another
    model wrote, or this model wrote with fewer layers (``partial``: the run stores it whole), and this model's rows made before
    hashing (a failed read; a name a table without ``inputs`` rejected) for inputs the run read again: the
    run's outcome for those names replaces them. Files are pruned by their statistics (model, names)."""
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
    counted = set(stale)  # rows of other models: what the summary reports as replaced
    stale |= set(partial) & encoded
    wanted = pa.array(sorted(stale), pa.string())

    def keep_fresh(t: pa.Table) -> list[bool]:
        return pc.invert(pc.is_in(t.column("photo_id"), wanted)).fill_null(True).to_pylist()

    read_again = {storable_uri(k) for k in sources}
    names = sorted({u for u, _ in read_again})

    def keep_inputs(t: pa.Table) -> list[bool]:  # a retried read failure, or a name of a photo stored whole now
        cols = (t.column(c).to_pylist() for c in INPUT_KEYS)
        return [not ((p is None or p in stale) and w == weights_hash and (u, raw) in read_again) for p, u, raw, w in zip(*cols)]

    def keep_rows(t: pa.Table) -> list[bool]:  # rejects: neither another model's row of a photo encoded now, nor a retried read failure
        cols = (t.column(c).to_pylist() for c in REJECT_KEYS)
        # a reject made before hashing is about the name, not the bytes: this run's outcome for the name replaces it
        retried_here = [p is None and w == weights_hash and (u, raw) in read_again for p, u, raw, _, w in zip(*cols)]
        return [k and not r for k, r in zip(keep_fresh(t), retried_here)]

    if counted:
        within = ("photo_id", "in", sorted(counted))
        older = read_family(table, INDEX_FAMILY, columns=["photo_id"], filters=[[*o, within] for o in others], snapshot=snapshot).num_rows
    for fam in (*PHOTO_FAMILIES, INPUTS_FAMILY):
        if fam == REJECT_FAMILY and (stale or read_again):  # one pass: a compacted file can hold both kinds of row
            near = None if stale else [rel for rel, _ in model_files(table, fam, snapshot, weights_hash, names)]
            r, a, _ = drop_committed_rows(table, snapshot, fam, keep_rows, tag, files=near, columns=REJECT_KEYS)
        elif fam == INPUTS_FAMILY and read_again:
            near = [rel for rel, _ in model_files(table, fam, snapshot, weights_hash, names)]
            r, a, _ = drop_committed_rows(table, snapshot, fam, keep_inputs, tag, files=near, columns=INPUT_KEYS)
        elif stale and fam not in (REJECT_FAMILY, INPUTS_FAMILY):
            r, a, _ = drop_committed_rows(table, snapshot, fam, keep_fresh, tag, [("photo_id", "in", sorted(stale))], columns=("photo_id",))
        else:
            continue
        removes.setdefault(fam, []).extend(r)
        adds.setdefault(fam, []).extend(a)
    return Replacement(removes, adds, older)
