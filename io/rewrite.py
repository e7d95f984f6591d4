"""Rewriting files without some of their rows: a run's own staged files (the same photo found by two
shards) and committed files (rows another model wrote for photos this run encoded again; rejects
of inputs this run read again).

New files are written beside the old ones under a name unique to the run; a committed file is
removed from its family by the commit that adds its rewrite, so earlier versions keep it.
"""
from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from facetier.io.commit import FileAdd
from facetier.io.reader import family_files, read_file
from facetier.io.table import ALIAS_FAMILY, ALIAS_SCHEMA, INDEX_FAMILY, INPUTS_FAMILY, PHOTO_FAMILIES, REJECT_FAMILY, ShardEntry, Snapshot, Table

RowFilter = Callable[[pa.Table], list[bool]]  # True: keep the row


def _read(table: Table, rel: str) -> pa.Table:
    return table.read_parquet(rel)


def _write_like(table: Table, family: str, name: str, rows: pa.Table) -> tuple[str, int, str]:
    """Write ``rows`` (read from a family file) as a new file with the same facetier metadata."""
    meta = {k.decode(): v.decode() for k, v in (rows.schema.metadata or {}).items() if k.startswith(b"facetier_")}
    codec, weights = meta.pop("facetier_codec_id", ""), meta.pop("facetier_weights_hash", "")
    extra = {k[len("facetier_"):]: v for k, v in meta.items() if k not in ("facetier_family", "facetier_schema_version")}
    return table.write_family(family, name, rows.replace_schema_metadata(None), codec, weights, extra)


def _stem(rel: str) -> str:
    return posixpath.basename(rel).split(".")[0]


def rewrite_staged(table: Table, entry: ShardEntry, tag: str, drop_photo_ids: frozenset[str], already_stored: bool = False) -> ShardEntry:
    """A copy of a staged shard without the rows of ``drop_photo_ids``; the dropped rows' names become aliases.

    With ``already_stored`` (photos the table held before this run), the inputs those names are count as
    already in the table instead of encoded or rejected; otherwise another shard of the run stores them.
    """
    files, rows, nbytes, fstats = dict(entry.files), dict(entry.rows), dict(entry.nbytes), dict(entry.file_stats)
    aliases: list[dict] = []
    names: dict[str, set] = {INDEX_FAMILY: set(), REJECT_FAMILY: set()}
    for family, rel in entry.files.items():
        if family not in PHOTO_FAMILIES:
            continue
        data = _read(table, rel)
        keep = [p not in drop_photo_ids for p in data.column("photo_id").to_pylist()]
        if all(keep):
            continue
        if family in (INDEX_FAMILY, REJECT_FAMILY):
            gone = data.filter(pa.array([not k for k in keep])).select(ALIAS_SCHEMA.names)
            aliases += gone.to_pylist()
            names[family] |= set(zip(gone.column("source_uri").to_pylist(), gone.column("source_uri_raw").to_pylist()))
        kept = data.filter(pa.array(keep))
        files[family], nbytes[family], fstats[family] = _write_like(table, family, f"{entry.shard_id}.{tag}", kept)
        rows[family] = kept.num_rows
    if INPUTS_FAMILY in entry.files:  # the inputs of dropped rows are still consumed: as aliases now
        inputs = _read(table, entry.files[INPUTS_FAMILY])
        moved = pc.fill_null(pc.is_in(inputs.column("photo_id"), pa.array(sorted(drop_photo_ids), pa.string())), False)
        if pc.any(moved).as_py():
            outcome = pc.if_else(moved, pa.scalar("alias"), inputs.column("outcome"))
            error = pc.if_else(moved, pa.scalar(None, pa.string()), inputs.column("error_class"))
            inputs = inputs.set_column(inputs.column_names.index("outcome"), "outcome", outcome)
            inputs = inputs.set_column(inputs.column_names.index("error_class"), "error_class", error)
            files[INPUTS_FAMILY], nbytes[INPUTS_FAMILY], fstats[INPUTS_FAMILY] = _write_like(table, INPUTS_FAMILY, f"{entry.shard_id}.{tag}", inputs)
    if aliases:
        old = _read(table, entry.files[ALIAS_FAMILY]).to_pylist() if ALIAS_FAMILY in entry.files else []
        unique = {(a["photo_id"], a["source_uri"]): a for a in old + aliases}
        t = pa.Table.from_pylist(sorted(unique.values(), key=lambda a: (a["photo_id"], a["source_uri"])), schema=ALIAS_SCHEMA)
        files[ALIAS_FAMILY], nbytes[ALIAS_FAMILY], fstats[ALIAS_FAMILY] = table.write_family(ALIAS_FAMILY, f"{entry.shard_id}.{tag}", t, entry.codec_id,
                                                                                            entry.weights_hash)
        rows[ALIAS_FAMILY] = t.num_rows
    stats = dict(entry.stats, faces=rows.get(INDEX_FAMILY, 0), aliases=rows.get(ALIAS_FAMILY, 0))
    if already_stored:  # an input's rows all hold one photo, so its name went whole
        found = len(names[INDEX_FAMILY] | names[REJECT_FAMILY])
        stats.update(encoded_inputs=stats.get("encoded_inputs", 0) - len(names[INDEX_FAMILY]),
                     rejected=stats.get("rejected", 0) - len(names[REJECT_FAMILY] - names[INDEX_FAMILY]),
                     already_stored=stats.get("already_stored", 0) + found)
    return ShardEntry(entry.shard_id, entry.codec_id, entry.weights_hash, files, rows, nbytes,
                      tuple(p for p in entry.photo_ids if p not in drop_photo_ids), stats, fstats)


def drop_committed_rows(table: Table, snapshot: Snapshot, family: str, keep: RowFilter, tag: str,
                        candidates: list | None = None, files: Sequence[str] | None = None,
                        columns: Sequence[str] | None = None) -> tuple[list[str], list[FileAdd], int]:
    """(files to remove, rewritten files to add, rows dropped) for the committed files of ``family`` in which
    ``keep`` rejects rows. ``files``, or else ``candidates`` (a filter on the Delta statistics), limits
    which files are read; with ``columns`` (all that ``keep`` looks at) a file is read whole only when a
    row of it goes."""
    removes, adds, dropped = [], [], 0
    for rel in family_files(table, family, snapshot, candidates) if files is None else files:
        if columns is not None and all(keep(read_file(table, rel, family, columns=columns))):
            continue
        data = _read(table, rel)
        mask = keep(data)
        if all(mask):
            continue
        kept = data.filter(pa.array(mask))
        dropped += data.num_rows - kept.num_rows
        removes.append(rel)
        if kept.num_rows:
            new_rel, size, stats = _write_like(table, family, f"{_stem(rel)}.{tag}", kept)
            adds.append(FileAdd(new_rel, size, stats))
    return removes, adds, dropped
