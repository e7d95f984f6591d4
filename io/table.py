"""The facetier table: one Parquet dataset per column family, shards published by a manifest.

Layout under the table root (local path, ``gs://`` or ``s3://``)::

    faces/<shard>.parquet      index: ids, source, box, landmarks, transform, codec identity
    basic/ middle/ enhanced/   one family per generative layer (payload bytes + crc32)
    residual/ original/        the pixel layers (original: one row per photo)
    rejects/<shard>.parquet    inputs that produced no face: error class and message
    aliases/<shard>.parquet    further names of photos whose bytes another name already brought
    _staging/<shard>.json      a shard's stats, written last: the shard's done marker (removed
                               once its run has committed, or found nothing to commit)
    _manifest/v00000001.json   committed versions; the highest one is the table

Shard files are written at their final paths but are invisible until a manifest lists them,
so a killed run leaves the committed table exactly as it was.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from facetier.io.sources import storable_uri

from facetier.errors import ConcurrentCommitError, TableNotFoundError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_DIR = "_manifest"
STAGING_DIR = "_staging"
LAYER_FAMILIES = ("basic", "middle", "enhanced", "residual")
INDEX_FAMILY = "faces"
BASE_FAMILY = "basic"
ORIGINAL_FAMILY = "original"
REJECT_FAMILY = "rejects"
ALIAS_FAMILY = "aliases"
ALL_FAMILIES = (INDEX_FAMILY, *LAYER_FAMILIES, ORIGINAL_FAMILY, REJECT_FAMILY, ALIAS_FAMILY)
PHOTO_FAMILIES = (INDEX_FAMILY, *LAYER_FAMILIES, ORIGINAL_FAMILY, REJECT_FAMILY)  # rows keyed by photo id
# Heavy families get small row groups so a point lookup for one face reads little.
ROW_GROUP_ROWS = {"residual": 64, ORIGINAL_FAMILY: 16}

FACES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("photo_id", pa.string()),
        ("face_index", pa.int32()),
        ("source_uri", pa.string()),
        ("source_uri_raw", pa.binary()),  # the name's bytes when they are not UTF-8 (source_uri then shows \xNN escapes)
        ("box", pa.list_(pa.float32(), 4)),
        ("landmarks", pa.list_(pa.float32(), 10)),
        ("transform", pa.list_(pa.float32(), 6)),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("detector_score", pa.float32()),
        ("codec_id", pa.string()),
        ("weights_hash", pa.string()),
        ("status", pa.string()),
    ]
)
LAYER_SCHEMA = pa.schema([("face_id", pa.string()), ("photo_id", pa.string()), ("payload", pa.binary()), ("nbytes", pa.int32()), ("crc32", pa.uint32())])
# The base family also carries what the semantic basic layer decodes to, so analytics read
# typed columns with no model at query time (null when the model has no semantic layer).
IDENTITY_DIM = 128
ATTRIBUTE_FIELDS = (
    pa.field("age", pa.float32()),
    pa.field("gender", pa.string()),
    pa.field("p_female", pa.float32()),
    pa.field("race", pa.string()),
    pa.field("race_confidence", pa.float32()),
    pa.field("yaw", pa.float32()),
    pa.field("pitch", pa.float32()),
    pa.field("eyes_open", pa.float32()),
    pa.field("mouth_open", pa.float32()),
    pa.field("smile", pa.float32()),
)
BASE_SCHEMA = pa.schema([*LAYER_SCHEMA, *ATTRIBUTE_FIELDS, pa.field("identity", pa.list_(pa.float32(), IDENTITY_DIM))])
ORIGINAL_SCHEMA = pa.schema([("photo_id", pa.string()), ("source_uri", pa.string()), ("source_uri_raw", pa.binary()), ("payload", pa.binary()),
                             ("nbytes", pa.int32()), ("source_bytes", pa.int64())])
REJECT_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_uri_raw", pa.binary()), ("photo_id", pa.string()), ("error_class", pa.string()),
                           ("message", pa.string()), ("codec_id", pa.string()), ("weights_hash", pa.string())])
ALIAS_SCHEMA = pa.schema([("photo_id", pa.string()), ("source_uri", pa.string()), ("source_uri_raw", pa.binary())])


def family_schema(family: str) -> pa.Schema:
    if family == INDEX_FAMILY:
        return FACES_SCHEMA
    if family == ORIGINAL_FAMILY:
        return ORIGINAL_SCHEMA
    if family == REJECT_FAMILY:
        return REJECT_SCHEMA
    if family == ALIAS_FAMILY:
        return ALIAS_SCHEMA
    if family == BASE_FAMILY:
        return BASE_SCHEMA
    return LAYER_SCHEMA


_RAW_KEY = "\x00raw:"  # no file name starts with NUL


def key_to_json(key: str) -> str:
    """A source key as valid Unicode for JSON: names that are not UTF-8 as the base64 of their bytes."""
    try:
        key.encode("utf-8")
        return key
    except UnicodeEncodeError:
        return _RAW_KEY + base64.b64encode(key.encode("utf-8", "surrogatepass")).decode("ascii")


def key_from_json(text: str) -> str:
    return base64.b64decode(text[len(_RAW_KEY):]).decode("utf-8", "surrogatepass") if text.startswith(_RAW_KEY) else text


@dataclass(frozen=True)
class ShardEntry:
    shard_id: str
    codec_id: str
    weights_hash: str
    files: dict[str, str]  # family -> path relative to the table root
    rows: dict[str, int]
    nbytes: dict[str, int]
    photo_ids: tuple[str, ...] = field(default=(), repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    # rejected before any byte was hashed, for what the name is (an unsafe archive member): done
    unread_sources: tuple[str, ...] = field(default=(), repr=False)
    # rejected because reading failed (permissions, a dangling link, a mount): tried again next run
    retry_sources: tuple[str, ...] = field(default=(), repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "codec_id": self.codec_id, "weights_hash": self.weights_hash, "files": self.files,
                "rows": self.rows, "nbytes": self.nbytes, "photo_ids": list(self.photo_ids), "stats": self.stats,
                "unread_sources": [key_to_json(k) for k in self.unread_sources], "retry_sources": [key_to_json(k) for k in self.retry_sources]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> ShardEntry:
        return ShardEntry(d["shard_id"], d["codec_id"], d["weights_hash"], dict(d["files"]), dict(d["rows"]), dict(d["nbytes"]),
                          tuple(d.get("photo_ids", ())), dict(d.get("stats", {})), tuple(key_from_json(k) for k in d.get("unread_sources", ())),
                          tuple(key_from_json(k) for k in d.get("retry_sources", ())))


@dataclass(frozen=True)
class Manifest:
    version: int
    shards: tuple[ShardEntry, ...]

    def files(self, family: str) -> list[str]:
        return [s.files[family] for s in self.shards if family in s.files]

    def photo_ids(self, weights_hash: str | None = None) -> set[str]:
        return {p for s in self.shards if weights_hash is None or s.weights_hash == weights_hash for p in s.photo_ids}

    def unread_sources(self, weights_hash: str) -> set[str]:
        return {u for s in self.shards if s.weights_hash == weights_hash for u in s.unread_sources}


class Table:
    """A table root on any fsspec filesystem."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    # --- manifest -------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        try:
            names = self.fs.ls(self._p(MANIFEST_DIR), detail=False)
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            base = posixpath.basename(n)
            if base.startswith("v") and base.endswith(".json"):
                out.append(int(base[1:-5]))
        return sorted(out)

    def exists(self) -> bool:
        return bool(self.versions())

    def manifest(self, version: int | None = None) -> Manifest:
        versions = self.versions()
        if not versions:
            raise TableNotFoundError(f"no committed facetier table at {self.root}")
        v = versions[-1] if version is None else version
        with self.fs.open(self._p(MANIFEST_DIR, f"v{v:08d}.json"), "rb") as fh:
            d = json.load(fh)
        return Manifest(int(d["version"]), tuple(ShardEntry.from_json(s) for s in d["shards"]))

    def manifest_or_empty(self) -> Manifest:
        return self.manifest() if self.exists() else Manifest(0, ())

    def commit(self, base_version: int, shards: list[ShardEntry]) -> Manifest:
        """Publish ``shards`` as version ``base_version + 1``; fails if someone else committed first."""
        new = Manifest(base_version + 1, tuple(sorted(shards, key=lambda s: s.shard_id)))
        body = json.dumps({"version": new.version, "schema_version": SCHEMA_VERSION, "shards": [s.to_json() for s in new.shards]}, indent=1).encode()
        target = self._p(MANIFEST_DIR, f"v{new.version:08d}.json")
        self.fs.makedirs(self._p(MANIFEST_DIR), exist_ok=True)
        if _is_local(self.fs):
            # the whole body first, then a hard link under the version's name: creating the name is
            # atomic and exclusive, and a kill at any point never leaves a half-written version
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                _link_exclusive(tmp, target)
            except FileExistsError:
                raise ConcurrentCommitError(f"version {new.version} of {self.root} was committed by another run; rerun to add what is missing") from None
            finally:
                os.unlink(tmp)
        else:
            # Object stores: check, write, then read back; the loser of a race sees another body.
            if self.fs.exists(target):
                raise ConcurrentCommitError(f"version {new.version} of {self.root} was committed by another run; rerun to add what is missing")
            self.fs.pipe_file(target, body)
            self.fs.invalidate_cache()
            if self.fs.cat_file(target) != body:
                raise ConcurrentCommitError(f"version {new.version} of {self.root} was overwritten by a concurrent run")
        return new

    # --- shards ---------------------------------------------------------------------------------
    def write_family(self, family: str, shard_id: str, table: pa.Table, codec_id: str, weights_hash: str) -> tuple[str, int]:
        rel = f"{family}/{shard_id}.parquet"
        meta = {b"facetier_schema_version": str(SCHEMA_VERSION).encode(), b"facetier_family": family.encode(),
                b"facetier_codec_id": codec_id.encode(), b"facetier_weights_hash": weights_hash.encode()}
        table = table.replace_schema_metadata(meta)
        self.fs.makedirs(self._p(family), exist_ok=True)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS.get(family, 65536))
        self._put(self._p(rel), buf.getvalue().to_pybytes())
        return rel, int(self.fs.size(self._p(rel)))

    def done_marker(self, shard_id: str) -> dict[str, Any] | None:
        p = self._p(STAGING_DIR, f"{shard_id}.json")
        try:
            with self.fs.open(p, "rb") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except ValueError:  # cut short by a kill on a filesystem without atomic writes: the shard is not done
            log.warning("ignoring the unreadable done marker %s; its shard runs again", self.uri(f"{STAGING_DIR}/{shard_id}.json"))
            return None

    def write_done_marker(self, entry: ShardEntry) -> None:
        self.fs.makedirs(self._p(STAGING_DIR), exist_ok=True)
        self._put(self._p(STAGING_DIR, f"{entry.shard_id}.json"), json.dumps(entry.to_json()).encode())

    def _put(self, path: str, body: bytes) -> None:
        """Write a whole file so that no reader ever sees part of it: a rename on local disk, one PUT on object stores."""
        if _is_local(self.fs):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)

    def remove_done_markers(self, shard_ids: list[str]) -> None:
        """Forget finished shards once their run has committed (or found nothing to commit): a later run
        must read its inputs again, so content that changed under an unchanged name is seen."""
        self.remove_files([f"{STAGING_DIR}/{s}.json" for s in shard_ids])

    def remove_files(self, rels: list[str]) -> None:
        """Delete files (paths relative to the root) that may already be gone."""
        for rel in rels:
            try:
                self.fs.rm_file(self._p(rel))
            except FileNotFoundError:
                pass

    def rewrite_shard(self, entry: ShardEntry, tag: str, *, drop_photo_ids: frozenset[str] = frozenset(),
                      drop_retried: frozenset[str] = frozenset(), alias_dropped: bool = False) -> ShardEntry:
        """A copy of a shard without the rows of ``drop_photo_ids`` (every family) and the rejects of its
        ``retry_sources`` that are in ``drop_retried`` (read again by a later run); with ``alias_dropped`` the
        dropped rows' names become rows of ``aliases``.

        New files are written beside the old ones (``<shard>.<tag>.parquet``, ``tag`` unique to the run); the
        old ones stay referenced by the earlier versions.
        """
        files, rows, nbytes, aliases = dict(entry.files), dict(entry.rows), dict(entry.nbytes), []
        dropping = set(PHOTO_FAMILIES) if drop_photo_ids & set(entry.photo_ids) else set()
        if drop_retried & set(entry.retry_sources):
            dropping.add(REJECT_FAMILY)
        for family, rel in entry.files.items():
            if family not in dropping:  # e.g. a retried reject: the heavy layer files are not read at all
                continue
            with self.fs.open(self._p(rel), "rb") as fh:
                data = pq.read_table(fh)
            keep = [True] * data.num_rows
            pids = data.column("photo_id").to_pylist() if "photo_id" in data.column_names else [None] * data.num_rows
            if family in PHOTO_FAMILIES:
                keep = [p not in drop_photo_ids for p in pids]
            retried = {storable_uri(k) for k in drop_retried & set(entry.retry_sources)}
            if family == REJECT_FAMILY and retried:
                stored = zip(data.column("source_uri").to_pylist(), data.column("source_uri_raw").to_pylist())
                keep = [k and not (p is None and (u, raw) in retried) for k, p, (u, raw) in zip(keep, pids, stored)]
            if all(keep):
                continue
            if alias_dropped and family in (INDEX_FAMILY, REJECT_FAMILY):
                gone = data.filter(pa.array([not k for k in keep]))
                aliases += [{"photo_id": r["photo_id"], "source_uri": r["source_uri"], "source_uri_raw": r["source_uri_raw"]}
                            for r in gone.select(["photo_id", "source_uri", "source_uri_raw"]).to_pylist()]
            kept = data.filter(pa.array(keep))
            files[family], nbytes[family] = self.write_family(family, f"{entry.shard_id}.{tag}", kept, entry.codec_id, entry.weights_hash)
            rows[family] = kept.num_rows
        if aliases:
            old = []
            if ALIAS_FAMILY in entry.files:
                with self.fs.open(self._p(entry.files[ALIAS_FAMILY]), "rb") as fh:
                    old = pq.read_table(fh).to_pylist()
            unique = {(a["photo_id"], a["source_uri"]): a for a in old + aliases}
            table = pa.Table.from_pylist(sorted(unique.values(), key=lambda a: (a["photo_id"], a["source_uri"])), schema=ALIAS_SCHEMA)
            files[ALIAS_FAMILY], nbytes[ALIAS_FAMILY] = self.write_family(ALIAS_FAMILY, f"{entry.shard_id}.{tag}", table, entry.codec_id, entry.weights_hash)
            rows[ALIAS_FAMILY] = table.num_rows
        stats = dict(entry.stats)
        stats["faces"] = rows.get(INDEX_FAMILY, 0)
        stats["aliases"] = rows.get(ALIAS_FAMILY, 0)
        return ShardEntry(entry.shard_id, entry.codec_id, entry.weights_hash, files, rows, nbytes,
                          tuple(p for p in entry.photo_ids if p not in drop_photo_ids), stats, entry.unread_sources,
                          tuple(u for u in entry.retry_sources if u not in drop_retried))

    def referenced_files(self) -> set[str]:
        """Every family file any committed version lists (relative paths): what time travel and readers may need."""
        return {rel for v in self.versions() for s in self.manifest(v).shards for rel in s.files.values()}

    def stored_files(self) -> dict[str, dict[str, Any]]:
        """Family files and done markers on storage (relative path -> fsspec info), whatever references them."""
        out = {}
        for folder in (*ALL_FAMILIES, STAGING_DIR):
            try:
                found = self.fs.find(self._p(folder), detail=True)
            except FileNotFoundError:
                continue
            for path, info in found.items():
                out[posixpath.relpath(path, self.path)] = info
        return out

    def family_bytes(self, manifest: Manifest | None = None) -> dict[str, int]:
        m = manifest or self.manifest()
        out: dict[str, int] = {}
        for s in m.shards:
            for fam, n in s.nbytes.items():
                out[fam] = out.get(fam, 0) + n
        return out


def _link_exclusive(tmp: str, target: str) -> None:
    """Give ``tmp`` the name ``target`` only if nothing has it: a hard link (atomic and whole), or, where the
    filesystem has no hard links (some FUSE, SMB, exFAT mounts), an exclusive create and copy."""
    try:
        os.link(tmp, target)
        return
    except FileExistsError:
        raise
    except OSError:
        pass
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as out, open(tmp, "rb") as src:
        out.write(src.read())
        out.flush()
        os.fsync(out.fileno())


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return proto in ("file", "local")
