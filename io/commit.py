"""Publishing shard files as one facetier commit across the families' Delta tables.

A commit of facetier version N+1 happens in three steps, each safe to cut short:

1. the plan (per family: files to add with their Delta statistics, files to remove) is written to
   ``_staging/commits/``;
2. a row holding the plan (its file list, without statistics) is committed to ``_commits`` under the application transaction
   ``facetier`` = N+1. Delta refuses a second transaction with the same application id racing the
   first, and a writer that planned on N refuses to claim when the table is already past N, so of
   two racing runs exactly one claims N+1: the other stops before touching any family;
3. the families are committed in :data:`COMMIT_ORDER` (heavy layers first, ``basic`` last), each
   with the application transaction ``facetier`` = N+1, so repeating a family's commit is a no-op.

A run killed between 2 and 3 leaves a claimed, unfinished commit; the next writer (or ``check
--repair``) rolls it forward from the plan before claiming its own version. Because ``_commits``
keeps every plan, ``check --repair`` also re-applies a commit a family's log lost (its newest
commit file deleted) from the files the plan names.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Field, Schema, Transaction
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.transaction import AddAction, RemoveAction
from facetier.io.table import (
    APP_ID,
    COMMIT_ORDER,
    COMMITS_TABLE,
    PLANS_DIR,
    ShardEntry,
    Table,
    facetier_version,
    family_schema,
    file_stats,
    history,
)

from facetier.errors import ConcurrentCommitError, TableCorruptError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileAdd:
    path: str  # relative to the table root: <family>/<file>
    size: int
    stats: str


@dataclass(frozen=True)
class CommitPlan:
    """What one facetier commit adds to and removes from each family (paths relative to the root)."""

    version: int
    job: str
    adds: dict[str, tuple[FileAdd, ...]] = field(default_factory=dict)
    removes: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @staticmethod
    def of(version: int, job: str, entries: list[ShardEntry], removes: dict[str, list[str]] | None = None,
           extra_adds: dict[str, list[FileAdd]] | None = None) -> CommitPlan:
        adds: dict[str, list[FileAdd]] = {}
        for e in entries:
            for fam, rel in e.files.items():
                adds.setdefault(fam, []).append(FileAdd(rel, e.nbytes[fam], e.file_stats.get(fam, "")))
        for fam, more in (extra_adds or {}).items():
            adds.setdefault(fam, []).extend(more)
        return CommitPlan(version, job, {f: tuple(sorted(a, key=lambda x: x.path)) for f, a in adds.items()},
                          {f: tuple(sorted(r)) for f, r in (removes or {}).items() if r})

    @property
    def families(self) -> list[str]:
        touched = set(self.adds) | set(self.removes)
        return [f for f in COMMIT_ORDER if f in touched] + sorted(touched - set(COMMIT_ORDER))

    @property
    def empty(self) -> bool:
        return not self.families

    def to_json(self, with_stats: bool = True) -> dict[str, Any]:
        return {"version": self.version, "job": self.job,
                "adds": {f: [a.__dict__ if with_stats else {"path": a.path, "size": a.size, "stats": ""} for a in v] for f, v in self.adds.items()},
                "removes": {f: list(v) for f, v in self.removes.items()}}

    @staticmethod
    def from_json(d: dict[str, Any]) -> CommitPlan:
        return CommitPlan(int(d["version"]), d["job"], {f: tuple(FileAdd(**a) for a in v) for f, v in d["adds"].items()},
                          {f: tuple(v) for f, v in d["removes"].items()})


def _txn(version: int, metadata: dict[str, str] | None = None) -> CommitProperties:
    return CommitProperties(app_transactions=[Transaction(app_id=APP_ID, version=version)],
                            custom_metadata={"facetier_version": str(version), **(metadata or {})})


def _relative(family: str, rel: str) -> str:
    prefix = f"{family}/"
    if not rel.startswith(prefix):
        raise ValueError(f"{rel} is not a file of the {family} family")
    return rel[len(prefix):]


def _ensure(table: Table, family: str) -> DeltaTable:
    """The family's Delta table, created empty first when missing. Creating is not where races are
    decided (two creators of the same empty table do no harm); every commit with rows is an append
    under the ``facetier`` application transaction, which Delta refuses to repeat concurrently."""
    dt = table.delta(family)
    if dt is None:
        try:
            DeltaTable.create(table.delta_uri(family), schema=Schema.from_arrow(family_schema(family)), mode="ignore",
                              storage_options=table.delta_options)
        except (CommitFailedError, DeltaError) as exc:  # another writer created it a moment earlier
            log.debug("creating the %s family raced another writer: %s", family, exc)
        dt = table.delta(family)
        if dt is None:
            raise TableCorruptError(f"could not create the {family} family of {table.root}")
    if missing := [f for f in family_schema(family) if f.name not in {g.name for g in dt.schema().fields}]:
        # a column added in a later facetier (nullable: the files before it read it as null); readers see it from this version on
        try:
            dt.alter.add_columns([Field(f.name, _DELTA_TYPES[f.type], nullable=True) for f in missing])
        except (CommitFailedError, DeltaError) as exc:  # another writer added it a moment earlier
            log.debug("adding %s to the %s family raced another writer: %s", [f.name for f in missing], family, exc)
        dt = table.delta(family)
    return dt


_DELTA_TYPES = {pa.string(): "string", pa.int64(): "long", pa.int32(): "integer", pa.float32(): "float", pa.binary(): "binary"}


def _done(dt: DeltaTable, version: int) -> bool:
    return facetier_version(dt) >= version


def _commit_family(table: Table, family: str, plan: CommitPlan) -> None:
    """Apply the plan's actions to one family, once: a family that already has this version's
    transaction is left alone."""
    dt = _ensure(table, family)
    if _done(dt, plan.version):
        return
    now = int(time.time() * 1000)
    adds = [AddAction(_relative(family, a.path), a.size, {}, now, True, a.stats or _stats_of(table, a.path)) for a in plan.adds.get(family, ())]
    removes = [RemoveAction(path=_relative(family, r), data_change=True, deletion_timestamp=now) for r in plan.removes.get(family, ())]
    try:
        dt.create_write_transaction([*adds, *removes], mode="append", schema=family_schema(family), commit_properties=_txn(plan.version))
    except (CommitFailedError, DeltaError) as exc:
        if _done(_ensure(table, family), plan.version):
            return  # a concurrent roll-forward of the same plan won
        raise ConcurrentCommitError(f"committing the {family} family of {table.root} at version {plan.version} failed: {exc}") from exc


def _stats_of(table: Table, rel: str) -> str:
    """Statistics of a file whose done marker predates them: read it back."""
    return file_stats(table.read_parquet(rel))


def _plan_path(version: int, job: str) -> str:
    return f"{PLANS_DIR}/v{version:08d}-{job}.json"


def committed_plans(table: Table) -> dict[int, CommitPlan | None]:
    """Facetier version -> the plan ``_commits`` holds for it (None for a claim made before plans were
    kept there: its row names the plan's staging file instead)."""
    from facetier.io.reader import read_family  # the reader builds on this module's table layer

    if table.delta(COMMITS_TABLE) is None:
        return {}
    rows = read_family(table, COMMITS_TABLE, columns=["version", "job", "plan"], snapshot=commits_snapshot(table))
    out: dict[int, CommitPlan | None] = {}
    for version, job, plan in zip(*(rows.column(c).to_pylist() for c in ("version", "job", "plan"))):
        out[int(version)] = CommitPlan.from_json(json.loads(plan)) if plan and plan.startswith("{") else None
    return out


def commits_snapshot(table: Table):
    from facetier.io.table import Snapshot

    dt = table.delta(COMMITS_TABLE)
    return Snapshot(facetier_version(dt), {COMMITS_TABLE: dt.version()})


def planned_files(table: Table) -> set[str]:
    """Files (relative to the root) some committed plan added and no later plan removed."""
    added: set[str] = set()
    for _, plan in sorted(committed_plans(table).items()):
        if plan is not None:
            added |= {a.path for adds in plan.adds.values() for a in adds}
            added -= {r for removes in plan.removes.values() for r in removes}
    return added


def reapply_lost(table: Table, family: str, have: int, want: int) -> str:
    """Re-apply to ``family`` the commits after facetier version ``have`` up to ``want`` that its log lost,
    from the plans ``_commits`` keeps; returns what was done, or why nothing could be."""
    plans = committed_plans(table)
    todo = [v for v in sorted(plans) if have < v <= want and (plans[v] is None or family in plans[v].families)]
    if not todo or any(plans[v] is None for v in todo):
        return f"kept the {family} family as it is: _commits holds no plan for version(s) {todo or [want]} (claimed by an older facetier)"
    for v in todo:
        if gone := [a.path for a in plans[v].adds.get(family, ()) if not table.fs.exists(table._p(a.path))]:
            return f"kept the {family} family as it is: version {v} added {len(gone)} file(s) that are gone too (e.g. {table.uri(gone[0])})"
    for v in todo:
        _commit_family(table, family, plans[v])
    log.warning("re-applied version(s) %s to the %s family of %s, which its log had lost", todo, family, table.root)
    return f"re-applied version(s) {', '.join(map(str, todo))} to the {family} family, which its log had lost"


def pending_plan(table: Table) -> CommitPlan | None:
    """The plan of the latest claimed commit when some family does not have it yet."""
    commits = table.delta(COMMITS_TABLE)
    if commits is None:
        return None
    version = facetier_version(commits)
    job = claimant(table, version)
    if job is None:
        return None
    rel = _plan_path(version, job)
    try:
        with table.fs.open(table._p(rel), "rb") as fh:
            plan = CommitPlan.from_json(json.load(fh))
    except FileNotFoundError:
        return None  # removed once every family had it
    for fam in plan.families:
        dt = table.delta(fam)
        if dt is None or not _done(dt, version):
            return plan
    table.remove_files([rel])
    return None


def finish_pending(table: Table) -> int | None:
    """Roll a claimed, unfinished commit forward; returns its version, or None when there was none."""
    plan = pending_plan(table)
    if plan is None:
        return None
    log.warning("version %d of %s was claimed by a run that stopped before committing every family; finishing it", plan.version, table.root)
    _apply(table, plan)
    return plan.version


def _apply(table: Table, plan: CommitPlan) -> None:
    for fam in plan.families:
        _commit_family(table, fam, plan)
    table.remove_files([_plan_path(plan.version, plan.job)])


def commit(table: Table, base_version: int, entries: list[ShardEntry], *, removes: dict[str, list[str]] | None = None,
           extra_adds: dict[str, list[FileAdd]] | None = None, job: str | None = None) -> int:
    """Publish ``entries``' files (and the given removals) as version ``base_version + 1``.

    Raises :class:`ConcurrentCommitError` when another writer committed since ``base_version``;
    nothing of this commit is then visible.
    """
    finish_pending(table)
    if (current := table.version()) != base_version:
        raise ConcurrentCommitError(f"{table.root} is at version {current}, this run planned on {base_version}; rerun to add what is missing")
    version = base_version + 1
    job = job or uuid.uuid4().hex[:12]
    plan = CommitPlan.of(version, job, entries, removes, extra_adds)
    for fam in plan.families:  # a family already past the claim log (a lost _commits file) would skip this commit's rows
        if (dt := table.delta(fam)) is not None and _done(dt, version):
            if table.version() != base_version:  # a racing run claimed and applied it a moment ago
                raise ConcurrentCommitError(f"{table.root} moved past version {base_version} while this run committed; rerun to add what is missing")
            raise TableCorruptError(f"the {fam} family of {table.root} already holds version {version}, which _commits never claimed "
                                    f"(a lost _commits log file): nothing was committed; `facetier check {table.root}`")
    rel = _plan_path(version, job)
    table.fs.makedirs(table._p(PLANS_DIR), exist_ok=True)
    table.put(table._p(rel), json.dumps(plan.to_json()).encode())
    _claim(table, plan, rel)
    _apply(table, plan)
    return version


def _claim(table: Table, plan: CommitPlan, rel: str) -> None:
    """Claim version ``plan.version`` in ``_commits``, or raise :class:`ConcurrentCommitError` (nothing of
    this commit is then visible)."""
    row = pa.table({"version": [plan.version], "job": [plan.job], "plan": [json.dumps(plan.to_json(with_stats=False))],
                    "families": [json.dumps({f: [len(plan.adds.get(f, ())), len(plan.removes.get(f, ()))] for f in plan.families})]},
                   schema=family_schema(COMMITS_TABLE))
    commits = _ensure(table, COMMITS_TABLE)
    claim_file, claimed = None, False
    try:
        if not _done(commits, plan.version - 1) or _done(commits, plan.version):
            raise ConcurrentCommitError(f"version {plan.version} of {table.root} was committed by another run; rerun to add what is missing")
        # written like every family file (named by its digest), so `check` verifies the claim log's files too
        claim_file, size, stats = table.write_family(COMMITS_TABLE, f"v{plan.version:08d}-{plan.job}", row, "", "")
        add = AddAction(_relative(COMMITS_TABLE, claim_file), size, {}, int(time.time() * 1000), True, stats)
        try:
            commits.create_write_transaction([add], mode="append", schema=family_schema(COMMITS_TABLE),
                                             commit_properties=_txn(plan.version, {"facetier_job": plan.job}))
            claimed = True
        except (CommitFailedError, DeltaError) as exc:  # lost the race: Delta refused a second `facetier` = N+1
            raise ConcurrentCommitError(f"version {plan.version} of {table.root} was claimed by another run ({str(exc).splitlines()[0][:200]}); "
                                        "rerun to add what is missing") from exc
        if (winner := claimant(table, plan.version)) != plan.job:  # belt and braces: the first claim in the log wins
            raise ConcurrentCommitError(f"version {plan.version} of {table.root} was claimed by run {winner} first; rerun to add what is missing")
    except ConcurrentCommitError:
        table.remove_files([rel, *([claim_file] if claim_file and not claimed else [])])  # a claim in the log stays: vacuum's to judge
        raise


def claimant(table: Table, version: int) -> str | None:
    """The job whose claim of ``version`` is first in the ``_commits`` log."""
    commits = table.delta(COMMITS_TABLE)
    if commits is None:
        return None
    claims = [h for h in history(commits, limit=50) if h.get("facetier_version") == str(version) and h.get("facetier_job")]
    return min(claims, key=lambda h: int(h["version"]))["facetier_job"] if claims else None
