"""``facetier index``: an approximate nearest-neighbour index over the base family's descriptors (faiss).

The index holds each face's stored int8 descriptor exactly (faiss's ``QT_8bit_direct_signed`` codes
are the stored components), so its distances are the exact distances between stored vectors; what
is approximate is only which inverted lists a query visits. Up to :data:`FLAT_BELOW` faces the
index is flat (every query exact); above, an IVF with ``nlist`` near ``4·sqrt(n)`` lists, probed
``nprobe`` at a time (``facetier bench-scale`` measures recall@10 against the exact scan).

A generation (facetier.io.derived) stores the faiss file and a Parquet map from faiss id to face id,
photo id and base-family file. An update reads only the base-family files added since the last
generation and drops the faces of the files gone (a compaction shows up as both: its faces leave and
come back), so adding 10 k faces to a 10 M index reads 10 k rows.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from facetier.io import derived
from facetier.io.derived import INDEX_KIND, Generation
from facetier.io.identity import DESCRIPTOR_DIM, DESCRIPTOR_STEP, descriptor_codes
from facetier.io.reader import read_file
from facetier.io.table import BASE_FAMILY, Snapshot, Table
from tqdm import tqdm

from facetier.errors import TableCorruptError

log = logging.getLogger(__name__)

FLAT_BELOW = 20_000
MAX_LISTS = 4096
TRAIN_ROWS_PER_LIST = 40
REBUILD_GROWTH = 8.0  # lists trained on n faces serve up to 8 n; past that an update retrains
INDEX_COLUMNS = ["face_id", "photo_id", "descriptor"]
DELTA_FRACTION = 0.1  # an update writes a delta beside the base while its changes stay under this share of the base's faces
_ID_MAP = pa.schema([pa.field("face_id", pa.string()), pa.field("photo_id", pa.string()),
                     pa.field("file", pa.dictionary(pa.int32(), pa.string())), pa.field("id", pa.int64())])
_ADDED = _ID_MAP.append(pa.field("code", pa.list_(pa.int8(), DESCRIPTOR_DIM)))


def _faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines are about which CPU build it picked
    import faiss  # imported here: only index, search and cluster need it

    return faiss


@dataclass(frozen=True)
class IndexReport:
    generation: int
    table_version: int
    faces: int
    added: int
    removed: int
    without_descriptor: int
    rebuilt: bool
    up_to_date: bool
    lists: int
    seconds: float

    def render(self) -> str:
        if self.up_to_date:
            return f"identity index generation {self.generation} already covers version {self.table_version} ({self.faces} faces)"
        how = "built" if self.rebuilt else "updated"
        kind = "flat (exact)" if self.lists == 0 else f"IVF, {self.lists} lists"
        line = (f"identity index generation {self.generation} {how} for version {self.table_version}: {self.faces} faces ({kind}); "
                f"+{self.added} -{self.removed} in {self.seconds:.1f} s")
        if self.without_descriptor:
            line += f"\n{self.without_descriptor} faces have no descriptor (encoded before facetier stored it) and are not in the index"
        return line


@dataclass
class LoadedIndex:
    """An index generation in memory with its id map."""

    generation: Generation
    index: object
    ids: np.ndarray  # sorted faiss ids
    face_ids: pa.Array
    photo_ids: pa.Array
    files: pa.Array
    added: pa.Table | None = None  # the generation's delta: faces added since its base (id map columns and codes)
    removed: np.ndarray | None = None  # and base ids removed since

    @property
    def nprobe(self) -> int:
        return int(self.generation.params.get("nprobe", 1))

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)


def lists_for(n: int) -> int:
    """Inverted lists for an index of ``n`` faces (0: flat)."""
    if n < FLAT_BELOW:
        return 0
    return int(min(MAX_LISTS, 2 ** round(math.log2(4 * math.sqrt(n)))))


def default_nprobe(lists: int) -> int:
    """Lists a query visits: an eighth of them, chosen with ``facetier bench-scale --persons`` for recall@10 >= 0.95
    against the exact scan (README's figures); queries stay in milliseconds even so."""
    return 0 if lists == 0 else max(8, lists // 8)


def neighbour_nprobe(lists: int) -> int:
    """Lists each face's neighbour query visits when clustering: a face's own person lies within 0.45,
    in the lists nearest it, so far fewer than a search for any 10 nearest (which must rank strangers)."""
    return 0 if lists == 0 else max(8, lists // 256)


def new_index(sample: np.ndarray, lists: int, seed: int = 0):
    """An empty index; an IVF's lists are trained on ``sample`` (at most TRAIN_ROWS_PER_LIST rows a list are used)."""
    faiss = _faiss()
    qtype = faiss.ScalarQuantizer.QT_8bit_direct_signed
    if lists == 0:
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(DESCRIPTOR_DIM, qtype, faiss.METRIC_L2))
    quantizer = faiss.IndexFlatL2(DESCRIPTOR_DIM)
    index = faiss.IndexIVFScalarQuantizer(quantizer, DESCRIPTOR_DIM, lists, qtype, faiss.METRIC_L2, False)
    rng = np.random.default_rng(seed)  # the sample, and so the lists, are reproducible
    chosen = sample[rng.choice(len(sample), min(len(sample), lists * TRAIN_ROWS_PER_LIST), replace=False)]
    index.cp.seed = seed
    index.train(np.ascontiguousarray(chosen, np.float32))
    return index


def add_codes(index: object, codes: np.ndarray, ids: np.ndarray, chunk: int = 200_000) -> None:
    for at in range(0, len(codes), chunk):
        index.add_with_ids(np.ascontiguousarray(codes[at:at + chunk], np.float32), np.ascontiguousarray(ids[at:at + chunk], np.int64))


def remove_ids(index: object, ids: np.ndarray) -> None:
    """Take faiss ids out of the index (an IVF with a hash-table direct map takes only an array selector)."""
    faiss = _faiss()
    ids = np.ascontiguousarray(ids, np.int64)
    if len(ids) == 0:
        return
    if getattr(getattr(index, "direct_map", None), "type", None) == faiss.DirectMap.Hashtable:
        index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))
    else:
        index.remove_ids(faiss.IDSelectorBatch(ids))


def _read_faces(table: Table, files: list[str], progress: bool) -> tuple[pa.Table, list[np.ndarray], int]:
    """(face_id, photo_id, file) rows with a descriptor, their codes a file at a time (so the index
    can take them in one by one, never holding a second copy of them all), and how many rows had none."""
    parts, codes, missing = [], [], 0
    for rel in tqdm(files, desc="index: read", unit="file", disable=not progress, mininterval=5):
        part = read_file(table, rel, BASE_FAMILY, columns=INDEX_COLUMNS)
        valid = part.column("descriptor").is_valid()
        missing += part.num_rows - pc.sum(valid.cast(pa.int64())).as_py() if part.num_rows else 0
        part = part.filter(valid)
        codes.append(descriptor_codes(part.column("descriptor")))
        parts.append(pa.table({"face_id": part.column("face_id"), "photo_id": part.column("photo_id"),
                               "file": _repeated(rel, part.num_rows)}))
    rows = pa.concat_tables(parts) if parts else pa.table({"face_id": pa.array([], pa.string()), "photo_id": pa.array([], pa.string()),
                                                          "file": _repeated("", 0)})
    return rows, codes, int(missing)


def _repeated(rel: str, n: int) -> pa.DictionaryArray:
    """A file name for each of ``n`` rows, dictionary-encoded: one copy of the name, not n (10 M faces' names would take GBs)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([rel], pa.string()))


def _training_sample(parts: list[np.ndarray], lists: int, seed: int = 0) -> np.ndarray:
    """Rows drawn evenly at random from every file's codes, enough to train ``lists`` lists."""
    total = sum(len(p) for p in parts)
    if lists == 0 or total == 0:
        return np.zeros((0, DESCRIPTOR_DIM), np.int8)
    chosen = np.sort(np.random.default_rng(seed).choice(total, min(total, lists * TRAIN_ROWS_PER_LIST), replace=False))
    starts = np.cumsum([0] + [len(p) for p in parts])
    return np.concatenate([p[chosen[(chosen >= lo) & (chosen < hi)] - lo] for p, lo, hi in zip(parts, starts[:-1], starts[1:])])


def _add_parts(index: object, parts: list[np.ndarray], first_id: int) -> None:
    """Add each file's codes with consecutive ids from ``first_id``, letting go of each once added."""
    at = first_id
    while parts:
        codes = parts.pop(0)
        add_codes(index, codes, np.arange(at, at + len(codes), dtype=np.int64))
        at += len(codes)


def build_index(table_root: str, *, rebuild: bool = False, progress: bool = True, nprobe: int | None = None) -> IndexReport:
    """Build (or bring up to date) the identity index of the table's latest version."""
    started = time.perf_counter()
    table = Table(table_root)
    snapshot = table.snapshot()
    files = derived.base_files(table, snapshot)
    previous = derived.latest(table, INDEX_KIND)
    if previous is not None and not rebuild and previous.current_for(table, snapshot) and not derived.verify(table, previous):
        return IndexReport(previous.number, previous.table_version, previous.rows, 0, 0, int(previous.params.get("without_descriptor", 0)),
                           False, True, int(previous.params.get("lists", 0)), time.perf_counter() - started)
    loaded = None
    if previous is not None and not rebuild:
        try:
            loaded = load(table, previous)
        except TableCorruptError as exc:
            log.warning("rebuilding the identity index: %s", exc)
    if loaded is not None:
        gone_files = set(loaded.generation.covers) - set(files)
        keep = (~pc.is_in(loaded.files, value_set=pa.array(sorted(gone_files), pa.string())).to_numpy(zero_copy_only=False)
                if gone_files else np.ones(len(loaded.ids), bool))
        new_rows, new_codes, missing = _read_faces(table, [f for f in files if f not in set(loaded.generation.covers)], progress)
        faces = int(keep.sum()) + len(new_rows)
        grown = faces > REBUILD_GROWTH * max(1, int(loaded.generation.params.get("trained_rows", 1)))
        if grown and lists_for(faces) != int(loaded.generation.params.get("lists", 0)):
            log.info("the index grew past %gx the faces its lists were trained on: rebuilding", REBUILD_GROWTH)
            loaded = None
    if loaded is None:
        new_rows, new_codes, missing = _read_faces(table, files, progress)
        lists = lists_for(len(new_rows))
        index = new_index(_training_sample(new_codes, lists), lists)
        _add_parts(index, new_codes, 0)
        rows = new_rows.append_column("id", pa.array(np.arange(len(new_rows), dtype=np.int64)))
        params = {"lists": lists, "trained_rows": len(new_rows), "nprobe": nprobe or default_nprobe(lists), "next_id": len(new_rows),
                  "step": DESCRIPTOR_STEP, "without_descriptor": missing}
        gen = _write_full(table, snapshot.version, files, index, rows, params)
        return IndexReport(gen.number, gen.table_version, rows.num_rows, len(new_rows), 0, missing, True, False, lists,
                           time.perf_counter() - started)
    first = int(loaded.generation.params["next_id"])
    codes = np.concatenate(new_codes) if new_codes else np.zeros((0, DESCRIPTOR_DIM), np.int8)
    fresh = new_rows.append_column("id", pa.array(np.arange(first, first + len(new_rows), dtype=np.int64)))
    params = {**loaded.generation.params, "next_id": first + len(new_rows), "nprobe": nprobe or loaded.generation.params["nprobe"],
              "without_descriptor": int(loaded.generation.params.get("without_descriptor", 0)) + missing}
    removed = int((~keep).sum())
    gen = _write_update(table, snapshot.version, files, loaded, keep, fresh, codes, params)
    return IndexReport(gen.number, gen.table_version, gen.rows, len(new_rows), removed, int(params["without_descriptor"]), False, False,
                       int(params["lists"]), time.perf_counter() - started)


def _codes_column(codes: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(codes, np.int8).ravel(), pa.int8()), DESCRIPTOR_DIM)


def _write_full(table: Table, version: int, files: list[str], index: object, rows: pa.Table, params: dict) -> Generation:
    with tempfile.TemporaryDirectory(prefix="facetier-index-") as tmp:
        index_path, faces_path = Path(tmp) / "index.faiss", Path(tmp) / "faces.parquet"
        _faiss().write_index(index, str(index_path))
        pq.write_table(rows.select(_ID_MAP.names).sort_by("id"), faces_path, compression="zstd")
        return derived.write_generation(table, INDEX_KIND, table_version=version, covers=files,
                                        files={"index": index_path, "faces": faces_path}, rows=rows.num_rows,
                                        params={**params, "base_next_id": params["next_id"], "base_rows": rows.num_rows})


def _write_update(table: Table, version: int, files: list[str], loaded: LoadedIndex, keep: np.ndarray, fresh: pa.Table,
                  codes: np.ndarray, params: dict) -> Generation:
    """A generation for ``loaded`` less the rows not kept plus ``fresh``: a small delta beside the previous
    generation's base files while the changes since the base stay under DELTA_FRACTION of it (adding
    10 k faces to 10 M then writes 10 k rows, not 1.3 GB), else the whole index again."""
    base_next = int(loaded.generation.params.get("base_next_id", loaded.generation.params["next_id"]))
    gone = loaded.ids[~keep]
    added = pa.concat_tables([t.cast(_ADDED) for t in (_kept_added(loaded, gone), fresh.append_column("code", _codes_column(codes)))
                              if t is not None])
    removed = np.union1d(loaded.removed if loaded.removed is not None else np.zeros(0, np.int64), gone[gone < base_next])
    base_rows = int(loaded.generation.params.get("base_rows", loaded.generation.rows))
    faces = len(loaded.ids) - len(gone) + fresh.num_rows
    if added.num_rows + len(removed) <= DELTA_FRACTION * base_rows:
        with tempfile.TemporaryDirectory(prefix="facetier-index-") as tmp:
            added_path, removed_path = Path(tmp) / "added.parquet", Path(tmp) / "removed.parquet"
            pq.write_table(added.sort_by("id"), added_path, compression="zstd")
            pq.write_table(pa.table({"id": pa.array(removed, pa.int64())}), removed_path, compression="zstd")
            return derived.write_generation(table, INDEX_KIND, table_version=version, covers=files,
                                            files={"added": added_path, "removed": removed_path}, rows=faces, params=params,
                                            reuse=(loaded.generation, ("index", "faces")))
    index = loaded.index
    remove_ids(index, gone)
    add_codes(index, codes, np.asarray(fresh.column("id"), np.int64))
    old = pa.table({"face_id": loaded.face_ids, "photo_id": loaded.photo_ids, "file": loaded.files, "id": pa.array(loaded.ids)})
    return _write_full(table, version, files, index,
                       pa.concat_tables([old.filter(pa.array(keep)).cast(_ID_MAP), fresh.select(_ID_MAP.names).cast(_ID_MAP)]), params)


def _kept_added(loaded: LoadedIndex, gone: np.ndarray) -> pa.Table | None:
    if loaded.added is None:
        return None
    return loaded.added.filter(pa.array(~np.isin(np.asarray(loaded.added.column("id"), np.int64), gone)))


def load(table: Table, gen: Generation) -> LoadedIndex:
    """A generation's faiss index and id map, each file's digest verified; a delta generation's
    added faces put in and removed ones taken out."""
    faiss = _faiss()
    with derived.local_copy(table, gen, "index") as path:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise TableCorruptError(f"{table.uri(gen.files['index'])}: the identity index cannot be read ({exc})") from exc
    with derived.local_copy(table, gen, "faces") as path:
        faces = pq.read_table(path, read_dictionary=["file"])
    added = removed = None
    if "added" in gen.files:
        with derived.local_copy(table, gen, "added") as path:
            added = pq.read_table(path, read_dictionary=["file"])
        with derived.local_copy(table, gen, "removed") as path:
            removed = np.asarray(pq.read_table(path).column("id"), np.int64)
        ids = np.asarray(added.column("id"), np.int64)
        add_codes(index, added.column("code").combine_chunks().flatten().to_numpy().reshape(-1, DESCRIPTOR_DIM), ids)
        if len(removed):
            remove_ids(index, removed)
            faces = faces.filter(pa.array(~np.isin(np.asarray(faces.column("id"), np.int64), removed)))
        faces = pa.concat_tables([faces.select(_ID_MAP.names).cast(_ID_MAP),
                                  added.select(_ID_MAP.names).cast(_ID_MAP)])
    if hasattr(index, "nprobe"):
        index.nprobe = int(gen.params.get("nprobe", 1))
    return LoadedIndex(gen, index, np.asarray(faces.column("id"), np.int64), faces.column("face_id").combine_chunks(),
                       faces.column("photo_id").combine_chunks(), _files(faces.column("file")), added, removed)


def _files(column: pa.ChunkedArray) -> pa.DictionaryArray:
    """The id map's file column as one dictionary array (an old generation stored it as plain strings)."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(column)
    return column.unify_dictionaries().combine_chunks() if column.num_chunks else _repeated("", 0)


def current_index(table: Table, snapshot: Snapshot) -> tuple[LoadedIndex | None, str]:
    """The index for ``snapshot`` when one is current, else None; and a line saying which, and why."""
    gens = derived.generations(table, INDEX_KIND)
    if not gens:
        return None, "no identity index (`facetier index` builds one): scanning the base family"
    for gen in reversed(gens):
        if gen.current_for(table, snapshot):
            try:
                return load(table, gen), f"identity index generation {gen.number} (version {gen.table_version}, {gen.rows} faces)"
            except TableCorruptError as exc:  # the base family still answers: scan, and say why
                log.warning("%s", exc)
                return None, f"the identity index is damaged ({exc}): scanning the base family"
    newest = gens[-1]
    return None, (f"the identity index (generation {newest.number}) covers version {newest.table_version}, not {snapshot.version}: "
                  "scanning the base family (`facetier index` brings it up to date)")


def search_index(loaded: LoadedIndex, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None,
                 nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances in descriptor units, rows of the id map; -1 where fewer than k) of the ``k`` nearest
    stored faces to each (m, 128) int8 query; ``allowed``: faiss ids the answer may hold."""
    faiss = _faiss()
    q = np.ascontiguousarray(queries, np.float32).reshape(-1, DESCRIPTOR_DIM)
    params, _keep = _params(loaded, allowed, nprobe)  # _keep: faiss's selector must outlive the search
    d2, ids = loaded.index.search(q, k, params=params) if params is not None else loaded.index.search(q, k)
    rows = np.where(ids >= 0, loaded.rows_of(np.maximum(ids, 0)), -1)
    return np.sqrt(np.maximum(d2, 0)) * DESCRIPTOR_STEP, rows


def within_index(loaded: LoadedIndex, query: np.ndarray, radius: float, *, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, id-map rows) of every indexed face within ``radius`` of one query (in the lists probed)."""
    q = np.ascontiguousarray(query, np.float32).reshape(1, DESCRIPTOR_DIM)
    # faiss's L2 range search is strict (d < r): nudge so a face at exactly the radius is in
    r2 = float((radius / DESCRIPTOR_STEP) ** 2) * (1 + 1e-6)
    params, _keep = _params(loaded, allowed, None)
    lims, d2, ids = loaded.index.range_search(q, r2, params=params) if params is not None else loaded.index.range_search(q, r2)
    order = np.lexsort((ids, d2))
    return np.sqrt(d2[order]) * DESCRIPTOR_STEP, loaded.rows_of(ids[order])


def _params(loaded: LoadedIndex, allowed: np.ndarray | None, nprobe: int | None) -> tuple[object | None, object | None]:
    """faiss search parameters (None: the index's own), and the selector they point to."""
    faiss = _faiss()
    sel = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64)) if allowed is not None else None
    if hasattr(loaded.index, "nprobe"):
        if sel is None and nprobe is None:
            return None, None
        p = faiss.SearchParametersIVF(nprobe=nprobe or loaded.nprobe)
        if sel is not None:
            p.sel = sel
        return p, sel
    return (faiss.SearchParameters(sel=sel), sel) if sel is not None else (None, None)
