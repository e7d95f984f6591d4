"""The encode job's progress watcher: it lists the staging folder once a poll and reads each done
marker once, however many shards are pending (no request per pending shard per poll)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from facetier.io.table import ShardEntry, Table
from facetier.pipelines.jobs.encode import _watch
from facetier.pipelines.jobs.records import ShardSpec


def _marker(table: Table, shard_id: str, faces: int) -> None:
    table.write_done_marker(ShardEntry(shard_id, "synthetic", "w", {}, {}, {}, (), {}, {"faces": faces}))


def check_marker_listing(root: str) -> None:
    """``done_shard_ids`` on a table root: empty before any marker, then exactly the written markers,
    current after each write and removal (object-store listings are cached by fsspec)."""
    table = Table(root)
    assert table.done_shard_ids() == set()
    for sid in ("s00000-a", "s00001-b", "s00002-c"):
        _marker(table, sid, 1)
    assert table.done_shard_ids() == {"s00000-a", "s00001-b", "s00002-c"}
    _marker(table, "s00003-d", 1)
    table.remove_done_markers(["s00000-a"])
    assert table.done_shard_ids() == {"s00001-b", "s00002-c", "s00003-d"}


def test_done_shard_ids_lists_markers_on_local_disk(tmp_path: Path):
    check_marker_listing(str(tmp_path / "t"))
    # a writer's temporary file (renamed into place when whole) is not a marker
    (tmp_path / "t" / "_staging" / "s00009-x.json.123-456.tmp").write_text("{")
    assert "s00009-x" not in Table(str(tmp_path / "t")).done_shard_ids()


def test_the_watcher_reads_only_finished_markers_and_stops_when_all_are_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    table = Table(str(tmp_path / "t"))
    shards = [ShardSpec(f"s{i:05d}-x", (f"/p{i}.jpg",)) for i in range(200)]
    reads: list[str] = []
    real = Table.done_marker
    monkeypatch.setattr(Table, "done_marker", lambda self, sid: reads.append(sid) or real(self, sid))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(table, shards, stop, True))
    watcher.start()
    try:
        for s in shards[:3]:
            _marker(table, s.shard_id, 2)
        time.sleep(1.5)  # three polls with 197 shards pending
        assert sorted(reads) == [s.shard_id for s in shards[:3]]
        for s in shards[3:]:
            _marker(table, s.shard_id, 2)
        watcher.join(10)
        assert not watcher.is_alive(), "the watcher did not stop once every shard was done"
    finally:
        stop.set()
        watcher.join()
    assert sorted(reads) == [s.shard_id for s in shards]


def test_no_watcher_polls_without_a_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Table, "done_shard_ids", lambda self: pytest.fail("listed the staging folder with progress off"))
    _watch(Table(str(tmp_path / "t")), [ShardSpec("s00000-x", ("/p.jpg",))], threading.Event(), False)


def test_a_failed_listing_costs_one_poll_not_the_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    table = Table(str(tmp_path / "t"))
    shard = ShardSpec("s00000-x", ("/p.jpg",))
    real, calls = Table.done_shard_ids, []

    def flaky(self: Table) -> set[str]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the store hung up")
        return real(self)

    monkeypatch.setattr(Table, "done_shard_ids", flaky)
    _marker(table, shard.shard_id, 1)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(table, [shard], stop, True))
    watcher.start()
    watcher.join(10)
    stop.set()
    assert not watcher.is_alive() and len(calls) == 2


def test_a_run_reads_each_shard_marker_once_and_none_it_did_not_find_listed(sample_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Planning asks storage which shards an interrupted run finished with one listing; the markers
    are read after the engine, once each."""
    from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

    reads: list[str] = []
    real = Table.done_marker
    monkeypatch.setattr(Table, "done_marker", lambda self, sid: reads.append(sid) or real(self, sid))
    s = run_encode(str(sample_archive), str(tmp_path / "t"), EncodeOptions(engine="local", shard_size=4, progress=False))
    assert s.shards_run > 1 and s.shards_reused == 0
    assert len(reads) == len(set(reads)) == s.shards_run
