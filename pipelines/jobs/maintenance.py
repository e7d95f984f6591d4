"""Keeping a table lean: roll forward an unfinished commit, compact small files, checkpoint the
Delta logs, and remove files no version needs any more (``facetier vacuum``, ``check --repair``).

Two kinds of files become garbage. Files no Delta log ever referenced (a killed run's shards, a
run that lost its claim, a rewrite never committed) are removed once older than the retention
window, unless a young done marker says their run may still commit. Files only versions older
than the window reference (replaced by rewrites or compaction) are removed by Delta's own vacuum,
which is what bounds how far back ``--as-of`` can travel.

Files Delta's compaction writes are named without a content digest; :func:`seal` copies each under
its digest name in a commit that changes no rows, so ``check`` can verify every file again.
"""
from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import ColumnProperties, CommitProperties, WriterProperties
from deltalake.transaction import AddAction, RemoveAction
from facetier.io.commit import finish_pending, planned_files
from facetier.io import derived
from facetier.io.delta_log import audit_logs
from facetier.io.derived import KINDS
from facetier.io.reader import read_body
from facetier.io.table import (
    ALL_FAMILIES,
    ROW_GROUP_ROWS,
    STAGING_DIR,
    Snapshot,
    Table,
    add_actions,
    digest_name,
    family_schema,
    file_stats,
    reading_log,
    recorded_digest,
)

from facetier.errors import TableCorruptError
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_RETENTION_HOURS = 24.0
COMPACT_TARGET_BYTES = 256 * 2**20
SORT_KEY = {"original": "photo_id", "aliases": "photo_id", "rejects": "source_uri", "inputs": "source_uri", "_commits": "version"}


@dataclass(frozen=True)
class VacuumReport:
    table: str
    version: int
    finished_commit: int | None  # a claimed commit this run completed
    compacted: dict[str, tuple[int, int]]  # family -> (files removed, files added)
    removed: tuple[str, ...]
    kept_young: int  # unreferenced files kept because they are inside the retention window
    sealed: int = 0  # files compaction wrote, renamed after their content digest
    kept_reasons: tuple[str, ...] = ()  # unreferenced files kept for another reason than their age, and why

    def render(self) -> str:
        lines = [f"table {self.table} at version {self.version}"]
        if self.finished_commit:
            lines.append(f"finished commit {self.finished_commit}, which a stopped run had claimed")
        for fam, (gone, added) in sorted(self.compacted.items()):
            lines.append(f"compacted {fam}: {gone} files into {added}")
        if self.sealed:
            lines.append(f"named {self.sealed} compacted file(s) after their content digest")
        lines.append(f"removed {len(self.removed)} file(s) no version within the retention window needs; kept {self.kept_young} younger ones")
        lines += [f"kept {k}" for k in self.kept_reasons]
        return "\n".join(lines)


def modified(info: dict[str, Any]) -> float | None:
    """Seconds since the epoch a stored file was last written, from whichever key the filesystem reports."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def seal(table: Table, family: str, only: set[str] | None = None) -> int:
    """Copy each current file of ``family`` named without a content digest (``only``: just these, relative
    to the root) to its digest name, and swap the names in one Delta commit that changes no rows (no
    facetier version: ``--as-of`` reads the same before and after). The old names become files only
    older versions reference, which vacuum removes after the retention window. Returns files sealed."""
    dt = table.delta(family)
    if dt is None:
        return 0
    unsealed = [p for p in add_actions(dt).column("path").to_pylist()
                if recorded_digest(p) is None and (only is None or f"{family}/{p}" in only)]
    if not unsealed:
        return 0
    now = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = []
    for name in unsealed:
        body = read_body(table, f"{family}/{name}", family)
        rel = digest_name(family, name[: -len(".parquet")] if name.endswith(".parquet") else name, body)
        table.put(table._p(rel), body)
        stats = file_stats(pq.read_table(pa.BufferReader(body)))
        actions += [AddAction(rel[len(family) + 1:], len(body), {}, now, False, stats),
                    RemoveAction(path=name, data_change=False, deletion_timestamp=now)]
    dt.create_write_transaction(actions, mode="append", schema=family_schema(family),
                                commit_properties=CommitProperties(custom_metadata={"facetier_operation": "seal"}))
    log.info("sealed %d file(s) of the %s family under their content digests", len(unsealed), family)
    return len(unsealed)


def unreferenced_files(table: Table, snapshot: Snapshot) -> list[str]:
    """Family files no version in the Delta logs references, and leftover staging files (relative paths)."""
    out = set()
    for family in snapshot.family_versions:
        dt = table.delta(family)
        with reading_log(dt):
            not_current = set(dt.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False, full=True))
            tombstones = set(dt.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False))  # older versions' files
        out |= {f"{family}/{posixpath.basename(p)}" for p in not_current - tombstones}
    out |= set(table.stored_files(tuple(f for f in ALL_FAMILIES if f not in snapshot.family_versions)))  # no commit created these yet
    out |= set(table.stored_files((STAGING_DIR,)))
    return sorted(out)


def vacuum(table: Table, *, retention_hours: float = DEFAULT_RETENTION_HOURS, compact: bool = False, dry_run: bool = False,
           progress: bool = False) -> VacuumReport:
    audit = audit_logs(table)
    if not audit.healthy:
        # a file no readable log references may be one the damaged log does: nothing is garbage until the logs are whole
        raise TableCorruptError(f"{table.root}: vacuum removes nothing while a log is damaged ({audit.problems[0]}); "
                                f"`facetier check {table.root}` lists every problem, `check --repair` mends what it can")
    finished = None if dry_run else finish_pending(table)
    compacted: dict[str, tuple[int, int]] = {}
    sealed = 0
    if compact and not dry_run:
        snap = table.snapshot()
        for family in tqdm(list(snap.family_versions), desc="compact", unit="family", disable=not progress):
            # payloads are already compressed and unique: no dictionary, no min/max (they would store them again)
            raw = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE")
            props = WriterProperties(compression="ZSTD", max_row_group_size=ROW_GROUP_ROWS.get(family, 65536),
                                     column_properties={c: raw for c in ("payload", "identity") if c in family_schema(family).names})
            # sorted by id: each compacted file (and row group) covers one id range, so a lookup's
            # statistics check opens one file, however large the table
            metrics = table.delta(family).optimize.z_order([SORT_KEY.get(family, "face_id")], target_size=COMPACT_TARGET_BYTES,
                                                            writer_properties=props)
            if metrics.get("numFilesRemoved"):
                compacted[family] = (int(metrics["numFilesRemoved"]), int(metrics["numFilesAdded"]))
                sealed += seal(table, family)
    snapshot = table.snapshot()
    unreferenced = unreferenced_files(table, snapshot)
    stored = {**table.stored_files(ALL_FAMILIES), **table.stored_files((STAGING_DIR,))}
    cutoff = time.time() - retention_hours * 3600

    def young(rel: str) -> bool:  # unknown age counts as young: never guess in favour of deleting
        written = modified(stored[rel]) if rel in stored else None
        return written is None or written > cutoff

    # a shard whose done marker is young belongs to a run that may still commit (encode refreshes the
    # markers of the shards it resumes), however old the shard's own files are
    live = {posixpath.basename(rel)[: -len(".json")] for rel in unreferenced if rel.startswith(f"{STAGING_DIR}/") and young(rel)}
    removable = [rel for rel in unreferenced if not young(rel) and posixpath.basename(rel).split(".")[0] not in live]
    kept_reasons = []
    # a file a committed plan added, and no later plan removed, belongs to the table even when no log
    # version names it (a commit file lost after the check above): never garbage
    if named := sorted(set(removable) & planned_files(table)):
        removable = [rel for rel in removable if rel not in set(named)]
        kept_reasons.append(f"{len(named)} file(s) a committed plan in _commits added (e.g. {named[0]}), though no log version names them")
    expired = []
    for family in snapshot.family_versions:  # files only versions older than the retention window reference
        expired += [f"{family}/{posixpath.basename(p)}" for p in table.delta(family).vacuum(
            retention_hours=max(0, int(retention_hours)), dry_run=dry_run, enforce_retention_duration=False)]
    for kind in KINDS:  # identity index and persons generations superseded past the window, and old unnamed uploads
        superseded, unnamed = derived.removable(table, kind, retention_hours)
        old_uploads = [rel for rel in unnamed if (m := modified(table.fs.info(table._p(rel)))) is not None and m <= cutoff]
        expired += superseded + old_uploads
        if not dry_run:
            table.remove_files(superseded + old_uploads)
    if not dry_run:
        table.remove_files(removable)
        for family in snapshot.family_versions:
            table.delta(family).create_checkpoint()
    removed = tuple(sorted(set(removable) | set(expired)))
    log.info("removed %d files (%d unreferenced kept inside the %.1f h window)", len(removed), len(unreferenced) - len(removable), retention_hours)
    return VacuumReport(table.root, snapshot.version, finished, compacted, removed, len(unreferenced) - len(removable) - len(named), sealed,
                        tuple(kept_reasons))
