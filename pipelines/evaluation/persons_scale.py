"""``facetier bench-scale --persons``: the identity index and clustering at 100 k to 10 M faces.

The descriptors are synthetic, drawn so that persons exist with the distances dlib's descriptors of
facetier's crops have on LFW's evaluation photos (same person: median 0.45; different persons:
median 0.82) and their uneven spread over directions: each person a centre around a common mean, each face its centre plus noise, stored
as the base family stores them (int8 at DESCRIPTOR_STEP), a Zipf-distributed number of faces per
person (exponent 2, at most 1,000 or 0.5 % of the faces: most persons have one or two photos, a few
have thousands, as in a news archive; clustering must keep those whole). Each size runs in its own process, so its peak memory is its own. The same functions as
``facetier index`` and ``facetier cluster`` run here, minus the Parquet reads and uploads.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import queue
import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from facetier.io.derived import Generation
from facetier.io.identity import DESCRIPTOR_DIM, DESCRIPTOR_STEP, LEVELS
from facetier.pipelines.jobs.identity_index import LoadedIndex, add_codes, default_nprobe, lists_for, new_index, remove_ids, search_index
from facetier.pipelines.jobs.neighbour_graph import GraphSpec, NeighbourWorker
from facetier.pipelines.jobs.persons import ClusterOptions, _join, leiden

log = logging.getLogger(__name__)

# variance per direction falls as rank^-1.1: half of it in the first 11 directions, as measured on those
# descriptors (an isotropic cloud would make every stranger equidistant, which no face set is)
PROFILE = np.arange(1, DESCRIPTOR_DIM + 1) ** -1.1 / (np.arange(1, DESCRIPTOR_DIM + 1) ** -1.1).sum()
SAME_SIGMA = np.sqrt(0.45**2 / 2 * PROFILE)
CENTRE_SIGMA = np.sqrt((0.82**2 - 0.45**2) / 2 * PROFILE)
MEAN_NORM = 1.3


@dataclass(frozen=True)
class PersonsScaleRow:
    faces: int
    lists: int
    nprobe: int
    build_s: float
    build_peak_rss_mb: float  # peak while building (the synthetic descriptors, which stand for the files read, included)
    peak_rss_mb: float  # peak of the whole size's process (generating the data and clustering's graph included)
    search_p50_ms: float
    search_p99_ms: float
    recall_at_10: float
    add_10k_s: float
    cluster_s: float | None
    cluster_incremental_10k_s: float | None
    persons_true: int
    persons_found: int | None
    cluster_pair_f: float | None  # pairwise F of the persons found against the synthetic persons
    cluster_bcubed_f: float | None  # and BCubed F (pairwise F is ruled by the persons with most photos; BCubed weighs every face alike)
    incremental_joined: float | None  # share of the 10 k new faces that joined an existing person
    store_s: float  # writing the index generation (faiss file, id map, digests) to local disk
    update_10k_s: float  # `facetier index`'s update for 10 k new faces: load the generation (digests verified), write a delta


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) int8 descriptors and their person labels."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.zipf(2.0, size=n // 2 + 10), max(1000, n // 200))
    labels = np.repeat(np.arange(len(sizes)), sizes)[:n]
    persons = int(labels.max()) + 1
    mean = rng.standard_normal(DESCRIPTOR_DIM)
    mean *= MEAN_NORM / np.linalg.norm(mean)
    codes = np.empty((n, DESCRIPTOR_DIM), np.int8)
    centres = (mean + CENTRE_SIGMA * rng.standard_normal((persons, DESCRIPTOR_DIM))).astype(np.float32)
    for at in range(0, n, 1_000_000):  # in chunks: float64 noise for 10 M faces would be 10 GB
        part = labels[at:at + 1_000_000]
        x = centres[part] + SAME_SIGMA * rng.standard_normal((len(part), DESCRIPTOR_DIM), dtype=np.float32)
        codes[at:at + len(part)] = np.clip(np.rint(x / DESCRIPTOR_STEP), -LEVELS, LEVELS)
    order = rng.permutation(n)
    return codes[order], labels[order]


def _loaded(index: object, n: int, lists: int) -> LoadedIndex:
    gen = Generation("identity-index", 0, 0, (), {}, {}, n, {"lists": lists, "nprobe": default_nprobe(lists)})
    if hasattr(index, "nprobe"):
        index.nprobe = default_nprobe(lists)
    ids = np.arange(n, dtype=np.int64)
    empty = pa.nulls(n, pa.string())
    return LoadedIndex(gen, index, ids, empty, empty, empty)


def _reset_peak() -> None:
    """Start the kernel's peak-RSS count afresh (Linux), so a step's peak is its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pair_f(found: np.ndarray, truth: np.ndarray) -> float:
    """Pairwise F of a clustering against the true labels (counted, not enumerated: fine at 1 M)."""
    def pairs(*labels: np.ndarray) -> int:
        _, counts = np.unique(np.stack(labels, 1), axis=0, return_counts=True)
        return int((counts.astype(np.int64) * (counts - 1) // 2).sum())

    both = pairs(found, truth)
    p, r = both / max(pairs(found), 1), both / max(pairs(truth), 1)
    return 2 * p * r / (p + r) if p + r else 0.0


def bcubed_f(found: np.ndarray, truth: np.ndarray) -> float:
    """BCubed F of a clustering against the true labels, from counts."""
    _, f = np.unique(found, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    _, inverse, counts = np.unique(f.astype(np.int64) * (int(t.max(initial=0)) + 1) + t, return_inverse=True, return_counts=True)
    joint = counts[inverse]
    p, r = float(np.mean(joint / np.bincount(f)[f])), float(np.mean(joint / np.bincount(t)[t]))
    return 2 * p * r / (p + r) if p + r else 0.0


def _one_size(n: int, queries: int, cluster_upto: int, seed: int, out: multiprocessing.Queue) -> None:
    import faiss

    peak_before = 0.0
    codes, labels = synthetic(n + 10_000, seed)
    extra, codes, labels, extra_labels = codes[n:], codes[:n], labels[:n], labels[n:]
    peak_before = _peak_mb()
    _reset_peak()
    started = time.perf_counter()
    lists = lists_for(n)
    index = new_index(codes, lists)
    add_codes(index, codes, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - started
    build_peak = _peak_mb()
    loaded = _loaded(index, n, lists)
    rng = np.random.default_rng(seed + 1)
    q = codes[rng.choice(n, queries, replace=False)]
    times = []
    found = []
    for row in q:
        t = time.perf_counter()
        _, rows = search_index(loaded, row[None], 10)
        times.append(time.perf_counter() - t)
        found.append(rows[0])
    truth = _exact_top10(codes, q)
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
    t = time.perf_counter()
    add_codes(index, extra, np.arange(n, n + len(extra), dtype=np.int64))
    add_s = time.perf_counter() - t
    cluster_s = incremental_s = persons_found = found_f = found_b = joined = None
    if n <= cluster_upto:
        opts = ClusterOptions(progress=False)
        remove_ids(index, np.arange(n, n + len(extra)))
        t = time.perf_counter()
        spec = GraphSpec("", 0, opts.threshold, opts.neighbours)
        person = leiden(n, NeighbourWorker(spec, loaded).run(np.arange(n)).undirected(), opts)
        cluster_s = time.perf_counter() - t
        persons_found, found_f, found_b = int(len(np.unique(person))), pair_f(person, labels), bcubed_f(person, labels)
        add_codes(index, extra, np.arange(n, n + len(extra), dtype=np.int64))
        grown = _loaded(index, n + len(extra), lists)
        t = time.perf_counter()
        new = np.arange(n, n + len(extra))
        edges = NeighbourWorker(spec, grown).run(new).undirected()
        before = np.concatenate([person, np.full(len(extra), -1)])
        after, n_joined, _, _ = _join(before, new, edges, opts, int(person.max()) + 1)
        incremental_s = time.perf_counter() - t
        joined = n_joined / len(extra)
    remove_ids(index, np.arange(n, n + len(extra)))
    del loaded
    store_s, update_s = _generation_io(index, n, lists, extra)
    out.put(asdict(PersonsScaleRow(n, lists, default_nprobe(lists), build_s, build_peak, max(peak_before, _peak_mb()),
                                   float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3), recall, add_s, cluster_s,
                                   incremental_s, int(len(np.unique(labels))), persons_found, found_f, found_b, joined, store_s, update_s)))


def _id_map(first: int, n: int, per_file: int = 10_000) -> pa.Table:
    """Face and photo ids (20-character strings, as long as facetier's) and base-family file names for ids first..first+n."""
    ids = np.arange(first, first + n, dtype=np.int64)
    text = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 20, "0")
    files = pa.DictionaryArray.from_arrays(pa.array((ids // per_file).astype(np.int32)),
                                           pa.array([f"basic/s{k:07d}.0.parquet" for k in range(int(ids.max(initial=0)) // per_file + 1)]))
    return pa.table({"face_id": text, "photo_id": text, "file": files, "id": pa.array(ids)})


def _generation_io(index: object, n: int, lists: int, extra: np.ndarray) -> tuple[float, float]:
    """(seconds to store the index as a generation, seconds for the update that adds ``extra``), on local disk."""
    from facetier.io.table import Table
    from facetier.pipelines.jobs import identity_index as ix

    with tempfile.TemporaryDirectory(prefix="facetier-bench-index-") as tmp:
        table = Table(tmp)
        rows = _id_map(0, n)
        covers = sorted(set(rows.column("file").chunk(0).dictionary.to_pylist()))
        params = {"lists": lists, "trained_rows": n, "nprobe": default_nprobe(lists), "next_id": n, "step": DESCRIPTOR_STEP, "without_descriptor": 0}
        t = time.perf_counter()
        gen = ix._write_full(table, 1, covers, index, rows, params)
        store_s = time.perf_counter() - t
        del rows, index
        t = time.perf_counter()
        loaded = ix.load(table, gen)
        fresh = _id_map(n, len(extra)).drop_columns(["id"]).append_column("id", pa.array(np.arange(n, n + len(extra), dtype=np.int64)))
        more = sorted(set(fresh.column("file").chunk(0).dictionary.to_pylist()) - set(covers))
        ix._write_update(table, 2, covers + more, loaded, np.ones(len(loaded.ids), bool), fresh, extra,
                         {**gen.params, "next_id": n + len(extra)})
        return store_s, time.perf_counter() - t


def _exact_top10(codes: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The exact 10 nearest of each query, a million faces at a time (float32 copies of 10 M would be 5 GB)."""
    import faiss

    best_d = np.full((len(q), 10), np.inf, np.float32)
    best_i = np.full((len(q), 10), -1, np.int64)
    qf = np.ascontiguousarray(q, np.float32)
    for at in range(0, len(codes), 1_000_000):
        flat = faiss.IndexFlatL2(DESCRIPTOR_DIM)
        flat.add(np.ascontiguousarray(codes[at:at + 1_000_000], np.float32))
        d, i = flat.search(qf, 10)
        d_all, i_all = np.concatenate([best_d, d], 1), np.concatenate([best_i, i + at], 1)
        order = np.argsort(d_all, axis=1, kind="stable")[:, :10]
        best_d, best_i = np.take_along_axis(d_all, order, 1), np.take_along_axis(i_all, order, 1)
    return best_i


def bench_persons(sizes: tuple[int, ...] = (100_000, 1_000_000, 10_000_000), *, queries: int = 500, cluster_upto: int = 1_000_000,
                  seed: int = 0, report: str | None = None) -> list[PersonsScaleRow]:
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for n in sizes:
        out = ctx.Queue()
        proc = ctx.Process(target=_one_size, args=(n, queries, cluster_upto, seed, out))
        proc.start()
        while True:  # a child that dies (out of memory, a crash) must not leave the bench waiting for ever
            try:
                row = PersonsScaleRow(**out.get(timeout=5))
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the {n}-face measurement died (exit code {proc.exitcode}) before reporting") from None
        proc.join()
        rows.append(row)
        log.info("%s", row)
        if report:
            Path(report).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


def render(rows: list[PersonsScaleRow]) -> str:
    lines = ["faces       lists nprobe  build_s build_MB  peak_MB  p50_ms  p99_ms  recall@10  add10k_s  store_s  update10k_s  cluster_s  incr10k_s  "
             "persons(true/found)  pair_F  BCubed_F  joined"]
    for r in rows:
        cl = f"{r.cluster_s:9.1f}" if r.cluster_s is not None else "        -"
        inc = f"{r.cluster_incremental_10k_s:9.2f}" if r.cluster_incremental_10k_s is not None else "        -"
        lines.append(f"{r.faces:<11d} {r.lists:5d} {r.nprobe:6d} {r.build_s:8.1f} {r.build_peak_rss_mb:8.0f} {r.peak_rss_mb:8.0f} {r.search_p50_ms:7.2f} {r.search_p99_ms:7.2f}"
                     f"  {r.recall_at_10:9.3f} {r.add_10k_s:9.2f} {r.store_s:8.1f} {r.update_10k_s:12.1f} {cl} {inc}  {r.persons_true}/{r.persons_found if r.persons_found is not None else '-'}"
                     f"  {'-' if r.cluster_pair_f is None else f'{r.cluster_pair_f:.3f}'}  {'-' if r.cluster_bcubed_f is None else f'{r.cluster_bcubed_f:.3f}'}"
                     f"  {'-' if r.incremental_joined is None else f'{r.incremental_joined:.2f}'}")
    return "\n".join(lines)
