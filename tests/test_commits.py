"""The commit protocol on its own (no model): racing writers and kill -9 at random points, on local
disk, S3 (moto) and GCS (fake-gcs-server), with zero lost or duplicated rows."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pyarrow as pa
import pytest
from facetier.io.commit import commit, finish_pending, pending_plan
from facetier.io.reader import read_family
from facetier.io.table import BASE_SCHEMA, FACES_SCHEMA, LAYER_SCHEMA, ShardEntry, Table

from facetier.errors import ConcurrentCommitError

FAMILIES = {"faces": FACES_SCHEMA, "basic": BASE_SCHEMA, "middle": LAYER_SCHEMA, "residual": LAYER_SCHEMA}


def stage(table: Table, shard_id: str, n: int) -> ShardEntry:
    """A finished shard of ``n`` synthetic faces, written as a worker writes one (files + done marker)."""
    ids = [f"{shard_id}-p{i}" for i in range(n)]
    files, rows, nbytes, stats = {}, {}, {}, {}
    for fam, schema in FAMILIES.items():
        cols = {name: [None] * n for name in schema.names}
        cols["photo_id"] = ids
        cols["face_id"] = [f"{p}-0" for p in ids]
        if "payload" in cols:
            cols["payload"] = [p.encode() for p in ids]
            cols["crc32"] = [zlib.crc32(p.encode()) for p in ids]
        t = pa.Table.from_pydict(cols, schema=schema)
        files[fam], nbytes[fam], stats[fam] = table.write_family(fam, shard_id, t, "synthetic", "w")
        rows[fam] = n
    entry = ShardEntry(shard_id, "synthetic", "w", files, rows, nbytes, tuple(ids), {}, stats)
    table.write_done_marker(entry)
    return entry


def face_ids(table: Table) -> dict[str, list[str]]:
    return {fam: sorted(read_family(table, fam, columns=["face_id"]).column("face_id").to_pylist()) for fam in FAMILIES}


def assert_exactly(table: Table, expected: set[str]) -> None:
    """Every family holds each expected face once, and nothing else."""
    for fam, ids in face_ids(table).items():
        assert len(ids) == len(set(ids)), f"{fam} has duplicated rows"
        assert set(ids) == expected, f"{fam}: {len(set(ids) - expected)} unexpected, {len(expected - set(ids))} lost"


COMMITTER = """
import json, sys
from facetier.io.commit import commit
from facetier.io.table import ShardEntry, Table
from facetier.errors import ConcurrentCommitError
root, base, markers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
t = Table(root)
entries = [ShardEntry.from_json(json.loads(t.fs.cat_file(t._p("_staging", m + ".json")))) for m in markers]
retry = base < 0
t.snapshot_or_empty()  # warm: the kill window starts at the commit itself
print("READY", flush=True)
while True:
    try:
        v = commit(t, t.version() if retry else base, entries)
        print("COMMITTED", v, flush=True)
        break
    except ConcurrentCommitError:
        if not retry:
            print("LOST", flush=True)
            break
"""


def run_committer(root: str, base: int, shard_ids: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COMMITTER, root, str(base), *shard_ids], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def racing_writers(root: str, rounds: int = 3) -> None:
    """Rounds of two processes claiming the same version (one must lose cleanly), then two that retry on
    the new version until both land: every winner's rows once, every loser's never."""
    t = Table(root)
    expected: set[str] = set()
    for r in range(rounds):
        a, b = stage(t, f"r{r}a", 3), stage(t, f"r{r}b", 3)
        base = t.version()
        procs = [run_committer(root, base, [a.shard_id]), run_committer(root, base, [b.shard_id])]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        won = [e for e, out in zip((a, b), outs) if "COMMITTED" in out]
        assert len(won) == 1 and sum("LOST" in o for o in outs) == 1, outs
        expected |= {f"{p}-0" for p in won[0].photo_ids}
        assert t.version() == base + 1
        assert_exactly(t, expected)
    c, d = stage(t, "late-c", 2), stage(t, "late-d", 2)
    procs = [run_committer(root, -1, [c.shard_id]), run_committer(root, -1, [d.shard_id])]
    assert all("COMMITTED" in p.communicate(timeout=300)[0] for p in procs)
    expected |= {f"{p}-0" for e in (c, d) for p in e.photo_ids}
    assert_exactly(t, expected)


def kills_mid_commit(root: str, episodes: int, seed: int = 0) -> None:
    """kill -9 a committing process at a random instant, then resume the way encode does (finish a claimed
    commit, or commit again): after every episode each shard's rows are there exactly once."""
    rng = random.Random(seed)
    t = Table(root)
    first = stage(t, "k-first", 2)
    commit(t, 0, [first])
    second = stage(t, "k-second", 2)
    calibration = run_committer(root, 1, [second.shard_id])  # what a commit costs in a fresh process, on this machine, now
    assert calibration.stdout.readline().strip() == "READY"
    started = time.monotonic()
    assert "COMMITTED" in calibration.communicate(timeout=300)[0]
    one_commit = time.monotonic() - started
    expected = {f"{p}-0" for e in (first, second) for p in e.photo_ids}
    outcomes = []
    # stratified instants over 1.5 commits: some kills land before the claim, some after
    delays = [(k + rng.random()) / episodes * 1.5 * one_commit for k in range(episodes)]
    rng.shuffle(delays)
    for k in range(episodes):
        entry = stage(t, f"k{k}", 2)
        base = t.version()
        proc = run_committer(root, base, [entry.shard_id])
        assert proc.stdout.readline().strip() == "READY"  # imported and about to commit
        time.sleep(delays[k])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if pending_plan(t) is not None:
            outcomes.append("claimed, finished by the next writer")
            finish_pending(t)
        elif t.version() == base:
            outcomes.append("not claimed, committed again")
            commit(t, base, [entry])
        else:
            outcomes.append("completed before the kill")
        expected |= {f"{p}-0" for p in entry.photo_ids}
        assert t.version() == base + 1
        assert_exactly(t, expected)
    assert len(set(outcomes)) >= 2, outcomes  # the kills did land at different points


def test_racing_writers_on_local_disk(tmp_path: Path):
    racing_writers(str(tmp_path / "t"))


def test_kill_9_at_random_points_of_a_commit_loses_and_duplicates_nothing(tmp_path: Path):
    kills_mid_commit(str(tmp_path / "t"), episodes=12)


def test_a_claimed_commit_is_finished_by_the_next_writer_only_once(tmp_path: Path):
    t = Table(str(tmp_path / "t"))
    first = stage(t, "a", 2)
    commit(t, 0, [first])
    second = stage(t, "b", 2)
    import facetier.io.commit as c

    real = c._commit_family
    calls = []

    def dies_after_two(table, family, plan):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(family)
        real(table, family, plan)

    c._commit_family = dies_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            commit(t, 1, [second])
    finally:
        c._commit_family = real
    assert t.version() == 2 and pending_plan(t) is not None
    # heavy families first, basic last: what a reader of `basic` sees is complete in every other family
    assert set(face_ids(t)["residual"]) > set(face_ids(t)["basic"])
    with pytest.raises(ConcurrentCommitError):  # a writer that planned on version 1 finishes 2, then sees it is late
        commit(t, 1, [stage(t, "c", 1)])
    assert pending_plan(t) is None
    assert_exactly(t, {f"{p}-0" for e in (first, second) for p in e.photo_ids})
    assert finish_pending(t) is None


def test_time_travel_reads_each_version(tmp_path: Path):
    t = Table(str(tmp_path / "t"))
    a = stage(t, "a", 2)
    commit(t, 0, [a])
    b = stage(t, "b", 3)
    commit(t, 1, [b])
    old = t.snapshot(1)
    assert len(read_family(t, "basic", columns=["face_id"], snapshot=old)) == 2
    assert len(read_family(t, "basic", columns=["face_id"])) == 5
    with pytest.raises(Exception, match="versions 1 to 2"):
        t.snapshot(3)
    assert json.loads(json.dumps(old.family_versions)) == old.family_versions


def test_vacuum_compacts_sorted_and_keeps_what_versions_in_the_window_need(tmp_path: Path):
    from facetier.io.reader import family_files
    from facetier.io.table import recorded_digest
    from facetier.pipelines.jobs.maintenance import vacuum
    from facetier.pipelines.jobs.stored_codes import index_rows, read_codes

    from facetier.errors import TableCorruptError

    t = Table(str(tmp_path / "t"))
    entries = []
    for k in range(3):
        entries.append(stage(t, f"v{k}", 4))
        commit(t, k, [entries[-1]])
    stray = stage(t, "killed-run", 2)  # a shard no commit took
    before = face_ids(t)
    report = vacuum(t, compact=True, retention_hours=24)
    assert report.compacted["basic"] == (3, 1) and report.removed == ()  # everything is inside the window
    assert face_ids(t) == before and len(family_files(t, "basic", t.snapshot())) == 1
    # Delta's compaction names files its own way: each is renamed after its digest, so `check` verifies it
    assert report.sealed == len(report.compacted) and all(recorded_digest(f) for f in family_files(t, "basic", t.snapshot()))
    # a point lookup after compaction: the shard's own file is gone, the statistics find the new one
    fid = f"{entries[1].photo_ids[2]}-0"
    snap = t.snapshot()
    rows, _ = index_rows(t, [fid], snap)
    codes, failed = read_codes(t, rows, ["basic", "middle"], snap)
    assert not failed and codes[fid].layers[1].payload == entries[1].photo_ids[2].encode()
    assert len(read_family(t, "basic", columns=["face_id"], snapshot=t.snapshot(1))) == 4  # time travel still reads version 1
    gone = vacuum(t, retention_hours=0)
    assert set(stray.files.values()) <= set(gone.removed)
    assert entries[0].files["basic"] in gone.removed  # only versions before compaction needed it
    assert face_ids(t) == before
    with pytest.raises(TableCorruptError, match="cannot be read"):
        read_family(t, "basic", columns=["face_id"], snapshot=t.snapshot(1))
