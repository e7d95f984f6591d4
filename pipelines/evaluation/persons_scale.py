"""``facetier bench-scale --persons``: the identity index and clustering at 100 k to 10 M faces.

The descriptors are synthetic, drawn so that persons exist with the distances dlib's descriptors of
facetier's crops have on LFW's evaluation photos (same person: median 0.45; different persons:
median 0.82) and their uneven spread over directions: each person a centre around a common mean, each face its centre plus noise, stored
as the base family stores them (int8 at DESCRIPTOR_STEP), a geometric number of faces per person
(mean 5). Each size runs in its own process, so its peak memory is its own. The same functions as
``facetier index`` and ``facetier cluster`` run here, minus the Parquet reads and uploads.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from facetier.io.derived import Generation
from facetier.io.identity import DESCRIPTOR_DIM, DESCRIPTOR_STEP, LEVELS
from facetier.pipelines.jobs.identity_index import LoadedIndex, _add, _lists_for, _new_index, default_nprobe, search_index
from facetier.pipelines.jobs.persons import ClusterOptions, chinese_whispers, neighbour_edges

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
    build_peak_rss_mb: float  # peak of the process by the end of the build (its synthetic descriptors included)
    peak_rss_mb: float  # by the end of everything (clustering's graph included)
    search_p50_ms: float
    search_p99_ms: float
    recall_at_10: float
    add_10k_s: float
    cluster_s: float | None
    cluster_incremental_10k_s: float | None
    persons_true: int
    persons_found: int | None


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 128) int8 descriptors and their person labels."""
    rng = np.random.default_rng(seed)
    sizes = rng.geometric(0.2, size=n // 2 + 10)
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


def _one_size(n: int, queries: int, cluster_upto: int, seed: int, out: multiprocessing.Queue) -> None:
    import faiss

    codes, labels = synthetic(n + 10_000, seed)
    extra, codes, labels = codes[n:], codes[:n], labels[:n]
    started = time.perf_counter()
    lists = _lists_for(n)
    index = _new_index(codes, lists)
    _add(index, codes, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - started
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the descriptors and the index, as `facetier index` holds them
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
    exact = faiss.IndexScalarQuantizer(DESCRIPTOR_DIM, faiss.ScalarQuantizer.QT_8bit_direct_signed, faiss.METRIC_L2)
    for at in range(0, n, 500_000):  # float32 copies of 10 M faces would be 5 GB
        exact.add(np.ascontiguousarray(codes[at:at + 500_000], np.float32))
    _, truth = exact.search(np.ascontiguousarray(q, np.float32), 10)
    del exact
    recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
    t = time.perf_counter()
    _add(index, extra, np.arange(n, n + len(extra), dtype=np.int64))
    add_s = time.perf_counter() - t
    cluster_s = incremental_s = None
    persons_found = None
    if n <= cluster_upto:
        index.remove_ids(faiss.IDSelectorRange(n, n + len(extra)))
        t = time.perf_counter()
        a, b = neighbour_edges(loaded, np.arange(n), ClusterOptions())
        person = chinese_whispers(n, a, b)
        cluster_s = time.perf_counter() - t
        persons_found = int(len(np.unique(person)))
        _add(index, extra, np.arange(n, n + len(extra), dtype=np.int64))
        grown = LoadedIndex(loaded.generation, index, np.arange(n + len(extra), dtype=np.int64), pa.nulls(n + len(extra), pa.string()),
                            pa.nulls(n + len(extra), pa.string()), pa.nulls(n + len(extra), pa.string()))
        t = time.perf_counter()
        a, b = neighbour_edges(grown, np.arange(n, n + len(extra)), ClusterOptions())
        before = np.concatenate([person, np.full(len(extra), -1)])
        votes = before[b] >= 0
        if votes.any():  # the join step `facetier cluster` runs for new faces (a vote per neighbour)
            np.unique(np.stack([a[votes], before[b[votes]]], 1), axis=0, return_counts=True)
        incremental_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.put(asdict(PersonsScaleRow(n, lists, default_nprobe(lists), build_s, build_peak, peak, float(np.percentile(times, 50) * 1e3),
                                   float(np.percentile(times, 99) * 1e3), recall, add_s, cluster_s, incremental_s,
                                   int(len(np.unique(labels))), persons_found)))


def bench_persons(sizes: tuple[int, ...] = (100_000, 1_000_000, 10_000_000), *, queries: int = 500, cluster_upto: int = 1_000_000,
                  seed: int = 0, report: str | None = None) -> list[PersonsScaleRow]:
    rows = []
    ctx = multiprocessing.get_context("spawn")
    for n in sizes:
        out = ctx.Queue()
        proc = ctx.Process(target=_one_size, args=(n, queries, cluster_upto, seed, out))
        proc.start()
        row = PersonsScaleRow(**out.get())
        proc.join()
        rows.append(row)
        log.info("%s", row)
        if report:
            Path(report).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return rows


def render(rows: list[PersonsScaleRow]) -> str:
    lines = ["faces       lists nprobe  build_s build_MB  peak_MB  p50_ms  p99_ms  recall@10  add10k_s  cluster_s  incr10k_s  persons(true/found)"]
    for r in rows:
        cl = f"{r.cluster_s:9.1f}" if r.cluster_s is not None else "        -"
        inc = f"{r.cluster_incremental_10k_s:9.2f}" if r.cluster_incremental_10k_s is not None else "        -"
        lines.append(f"{r.faces:<11d} {r.lists:5d} {r.nprobe:6d} {r.build_s:8.1f} {r.build_peak_rss_mb:8.0f} {r.peak_rss_mb:8.0f} {r.search_p50_ms:7.2f} {r.search_p99_ms:7.2f}"
                     f"  {r.recall_at_10:9.3f} {r.add_10k_s:9.2f} {cl} {inc}  {r.persons_true}/{r.persons_found if r.persons_found is not None else '-'}")
    return "\n".join(lines)
