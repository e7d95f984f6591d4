"""``facetier check TABLE [--repair]``: verify a committed table end to end, and clean what nothing needs.

Verifies that every file the latest version of each family's Delta log lists opens, holds the rows
the log recorded, that every stored payload matches its crc32 and every original hashes to its
photo id, that every face of the index has a base row and no layer row lacks its face, and that no
claimed commit is left half applied. Lists files no Delta version references (a killed run's
shards, a racing run that lost its claim, a rewrite never committed) and leftover staging files;
``--repair`` finishes a half-applied commit and vacuums (facetier.pipelines.jobs.maintenance), so a
run still writing is never touched.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field

from facetier.codec.image_layers import decode_original
from facetier.io.reader import read_file
from facetier.io.sources import content_id
from facetier.io.commit import finish_pending, pending_plan
from facetier.pipelines.jobs.maintenance import DEFAULT_RETENTION_HOURS, unreferenced_files, vacuum
from facetier.io.table import (
    ALL_FAMILIES,
    INDEX_FAMILY,
    LAYER_FAMILIES,
    ORIGINAL_FAMILY,
    Snapshot,
    Table,
    add_actions,
)
from tqdm import tqdm

from facetier.errors import FacetierError, TableCorruptError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CheckReport:
    table: str
    version: int
    files_checked: int
    rows_checked: int
    problems: tuple[str, ...]
    unreferenced: tuple[str, ...]  # relative paths no committed version lists (family files and done markers)
    removed: tuple[str, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"table {self.table} version {self.version}: {self.files_checked} files, {self.rows_checked} rows checked",
                 "OK: every committed file reads, matches its commit record and its checksums" if self.healthy
                 else f"{len(self.problems)} problem(s):"]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        lines.append(f"{len(self.unreferenced)} file(s) no committed version references" + (":" if self.unreferenced else ""))
        lines += [f"  {u}" for u in self.unreferenced[:50]] + ([f"  ... {len(self.unreferenced) - 50} more"] if len(self.unreferenced) > 50 else [])
        if self.removed:
            lines.append(f"removed {len(self.removed)} of them (older than the retention window)")
        return "\n".join(lines)


def _check_family(table: Table, family: str, snapshot: Snapshot, problems: list[str], ids: dict[str, set[str]]) -> tuple[int, int]:
    """Check every committed file of one family; returns (files, rows) checked. ``ids[family]`` gets its face ids."""
    files = rows = 0
    dt = table.delta(family, snapshot.family_versions[family])
    actions = add_actions(dt)
    recorded = dict(zip(actions.column("path").to_pylist(), actions.column("num_records").to_pylist()))
    columns = {INDEX_FAMILY: ["face_id", "photo_id", "face_index"], ORIGINAL_FAMILY: ["photo_id", "payload"]}.get(
        family, ["face_id", "payload", "crc32"] if family in LAYER_FAMILIES else None)
    for name in sorted(recorded):
        rel = f"{family}/{name}"
        try:
            data = read_file(table, rel, family, columns=columns)
        except TableCorruptError as exc:
            problems.append(str(exc))
            continue
        files += 1
        rows += data.num_rows
        if recorded[name] is not None and data.num_rows != recorded[name]:
            problems.append(f"{table.uri(rel)}: {data.num_rows} rows, its commit recorded {recorded[name]}")
        if family == INDEX_FAMILY or family in LAYER_FAMILIES:
            ids.setdefault(family, set()).update(data.column("face_id").to_pylist())
        if family in LAYER_FAMILIES:
            for fid, payload, crc in zip(*(data.column(c).to_pylist() for c in ("face_id", "payload", "crc32"))):
                if payload is None or crc is None or zlib.crc32(payload) != crc:
                    problems.append(f"{table.uri(rel)}: face {fid}'s payload fails its crc32")
        elif family == ORIGINAL_FAMILY:
            for pid, payload in zip(data.column("photo_id").to_pylist(), data.column("payload").to_pylist()):
                try:
                    ok = payload is not None and content_id(decode_original(payload)) == pid
                except FacetierError:
                    ok = False
                if not ok:
                    problems.append(f"{table.uri(rel)}: photo {pid}'s original does not reproduce the bytes it was hashed from")
    return files, rows


def check_table(table_root: str, *, repair: bool = False, retention_hours: float = DEFAULT_RETENTION_HOURS, progress: bool = True) -> CheckReport:
    table = Table(table_root)
    if repair:
        finish_pending(table)
    snapshot = table.snapshot()
    problems: list[str] = []
    files = rows = 0
    ids: dict[str, set[str]] = {}
    for family in tqdm([f for f in ALL_FAMILIES if snapshot.has(f)], desc="check", unit="family", disable=not progress):
        f, r = _check_family(table, family, snapshot, problems, ids)
        files, rows = files + f, rows + r
    faces = ids.get(INDEX_FAMILY, set())
    for family in LAYER_FAMILIES:
        present = ids.get(family)
        if present is None or not faces:
            continue
        if family == "basic":
            for fid in sorted(faces - present)[:5]:
                problems.append(f"face {fid} has no row in the {family} family")
        for fid in sorted(present - faces)[:5]:
            problems.append(f"the {family} family holds face {fid}, which the faces index does not")
    if pending_plan(table) is not None:
        problems.append("the latest commit was claimed but not applied to every family (a killed run); `check --repair` finishes it")
    unreferenced = unreferenced_files(table, snapshot)
    removed: tuple[str, ...] = ()
    if repair:
        removed = vacuum(table, retention_hours=retention_hours).removed
    return CheckReport(table_root, snapshot.version, files, rows, tuple(problems), tuple(unreferenced), removed)
