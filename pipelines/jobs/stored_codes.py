"""Reading faces' stored codes back from the table, checked before anything decodes them.

Every payload is verified against the crc32 stored beside it, every original against its photo id
(the SHA-256 of the source bytes), and a family file that cannot be read fails only the faces it
holds: a decode or edit job records those faces as failures, names the file, and goes on with
the rest. A damaged byte never becomes a plausible face of someone else.
"""
from __future__ import annotations

import posixpath
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from facetier.codec.image_layers import decode_original
from facetier.codec.layers import LayerCode, LayeredCode
from facetier.io.reader import family_files, read_family
from facetier.io.sources import content_id
from facetier.io.table import (
    INDEX_FAMILY,
    LAYER_FAMILIES,
    ORIGINAL_FAMILY,
    Snapshot,
    Table,
)

from facetier.errors import (
    ChecksumError,
    ConfigError,
    FacetierError,
    MissingLayerError,
    TableCorruptError,
)


@dataclass(frozen=True)
class FaceFailure:
    """A selected face (or photo) that could not be produced, and why."""

    id: str
    error_class: str
    message: str

    @staticmethod
    def of(id_: str, exc: FacetierError) -> FaceFailure:
        return FaceFailure(id_, exc.error_class, str(exc))


def index_rows(table: Table, ids: Sequence[str], snapshot: Snapshot) -> tuple[list[dict], list[FaceFailure]]:
    """Rows of the faces index for face ids or photo ids; ids only an unreadable index file could hold are failures.
    Each row's ``__file`` names the index file it came from."""
    wanted = set(ids)
    unreadable: list[str] = []
    either = [[("face_id", "in", sorted(wanted))], [("photo_id", "in", sorted(wanted))]]  # one pass: face ids OR photo ids
    index = read_family(table, INDEX_FAMILY, snapshot=snapshot, filters=either, unreadable=unreadable, with_file=True)
    seen, rows = set(), []
    for r in index.to_pylist():
        if r["face_id"] not in seen:  # a face listed twice (the same bytes under two names) decodes once
            seen.add(r["face_id"])
            rows.append(r)
    rows.sort(key=lambda r: r["face_id"])
    missing = sorted(wanted - {r["face_id"] for r in rows} - {r["photo_id"] for r in rows})
    if missing and not unreadable:
        raise ConfigError(f"not in table {table.root}: {missing[:5]}")
    files = ", ".join(table.uri(u) for u in sorted(set(unreadable)))
    return rows, [FaceFailure(m, TableCorruptError.__name__, f"{m} is not in the readable part of the faces index; unreadable: {files}") for m in missing]


def _stem(rel: str) -> str:
    """The shard a file was written by: every family file of one shard shares it."""
    return posixpath.basename(rel).split(".")[0]


def read_codes(table: Table, rows: Sequence[dict], families: Sequence[str], snapshot: Snapshot,
               optional: Sequence[str] = ()) -> tuple[dict[str, LayeredCode], list[FaceFailure]]:
    """The verified layers ``families`` (lowest first) of each face in ``rows``, by face id; the faces that fail.
    A face without one of ``optional`` (a rung it was written without) is read without it.

    A face's layers are looked for first in the files its shard wrote (same name as its index file),
    then, for faces not found there (files compacted since), in every file whose statistics allow it."""
    payloads: dict[str, dict[str, bytes]] = defaultdict(dict)
    failed: dict[str, FaceFailure] = {}
    stems = {_stem(r["__file"]) for r in rows if r.get("__file")}
    for fam in (f for f in families if f in LAYER_FAMILIES):
        todo = sorted(r["face_id"] for r in rows if r["face_id"] not in failed)
        if not todo:
            continue
        candidates = family_files(table, fam, snapshot, [("face_id", "in", todo)])
        first = [f for f in candidates if _stem(f) in stems]
        unreadable: list[str] = []
        for group in (first, [f for f in candidates if _stem(f) not in stems]):
            todo = [f for f in todo if fam not in payloads[f] and f not in failed]
            if not todo or not group:
                continue
            part = read_family(table, fam, columns=["face_id", "payload", "crc32"], filters=[("face_id", "in", todo)], snapshot=snapshot,
                               unreadable=unreadable, with_file=True, only_files=group)
            for fid, payload, crc, rel in zip(*(part.column(c).to_pylist() for c in ("face_id", "payload", "crc32", "__file"))):
                if payload is None or crc is None or zlib.crc32(payload) != crc:
                    failed[fid] = FaceFailure.of(fid, ChecksumError(f"face {fid}: its {fam} payload fails its crc32 check in {table.uri(rel)}"))
                else:
                    payloads[fid][fam] = payload
        if unreadable:
            files = ", ".join(table.uri(u) for u in sorted(set(unreadable)))
            for fid in todo:
                if fam not in payloads[fid] and fid not in failed:
                    failed[fid] = FaceFailure.of(fid, TableCorruptError(f"face {fid}: its {fam} layer is not in the readable files; unreadable: {files}"))
    codes = {}
    for r in rows:
        fid = r["face_id"]
        if fid in failed:
            continue
        lacking = [fam for fam in families if fam not in payloads[fid] and fam not in optional]
        if lacking:
            failed[fid] = FaceFailure.of(fid, MissingLayerError(f"face {fid} has no {lacking[0]!r} layer in the table"))
            continue
        codes[fid] = LayeredCode(r["codec_id"], r["weights_hash"], tuple(LayerCode(fam, payloads[fid][fam]) for fam in families if fam in payloads[fid]))
    return codes, sorted(failed.values(), key=lambda f: f.id)


def read_originals(table: Table, photo_ids: Sequence[str], snapshot: Snapshot) -> tuple[dict[str, bytes], list[FaceFailure]]:
    """The source bytes of each photo, checked against its photo id (their own SHA-256); the photos that fail."""
    unreadable: list[str] = []
    stored = read_family(table, ORIGINAL_FAMILY, snapshot=snapshot, columns=["photo_id", "payload"], filters=[("photo_id", "in", list(photo_ids))],
                         unreadable=unreadable)
    out: dict[str, bytes] = {}
    failed: dict[str, FaceFailure] = {}
    for pid, payload in zip(stored.column("photo_id").to_pylist(), stored.column("payload").to_pylist()):
        try:
            data = decode_original(payload)
        except FacetierError as exc:
            failed[pid] = FaceFailure.of(pid, exc)
            continue
        if content_id(data) != pid:
            failed[pid] = FaceFailure.of(pid, ChecksumError(f"photo {pid}: its original layer does not reproduce the source bytes it was hashed from"))
        else:
            out[pid] = data
    files = ", ".join(table.uri(u) for u in sorted(unreadable))
    for pid in photo_ids:
        if pid not in out and pid not in failed:
            why = f"unreadable family files: {files}" if unreadable else "the table holds no original layer for it"
            failed[pid] = FaceFailure.of(pid, (TableCorruptError if unreadable else MissingLayerError)(f"photo {pid}: {why}"))
    return out, sorted(failed.values(), key=lambda f: f.id)
