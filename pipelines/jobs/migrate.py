"""``facetier migrate``: a table an older facetier published through JSON manifests becomes Delta tables.

The v1 format kept every family's shard files under the same folders as now and listed them (with
every photo id) in ``_manifest/vNNNNNNNN.json``. Migration reads the latest manifest, converts each
listed file to the current schema, writes it beside the old one under a deterministic name, and
commits everything as facetier version 1 through the ordinary commit (so a killed migration is
finished by the next writer, or repeated from the start: the names and the plan are the same).
Conversions: fixed-size lists become lists, ``crc32`` becomes int64, the float32 identity becomes
int8 + scale (facetier.io.identity). v1 had no ``inputs`` family, so the first incremental run after
migration reads those inputs once, finds them by content and records them.

Nothing is deleted: the v1 files become unreferenced and ``facetier vacuum`` removes them once
they are older than its retention window; ``_manifest/`` stays as the record of what was migrated.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

import pyarrow as pa
from tqdm import tqdm

from facetier.errors import TableCorruptError, TableError
from facetier.io.commit import commit, finish_pending
from facetier.io.identity import pack_identity
from facetier.io.table import BASE_FAMILY, LEGACY_MANIFEST_DIR, ShardEntry, Table, family_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MigrationReport:
    table: str
    manifest_version: int  # the v1 version migrated (0: nothing to migrate)
    version: int  # the facetier (Delta) version the table is at afterwards
    shards: int
    rows: dict[str, int]
    already_migrated: bool = False

    def render(self) -> str:
        if self.already_migrated:
            return f"{self.table} is already a Delta table (version {self.version}); nothing to migrate"
        rows = ", ".join(f"{k} {v}" for k, v in sorted(self.rows.items()))
        return (f"{self.table}: manifest version {self.manifest_version} ({self.shards} shards) committed as version {self.version}\n"
                f"rows by family: {rows}\nthe v1 files are now unreferenced: `facetier vacuum` removes them after its retention window")


def latest_manifest(table: Table) -> tuple[int, dict]:
    """(version, body) of the newest v1 manifest."""
    try:
        names = [posixpath.basename(n) for n in table.fs.ls(table._p(LEGACY_MANIFEST_DIR), detail=False)]
    except FileNotFoundError:
        names = []
    versions = sorted(int(n[1:-5]) for n in names if n.startswith("v") and n.endswith(".json") and n[1:-5].isdigit())
    if not versions:
        raise TableError(f"{table.root} has no v1 manifest to migrate")
    with table.fs.open(table._p(LEGACY_MANIFEST_DIR, f"v{versions[-1]:08d}.json"), "rb") as fh:
        return versions[-1], json.load(fh)


def conform_v1(family: str, data: pa.Table) -> pa.Table:
    """A v1 file's rows in the family's current schema."""
    schema = family_schema(family)
    n = data.num_rows
    columns = []
    for f in schema:
        if family == BASE_FAMILY and f.name in ("identity", "identity_scale") and "identity" in data.column_names:
            packed = [pack_identity(v) for v in data.column("identity").to_pylist()]
            values = [p[0] if f.name == "identity" else p[1] for p in packed]
            columns.append(pa.array(values, f.type))
        elif f.name in data.column_names:
            columns.append(data.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def migrate_v1(root: str, progress: bool = True) -> MigrationReport:
    table = Table(root, allow_legacy=True)
    finish_pending(table)
    if table.version() > 0:
        return MigrationReport(root, 0, table.version(), 0, {}, already_migrated=True)
    manifest_version, body = latest_manifest(table)
    entries: list[ShardEntry] = []
    totals: dict[str, int] = {}
    for shard in tqdm(body.get("shards", []), desc="migrate", unit="shard", disable=not progress):
        codec_id, weights_hash = shard["codec_id"], shard["weights_hash"]
        entry = ShardEntry(shard["shard_id"], codec_id, weights_hash, {}, {}, {}, tuple(shard.get("photo_ids", ())), dict(shard.get("stats", {})), {})
        for family, rel in sorted(shard["files"].items()):
            try:
                data = table.read_parquet(rel)
            except (OSError, pa.ArrowException) as exc:
                raise TableCorruptError(f"{table.uri(rel)} (listed by manifest v{manifest_version}) cannot be read: {exc}; nothing was migrated") from exc
            if data.num_rows != shard.get("rows", {}).get(family, data.num_rows):
                raise TableCorruptError(f"{table.uri(rel)} holds {data.num_rows} rows, the manifest says {shard['rows'][family]}; nothing was migrated")
            rows = conform_v1(family, data)
            entry.files[family], entry.nbytes[family], entry.file_stats[family] = table.write_family(family, f"{shard['shard_id']}.v1", rows,
                                                                                                   codec_id, weights_hash)
            entry.rows[family] = rows.num_rows
            totals[family] = totals.get(family, 0) + rows.num_rows
        entries.append(entry)
    version = commit(table, 0, entries)
    log.info("migrated %s: manifest v%d, %d shards, committed as version %d", root, manifest_version, len(entries), version)
    return MigrationReport(root, manifest_version, version, len(entries), totals)
