"""Incremental runs decide by content: retried reads, changed files, duplicate bytes, clean staging, fsck.

Every case here was a silent skip or a duplicate row before: an input that failed to read was
skipped forever, a file whose bytes changed under the same name was never encoded again, and the
same bytes under several names were stored several times.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from facetier.cli import main
from facetier.io.reader import read_family
from facetier.io.table import Table
from facetier.pipelines.jobs.analytics import run_query
from facetier.pipelines.jobs.check import check_table
from facetier.pipelines.jobs.decode import run_decode
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode

OPTS = EncodeOptions(engine="local", shard_size=2, progress=False)


@pytest.fixture()
def photos(sample_archive: Path, tmp_path: Path) -> Path:
    """Three generated face photos and the archive with an unsafe member name."""
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(sample_archive.glob("generated-*.jpg"))[:3]:
        shutil.copy(p, src / p.name)
    shutil.copy(sample_archive / "broken-archive.tar", src / "broken-archive.tar")
    return src


def _faces(root: str) -> list[dict]:
    return read_family(Table(root), "faces").to_pylist()


def test_an_input_that_failed_to_read_is_tried_again(photos: Path, sample_archive: Path, tmp_path: Path):
    link = photos / "later.jpg"
    link.symlink_to(tmp_path / "not-there-yet.jpg")  # dangling: reading fails now, may work later
    root = str(tmp_path / "table")
    first = run_encode(str(photos), root, OPTS)
    assert first.balanced and first.rejects_by_class.get("SourceReadError") == 1
    shutil.copy(sorted(sample_archive.glob("generated-*.jpg"))[4], tmp_path / "not-there-yet.jpg")
    second = run_encode(str(photos), root, OPTS)
    assert second.balanced and second.faces == 1 and second.encoded_inputs == 1, second.render()
    assert second.skipped == second.inputs - 1  # the escaping archive member was rejected for its name: done
    assert any(f["source_uri"].endswith("later.jpg") for f in _faces(root))
    rejects = read_family(Table(root), "rejects").to_pylist()
    assert not [r for r in rejects if r["source_uri"].endswith("later.jpg")], "the superseded reject row is gone"
    later = [i for i in read_family(Table(root), "inputs").to_pylist() if i["source_uri"].endswith("later.jpg")]
    assert [i["outcome"] for i in later] == ["stored"], "and so is its inputs row"
    assert [r["error_class"] for r in rejects] == ["UnsafeMemberError"]
    assert check_table(root, progress=False).healthy


def test_a_file_whose_bytes_changed_under_the_same_name_is_encoded_again(photos: Path, sample_archive: Path, tmp_path: Path):
    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    first_version = Table(root).version()
    nothing = run_encode(str(photos), root, OPTS)  # a no-op run: nothing new, no new version
    assert nothing.faces == 0 and nothing.skipped == nothing.inputs and nothing.version == first_version
    assert not any((Path(root) / "_staging").glob("*.json")), "done markers are removed once their run is over"
    before = {f["photo_id"] for f in _faces(root)}
    target = sorted(photos.glob("generated-*.jpg"))[0]
    shutil.copy(sorted(sample_archive.glob("generated-*.jpg"))[3], target)  # new bytes, same name
    changed = run_encode(str(photos), root, OPTS)
    assert changed.faces == 1 and changed.balanced, changed.render()
    new = {f["photo_id"] for f in _faces(root)} - before
    assert len(new) == 1  # the old photo's rows stay: they are another photo, documented in the README


def test_the_same_bytes_under_several_names_are_stored_once(photos: Path, tmp_path: Path, capsys):
    original = sorted(photos.glob("generated-*.jpg"))[0]
    for name in ("a-copy.jpg", "zz-copy.jpg"):  # one in the same shard as the original, one in another
        shutil.copy(original, photos / name)
    root = str(tmp_path / "table")
    summary = run_encode(str(photos), root, EncodeOptions(engine="local", shard_size=2, progress=False))
    # four distinct photos: the three generated ones (one of them under three names) and the tar's good member
    assert summary.balanced and summary.faces == 4 and summary.encoded_inputs == 6, summary.render()
    faces = _faces(root)
    assert len({f["face_id"] for f in faces}) == len(faces) == 4, "one row per face, whatever the names"
    aliases = run_query(root, "select photo_id, source_uri from aliases order by source_uri").table.to_pylist()
    dup = [f for f in faces if f["source_uri"].endswith(("a-copy.jpg", "zz-copy.jpg", original.name))]
    assert len(dup) == 1 and len(aliases) == 2 and {a["photo_id"] for a in aliases} == {dup[0]["photo_id"]}
    out = run_decode(root, [dup[0]["photo_id"]], "original", str(tmp_path / "out"))
    assert len(out.files) == 1 and not out.failures
    report = check_table(root, progress=False)
    assert report.healthy and not report.unreferenced  # the files the dedupe rewrite replaced are gone


def test_unchanged_inputs_are_not_read_again_and_known_bytes_under_new_names_become_aliases(photos: Path, tmp_path: Path, monkeypatch):
    """The driver skips what the listing shows unchanged without a worker reading it; bytes found under
    a new name, or under a name whose listing changed while its bytes did not, are aliases, not rows."""
    from facetier.pipelines.jobs import records

    real, reads = records.read_source, []

    def counting(ref, *args):
        reads.append(ref.key)
        return real(ref, *args)

    monkeypatch.setattr(records, "read_source", counting)
    root = str(tmp_path / "table")
    first = run_encode(str(photos), root, OPTS)
    assert first.balanced and len(reads) == first.inputs
    reads.clear()
    again = run_encode(str(photos), root, OPTS)
    assert again.skipped == again.inputs and reads == [], "nothing unchanged is read again"
    faces_before = _faces(root)
    shot = sorted(photos.glob("generated-*.jpg"))[0]
    shutil.copy(shot, photos / "later-copy.jpg")  # known bytes, new name
    os.utime(sorted(photos.glob("generated-*.jpg"))[1], (time.time() + 5, time.time() + 5))  # touched: same bytes, new mtime
    reads.clear()
    third = run_encode(str(photos), root, OPTS)
    assert third.balanced and sorted(Path(r).name for r in reads) == ["generated-001.jpg", "later-copy.jpg"], reads
    assert third.skipped == third.inputs and third.faces == 0, third.render()
    assert len(_faces(root)) == len(faces_before), "no face is stored twice"
    aliases = read_family(Table(root), "aliases").to_pylist()
    assert sorted(Path(a["source_uri"]).name for a in aliases) == ["generated-001.jpg", "later-copy.jpg"]
    inputs = {Path(i["source_uri"]).name: i for i in read_family(Table(root), "inputs").to_pylist()}
    assert inputs["later-copy.jpg"]["outcome"] == "alias" and inputs["generated-000.jpg"]["outcome"] == "stored"
    assert all(i["source_key"] is not None for i in inputs.values())
    reads.clear()
    fourth = run_encode(str(photos), root, OPTS)
    assert fourth.skipped == fourth.inputs and reads == [] and fourth.version == third.version
    assert check_table(root, progress=False).healthy


def test_planning_opens_only_inputs_files_whose_name_range_holds_a_listed_name(photos: Path, tmp_path: Path, monkeypatch):
    from facetier.io.sources import list_sources, source_key
    from facetier.pipelines.jobs import table_state

    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    t = Table(root)
    snap, weights = t.snapshot(), read_family(t, "inputs").column("weights_hash")[0].as_py()
    opened = []
    real = table_state.read_file
    monkeypatch.setattr(table_state, "read_file", lambda *a, **k: opened.append(a[1]) or real(*a, **k))
    listed = list_sources(str(photos))
    assert all(table_state.held_sources(t, snap, weights, [(r.key, source_key(r.key, r.fingerprint)) for r in listed])) and opened
    opened.clear()
    elsewhere = [(f"/somewhere/else/{i}.jpg", source_key(f"/somewhere/else/{i}.jpg", "1:2")) for i in range(3)]
    assert not any(table_state.held_sources(t, snap, weights, elsewhere)) and opened == [], "no file's name range holds them"
    assert not any(table_state.held_sources(t, snap, "another-model", [(r.key, source_key(r.key, r.fingerprint)) for r in listed])) and opened == []


def test_a_table_written_before_the_inputs_family_gains_it_and_stores_nothing_twice(photos: Path, tmp_path: Path):
    """A table an older facetier wrote (no ``inputs`` family) upgrades on the next commit: its inputs are
    read once more, found by content and counted as already in the table; then they are skipped unread."""
    root = tmp_path / "table"
    run_encode(str(photos), str(root), OPTS)
    shutil.rmtree(root / "inputs")  # what the table looked like before the family existed
    faces_before = _faces(str(root))
    upgraded = run_encode(str(photos), str(root), OPTS)
    # the escaping member is rejected again, once: its older reject row made way
    assert upgraded.balanced and upgraded.faces == 0 and upgraded.skipped == upgraded.inputs - 1 and upgraded.rejected == 1, upgraded.render()
    assert [r["error_class"] for r in read_family(Table(str(root)), "rejects").to_pylist()] == ["UnsafeMemberError"]
    assert sorted(f["face_id"] for f in _faces(str(root))) == sorted(f["face_id"] for f in faces_before)
    inputs = read_family(Table(str(root)), "inputs").to_pylist()
    assert len(inputs) == upgraded.inputs and {i["outcome"] for i in inputs} == {"alias", "rejected"}
    settled = run_encode(str(photos), str(root), OPTS)
    assert settled.skipped == settled.inputs and settled.version == upgraded.version
    assert run_query(str(root), "select count(*) as n from faces", as_of=1).table.column("n")[0].as_py() == len(faces_before)
    assert check_table(str(root), progress=False).healthy


def test_check_finds_damage_and_repair_removes_only_what_no_commit_needs(photos: Path, tmp_path: Path, capsys):
    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    report = check_table(root, progress=False)
    assert report.healthy and report.files_checked > 0 and not report.unreferenced
    # what a killed or losing run leaves: shard files no version lists, and a done marker
    stray = Path(root) / "middle" / "s99999-deadbeef.parquet"
    shutil.copy(next((Path(root) / "middle").glob("*.parquet")), stray)
    (Path(root) / "_staging").mkdir(exist_ok=True)
    (Path(root) / "_staging" / "s99999-deadbeef.json").write_text("{}")
    found = check_table(root, progress=False)
    assert set(found.unreferenced) == {"middle/s99999-deadbeef.parquet", "_staging/s99999-deadbeef.json"} and found.healthy
    young = check_table(root, repair=True, retention_hours=1.0, progress=False)
    assert young.removed == () and stray.exists()  # within the retention window: a running job's
    old = time.time() - 7200
    os.utime(stray, (old, old))
    os.utime(Path(root) / "_staging" / "s99999-deadbeef.json", (old, old))
    assert main(["check", root, "--repair", "--retention-hours", "1", "--quiet"]) == 0
    assert not stray.exists() and not check_table(root, progress=False).unreferenced
    # damage: a payload that fails its crc32 and a truncated file are problems, exit 5
    index = next((Path(root) / "faces").glob("*.parquet"))
    enhanced = next((Path(root) / "enhanced").glob("*.parquet"))
    t = pq.read_table(enhanced).to_pylist()
    t[0]["payload"] = bytes([t[0]["payload"][0] ^ 1]) + t[0]["payload"][1:]
    pq.write_table(pq.read_table(enhanced).from_pylist(t, schema=pq.read_table(enhanced).schema), enhanced)
    index.write_bytes(index.read_bytes()[:100])
    capsys.readouterr()
    assert main(["check", root, "--quiet"]) == 5
    out = capsys.readouterr().out
    assert "fails its crc32" in out and index.name in out


def test_any_failure_before_hashing_is_retried_and_a_cut_marker_is_no_marker(photos: Path, tmp_path: Path, monkeypatch):
    """Not only SourceReadError: an unexpected error while reading (a storage client's own exception
    type) is retried too; only a name rejected for what it is stays done."""
    from facetier.pipelines.jobs import records

    real = records.read_source
    flaky = sorted(photos.glob("generated-*.jpg"))[1].name

    def failing_once(ref, *args):
        if ref.uri.endswith(flaky):
            raise RuntimeError("HTTP 503 from the object store")
        return real(ref, *args)

    monkeypatch.setattr(records, "read_source", failing_once)
    root = str(tmp_path / "table")
    first = run_encode(str(photos), root, OPTS)
    assert first.rejects_by_class.get("UnexpectedRuntimeError") == 1
    monkeypatch.setattr(records, "read_source", real)
    second = run_encode(str(photos), root, OPTS)
    assert second.faces == 1 and second.balanced and any(f["source_uri"].endswith(flaky) for f in _faces(root))
    assert [r["error_class"] for r in read_family(Table(root), "rejects").to_pylist()] == ["UnsafeMemberError"]
    # a done marker cut short by a kill (no atomic writes on that filesystem) reads as "not done"
    (Path(root) / "_staging").mkdir(exist_ok=True)
    (Path(root) / "_staging" / "s00000-cut.json").write_text('{"shard_id": "s00')
    assert Table(root).done_marker("s00000-cut") is None


def test_repair_keeps_the_shards_of_a_run_that_may_still_commit(photos: Path, tmp_path: Path):
    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    old = time.time() - 7200
    stray = Path(root) / "basic" / "s00007-running.parquet"  # written two hours ago by a run still going
    shutil.copy(next((Path(root) / "basic").glob("*.parquet")), stray)
    os.utime(stray, (old, old))
    (Path(root) / "_staging").mkdir(exist_ok=True)
    (Path(root) / "_staging" / "s00007-running.json").write_text("{}")  # its marker, refreshed just now
    report = check_table(root, repair=True, retention_hours=1.0, progress=False)
    assert stray.exists() and not report.removed


def test_the_same_edit_twice_adds_its_rows_once(photos: Path, tmp_path: Path):
    from facetier.pipelines.jobs.edit import edit

    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    where = "face_id in (" + ", ".join(f"'{f['face_id']}'" for f in _faces(root)) + ")"  # the same faces both times
    first = edit(root, where, {"age": "+10"}, root, as_table=True, device="cpu")
    again = edit(root, where, {"age": "+10"}, root, as_table=True, device="cpu")
    assert again.table_version == first.table_version and again.outputs == first.outputs
    assert not any((Path(root) / "_staging").glob("*.json"))
    assert check_table(root, progress=False).healthy


def _table_rows(root: str) -> dict[str, list]:
    t = Table(root)
    fams = {"faces": ["face_id", "photo_id", "source_uri"], "basic": ["face_id", "payload"], "middle": ["face_id", "payload"],
            "enhanced": ["face_id", "payload"], "residual": ["face_id", "payload"], "original": ["photo_id", "payload"],
            "rejects": ["source_uri", "error_class"], "aliases": ["photo_id", "source_uri"],
            "inputs": ["source_uri", "source_key", "photo_id", "outcome", "error_class"]}
    return {f: sorted(read_family(t, f, columns=c).to_pylist(), key=lambda r: tuple(str(v) for v in r.values())) for f, c in fams.items()}


@pytest.mark.slow
def test_random_kills_then_one_clean_run_give_the_uninterrupted_table(embedded_codec, tmp_path: Path):
    """kill -9 at 20+ random points of encodes (loading, encoding, writing shards, committing), each
    episode finished by one clean run: every episode's table has the rows of a run never interrupted."""
    from facetier.pipelines.jobs.sample_archive import build_sample_archive

    src = tmp_path / "src"
    build_sample_archive(src, embedded_codec, n_faces=16, seed=3)  # long enough that kills land mid-encode
    shutil.copy(src / "generated-000.jpg", src / "zz-duplicate.jpg")
    opts = EncodeOptions(engine="local", shard_size=1, progress=False)

    def encode_in_a_process(root: str) -> subprocess.Popen:
        code = ("from facetier.pipelines.jobs.encode import run_encode, EncodeOptions;"
                f"run_encode({str(src)!r}, {root!r}, EncodeOptions(engine='local', shard_size=1, progress=False))")
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    reference = str(tmp_path / "reference")
    start = time.monotonic()
    assert encode_in_a_process(reference).wait() == 0
    whole = time.monotonic() - start  # start-up, model load, every shard, the commit
    expected = _table_rows(reference)
    rng = random.Random(0)
    kills = episodes = 0
    while kills < 20:
        root = str(tmp_path / f"killed-{episodes}")
        for attempt in range(8):  # killed attempts at one table, each resuming what the last one left
            began = time.monotonic()
            proc = encode_in_a_process(root)
            try:
                proc.wait(timeout=rng.uniform(0.15, 1.0) * whole)  # some land in the last shards and the commit
                if attempt == 0:  # a whole run, from scratch: the machine is faster now than when `whole` was measured
                    whole = min(whole, time.monotonic() - began)
                break  # it finished before its kill: this episode's table is complete
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
        final = run_encode(str(src), root, opts)  # the clean run that ends the episode
        assert final.balanced
        assert _table_rows(root) == expected, f"episode {episodes} after {kills} kills"
        assert check_table(root, progress=False).healthy
        episodes += 1
        assert episodes < 30, f"kills keep missing the encode ({kills} in {episodes} episodes)"
    print(f"{kills} kills in {episodes} episodes, each ended by a clean run equal to the uninterrupted table")


def test_an_input_is_held_only_when_every_layer_asked_for_is_stored(photos: Path, tmp_path: Path):
    """``--layers basic,middle`` first, every layer after: the second run stores the photos whole instead
    of calling them already in the table (and `decode --upto original` failing)."""
    root = str(tmp_path / "table")
    first = run_encode(str(photos), root, EncodeOptions(engine="local", shard_size=2, progress=False, layers=("basic", "middle")))
    before = sorted(f["face_id"] for f in _faces(root))
    assert first.faces == len(before) >= 3
    whole = run_encode(str(photos), root, OPTS)
    assert whole.balanced and whole.encoded_inputs == first.encoded_inputs >= 3 and whole.faces == len(before), whole.render()
    assert any("encoded again, whole" in n for n in whole.notes)
    assert sorted(f["face_id"] for f in _faces(root)) == before  # replaced, not added beside
    t = Table(root)
    for family in ("basic", "middle", "enhanced", "preview", "detail", "residual"):
        assert sorted(read_family(t, family, columns=["face_id"]).column("face_id").to_pylist()) == before
    photos_stored = {f["photo_id"] for f in _faces(root)}
    assert set(read_family(t, "original", columns=["photo_id"]).column("photo_id").to_pylist()) == photos_stored
    inputs = [r for r in read_family(t, "inputs").to_pylist() if r["outcome"] == "stored"]
    assert len(inputs) == len(photos_stored) and all(r["layers"] == "basic,middle,enhanced,preview,detail,residual,original" for r in inputs)
    out = run_decode(root, [before[0]], "original", str(tmp_path / "out"))
    assert not out.failures and len(out.files) == 1
    # held whole now: nothing is read again, whichever layers a later run asks for
    for layers in (None, ("basic",)):
        again = run_encode(str(photos), root, EncodeOptions(engine="local", shard_size=2, progress=False, layers=layers))
        assert again.skipped == again.inputs and again.faces == 0
    assert check_table(root, progress=False).healthy


def test_new_bytes_under_the_same_size_and_mtime_are_seen_with_verify_content(photos: Path, sample_archive: Path, tmp_path: Path):
    root = str(tmp_path / "table")
    run_encode(str(photos), root, OPTS)
    target = sorted(photos.glob("generated-*.jpg"))[0]
    stat = target.stat()
    other = sorted(sample_archive.glob("generated-*.jpg"))[-1].read_bytes()  # a photo the fixture did not copy
    body = (other + b"\0" * stat.st_size)[: stat.st_size] if len(other) <= stat.st_size else None
    if body is None:  # a restored backup of the same length: keep the size, change the bytes
        body = bytes(b ^ 0xFF if i == stat.st_size // 2 else b for i, b in enumerate(target.read_bytes()))
    target.write_bytes(body)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # an editor that keeps mtime
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    blind = run_encode(str(photos), root, OPTS)
    assert blind.skipped == blind.inputs  # the listing cannot tell: the documented trade-off
    seen = run_encode(str(photos), root, EncodeOptions(engine="local", shard_size=2, progress=False, verify_content=True))
    assert seen.balanced and seen.encoded_inputs + seen.rejected == 1 and seen.skipped == seen.inputs - 1, seen.render()
    again = run_encode(str(photos), root, EncodeOptions(engine="local", shard_size=2, progress=False, verify_content=True))
    assert again.skipped == again.inputs  # the new bytes are held now
    assert check_table(root, progress=False).healthy
