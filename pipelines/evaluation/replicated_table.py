"""A larger table made of a real one's rows, for scale measurements (memory, planning, queries).

Copy ``k`` renames every photo id ``p`` to ``p + "r<k>"`` (face ids follow: ``<photo id>-<index>``)
in every committed family file, under new file names; everything else is the real rows, so
decodes, queries and selections cost what they would on real faces. The renamed originals no
longer hash to their photo ids: such a table measures, it does not restore source files.
"""
from __future__ import annotations

import posixpath

import pyarrow as pa
from facetier.io.commit import commit
from facetier.io.reader import family_files, read_file
from facetier.io.table import ALL_FAMILIES, ShardEntry, Table, recorded_digest
from tqdm import tqdm


def _renamed(t: pa.Table, suffix: str) -> pa.Table:
    for name in ("photo_id", "face_id"):
        if name not in t.column_names:
            continue
        values = t.column(name).to_pylist()
        if name == "photo_id":
            new = [None if v is None else v + suffix for v in values]
        else:
            new = [None if v is None else f"{v.rsplit('-', 1)[0]}{suffix}-{v.rsplit('-', 1)[1]}" for v in values]
        t = t.set_column(t.column_names.index(name), name, pa.array(new, pa.string()))
    return t


def replicate_table(src_root: str, dst_root: str, copies: int) -> int:
    """Write ``copies`` renamed copies of ``src_root``'s committed files as one new commit of ``dst_root``; returns its faces."""
    src, dst = Table(src_root), Table(dst_root)
    snapshot = src.snapshot()
    files = {fam: family_files(src, fam, snapshot) for fam in ALL_FAMILIES}
    entries = []
    for k in tqdm(range(copies), desc="replicate", unit="copy"):
        suffix = f"r{k}"
        by_shard: dict[str, ShardEntry] = {}
        for family, rels in files.items():
            for rel in rels:
                data = read_file(src, rel, family)
                name = posixpath.basename(rel)
                digest = recorded_digest(name)  # a shard's files share their stem, not their digests
                shard_id = f"{name[: -len(f'.{digest}.parquet' if digest else '.parquet')]}-{suffix}"
                e = by_shard.setdefault(shard_id, ShardEntry(shard_id, "replica", "replica", {}, {}, {}))
                e.files[family], e.nbytes[family], e.file_stats[family] = dst.write_family(family, shard_id, _renamed(data, suffix), "replica", "replica")
                e.rows[family] = data.num_rows
        entries += by_shard.values()
    commit(dst, dst.snapshot_or_empty().version, entries)
    return sum(e.rows.get("faces", 0) for e in entries)
