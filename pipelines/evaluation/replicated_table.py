"""A larger table made of a real one's rows, for scale measurements (memory, planning, queries).

Copy ``k`` renames every photo id ``p`` to ``p + "r<k>"`` (face ids follow: ``<photo id>-<index>``)
in every family file of every shard, under new shard ids; everything else is the real rows, so
decodes, queries and selections cost what they would on real faces. The renamed originals no
longer hash to their photo ids: such a table measures, it does not restore source files.
"""
from __future__ import annotations

import pyarrow as pa
from facetier.io.reader import read_file
from facetier.io.table import ShardEntry, Table
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
    """Write ``copies`` renamed copies of ``src_root``'s committed shards as one new table; returns its faces."""
    src, dst = Table(src_root), Table(dst_root)
    manifest = src.manifest()
    entries = []
    for k in tqdm(range(copies), desc="replicate", unit="copy"):
        suffix = f"r{k}"
        for s in manifest.shards:
            shard_id = f"{s.shard_id}-{suffix}"
            files, nbytes = {}, {}
            for family, rel in s.files.items():
                files[family], nbytes[family] = dst.write_family(family, shard_id, _renamed(read_file(src, rel, family), suffix), s.codec_id, s.weights_hash)
            entries.append(ShardEntry(shard_id, s.codec_id, s.weights_hash, files, dict(s.rows), nbytes, tuple(p + suffix for p in s.photo_ids), dict(s.stats)))
    dst.commit(dst.manifest_or_empty().version, entries)
    return sum(e.rows.get("faces", 0) for e in entries)
