"""The facetier table: one Delta Lake table per column family under one root.

Layout under the table root (local path, ``gs://`` or ``s3://``)::

    faces/                     index: ids, source, box, landmarks, transform, codec identity
    basic/ middle/ enhanced/   one family per generative layer (payload bytes + crc32)
    preview/ detail/ residual/ the layers for people: rungs of the face, then the face at full resolution
    original/                  the source files, byte for byte (one row per photo)
    rejects/                   inputs that produced no face: error class and message
    aliases/                   further names of photos whose bytes another name already brought
    inputs/                    every input each model consumed: name, source key, outcome (incremental planning)
    _commits/                  one row per facetier commit: the claim that orders racing writers, and its plan
    _staging/<shard>.json      a shard's done marker (its files and their Delta statistics)
    _staging/commits/*.json    the plan of a commit in flight, removed once every family has it

Each family directory is a Delta table any Delta reader opens (Spark, DuckDB, BigQuery through
BigLake). Workers write a shard's Parquet files straight into the family directories, where they
are invisible until a commit adds them; :mod:`facetier.io.commit` publishes them.

Every file facetier writes is named after its content: ``<name>.<digest>.parquet``, the digest the
first 32 hex digits of the SHA-256 of its bytes. The name is what the Delta log records (its add
action's path, kept by every checkpoint and every reader), so ``facetier check`` verifies any file
against the log that references it, and a byte flipped anywhere in a file is seen. (Delta's own
``tags`` on an add action would be the natural home, but the Python writer does not expose them.)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFoundError
from facetier.io.storage import delta_storage_options, storage_error

from facetier.errors import LegacyTableError, TableCorruptError, TableNotFoundError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
STAGING_DIR = "_staging"
PLANS_DIR = f"{STAGING_DIR}/commits"
COMMITS_TABLE = "_commits"
LEGACY_MANIFEST_DIR = "_manifest"  # facetier's v1 format: the shard list in JSON (facetier.pipelines.jobs.migrate)
APP_ID = "facetier"  # the application transaction whose version is the facetier table version
LAYER_FAMILIES = ("basic", "middle", "enhanced", "preview", "detail", "residual")
INDEX_FAMILY = "faces"
BASE_FAMILY = "basic"
ORIGINAL_FAMILY = "original"
REJECT_FAMILY = "rejects"
ALIAS_FAMILY = "aliases"
INPUTS_FAMILY = "inputs"
ALL_FAMILIES = (INDEX_FAMILY, *LAYER_FAMILIES, ORIGINAL_FAMILY, REJECT_FAMILY, ALIAS_FAMILY, INPUTS_FAMILY)
PHOTO_FAMILIES = (INDEX_FAMILY, *LAYER_FAMILIES, ORIGINAL_FAMILY, REJECT_FAMILY)  # rows keyed by photo id
# Heavy families first and the base family after them: a face a reader sees in `basic` has every other
# layer its run wrote already committed; `inputs` last, so an input a planner sees as held is held whole.
COMMIT_ORDER = (ORIGINAL_FAMILY, "residual", "detail", "preview", "enhanced", "middle", ALIAS_FAMILY, REJECT_FAMILY, INDEX_FAMILY, BASE_FAMILY, INPUTS_FAMILY)
# Heavy families get small row groups so a point lookup for one face reads little.
ROW_GROUP_ROWS = {"preview": 256, "detail": 128, "residual": 64, ORIGINAL_FAMILY: 16}

FACES_SCHEMA = pa.schema(
    [
        ("face_id", pa.string()),
        ("photo_id", pa.string()),
        ("face_index", pa.int32()),
        ("source_uri", pa.string()),
        ("source_uri_raw", pa.binary()),  # the name's bytes when they are not UTF-8 (source_uri then shows \xNN escapes)
        ("box", pa.list_(pa.float32())),
        ("landmarks", pa.list_(pa.float32())),
        ("transform", pa.list_(pa.float32())),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("detector_score", pa.float32()),
        ("codec_id", pa.string()),
        ("weights_hash", pa.string()),
        ("status", pa.string()),
    ]
)
LAYER_SCHEMA = pa.schema([("face_id", pa.string()), ("photo_id", pa.string()), ("payload", pa.binary()), ("nbytes", pa.int32()), ("crc32", pa.int64())])
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
# identity: int8 components with a float32 scale per row (facetier.io.identity), 132 B instead of 512;
# descriptor: dlib's descriptor of the crop at one fixed step (128 B), what persons and search use
BASE_SCHEMA = pa.schema([*LAYER_SCHEMA, *ATTRIBUTE_FIELDS, pa.field("identity", pa.list_(pa.int8())), pa.field("identity_scale", pa.float32()),
                         pa.field("descriptor", pa.list_(pa.int8()))])
ORIGINAL_SCHEMA = pa.schema([("photo_id", pa.string()), ("source_uri", pa.string()), ("source_uri_raw", pa.binary()), ("payload", pa.binary()),
                             ("nbytes", pa.int32()), ("source_bytes", pa.int64())])
REJECT_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_uri_raw", pa.binary()), ("photo_id", pa.string()), ("error_class", pa.string()),
                           ("message", pa.string()), ("codec_id", pa.string()), ("weights_hash", pa.string())])
ALIAS_SCHEMA = pa.schema([("photo_id", pa.string()), ("source_uri", pa.string()), ("source_uri_raw", pa.binary())])
# One row per input a model consumed: what lets a later run skip it unread. ``source_key`` hashes the name
# and the listing's fingerprint (facetier.io.sources.source_key); compaction sorts by name, so the
# files' name ranges let planning open only files whose range holds a name it lists.
# outcome: "stored" (its photo's rows are under this name), "alias" (under another name) or "rejected" (see rejects);
# layers: the layers the run that consumed it stored, comma-separated (null: written before the column, taken as every layer)
INPUTS_SCHEMA = pa.schema([("source_uri", pa.string()), ("source_uri_raw", pa.binary()), ("source_key", pa.int64()), ("photo_id", pa.string()),
                           ("weights_hash", pa.string()), ("outcome", pa.string()), ("error_class", pa.string()), ("layers", pa.string())])
COMMITS_SCHEMA = pa.schema([("version", pa.int64()), ("job", pa.string()), ("plan", pa.string()), ("families", pa.string())])


DIGEST_CHARS = 32
_DIGEST_NAME = re.compile(r"\.([0-9a-f]{%d})\.parquet$" % DIGEST_CHARS)


def content_digest(body: bytes) -> str:
    """What a file's name records of its bytes: the first 32 hex digits of their SHA-256."""
    return hashlib.sha256(body).hexdigest()[:DIGEST_CHARS]


def recorded_digest(rel: str) -> str | None:
    """The digest a file's name records, or None for a file named without one (written before facetier
    recorded digests, or by another Delta writer: compaction before it is sealed, Spark)."""
    m = _DIGEST_NAME.search(rel)
    return m.group(1) if m else None


def digest_name(family: str, stem: str, body: bytes) -> str:
    """The path (relative to the root) of a family file holding ``body``."""
    return f"{family}/{stem}.{content_digest(body)}.parquet"


def family_schema(family: str) -> pa.Schema:
    return {INDEX_FAMILY: FACES_SCHEMA, ORIGINAL_FAMILY: ORIGINAL_SCHEMA, REJECT_FAMILY: REJECT_SCHEMA, ALIAS_FAMILY: ALIAS_SCHEMA,
            INPUTS_FAMILY: INPUTS_SCHEMA, BASE_FAMILY: BASE_SCHEMA, COMMITS_TABLE: COMMITS_SCHEMA}.get(family, LAYER_SCHEMA)


_LONGEST_BOUND = 1024


def file_stats(table: pa.Table) -> str:
    """Delta's per-file statistics (row count, min, max, null count of the flat typed columns) as JSON:
    what lets a reader skip files whose range cannot hold the ids or values it looks for."""
    lo, hi, nulls = {}, {}, {}
    for name, col in zip(table.column_names, table.columns):
        if not (pa.types.is_string(col.type) or pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            continue
        nulls[name] = col.null_count
        if pa.types.is_string(col.type) and (pc.max(pc.utf8_length(col)).as_py() or 0) > _LONGEST_BOUND:
            continue  # a commit's plan: a bound no reader prunes by, and it would sit in the log twice
        if col.null_count < len(col):
            mm = pc.min_max(col)
            lo[name], hi[name] = mm["min"].as_py(), mm["max"].as_py()
            if isinstance(lo[name], float) and (lo[name] != lo[name] or hi[name] != hi[name]):  # NaN: no usable bound
                del lo[name], hi[name]
    return json.dumps({"numRecords": table.num_rows, "minValues": lo, "maxValues": hi, "nullCount": nulls})


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextmanager
def reading_log(dt: DeltaTable) -> Iterator[None]:
    """Delta parses parts of a log only when asked (transactions, file actions, history): damage found
    then is a :class:`TableCorruptError` naming the log, like damage found on opening it."""
    try:
        yield
    except DeltaError as exc:
        raise TableCorruptError(f"the Delta log of {dt.table_uri} cannot be read: {_first_line(exc)}; `facetier check` says what is damaged") from exc


def facetier_version(dt: DeltaTable) -> int:
    """The last facetier commit a Delta table (a family, or ``_commits``) has applied; 0 for none."""
    with reading_log(dt):
        return int(dt.transaction_version(APP_ID) or 0)


def add_actions(dt: DeltaTable) -> pa.Table:
    """The files of a Delta table version (path, size_bytes, num_records, statistics) as a pyarrow table."""
    with reading_log(dt):
        return pa.table(dt.get_add_actions(flatten=True))


def history(dt: DeltaTable, limit: int | None = None) -> list[dict[str, Any]]:
    """The commits of a Delta table, newest first (their facetier version and job in the custom metadata)."""
    with reading_log(dt):
        return dt.history(limit)


@dataclass(frozen=True)
class ShardEntry:
    """A finished shard, as its done marker records it, until a commit publishes its files."""

    shard_id: str
    codec_id: str
    weights_hash: str
    files: dict[str, str]  # family -> path relative to the table root
    rows: dict[str, int]
    nbytes: dict[str, int]
    photo_ids: tuple[str, ...] = field(default=(), repr=False)
    stats: dict[str, Any] = field(default_factory=dict)
    file_stats: dict[str, str] = field(default_factory=dict, repr=False)  # family -> Delta statistics JSON

    def to_json(self) -> dict[str, Any]:
        return {"shard_id": self.shard_id, "codec_id": self.codec_id, "weights_hash": self.weights_hash, "files": self.files,
                "rows": self.rows, "nbytes": self.nbytes, "photo_ids": list(self.photo_ids), "stats": self.stats, "file_stats": self.file_stats}

    @staticmethod
    def from_json(d: dict[str, Any]) -> ShardEntry:
        return ShardEntry(d["shard_id"], d["codec_id"], d["weights_hash"], dict(d["files"]), dict(d["rows"]), dict(d["nbytes"]),
                          tuple(d.get("photo_ids", ())), dict(d.get("stats", {})), dict(d.get("file_stats", {})))


@dataclass(frozen=True)
class Snapshot:
    """A committed state of the table: the facetier version and the Delta version of each family at it."""

    version: int
    family_versions: dict[str, int]
    # families whose log cannot be read, with why: a reader that needs one fails with that error, the
    # others still serve (a damaged `residual` log does not stop a query of the base family)
    damaged: dict[str, str] = field(default_factory=dict)

    def has(self, family: str) -> bool:
        return family in self.family_versions

    def require(self, family: str) -> None:
        """Raise the damage of ``family``'s log, when it has any (call before treating a family as absent)."""
        if family in self.damaged:
            raise TableCorruptError(self.damaged[family])


class Table:
    """A table root on any fsspec filesystem; the families are Delta tables beneath it."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None, allow_legacy: bool = False) -> None:
        self.root = root.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        self.delta_options = delta_storage_options(self.root)
        self.allow_legacy = allow_legacy  # only `facetier migrate` opens a v1 table

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read_parquet(self, rel: str) -> pa.Table:
        """A whole Parquet file of the table (path relative to the root): one read, parsed from memory.
        Why not ``pq.read_table`` on the open file: Arrow's threads then call back into Python, and
        at interpreter exit the process could abort (see ``reader._read_part``)."""
        with self.fs.open(self._p(rel), "rb") as fh:
            return pq.read_table(pa.BufferReader(fh.read()))

    @property
    def is_local(self) -> bool:
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return proto in ("file", "local")

    # --- Delta tables -----------------------------------------------------------------------------
    def delta_uri(self, family: str) -> str:
        return os.path.abspath(self._p(family)) if self.is_local else self.uri(family)

    def delta(self, family: str, version: int | None = None) -> DeltaTable | None:
        """The family's Delta table (at a Delta version), or None when no commit created it yet.

        A log Delta cannot read (a lost or damaged file in ``_delta_log/``) is a
        :class:`TableCorruptError` naming the family; storage that refuses (no such bucket, no
        credentials, no connection) a :class:`StorageError`."""
        try:
            return DeltaTable(self.delta_uri(family), version=version, storage_options=self.delta_options)
        except DeltaTableNotFoundError:
            return None
        except DeltaError as exc:
            if (refused := storage_error(exc, self.uri(family))) is not None:
                raise refused from exc
            at = "" if version is None else f" at Delta version {version}"
            raise TableCorruptError(f"the {family} family's Delta log ({self.uri(family)}/_delta_log){at} cannot be read: "
                                    f"{_first_line(exc)}; `facetier check {self.root}` says what is damaged") from exc
        except OSError as exc:
            raise storage_error(exc, self.uri(family), always=True) from exc

    def version(self) -> int:
        """The facetier version: how many commits the table has had (0: none)."""
        commits = self.delta(COMMITS_TABLE)
        if commits is None:
            if not self.allow_legacy and self._exists(LEGACY_MANIFEST_DIR):
                # writing a Delta table over it would hide its rows, and vacuum would delete its files
                raise LegacyTableError(f"{self.root} was written by an older facetier (JSON manifests in {LEGACY_MANIFEST_DIR}/): "
                                       f"run `facetier migrate {self.root}` once, then rerun")
            if orphans := [f for f in ALL_FAMILIES if self._exists(f"{f}/_delta_log")]:
                # a new claim log would restart at version 1, and every family that has a version past it would
                # take the new commits for ones it already applied: nothing may write here until a person looks
                raise TableCorruptError(f"{self.root} has no _commits log, yet its families {', '.join(orphans)} hold commits "
                                        "(a lost folder?): restore _commits/ from a backup; facetier will not write or clean here")
            return 0
        return facetier_version(commits)

    def _exists(self, rel: str) -> bool:
        try:
            return self.fs.exists(self._p(rel))
        except OSError as exc:
            raise storage_error(exc, self.uri(rel), always=True) from exc

    def exists(self) -> bool:
        return self.version() > 0

    def snapshot(self, version: int | None = None) -> Snapshot:
        """The latest committed state, or the one of facetier version ``version`` (time travel)."""
        current = self.version()
        if current == 0:
            raise TableNotFoundError(f"no committed facetier table at {self.root}")
        if version is not None and not 1 <= version <= current:
            raise TableNotFoundError(f"{self.root} has versions 1 to {current}, not {version}")
        families, damaged = {}, {}
        for fam in ALL_FAMILIES:
            try:
                if version is None or version == current:
                    dt = self.delta(fam)
                    v = None if dt is None else dt.version()
                else:
                    v = self._family_version_at(fam, version)
            except TableCorruptError as exc:
                damaged[fam] = str(exc)
                continue
            if v is not None:
                families[fam] = v
        return Snapshot(version or current, families, damaged)

    def snapshot_or_empty(self) -> Snapshot:
        try:
            return self.snapshot()
        except TableNotFoundError:  # nothing committed yet
            return Snapshot(0, {})

    def _family_version_at(self, family: str, version: int) -> int | None:
        """The Delta version of ``family`` holding every facetier commit up to ``version``, from the commit metadata."""
        dt = self.delta(family)
        if dt is None:
            return None
        best = None
        for h in history(dt):
            stamped = h.get("facetier_version")
            # unstamped commits (compaction, vacuum) change files, not rows: the stamped version before them reads the same
            if stamped is not None and int(stamped) <= version and (best is None or h["version"] > best):
                best = int(h["version"])
        return best

    def family_bytes(self, snapshot: Snapshot | None = None) -> dict[str, int]:
        """Bytes of the files each family's committed version references."""
        snap = snapshot or self.snapshot()
        out = {}
        for fam, v in snap.family_versions.items():
            dt = self.delta(fam, v)
            if dt is not None:
                out[fam] = int(pc.sum(add_actions(dt).column("size_bytes")).as_py() or 0)
        return out

    # --- shard files ------------------------------------------------------------------------------
    def write_family(self, family: str, shard_id: str, table: pa.Table, codec_id: str, weights_hash: str,
                     extra_meta: dict[str, str] | None = None) -> tuple[str, int, str]:
        """Write one family file of a shard inside the family's Delta directory, not yet committed, named
        ``<shard_id>.<digest>.parquet``. Returns (path relative to the root, bytes, Delta statistics). ``extra_meta`` adds
        ``facetier_<key>`` entries to the file's metadata (e.g. the residual's JPEG XL quality)."""
        meta = {b"facetier_schema_version": str(SCHEMA_VERSION).encode(), b"facetier_family": family.encode(),
                b"facetier_codec_id": codec_id.encode(), b"facetier_weights_hash": weights_hash.encode()}
        meta.update({f"facetier_{k}".encode(): v.encode() for k, v in (extra_meta or {}).items()})
        table = table.replace_schema_metadata(meta)
        self.fs.makedirs(self._p(family), exist_ok=True)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS.get(family, 65536))
        body = buf.getvalue().to_pybytes()
        rel = digest_name(family, shard_id, body)
        self.put(self._p(rel), body)
        return rel, len(body), file_stats(table)

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

    def done_shard_ids(self) -> set[str]:
        """Ids of the shards whose done markers are on storage now, from one listing of the staging
        folder (paginated on object stores) rather than one request per shard."""
        folder = self._p(STAGING_DIR)
        self.fs.invalidate_cache(folder)  # object-store filesystems cache listings; progress needs the current one
        try:
            names = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return set()
        # a local writer's temporary file ends ".tmp", after the shard's ".json"
        return {posixpath.basename(n)[: -len(".json")] for n in names if n.endswith(".json")}

    def write_done_marker(self, entry: ShardEntry) -> None:
        self.fs.makedirs(self._p(STAGING_DIR), exist_ok=True)
        self.put(self._p(STAGING_DIR, f"{entry.shard_id}.json"), json.dumps(entry.to_json()).encode())

    def put(self, path: str, body: bytes) -> None:
        """Write a whole file so that no reader ever sees part of it: a rename on local disk, one PUT on object stores."""
        if self.is_local:
            tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"  # unique per writer, threads of one process included
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

    def stored_files(self, folders: tuple[str, ...] = (*ALL_FAMILIES, STAGING_DIR)) -> dict[str, dict[str, Any]]:
        """Files on storage under ``folders`` (relative path -> fsspec info), whatever references them; Delta logs excluded."""
        out = {}
        for folder in folders:
            try:
                found = self.fs.find(self._p(folder), detail=True)
            except FileNotFoundError:
                continue
            for path, info in found.items():
                rel = posixpath.relpath(path, self.path)
                if "/_delta_log/" not in f"/{rel}":
                    out[rel] = info
        return out
