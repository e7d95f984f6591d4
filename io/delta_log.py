"""A family's Delta log read as files: what Delta itself reports only by failing to open, or not at all.

delta-rs opens a log whose newest commit file is gone as the version before it (the commit's rows
silently vanish), refuses one with a gap or an unreadable file, and tolerates some damage inside a
commit file's JSON. ``facetier check`` therefore reads the log's files itself: every commit file
from the earliest kept to the newest is present and parses line by line, and the checkpoint
``_last_checkpoint`` names exists and reads. Which facetier versions a family must hold comes from
``_commits`` (:func:`facetier.pipelines.jobs.check.check_table` compares the two).
"""
from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from facetier.io.storage import storage_error
from facetier.io.table import ALL_FAMILIES, COMMITS_TABLE, Table, facetier_version, family_schema

from facetier.errors import TableCorruptError

_COMMIT_FILE = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT_FILE = re.compile(r"^(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet$")
# the actions of the Delta protocol; a flipped byte in a key makes an action Delta silently skips
DELTA_ACTIONS = frozenset({"add", "remove", "metaData", "protocol", "commitInfo", "txn", "cdc", "domainMetadata", "checkpointMetadata", "sidecar"})
# the fields the Delta protocol requires of each action: a flipped byte in a key leaves valid JSON Delta cannot use
REQUIRED_FIELDS = {"add": ("path", "partitionValues", "size", "modificationTime", "dataChange"), "remove": ("path", "dataChange"),
                   "txn": ("appId", "version"), "metaData": ("id", "format", "schemaString", "partitionColumns", "configuration"),
                   "protocol": ("minReaderVersion", "minWriterVersion")}


@dataclass(frozen=True)
class LogHealth:
    family: str
    exists: bool  # the family has a _delta_log folder with at least one commit file
    problems: tuple[str, ...]
    newest: int | None  # the newest commit version among the log's files


def _listing(table: Table, family: str) -> list[str] | None:
    folder = table._p(family, "_delta_log")
    table.fs.invalidate_cache(folder)
    try:
        return sorted(posixpath.basename(p) for p in table.fs.ls(folder, detail=False))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, table.uri(f"{family}/_delta_log"), always=True) from exc


def _read(table: Table, rel: str) -> bytes:
    try:
        return table.fs.cat_file(table._p(rel))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise storage_error(exc, table.uri(rel), always=True) from exc


def log_health(table: Table, family: str) -> LogHealth:
    """Whether ``family``'s log is whole: commit files contiguous and parseable, its checkpoint readable."""
    names = _listing(table, family)
    where = table.uri(f"{family}/_delta_log")
    if names is None:
        return LogHealth(family, False, (), None)
    versions = sorted(int(m.group(1)) for n in names if (m := _COMMIT_FILE.match(n)))
    checkpoints = {int(m.group(1)) for n in names if (m := _CHECKPOINT_FILE.match(n))}
    problems: list[str] = []
    checkpoint = None
    if "_last_checkpoint" in names:
        try:
            checkpoint = int(json.loads(_read(table, f"{family}/_delta_log/_last_checkpoint"))["version"])
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            problems.append(f"{where}/_last_checkpoint cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
    if checkpoint is not None:
        if checkpoint not in checkpoints:
            problems.append(f"{where}: _last_checkpoint names version {checkpoint}, whose checkpoint file is missing")
        else:
            for n in names:
                if (m := _CHECKPOINT_FILE.match(n)) and int(m.group(1)) == checkpoint:
                    try:
                        pq.read_table(pa.BufferReader(_read(table, f"{family}/_delta_log/{n}")))
                    except (pa.ArrowException, OSError) as exc:
                        problems.append(f"{where}/{n} (the checkpoint Delta starts from) cannot be read: {str(exc)[:160]}")
    if not versions and checkpoint is None:
        return LogHealth(family, False, tuple(problems), None)
    # commit files older than a checkpoint may have been cleaned up (Delta's log retention), always from
    # the oldest on: a gap after the first kept file, or before a checkpoint's successor, is a lost file
    first = versions[0] if versions else checkpoint + 1
    if checkpoint is None and first != 0:
        problems.append(f"{where}: the commit files start at version {first}, with no checkpoint before them (files 0-{first - 1} lost)")
    elif checkpoint is not None and first > checkpoint + 1:
        problems.append(f"{where}: versions {checkpoint + 1}-{first - 1} after the checkpoint at {checkpoint} are lost")
    present = set(versions)
    if missing := [v for v in range(first, (versions[-1] if versions else first) + 1) if v not in present]:
        shown = ", ".join(str(v) for v in missing[:10]) + (" ..." if len(missing) > 10 else "")
        problems.append(f"{where}: commit file(s) of version {shown} are missing (a lost object: versions after it cannot be read)")
    for v in versions:
        rel = f"{family}/_delta_log/{v:020d}.json"
        try:
            body = _read(table, rel)
        except FileNotFoundError:
            problems.append(f"{table.uri(rel)} vanished while it was read")
            continue
        if problem := _commit_file_problem(body):
            problems.append(f"{table.uri(rel)}: {problem}")
    newest = max([*versions, *(c for c in [checkpoint] if c is not None)])
    return LogHealth(family, True, tuple(problems), newest)


def _commit_file_problem(body: bytes) -> str | None:
    """Why a commit file is damaged, or None. Every line of a Delta commit is one JSON object holding one action."""
    if not body.strip():
        return "the commit file is empty"
    try:
        lines = body.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        return f"not UTF-8 at byte {exc.start}"
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            action = json.loads(line)
        except ValueError as exc:
            return f"line {i} is not JSON ({exc})"
        if not isinstance(action, dict) or len(action) != 1:
            return f"line {i} is not one Delta action"
        if (kind := next(iter(action))) not in DELTA_ACTIONS:
            return f"line {i} holds an unknown action {kind!r}"
        fields = action[kind]
        if not isinstance(fields, dict) or (missing := [f for f in REQUIRED_FIELDS.get(kind, ()) if f not in fields]):
            return f"line {i}'s {kind} action lacks {missing if isinstance(fields, dict) else 'its fields'}"
    return None


def expected_versions(table: Table, skip: int | None = None) -> dict[str, int]:
    """Family -> the newest facetier version ``_commits`` says wrote to it (``skip``: a claimed version
    not yet applied everywhere)."""
    from facetier.io.commit import commits_snapshot
    from facetier.io.reader import read_family

    rows = read_family(table, COMMITS_TABLE, columns=["version", "families"], snapshot=commits_snapshot(table))
    out: dict[str, int] = {}
    for version, families in zip(rows.column("version").to_pylist(), rows.column("families").to_pylist()):
        if version == skip:
            continue
        try:
            touched = json.loads(families or "{}")
        except ValueError as exc:
            raise TableCorruptError(f"{table.uri(COMMITS_TABLE)}: the row of version {version} does not parse ({exc})") from exc
        for family in touched:
            out[family] = max(out.get(family, 0), int(version))
    return out


@dataclass(frozen=True)
class LogAudit:
    problems: tuple[str, ...]
    behind: dict[str, tuple[int, int]]  # family -> (facetier version its log holds, version _commits says it has): lost newest commits

    @property
    def healthy(self) -> bool:
        return not self.problems


def audit_logs(table: Table) -> LogAudit:
    """Every family's log whole, and holding every facetier version ``_commits`` says it does (a family
    whose newest commit file was lost reads as the version before it, its rows gone without an error)."""
    from facetier.io.commit import pending_plan

    health = log_health(table, COMMITS_TABLE)
    if health.problems:
        return LogAudit(health.problems, {})
    if not health.exists:
        try:
            table.version()  # families without _commits: a lost claim log
        except TableCorruptError as exc:
            return LogAudit((str(exc),), {})
        return LogAudit((), {})
    problems: list[str] = []
    try:
        commits = table.delta(COMMITS_TABLE)
        claimed = facetier_version(commits)
        pending = pending_plan(table)
        expected = expected_versions(table, skip=pending.version if pending else None)
    except TableCorruptError as exc:
        return LogAudit((str(exc),), {})
    behind: dict[str, tuple[int, int]] = {}
    for family in ALL_FAMILIES:
        h = log_health(table, family)
        problems += h.problems
        want = expected.get(family, 0)
        if not h.exists:
            if want:
                problems.append(f"the {family} family is gone ({table.uri(family)} has no Delta log), though version {want} committed to it")
            continue
        if h.problems:
            continue
        try:
            dt = table.delta(family)
            have = facetier_version(dt) if dt is not None else 0
        except TableCorruptError as exc:
            problems.append(str(exc))
            continue
        if dt is not None and (strange := sorted({f.name for f in dt.schema().fields} - set(family_schema(family).names))):
            # another Delta reader (Spark, BigQuery) takes its column names from here
            problems.append(f"the {family} family's Delta schema names columns {strange} that the family does not have (a damaged metaData action?)")
        if have < want:
            behind[family] = (have, want)
            problems.append(f"the {family} family's log ends at facetier version {have}, but version {want} committed to it "
                            "(its newest commit file lost?): `check --repair` re-applies the lost commits from _commits")
        elif have > claimed:
            problems.append(f"the {family} family holds facetier version {have}, past the {claimed} _commits has claimed "
                            "(a lost _commits log file): restore it from a backup before writing to this table")
    return LogAudit(tuple(problems), behind)
