"""``facetier bench-scale``: what table operations cost as the table grows, 10 k to 10 M faces.

For each size a synthetic table is built from real rows: the faces index and the base family of
the sample archive's faces, replicated under new random ids (random int8 identities, so nothing
compresses better than real faces would), with an ``inputs`` row per photo named as an archive
that grows by dated folders of 10,000 photos (``archive_name``), written as one commit of sorted files of
``--file-rows`` rows (what ``facetier vacuum --compact`` leaves); the heavy families hold one real
shard only (their size does not change what these operations read). Then, each in a fresh
process so peak memory is its own (planning, content check, query and lookup: the median of three):

* commit: one more 64-face shard, every family (claim + nine family commits);
* planning: what the driver does before workers start an incremental run over 10 k new inputs
  (finish pending commits, snapshot, the anti-join of their source keys against the ``inputs``
  family, shard plan), twice: the archive grew by a new folder (the usual case: new names sort
  apart, so file statistics rule out every file), and 10 k new names scattered over every folder
  of the archive (every file's name range holds some: a scan of the 8-byte key column);
* content check: what the driver does at commit for those 10 k photos (which of their content ids
  this model already stores under other names: an anti-join against the ``photo_id`` columns);
* query: an attribute query over the base family (bytes read reported);
* lookup: one face's index row and basic payload by id, as decode reads them.

Next to each size, the JSON work the v1 design (one manifest listing every photo id) did for the
same table, emulated: serialising and parsing the manifest and building the skip set.
"""
from __future__ import annotations

import binascii
import json
import resource
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

QUERY = "SELECT gender, count(*) AS n, avg(age) AS mean_age FROM basic WHERE smile > 0.5 GROUP BY gender"
NEW_INPUTS = 10_000


@dataclass(frozen=True)
class ScaleRow:
    faces: int
    table_bytes: int
    base_bytes: int
    build_seconds: float
    commit_seconds: float
    planning_seconds: float
    planning_scattered_seconds: float
    content_check_seconds: float
    query_seconds: float
    query_bytes_read: int
    lookup_seconds: float
    peak_rss_mb: dict[str, float]
    v1_manifest_mb: float
    v1_commit_seconds: float
    v1_load_seconds: float
    v1_skip_set_seconds: float


def _real_rows(src_table: str) -> tuple[pa.Table, pa.Table]:
    """The source table's index and base rows, in the same face order."""
    from facetier.io.reader import read_family
    from facetier.io.table import Table

    t = Table(src_table)
    faces = read_family(t, "faces").sort_by("face_id")
    base = read_family(t, "basic").sort_by("face_id")
    if faces.column("face_id").to_pylist() != base.column("face_id").to_pylist():
        raise ValueError(f"{src_table}: every face needs its base row")
    return faces, base


def _ids(n: int, seed: int | None = None) -> pa.Array:
    """``n`` sorted random 32-hex-digit ids (what content hashes look like), built without Python strings."""
    raw = np.random.default_rng(seed).bytes(16 * n)
    hexed = np.sort(np.frombuffer(binascii.hexlify(raw), dtype="S32"))
    return pa.array(hexed, pa.binary(32)).cast(pa.string())


def archive_name(i: int, year: int = 2025) -> str:
    """The ``i``-th name of a synthetic archive that grows by dated folders of 10,000 photos."""
    return f"/archive/{year}/{i // 10_000:05d}/{i:09d}.jpg"


def build_table(root: str, n_faces: int, src_table: str, file_rows: int, seed: int = 0) -> float:
    """A committed table of ``n_faces`` synthetic faces (see the module docstring); returns seconds."""
    from facetier.io.commit import commit
    from facetier.io.reader import family_files, read_file
    from facetier.io.table import BASE_SCHEMA, FACES_SCHEMA, INPUTS_SCHEMA, ShardEntry, Table

    started = time.perf_counter()
    faces, base = _real_rows(src_table)
    rng = np.random.default_rng(seed)
    t = Table(root)
    src = Table(src_table)
    entries = []
    photos = _ids(n_faces, seed)
    codec_id, weights_hash = faces.column("codec_id")[0].as_py(), faces.column("weights_hash")[0].as_py()
    for k, lo in enumerate(range(0, n_faces, file_rows)):
        pids = photos.slice(lo, file_rows)
        n = len(pids)
        pick = pa.array(rng.integers(0, faces.num_rows, n))
        fids = pc.binary_join_element_wise(pids, pa.scalar("0"), "-")
        identity = pa.ListArray.from_arrays(pa.array(np.arange(0, 128 * n + 1, 128, dtype=np.int32)),
                                            pa.array(rng.integers(-127, 128, 128 * n, dtype=np.int8)))
        names = pa.array([archive_name(i) for i in range(lo, lo + n)], pa.string())
        f = _with(faces.take(pick), FACES_SCHEMA, face_id=fids, photo_id=pids, face_index=pa.array(np.zeros(n, np.int32)), source_uri=names)
        b = _with(base.take(pick), BASE_SCHEMA, face_id=fids, photo_id=pids, identity=identity)
        inputs = pa.table({"source_uri": names, "source_uri_raw": pa.nulls(n, pa.binary()),
                           "source_key": pa.array(rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)), "photo_id": pids,
                           "weights_hash": pa.array([weights_hash] * n), "outcome": pa.array(["stored"] * n), "error_class": pa.nulls(n, pa.string()),
                           "layers": pa.array(["basic"] * n)},
                          schema=INPUTS_SCHEMA)
        shard = f"bulk{k:05d}"
        e = ShardEntry(shard, codec_id, weights_hash, {}, {}, {})
        for fam, table in (("faces", f), ("basic", b), ("inputs", inputs)):
            e.files[fam], e.nbytes[fam], e.file_stats[fam] = t.write_family(fam, shard, table, codec_id, weights_hash)
            e.rows[fam] = table.num_rows
        entries.append(e)
    heavy = ShardEntry("real", codec_id, weights_hash, {}, {}, {})
    snap = src.snapshot()
    for fam in ("middle", "enhanced", "preview", "detail", "residual", "original", "rejects"):
        for rel in family_files(src, fam, snap)[:1]:
            data = read_file(src, rel, fam)
            heavy.files[fam], heavy.nbytes[fam], heavy.file_stats[fam] = t.write_family(fam, "real", data, heavy.codec_id, heavy.weights_hash)
            heavy.rows[fam] = data.num_rows
    commit(t, 0, [*entries, heavy])
    return time.perf_counter() - started


def _with(table: pa.Table, schema: pa.Schema, **columns: pa.Array) -> pa.Table:
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), schema.field(name), values)
    return table.select(schema.names).cast(schema)


def _commit_one_shard(root: str, src_table: str) -> float:
    from facetier.io.commit import commit
    from facetier.io.reader import family_files, read_file
    from facetier.io.table import ShardEntry, Table

    t, src = Table(root), Table(src_table)
    snap = src.snapshot()
    fresh = _ids(64).to_pylist()
    e = ShardEntry("one-more", "bench", "bench", {}, {}, {})
    for fam in ("original", "residual", "detail", "preview", "enhanced", "middle", "rejects", "faces", "basic"):
        rels = family_files(src, fam, snap)
        if not rels:
            continue
        data = read_file(src, rels[0], fam)
        data = data.take(pa.array(np.arange(64) % max(1, data.num_rows))) if data.num_rows else data
        if "photo_id" in data.column_names and data.num_rows:
            data = data.set_column(data.column_names.index("photo_id"), "photo_id", pa.array(fresh[: data.num_rows]))
        if "face_id" in data.column_names and data.num_rows:
            data = data.set_column(data.column_names.index("face_id"), "face_id", pa.array([f"{p}-0" for p in fresh[: data.num_rows]]))
        e.files[fam], e.nbytes[fam], e.file_stats[fam] = t.write_family(fam, "one-more", data, "bench", "bench")
        e.rows[fam] = data.num_rows
    started = time.perf_counter()
    commit(t, t.version(), [e])
    return time.perf_counter() - started


def _planning(root: str, weights_hash: str, scattered: bool = False) -> float:
    from facetier.io.commit import finish_pending
    from facetier.io.sources import source_key
    from facetier.io.table import Table
    from facetier.pipelines.jobs.encode import plan_shards
    from facetier.pipelines.jobs.table_state import held_sources

    held_before = _held_faces(root)  # also what opens the Delta library, before the clock, in both cases alike
    if scattered:  # new names spread over the whole name range (every file's range holds some): a scan
        folders = np.random.default_rng(7).integers(0, max(1, held_before // 10_000), NEW_INPUTS)
        sources = sorted(f"/archive/2025/{d:05d}/new-{i:07d}.jpg" for i, d in enumerate(folders))
    else:  # the archive grew by a new folder
        sources = [archive_name(i, year=2026) for i in range(NEW_INPUTS)]
    fingerprints = [f"{30_000 + i}:{1_796_000_000 + i}" for i in range(NEW_INPUTS)]
    started = time.perf_counter()
    t = Table(root)
    finish_pending(t)
    snap = t.snapshot()
    listed = [(s, source_key(s, f)) for s, f in zip(sources, fingerprints)]
    held = held_sources(t, snap, weights_hash, listed)
    todo = [inp for inp, h in zip(listed, held) if not h]
    plan_shards([s for s, _ in todo], weights_hash, 64, snap.version, keys=[k for _, k in todo])
    elapsed = time.perf_counter() - started
    assert len(todo) == NEW_INPUTS
    return elapsed


def _held_faces(root: str) -> int:
    from facetier.io.table import Table, add_actions

    return int(pc.sum(add_actions(Table(root).delta("inputs")).column("num_records")).as_py() or 0)


def _content_check(root: str, weights_hash: str) -> float:
    from facetier.io.table import Table
    from facetier.pipelines.jobs.table_state import held_photos

    photo_ids = _ids(NEW_INPUTS, seed=12345).to_pylist()
    started = time.perf_counter()
    t = Table(root)
    again = held_photos(t, t.snapshot(), weights_hash, photo_ids)
    elapsed = time.perf_counter() - started
    assert not again
    return elapsed


def _query(root: str) -> tuple[float, int]:
    from facetier.pipelines.jobs.analytics import run_query

    started = time.perf_counter()
    res = run_query(root, QUERY)
    return time.perf_counter() - started, res.bytes_read


def _lookup(root: str, face_id: str) -> float:
    from facetier.io.table import Table
    from facetier.pipelines.jobs.stored_codes import index_rows, read_codes

    started = time.perf_counter()
    t = Table(root)
    snap = t.snapshot()
    rows, _ = index_rows(t, [face_id], snap)
    codes, failed = read_codes(t, rows, ["basic"], snap)
    assert face_id in codes and not failed
    return time.perf_counter() - started


def _v1_manifest(n_faces: int, shard_rows: int = 64) -> tuple[float, float, float, float]:
    """(MB, commit s, load s, skip-set s) of the v1 design's JSON for ``n_faces`` faces in shards of 64."""
    ids = [secrets.token_hex(16) for _ in range(n_faces)]
    shards = [{"shard_id": f"s{i:07d}", "codec_id": "c", "weights_hash": "w", "files": {f: f"{f}/s{i}.parquet" for f in ("faces", "basic")},
               "rows": {"faces": shard_rows}, "nbytes": {"faces": 1}, "photo_ids": ids[i:i + shard_rows], "stats": {}}
              for i in range(0, n_faces, shard_rows)]
    t0 = time.perf_counter()
    body = json.dumps({"version": 1, "shards": shards}, indent=1).encode()
    t1 = time.perf_counter()
    loaded = json.loads(body)
    t2 = time.perf_counter()
    skip = frozenset(p for s in loaded["shards"] for p in s["photo_ids"])
    t3 = time.perf_counter()
    assert len(skip) == n_faces
    return len(body) / 2**20, t1 - t0, t2 - t1, t3 - t2


def _in_child(call: str) -> tuple[object, float]:
    """(result, peak RSS MB) of one measurement in a fresh interpreter."""
    code = ("import json, resource\nfrom facetier.pipelines.evaluation import scale_bench as b\n"
            f"r = {call}\nprint(json.dumps([r, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]), flush=True)\n"
            # the measurement is printed: skip interpreter teardown, where pyarrow 25.0.1 can still abort
            # ("terminate called without an active exception") after the reads are done
            "import os\nos._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench-scale {call} failed:\n{proc.stderr[-3000:]}")
    result, rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, float(rss)


def _median_in_child(call: str, repeats: int = 3) -> tuple[object, float]:
    """The median of ``repeats`` runs of a timed call (each in a fresh interpreter; first element of a
    tuple result is the seconds), with the largest peak RSS."""
    runs = [_in_child(call) for _ in range(repeats)]
    runs.sort(key=lambda r: r[0][0] if isinstance(r[0], (list, tuple)) else r[0])
    return runs[len(runs) // 2][0], max(rss for _, rss in runs)


def measure(size: int, work: Path, src_table: str, file_rows: int, v1_max: int) -> ScaleRow:
    from facetier.io.reader import family_files, read_family
    from facetier.io.table import Table

    root = str(work / f"t{size}")
    shutil.rmtree(root, ignore_errors=True)
    build, _ = _in_child(f"b.build_table({root!r}, {size}, {src_table!r}, {file_rows})")
    t = Table(root)
    files = family_files(t, "faces", t.snapshot())
    one = read_family(t, "faces", columns=["face_id", "weights_hash"], only_files=[files[len(files) // 2]])
    face_id, weights = one.column("face_id")[one.num_rows // 2].as_py(), one.column("weights_hash")[0].as_py()
    plan, rss_plan = _median_in_child(f"b._planning({root!r}, {weights!r})")
    scattered, rss_scattered = _median_in_child(f"b._planning({root!r}, {weights!r}, scattered=True)")
    check, rss_check = _median_in_child(f"b._content_check({root!r}, {weights!r})")
    (q_s, q_bytes), rss_query = _median_in_child(f"b._query({root!r})")
    lookup, rss_lookup = _median_in_child(f"b._lookup({root!r}, {face_id!r})")
    commit_s, rss_commit = _in_child(f"b._commit_one_shard({root!r}, {src_table!r})")
    sizes = t.family_bytes()
    v1 = _v1_manifest(size) if size <= v1_max else (float("nan"),) * 4
    return ScaleRow(size, sum(sizes.values()), sizes.get("basic", 0), build, commit_s, plan, scattered, check, q_s, q_bytes, lookup,
                    {"planning": max(rss_plan, rss_scattered), "content_check": rss_check, "query": rss_query, "lookup": rss_lookup, "commit": rss_commit}, *v1)


def run_scale_bench(sizes: list[int], work: Path, src_table: str, file_rows: int = 250_000, v1_max: int = 1_000_000,
                    report: str | None = None, keep: bool = False) -> list[ScaleRow]:
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in sizes:
        rows.append(measure(size, work, src_table, file_rows, v1_max))
        print(render(rows[-1:]), flush=True)
        if not keep:
            shutil.rmtree(work / f"t{size}", ignore_errors=True)
    if report:
        Path(report).write_text(json.dumps({"file_rows": file_rows, "new_inputs": NEW_INPUTS, "query": QUERY, "rows": [asdict(r) for r in rows],
                                            "peak_rss_mb_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, indent=1))
    return rows


def render(rows: list[ScaleRow]) -> str:
    lines = [f"{'faces':>10} {'table MB':>9} {'base %':>7} {'commit s':>9} {'plan s':>7} {'scatter s':>9} {'check s':>8} {'query s':>8} {'query MB':>9} {'lookup s':>9} "
             f"{'peak MB':>8} | {'v1 JSON MB':>10} {'v1 commit':>9} {'v1 load':>8} {'v1 skip':>8}"]
    for r in rows:
        lines.append(f"{r.faces:>10} {r.table_bytes / 2**20:>9.1f} {100 * r.base_bytes / max(1, r.table_bytes):>6.1f}% {r.commit_seconds:>9.3f} "
                     f"{r.planning_seconds:>7.3f} {r.planning_scattered_seconds:>9.3f} {r.content_check_seconds:>8.3f} {r.query_seconds:>8.3f} {r.query_bytes_read / 2**20:>9.2f} {r.lookup_seconds:>9.3f} "
                     f"{max(r.peak_rss_mb.values()):>8.0f} | {r.v1_manifest_mb:>10.1f} {r.v1_commit_seconds:>9.3f} {r.v1_load_seconds:>8.3f} "
                     f"{r.v1_skip_set_seconds:>8.3f}")
    return "\n".join(lines)
