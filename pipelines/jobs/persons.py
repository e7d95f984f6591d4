"""``facetier cluster``: a person id for every face, from the base family's descriptors alone.

The graph is each face's ``neighbours`` nearest faces in the identity index (facetier.pipelines.jobs.
identity_index) closer than ``threshold``, plus a self edge per face (as dlib's
``chinese_whispers_clustering`` builds it); dlib's ``chinese_whispers`` labels it. Settings chosen
on LFW's evaluation photos (folds 5-8; ``facetier eval-persons``): threshold 0.45 and 32 neighbours.

Runs are incremental: faces new since the last generation join the person most of their
neighbours within the threshold belong to; the rest are clustered among themselves into new
persons; faces whose photos left the table leave. ``--full`` clusters everything again and keeps a
person's id where most of its new cluster was that person before, so ids stay stable where their
cluster did not change. The result is a generation of kind ``persons`` (facetier.io.derived), which
``query`` reads as the ``persons`` family (face_id, person_id, version).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from facetier.io import derived
from facetier.io.derived import PERSONS_KIND, Generation
from facetier.io.table import Table
from facetier.pipelines.jobs.identity_index import LoadedIndex, build_index, current_index, neighbour_nprobe, search_index
from tqdm import tqdm

from facetier.errors import ConfigError, TableCorruptError

log = logging.getLogger(__name__)

PERSONS_SCHEMA = pa.schema([pa.field("face_id", pa.string()), pa.field("person_id", pa.int64()), pa.field("version", pa.int64())])
QUERY_CHUNK = 4096


@dataclass(frozen=True)
class ClusterOptions:
    threshold: float = 0.45  # descriptor distance (dlib's units) below which two faces may be one person
    neighbours: int = 32
    nprobe: int | None = None  # inverted lists each neighbour query visits (default: identity_index.neighbour_nprobe)
    full: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.threshold < 2):
            raise ConfigError(f"--threshold must be between 0 and 2 (a descriptor distance), got {self.threshold}")
        if self.neighbours < 1:
            raise ConfigError(f"--neighbours must be at least 1, got {self.neighbours}")


@dataclass(frozen=True)
class ClusterReport:
    generation: int
    table_version: int
    faces: int
    persons: int
    new_faces: int
    joined: int  # new faces that joined an existing person
    new_persons: int
    left: int  # faces whose photos left the table
    full: bool
    seconds: float

    def render(self) -> str:
        how = "clustered in full" if self.full else f"{self.new_faces} new faces ({self.joined} joined a person, {self.new_persons} new persons), {self.left} left"
        return (f"persons generation {self.generation} for version {self.table_version}: {self.faces} faces in {self.persons} persons; "
                f"{how}; {self.seconds:.1f} s")


def neighbour_edges(loaded: LoadedIndex, rows: np.ndarray, opts: ClusterOptions, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) id-map rows of every edge from ``rows`` to a neighbour closer than the threshold (a != b)."""
    index = loaded.index
    if hasattr(index, "set_direct_map_type"):  # an IVF reconstructs by id through a direct map; a hash table takes later adds
        import faiss

        if index.direct_map.type != faiss.DirectMap.Hashtable:
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
    sources, targets = [], []
    for at in tqdm(range(0, len(rows), QUERY_CHUNK), desc="cluster: neighbours", unit="chunk", disable=not progress, mininterval=5):
        chunk = rows[at:at + QUERY_CHUNK]
        codes = index.reconstruct_batch(np.ascontiguousarray(loaded.ids[chunk], np.int64))
        dist, nb = search_index(loaded, codes, opts.neighbours + 1, nprobe=opts.nprobe or neighbour_nprobe(int(loaded.generation.params.get("lists", 0))) or None)
        keep = (nb >= 0) & (dist < opts.threshold) & (nb != chunk[:, None])
        sources.append(np.repeat(chunk, keep.sum(1)))
        targets.append(nb[keep])
    if not sources:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(sources).astype(np.int64), np.concatenate(targets).astype(np.int64)


def chinese_whispers(nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A label per node 0..nodes-1 of the graph with edges (a, b) (dlib's implementation; fixed seed)."""
    import dlib

    if nodes == 0:
        return np.zeros(0, np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = np.unique(np.stack([lo, hi], 1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
    edges = [(i, i) for i in range(nodes)] + [(int(x), int(y)) for x, y in pairs]
    return np.asarray(dlib.chinese_whispers(edges), np.int64)


def _stable_ids(labels: np.ndarray, previous: np.ndarray, next_id: int) -> tuple[np.ndarray, int]:
    """Person ids for cluster ``labels``: a cluster keeps the previous id most of its faces had, when
    it holds most of that person's faces; other clusters get new ids (previous: -1 = none)."""
    out = np.empty(len(labels), np.int64)
    sizes = Counter(previous[previous >= 0].tolist())
    claims = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        votes = Counter(previous[members][previous[members] >= 0].tolist())
        if votes:
            pid, n = votes.most_common(1)[0]
            if 2 * n > len(members) and 2 * n > sizes[pid]:
                claims.append((n, pid, members))
                continue
        claims.append((0, -1, members))
    taken = set()
    for n, pid, members in sorted(claims, key=lambda c: -c[0]):
        if pid >= 0 and pid not in taken:
            taken.add(pid)
            out[members] = pid
        else:
            out[members] = next_id
            next_id += 1
    return out, next_id


def _read_persons(table: Table, gen: Generation) -> pa.Table:
    with derived.local_copy(table, gen, "persons") as path:
        return pq.read_table(path)


def cluster(table_root: str, opts: ClusterOptions = ClusterOptions()) -> ClusterReport:
    """Bring the identity index up to date, then give every indexed face a person id."""
    started = time.perf_counter()
    build_index(table_root, progress=opts.progress)
    table = Table(table_root)
    snapshot = table.snapshot()
    loaded, why = current_index(table, snapshot)
    if loaded is None:
        raise TableCorruptError(f"{table_root}: {why}")  # the table moved while the index was built: run again
    n = len(loaded.ids)
    face_ids = np.asarray(loaded.face_ids.to_numpy(zero_copy_only=False), object)
    previous = derived.latest(table, PERSONS_KIND)
    usable = previous is not None and previous.params.get("threshold") == opts.threshold and previous.params.get("neighbours") == opts.neighbours
    before = np.full(n, -1, np.int64)
    next_id, left = 0, 0
    if previous is not None:
        old = _read_persons(table, previous)
        old_ids = dict(zip(old.column("face_id").to_pylist(), old.column("person_id").to_pylist()))
        before = np.array([old_ids.get(f, -1) for f in face_ids], np.int64)
        next_id = int(previous.params.get("next_person", 0))
        left = len(old_ids) - int((before >= 0).sum())
    full = opts.full or not usable
    if not full and previous.covers == loaded.generation.covers:  # nothing changed since: no new generation
        return ClusterReport(previous.number, previous.table_version, n, len(np.unique(before)), 0, 0, 0, 0, False,
                             time.perf_counter() - started)
    if full:
        a, b = neighbour_edges(loaded, np.arange(n), opts, opts.progress)
        labels = chinese_whispers(n, a, b)
        person, next_id = _stable_ids(labels, before, next_id)
        new_faces, joined, new_persons = n - int((before >= 0).sum()), 0, len(set(person.tolist()) - set(before[before >= 0].tolist()))
    else:
        person = before.copy()
        new = np.flatnonzero(before < 0)
        a, b = neighbour_edges(loaded, new, opts, opts.progress)
        votes = before[b] >= 0
        if votes.any():
            pairs, counts = np.unique(np.stack([a[votes], before[b[votes]]], 1), axis=0, return_counts=True)
            order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))  # per face: most votes first, then the lowest id
            first = order[np.r_[True, pairs[order, 0][1:] != pairs[order, 0][:-1]]]
            person[pairs[first, 0]] = pairs[first, 1]
        joined = int((person[new] >= 0).sum())
        rest = np.flatnonzero(person < 0)
        position = np.full(n, -1, np.int64)
        position[rest] = np.arange(len(rest))
        inside = (position[a] >= 0) & (position[b] >= 0)
        among = np.stack([position[a[inside]], position[b[inside]]], 1)
        labels = chinese_whispers(len(rest), among[:, 0], among[:, 1])
        for k, label in enumerate(np.unique(labels)):
            person[rest[labels == label]] = next_id + k
        new_persons = len(np.unique(labels))
        next_id += new_persons
        new_faces = len(new)
    rows = pa.table({"face_id": loaded.face_ids, "person_id": pa.array(person, pa.int64()),
                     "version": pa.array(np.full(n, snapshot.version, np.int64))}, schema=PERSONS_SCHEMA).sort_by("face_id")
    with tempfile.TemporaryDirectory(prefix="facetier-persons-") as tmp:
        path = Path(tmp) / "persons.parquet"
        pq.write_table(rows, path, compression="zstd")
        gen = derived.write_generation(table, PERSONS_KIND, table_version=snapshot.version, covers=list(loaded.generation.covers),
                                       files={"persons": path}, rows=n,
                                       params={"threshold": opts.threshold, "neighbours": opts.neighbours, "next_person": next_id,
                                               "index_generation": loaded.generation.number})
    return ClusterReport(gen.number, snapshot.version, n, len(np.unique(person)), new_faces, joined, new_persons, left, full,
                         time.perf_counter() - started)


def persons_rows(table: Table, version: int) -> pa.Table:
    """The ``persons`` family as of table version ``version``: the newest generation computed at or
    before it (empty when there is none)."""
    gen = derived.latest(table, PERSONS_KIND, at_version=version)
    return PERSONS_SCHEMA.empty_table() if gen is None else _read_persons(table, gen).cast(PERSONS_SCHEMA)
