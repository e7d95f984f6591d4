"""``facetier cluster``: a person id for every face, from the base family's descriptors alone.

The graph links each face to its ``neighbours`` nearest faces in the identity index closer than
``threshold`` (facetier.pipelines.jobs.neighbour_graph; on Ray or Beam for large tables), each edge
weighted ``1 - distance / threshold``. Leiden with the constant Potts model (CPM, igraph) cuts it
into clusters denser than ``resolution``: unlike chinese whispers, one stray edge between two people
does not chain them together.

CPM's penalty grows with the square of a cluster's size while a nearest-neighbour graph's edges
grow only linearly, so on its own it would cut a person with hundreds of photos into pieces. Each
face therefore carries a node weight ``sqrt(min(1, linear_above / m))``, where ``m`` is the size of
its group in a first, stricter grouping (dlib's chinese whispers on the links closer than
``group_threshold``, or ``threshold`` if lower, which does not split what is dense): inside a big
group the penalty grows linearly, like the edges, and only a thin link between two dense parts is
cut. That grouping must not chain strangers together, or it protects chains instead of persons: at
a million synthetic faces (``bench-scale --persons``) chinese whispers at 0.46 put 176 k faces of
many persons in one group, at 0.40 its largest group was the largest person (5,022 faces of 5,013).
Settings chosen on LFW's evaluation photos (folds 5-8; ``facetier eval-persons``) and checked on LFW
training identities with 144-236 photos (kept whole) and on that synthetic archive: threshold 0.52,
resolution 0.03, group threshold 0.40, linear above 50.

Runs are incremental: the faces new since the last generation are clustered among themselves the
same way, and each new cluster then joins the existing person it is linked to most, when that link
weighs at least ``join`` per face of the new cluster (or of the person, if smaller; a link weighs at most 1); the rest become
new persons; faces whose photos left the table leave. Existing persons are never merged by an
incremental run (their ids stay); ``--full`` clusters everything again and keeps a person's id
where most of its new cluster was that person before. The result is a generation of kind
``persons`` (facetier.io.derived), which ``query`` reads as the ``persons`` family (face_id,
person_id, version).
"""
from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from facetier.io import derived
from facetier.io.derived import PERSONS_KIND, Generation
from facetier.io.table import Table
from facetier.pipelines.jobs.identity_index import build_index, current_index
from facetier.pipelines.jobs.neighbour_graph import Edges, GraphSpec, neighbour_graph

from facetier.errors import ConfigError, TableCorruptError

log = logging.getLogger(__name__)

PERSONS_SCHEMA = pa.schema([pa.field("face_id", pa.string()), pa.field("person_id", pa.int64()), pa.field("version", pa.int64())])
ENGINES = ("local", "beam", "ray")


@dataclass(frozen=True)
class ClusterOptions:
    threshold: float = 0.52  # descriptor distance (dlib's units) below which two faces are linked
    neighbours: int = 32
    resolution: float = 0.03  # CPM: the edge weight per pair of faces a cluster must exceed
    group_threshold: float = 0.40  # the stricter first grouping that sets each face's node weight (at most ``threshold``)
    linear_above: int = 50  # group size above which CPM's penalty grows linearly
    join: float = 0.1  # incremental runs: link weight per face a new cluster needs to join an existing person
    nprobe: int | None = None  # inverted lists each neighbour query visits (default: identity_index.neighbour_nprobe)
    full: bool = False
    engine: str = "local"  # where the neighbour graph is computed: local, beam or ray
    workers: int = 1
    ray_address: str | None = None
    beam_args: tuple[str, ...] = ()
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.threshold < 2):
            raise ConfigError(f"--threshold must be between 0 and 2 (a descriptor distance), got {self.threshold}")
        if self.neighbours < 1:
            raise ConfigError(f"--neighbours must be at least 1, got {self.neighbours}")
        if not (0 < self.resolution < 1):
            raise ConfigError(f"--resolution must be between 0 and 1 (an edge weight per pair), got {self.resolution}")
        if self.group_threshold <= 0:
            raise ConfigError(f"the group threshold must be positive, got {self.group_threshold}")
        if self.linear_above < 1:
            raise ConfigError(f"linear_above must be at least 1, got {self.linear_above}")
        if self.join <= 0:
            raise ConfigError(f"--join must be positive (edge weight per face), got {self.join}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")

    @property
    def settings(self) -> dict[str, float]:
        """What makes two runs' persons comparable (an incremental run continues only with the same)."""
        return {"threshold": self.threshold, "neighbours": self.neighbours, "resolution": self.resolution,
                "group_threshold": self.group_threshold, "linear_above": self.linear_above, "join": self.join}


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


def edge_weights(edges: Edges, threshold: float) -> np.ndarray:
    return (1.0 - edges.distance.astype(np.float64) / threshold).clip(1e-6, 1.0)


def leiden(nodes: int, edges: Edges, opts: ClusterOptions) -> np.ndarray:
    """A cluster label per node 0..nodes-1: Leiden (CPM) on the weighted graph, node weights from the first grouping."""
    import igraph

    if nodes == 0:
        return np.zeros(0, np.int64)
    strict = edges.distance < min(opts.group_threshold, opts.threshold)
    group = chinese_whispers(nodes, edges.a[strict], edges.b[strict])
    node_weights = np.sqrt(np.minimum(1.0, opts.linear_above / np.bincount(group)[group]))
    graph = igraph.Graph(n=nodes, edges=np.stack([edges.a, edges.b], 1) if len(edges) else [])
    igraph.set_random_number_generator(random.Random(opts.seed))  # Leiden's node order: the same graph, the same persons
    try:
        parts = graph.community_leiden(objective_function="CPM", weights=edge_weights(edges, opts.threshold), resolution=opts.resolution,
                                       node_weights=node_weights)
    finally:
        igraph.set_random_number_generator(random)
    return np.asarray(parts.membership, np.int64)


def chinese_whispers(nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A label per node of the unweighted graph (a, b), with a self edge per node as dlib builds it (dlib's fixed seed)."""
    import dlib

    edges = [(i, i) for i in range(nodes)]
    edges += zip(a.tolist(), b.tolist())
    return np.asarray(dlib.chinese_whispers(edges), np.int64)


def join_existing(labels: np.ndarray, a: np.ndarray, b: np.ndarray, weights: np.ndarray, per_face: float, existing: np.ndarray) -> np.ndarray:
    """``labels`` with each cluster that has no ``existing`` face (rows) joined to the existing cluster
    it is linked to most, when that link weighs at least ``per_face`` per face of the smaller of the two."""
    if len(labels) == 0:
        return labels
    _, dense = np.unique(labels, return_inverse=True)
    size = np.bincount(dense)
    is_existing = np.zeros(len(size), bool)
    is_existing[np.unique(dense[existing])] = True
    la, lb = dense[a], dense[b]
    # each link from a new cluster to an existing one, as (new, existing)
    one_side = is_existing[la] != is_existing[lb]
    new = np.where(is_existing[la[one_side]], lb[one_side], la[one_side])
    old = np.where(is_existing[la[one_side]], la[one_side], lb[one_side])
    pair, inverse = np.unique(new * len(size) + old, return_inverse=True)
    weight = np.bincount(inverse, weights=weights[one_side]) if len(pair) else np.zeros(0)
    pnew, pold = pair // len(size), pair % len(size)
    per = weight / np.minimum(size[pnew], size[pold])
    target = np.arange(len(size))
    order = np.lexsort((pold, -per, pnew))  # per new cluster: the strongest link first
    first = order[np.r_[True, pnew[order][1:] != pnew[order][:-1]]] if len(order) else order
    strong = first[per[first] >= per_face]
    target[pnew[strong]] = pold[strong]
    label_of = np.zeros(len(size), labels.dtype)
    label_of[dense] = labels
    return label_of[target][dense]


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


def _join(before: np.ndarray, new: np.ndarray, edges: Edges, opts: ClusterOptions, next_id: int) -> tuple[np.ndarray, int, int, int]:
    """Person ids after an incremental run: the ``new`` faces clustered among themselves, each new
    cluster joining the existing person (``before``; -1 = none) it is linked to most, if strongly enough.
    Returns (person ids, new faces that joined a person, new persons, the next free id)."""
    position = np.full(len(before), -1, np.int64)
    position[new] = np.arange(len(new))
    among = (position[edges.a] >= 0) & (position[edges.b] >= 0)
    local = leiden(len(new), Edges(position[edges.a[among]], position[edges.b[among]], edges.distance[among]), opts)
    labels = before.copy()
    labels[new] = next_id + local  # new clusters take labels no existing person has
    merged = join_existing(labels, edges.a, edges.b, edge_weights(edges, opts.threshold), opts.join, np.flatnonzero(before >= 0))
    person = before.copy()
    got = merged[new]
    joined = got < next_id
    person[new[joined]] = got[joined]
    fresh, renumbered = np.unique(got[~joined], return_inverse=True)
    person[new[~joined]] = next_id + renumbered
    return person, int(joined.sum()), len(fresh), next_id + len(fresh)


def _read_persons(table: Table, gen: Generation) -> pa.Table:
    with derived.local_copy(table, gen, "persons") as path:
        return pq.read_table(path)


def cluster(table_root: str, opts: ClusterOptions = ClusterOptions()) -> ClusterReport:
    """Bring the identity index up to date, then give every indexed face a person id."""
    started = time.perf_counter()
    table = Table(table_root)
    snapshot = table.snapshot()
    loaded, _ = current_index(table, snapshot)  # an index already current is loaded (and its digests verified) once
    if loaded is None:
        build_index(table_root, progress=opts.progress)
        snapshot = table.snapshot()
        loaded, why = current_index(table, snapshot)
        if loaded is None:
            raise TableCorruptError(f"{table_root}: {why}")  # the table moved while the index was built: run again
    n = len(loaded.ids)
    face_ids = np.asarray(loaded.face_ids.to_numpy(zero_copy_only=False), object)
    previous = derived.latest(table, PERSONS_KIND)
    usable = previous is not None and all(previous.params.get(k) == v for k, v in opts.settings.items())
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
    spec = GraphSpec(table_root, loaded.generation.number, opts.threshold, opts.neighbours, opts.nprobe)
    rows = np.arange(n) if full else np.flatnonzero(before < 0)
    edges = neighbour_graph(loaded, rows, spec, engine=opts.engine, workers=opts.workers, ray_address=opts.ray_address,
                            beam_args=opts.beam_args, progress=opts.progress)
    log.info("cluster: %d edges among %d faces", len(edges), n)
    if full:
        person, next_id = _stable_ids(leiden(n, edges, opts), before, next_id)
        new_faces, joined, new_persons = n - int((before >= 0).sum()), 0, len(set(person.tolist()) - set(before[before >= 0].tolist()))
    else:
        person, joined, new_persons, next_id = _join(before, rows, edges, opts, next_id)
        new_faces = len(rows)
    result = pa.table({"face_id": loaded.face_ids, "person_id": pa.array(person, pa.int64()),
                       "version": pa.array(np.full(n, snapshot.version, np.int64))}, schema=PERSONS_SCHEMA).sort_by("face_id")
    with tempfile.TemporaryDirectory(prefix="facetier-persons-") as tmp:
        path = Path(tmp) / "persons.parquet"
        pq.write_table(result, path, compression="zstd")
        gen = derived.write_generation(table, PERSONS_KIND, table_version=snapshot.version, covers=list(loaded.generation.covers),
                                       files={"persons": path}, rows=n,
                                       params={**opts.settings, "next_person": next_id, "index_generation": loaded.generation.number})
    return ClusterReport(gen.number, snapshot.version, n, len(np.unique(person)), new_faces, joined, new_persons, left, full,
                         time.perf_counter() - started)


def persons_rows(table: Table, version: int) -> pa.Table:
    """The ``persons`` family as of table version ``version``: the newest generation computed at or
    before it (empty when there is none)."""
    gen = derived.latest(table, PERSONS_KIND, at_version=version)
    return PERSONS_SCHEMA.empty_table() if gen is None else _read_persons(table, gen).cast(PERSONS_SCHEMA)
