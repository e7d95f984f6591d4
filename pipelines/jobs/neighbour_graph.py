"""The nearest-neighbour graph ``facetier cluster`` labels: each face linked to its nearest faces in
the identity index (facetier.pipelines.jobs.identity_index) that are closer than the threshold.

The work per slice of faces is written once (:class:`NeighbourWorker`, which loads an index
generation and queries it). The local engine runs the slices in this process; Ray and Beam are thin
adapters that spread them over workers, each loading the generation once from the table's storage.
Ray hands each slice's edges back through its object store; Beam's workers leave them as files in a
job folder under ``_derived/_work`` on the table's storage, which the driver reads and removes.
"""
from __future__ import annotations

import io
import logging
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from facetier.io import derived
from facetier.io.derived import DERIVED_DIR, INDEX_KIND
from facetier.io.table import Table
from facetier.pipelines.jobs.identity_index import LoadedIndex, load, neighbour_nprobe, search_index
from tqdm import tqdm

from facetier.errors import ConfigError, TableCorruptError

log = logging.getLogger(__name__)

ROWS_PER_SLICE = 16_384  # a slice is one unit of work: about a second of queries at 1 M faces
QUERY_CHUNK = 4096
WORK_DIR = f"{DERIVED_DIR}/_work"


@dataclass(frozen=True)
class GraphSpec:
    """What a worker needs to compute edges: the table, the index generation and the graph's settings."""

    table_root: str
    index_generation: int
    threshold: float
    neighbours: int
    nprobe: int | None = None


@dataclass(frozen=True)
class Edges:
    """Undirected edges as id-map rows (a != b) with their descriptor distance."""

    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray

    @staticmethod
    def empty() -> Edges:
        return Edges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @staticmethod
    def concat(parts: Sequence[Edges]) -> Edges:
        if not parts:
            return Edges.empty()
        return Edges(np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts]), np.concatenate([p.distance for p in parts]))

    def __len__(self) -> int:
        return len(self.a)

    def undirected(self) -> Edges:
        """Each pair once (lower row first), at the smaller distance either direction found."""
        lo, hi = np.minimum(self.a, self.b), np.maximum(self.a, self.b)
        order = np.lexsort((self.distance, hi, lo))
        lo, hi, dist = lo[order], hi[order], self.distance[order]
        first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
        return Edges(lo[first], hi[first], dist[first])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, a=self.a, b=self.b, distance=self.distance)
        return buf.getvalue()

    @staticmethod
    def from_bytes(body: bytes) -> Edges:
        with np.load(io.BytesIO(body)) as z:
            return Edges(z["a"], z["b"], z["distance"])


def row_slices(rows: np.ndarray, per_slice: int | None = None) -> list[np.ndarray]:
    per_slice = per_slice or ROWS_PER_SLICE
    return [rows[at:at + per_slice] for at in range(0, len(rows), per_slice)]


class NeighbourWorker:
    """Edges from a slice of id-map rows to their neighbours closer than the threshold."""

    def __init__(self, spec: GraphSpec, loaded: LoadedIndex | None = None) -> None:
        self.spec = spec
        self.loaded = loaded if loaded is not None else load_generation(spec)
        index = self.loaded.index
        if hasattr(index, "set_direct_map_type"):  # an IVF reconstructs by id through a direct map; a hash table takes later adds
            import faiss

            if index.direct_map.type != faiss.DirectMap.Hashtable:
                index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.nprobe = spec.nprobe or neighbour_nprobe(int(self.loaded.generation.params.get("lists", 0))) or None

    def run(self, rows: np.ndarray) -> Edges:
        parts = []
        for at in range(0, len(rows), QUERY_CHUNK):
            chunk = np.asarray(rows[at:at + QUERY_CHUNK], np.int64)
            codes = self.loaded.index.reconstruct_batch(np.ascontiguousarray(self.loaded.ids[chunk], np.int64))
            dist, nb = search_index(self.loaded, codes, self.spec.neighbours + 1, nprobe=self.nprobe)
            keep = (nb >= 0) & (dist < self.spec.threshold) & (nb != chunk[:, None])
            parts.append(Edges(np.repeat(chunk, keep.sum(1)), nb[keep].astype(np.int64), dist[keep].astype(np.float32)))
        return Edges.concat(parts)


def load_generation(spec: GraphSpec) -> LoadedIndex:
    table = Table(spec.table_root)
    gens = [g for g in derived.generations(table, INDEX_KIND) if g.number == spec.index_generation]
    if not gens:
        raise TableCorruptError(f"{table.uri(DERIVED_DIR)}: identity index generation {spec.index_generation} is gone (a vacuum ran?); run cluster again")
    return load(table, gens[0])


def neighbour_graph(loaded: LoadedIndex, rows: np.ndarray, spec: GraphSpec, *, engine: str = "local", workers: int = 1,
                    ray_address: str | None = None, beam_args: Sequence[str] = (), progress: bool = False) -> Edges:
    """Every edge from ``rows`` (id-map rows of ``loaded``) to a neighbour closer than the threshold, each pair once."""
    slices = row_slices(np.asarray(rows, np.int64))
    if not slices:
        return Edges.empty()
    if engine == "local":
        worker = NeighbourWorker(spec, loaded)
        parts = [worker.run(s) for s in tqdm(slices, desc="cluster: neighbours", unit="slice", disable=not progress, mininterval=5)]
    elif engine == "ray":
        from facetier.pipelines.jobs.ray_engine import run_ray_neighbours

        parts = run_ray_neighbours(spec, slices, workers=workers, address=ray_address)
    elif engine == "beam":
        parts = _run_beam(spec, slices, workers, beam_args)
    else:
        raise ConfigError(f"unknown engine {engine!r} (local, beam or ray)")
    return Edges.concat(parts).undirected()


def _run_beam(spec: GraphSpec, slices: list[np.ndarray], workers: int, beam_args: Sequence[str]) -> list[Edges]:
    from facetier.pipelines.jobs.beam_engine import run_beam_neighbours

    table = Table(spec.table_root)
    job = f"{WORK_DIR}/cluster-{uuid.uuid4().hex[:12]}"
    try:
        table.fs.makedirs(table._p(job), exist_ok=True)  # a local folder must exist before workers write into it
        run_beam_neighbours(spec, slices, table.uri(job), workers=workers, extra_args=beam_args)
        names = sorted(table.fs.ls(table._p(job), detail=False))
        if len(names) != len(slices):
            raise TableCorruptError(f"{table.uri(job)}: {len(names)} of {len(slices)} neighbour slices came back from Beam")
        return [Edges.from_bytes(table.fs.cat_file(name)) for name in names]
    finally:
        if table.fs.exists(table._p(job)):
            table.fs.rm(table._p(job), recursive=True)


def slice_name(job_uri: str, rows: np.ndarray) -> str:
    """Where a Beam worker leaves a slice's edges: named by its first row, so a retried bundle overwrites its own file."""
    return posixpath.join(job_uri, f"edges-{int(rows[0]):012d}.npz")
