"""``facetier check TABLE [--repair]``: verify a committed table end to end, and clean only what is provably garbage.

What ``check`` verifies (any failure is a problem: exit 5, the family, file or version named):

* every family's Delta log (``_commits`` included) is whole: commit files contiguous and parseable,
  the checkpoint readable (facetier.io.delta_log), and it holds every facetier version ``_commits``
  says was committed to it; every family a commit wrote to still exists;
* every file the latest version of each family lists is there, hashes to the digest its name
  records (a byte flipped anywhere in it is seen), holds the rows the log recorded, and lies within
  the statistics the log keeps for it (a reader skips files by them); every stored payload matches
  its crc32 and every original hashes to its photo id;
* every face of the index has a base row, no layer row lacks its face, and every stored photo has
  its ``inputs`` row; no claimed commit is left half applied.

Files no Delta version references (a killed run's shards, a racing run that lost its claim, a
rewrite never committed) and leftover staging files are listed. ``--repair`` finishes a
half-applied commit, re-applies commits a family's log lost (from the plans ``_commits`` keeps),
names files written without a digest after theirs, and vacuums (facetier.pipelines.jobs.maintenance)
only when nothing is wrong: with any problem left it removes nothing, since a file no readable
log references may be one a damaged log does.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from facetier.codec.human_layers import payload_problem
from facetier.codec.image_layers import decode_original
from facetier.codec.layers import HUMAN_LAYERS
from facetier.io.commit import finish_pending, pending_plan, reapply_lost
from facetier.io import derived
from facetier.io.delta_log import audit_logs
from facetier.io.derived import INDEX_KIND, PERSONS_KIND
from facetier.io.reader import parse_body, read_body
from facetier.io.sources import content_id
from facetier.io.table import (
    ALL_FAMILIES,
    COMMITS_TABLE,
    INDEX_FAMILY,
    INPUTS_FAMILY,
    LAYER_FAMILIES,
    ORIGINAL_FAMILY,
    Snapshot,
    Table,
    add_actions,
    content_digest,
    recorded_digest,
)
from facetier.pipelines.jobs.maintenance import DEFAULT_RETENTION_HOURS, seal, unreferenced_files, vacuum
from tqdm import tqdm

from facetier.errors import FacetierError, TableError, TableNotFoundError

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
    repaired: tuple[str, ...] = field(default=())  # what --repair did, in words
    kept: tuple[str, ...] = field(default=())  # what --repair left alone, and why
    undigested: tuple[str, ...] = field(default=())  # files named without a content digest (verified by their checksums only)
    derived: tuple[str, ...] = field(default=())  # the identity index and persons: current or stale (facetier.io.derived)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"table {self.table} version {self.version}: {self.files_checked} files, {self.rows_checked} rows checked"]
        lines += [f"  REPAIRED {r}" for r in self.repaired]
        lines.append("OK: every log is whole; every committed file reads, matches its digest, its commit record and its checksums"
                     if self.healthy else f"{len(self.problems)} problem(s):")
        lines += [f"  PROBLEM {p}" for p in self.problems]
        if self.undigested:
            lines.append(f"{len(self.undigested)} file(s) are named without a content digest (written before facetier recorded them, or by "
                         "another Delta writer): verified by their rows and checksums only; `check --repair` names them after their digest")
        lines.append(f"{len(self.unreferenced)} file(s) no committed version references" + (":" if self.unreferenced else ""))
        lines += [f"  {u}" for u in self.unreferenced[:50]] + ([f"  ... {len(self.unreferenced) - 50} more"] if len(self.unreferenced) > 50 else [])
        if self.removed:
            lines.append(f"removed {len(self.removed)} of them (older than the retention window)")
        lines += [f"  KEPT {k}" for k in self.kept]
        lines += [f"  {d}" for d in self.derived]
        return "\n".join(lines)


@dataclass
class _Tally:
    files: int = 0
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    undigested: list[str] = field(default_factory=list)
    ids: dict[str, set[str]] = field(default_factory=dict)  # family -> face ids (photo ids for original and inputs)


def _bound_problems(where: str, data: pa.Table, bounds: dict[str, Any]) -> list[str]:
    """Rows outside the statistics the log keeps for their file: a reader that prunes by them would
    silently skip those rows (a flipped digit in the log, or a file swapped under it)."""
    out = []
    for name in data.column_names:
        lo, hi = bounds.get(f"min.{name}"), bounds.get(f"max.{name}")
        col = data.column(name)
        if (lo is None and hi is None and bounds.get(f"null_count.{name}") is None) or not (pa.types.is_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue
        nulls = bounds.get(f"null_count.{name}")
        if nulls is not None and nulls != col.null_count:  # `is null` / `is not null` prune by it
            out.append(f"{where}: column {name} holds {col.null_count} nulls, its log records {nulls}")
        mm = pc.min_max(col)
        low, high = mm["min"].as_py(), mm["max"].as_py()
        if low is None or (isinstance(low, float) and (low != low or high != high)):
            continue
        if lo is not None and lo > low:
            out.append(f"{where}: column {name} holds {low!r}, below the minimum {lo!r} its log records")
        # another writer may record a string bound cut to a prefix
        if hi is not None and hi < high and not (isinstance(hi, str) and high.startswith(hi)):
            out.append(f"{where}: column {name} holds {high!r}, above the maximum {hi!r} its log records")
    return out


def _check_file(table: Table, family: str, name: str, action: dict[str, Any], tally: _Tally) -> None:
    rel = f"{family}/{name}"
    where = table.uri(rel)
    try:
        body = read_body(table, rel, family)
    except TableError as exc:
        tally.problems.append(str(exc))
        return
    tally.files += 1
    if (digest := recorded_digest(name)) is None:
        tally.undigested.append(rel)
    elif content_digest(body) != digest:
        tally.problems.append(f"{where}: its bytes do not hash to the digest its name records (bit rot, or overwritten)")
        # and on: what else the damage broke (which faces' payloads) helps whoever restores the file
    try:
        data = parse_body(body, where, family)
    except TableError as exc:
        tally.problems.append(str(exc))
        return
    tally.rows += data.num_rows
    if action.get("num_records") is not None and data.num_rows != action["num_records"]:
        tally.problems.append(f"{where}: {data.num_rows} rows, its commit recorded {action['num_records']}")
    tally.problems.extend(_bound_problems(where, data, action))
    if family == INDEX_FAMILY or family in LAYER_FAMILIES:
        tally.ids.setdefault(family, set()).update(data.column("face_id").to_pylist())
    if family in LAYER_FAMILIES:
        for fid, payload, crc in zip(*(data.column(c).to_pylist() for c in ("face_id", "payload", "crc32"))):
            if payload is None or crc is None or zlib.crc32(payload) != crc:
                tally.problems.append(f"{where}: face {fid}'s payload fails its crc32")
            elif family in HUMAN_LAYERS and (why := payload_problem(family, payload)):
                tally.problems.append(f"{where}: face {fid}'s payload {why}")
    elif family == ORIGINAL_FAMILY:
        for pid, payload in zip(data.column("photo_id").to_pylist(), data.column("payload").to_pylist()):
            try:
                ok = payload is not None and content_id(decode_original(payload)) == pid
            except FacetierError:
                ok = False
            if not ok:
                tally.problems.append(f"{where}: photo {pid}'s original does not reproduce the bytes it was hashed from")
    if family in (INDEX_FAMILY, ORIGINAL_FAMILY):
        tally.ids.setdefault(f"{family}:photos", set()).update(data.column("photo_id").to_pylist())
    elif family == INPUTS_FAMILY:  # stored, or an alias (a table from before the family: its names found the photo again)
        tally.ids.setdefault(f"{family}:photos", set()).update(data.column("photo_id").drop_null().to_pylist())


def _check_family(table: Table, family: str, version: int, tally: _Tally) -> None:
    try:
        actions = add_actions(table.delta(family, version)).to_pylist()
    except TableError as exc:
        tally.problems.append(str(exc))
        return
    for action in sorted(actions, key=lambda a: a["path"]):
        _check_file(table, family, action["path"], action, tally)


def _cross_family(tally: _Tally, has_inputs: bool) -> None:
    faces = tally.ids.get(INDEX_FAMILY, set())
    for family in LAYER_FAMILIES:
        present = tally.ids.get(family)
        if present is None or not faces:
            continue
        if family == "basic":
            for fid in sorted(faces - present)[:5]:
                tally.problems.append(f"face {fid} has no row in the {family} family")
        for fid in sorted(present - faces)[:5]:
            tally.problems.append(f"the {family} family holds face {fid}, which the faces index does not")
    if has_inputs:
        photos = tally.ids.get(f"{INDEX_FAMILY}:photos", set()) | tally.ids.get(f"{ORIGINAL_FAMILY}:photos", set())
        missing = sorted(photos - tally.ids.get(f"{INPUTS_FAMILY}:photos", set()))
        for pid in missing[:5]:
            tally.problems.append(f"photo {pid} is stored, but no row of the inputs family says which input brought it")
        if len(missing) > 5:
            tally.problems.append(f"... {len(missing) - 5} more stored photos have no inputs row")


def _readable_snapshot(table: Table, tally: _Tally) -> Snapshot | None:
    """The latest state of every family whose log opens (a damaged one is a problem, not the end of the check)."""
    try:
        version = table.version()
    except TableError as exc:
        tally.problems.append(str(exc))
        return None
    if version == 0:
        raise TableNotFoundError(f"no committed facetier table at {table.root}")
    families = {}
    for family in ALL_FAMILIES:
        try:
            dt = table.delta(family)
        except TableError as exc:
            tally.problems.append(str(exc))
            continue
        if dt is not None:
            families[family] = dt.version()
    return Snapshot(version, families)


def _repair_logs(table: Table) -> tuple[list[str], list[str]]:
    """(what was repaired, what was kept and why) before the check proper: a half-applied commit finished,
    commits a family's log lost re-applied from the plans ``_commits`` keeps."""
    repaired, kept = [], []
    audit = audit_logs(table)
    for family, (have, want) in sorted(audit.behind.items()):
        done = reapply_lost(table, family, have, want)
        (repaired if done.startswith("re-applied") else kept).append(done)
    if audit_logs(table).healthy:
        if (finished := finish_pending(table)) is not None:
            repaired.append(f"finished version {finished}, which a stopped run had claimed and not applied to every family")
    return repaired, kept


def check_table(table_root: str, *, repair: bool = False, retention_hours: float = DEFAULT_RETENTION_HOURS, progress: bool = True) -> CheckReport:
    table = Table(table_root)
    repaired, kept = _repair_logs(table) if repair else ([], [])
    tally = _Tally()
    tally.problems.extend(audit_logs(table).problems)
    snapshot = _readable_snapshot(table, tally)
    if snapshot is None:
        if repair:
            kept.append("removed nothing: the table's claim log cannot be read")
        return CheckReport(table_root, 0, 0, 0, tuple(dict.fromkeys(tally.problems)), (), repaired=tuple(repaired), kept=tuple(kept))
    families = [(f, v) for f, v in snapshot.family_versions.items()]
    try:
        if (commits := table.delta(COMMITS_TABLE)) is not None:
            families.append((COMMITS_TABLE, commits.version()))
    except TableError as exc:
        tally.problems.append(str(exc))
    for family, version in tqdm(families, desc="check", unit="family", disable=not progress):
        _check_family(table, family, version, tally)
    _cross_family(tally, snapshot.has(INPUTS_FAMILY))
    derived_lines = _check_derived(table, snapshot, tally)
    try:
        if pending_plan(table) is not None:
            tally.problems.append("the latest commit was claimed but not applied to every family (a killed run); `check --repair` finishes it")
    except TableError as exc:
        tally.problems.append(str(exc))
    try:
        unreferenced = unreferenced_files(table, snapshot)
    except TableError as exc:
        tally.problems.append(str(exc))
        unreferenced = []
    removed: tuple[str, ...] = ()
    undigested = tally.undigested
    if repair and tally.problems:
        kept.append(f"removed nothing and renamed nothing: with {len(tally.problems)} problem(s) above, a file no readable log references "
                    "may be one a damaged log does; fix or restore what is named, then run `check --repair` again")
    elif repair:
        by_family: dict[str, set[str]] = {}
        for rel in undigested:
            by_family.setdefault(rel.split("/", 1)[0], set()).add(rel)
        sealed = sum(seal(table, family, only) for family, only in by_family.items())
        if sealed:
            repaired.append(f"named {sealed} verified file(s) after their content digest (the old names go with vacuum's retention)")
            undigested = []
        report = vacuum(table, retention_hours=retention_hours)
        removed = report.removed
        kept += list(report.kept_reasons)
    return CheckReport(table_root, snapshot.version, tally.files, tally.rows, tuple(dict.fromkeys(tally.problems)), tuple(unreferenced), removed,
                       tuple(repaired), tuple(kept), tuple(undigested), tuple(derived_lines))


def _check_derived(table: Table, snapshot: Snapshot, tally: _Tally) -> list[str]:
    """The newest identity index and persons generations: files there and matching their digests (a
    problem otherwise, though a rebuild mends it), and whether they cover the latest version."""
    lines = []
    for kind, rebuild in ((INDEX_KIND, "facetier index --rebuild"), (PERSONS_KIND, "facetier cluster --full")):
        try:
            gen = derived.latest(table, kind)
        except TableError as exc:
            tally.problems.append(f"{exc} (`{rebuild}` writes a new generation)")
            continue
        if gen is None:
            continue
        if damage := derived.verify(table, gen):
            tally.problems += [f"{d} (`{rebuild}` writes a new generation)" for d in damage]
            continue
        tally.files += len(gen.files)
        state = "current" if gen.current_for(table, snapshot) else f"stale: covers version {gen.table_version}, not {snapshot.version}"
        lines.append(f"{kind} generation {gen.number} ({gen.rows} faces): {state}")
    return lines

