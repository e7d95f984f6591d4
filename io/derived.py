"""Artefacts computed from a table's base family (the identity index, persons), kept beside it.

They are not column families: nothing in them is a copy of record, and each is rebuilt from the
base family whenever it is lost. Each run writes a *generation*: its files, named by their SHA-256
digest like the families' files, then a manifest ``_derived/<kind>/g<number>.json`` (written last,
whole, so a manifest means complete) that names them, their digests, the table version and the
base-family files it was computed from. A generation is *current* for a snapshot when it covers
exactly that snapshot's base-family files; a stale one is never used silently (callers say so).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facetier import __version__
from facetier.io.table import BASE_FAMILY, Snapshot, Table
from facetier.io.reader import family_files

from facetier.errors import StorageError, TableCorruptError

log = logging.getLogger(__name__)

DERIVED_DIR = "_derived"
INDEX_KIND = "identity-index"
PERSONS_KIND = "persons"
KINDS = (INDEX_KIND, PERSONS_KIND)
_MANIFEST = re.compile(r"g(\d{8})\.json$")
CHUNK = 8 << 20


@dataclass(frozen=True)
class Generation:
    """One complete run of a derived artefact."""

    kind: str
    number: int
    table_version: int
    covers: tuple[str, ...]  # the base family's files (relative to the root) it was computed from
    files: dict[str, str]  # role ("index", "faces", "persons") -> file relative to the root
    digests: dict[str, str]  # file -> SHA-256 (hex)
    rows: int
    params: dict[str, Any] = field(default_factory=dict)
    created_unix: float = 0.0
    facetier_version: str = __version__

    @property
    def manifest(self) -> str:
        return manifest_rel(self.kind, self.number)

    def current_for(self, table: Table, snapshot: Snapshot) -> bool:
        return self.covers == tuple(base_files(table, snapshot))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["covers"] = list(self.covers)
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> Generation:
        return Generation(d["kind"], int(d["number"]), int(d["table_version"]), tuple(d["covers"]), dict(d["files"]), dict(d["digests"]),
                          int(d["rows"]), dict(d.get("params", {})), float(d.get("created_unix", 0.0)), str(d.get("facetier_version", "")))


def manifest_rel(kind: str, number: int) -> str:
    return f"{DERIVED_DIR}/{kind}/g{number:08d}.json"


def base_files(table: Table, snapshot: Snapshot) -> list[str]:
    return family_files(table, BASE_FAMILY, snapshot) if snapshot.has(BASE_FAMILY) else []


def generations(table: Table, kind: str) -> list[Generation]:
    """Every complete generation of ``kind``, oldest first. A manifest that cannot be parsed is a
    :class:`TableCorruptError` (``check`` reports it; a rebuild writes a newer one)."""
    try:
        names = table.fs.ls(table._p(DERIVED_DIR, kind), detail=False)
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if not (m := _MANIFEST.search(posixpath.basename(name))):
            continue
        rel = f"{DERIVED_DIR}/{kind}/{posixpath.basename(name)}"
        try:
            gen = Generation.from_json(json.loads(table.fs.cat_file(table._p(rel))))
        except (ValueError, KeyError, TypeError) as exc:
            raise TableCorruptError(f"{table.uri(rel)}: the {kind} manifest cannot be read ({exc}); rebuild it") from exc
        if gen.number != int(m.group(1)) or gen.kind != kind:
            raise TableCorruptError(f"{table.uri(rel)}: the manifest names generation {gen.kind} {gen.number}")
        out.append(gen)
    return out


def latest(table: Table, kind: str, at_version: int | None = None) -> Generation | None:
    """The newest generation computed at a table version no later than ``at_version`` (any, when None)."""
    gens = [g for g in generations(table, kind) if at_version is None or g.table_version <= at_version]
    return gens[-1] if gens else None


def write_generation(table: Table, kind: str, *, table_version: int, covers: list[str], files: dict[str, Path], rows: int,
                     params: dict[str, Any], reuse: tuple[Generation, tuple[str, ...]] | None = None) -> Generation:
    """Upload ``files`` (role -> local path) under digest names, then the manifest naming them.
    ``reuse``: an earlier generation and roles whose files the new one names as they are (not uploaded again)."""
    previous = generations(table, kind)
    number = previous[-1].number + 1 if previous else 1
    stored, digests = {}, {}
    if reuse is not None:
        old, roles = reuse
        for role in roles:
            stored[role] = old.files[role]
            digests[old.files[role]] = old.digests[old.files[role]]
    for role, path in files.items():
        digest = file_digest(path)
        rel = f"{DERIVED_DIR}/{kind}/{role}.{digest[:32]}{''.join(Path(path).suffixes[-1:])}"
        if not table.fs.exists(table._p(rel)):
            _upload(table, path, rel)
        stored[role], digests[rel] = rel, digest
    gen = Generation(kind, number, table_version, tuple(covers), stored, digests, rows, params, time.time())
    table.put(table._p(gen.manifest), json.dumps(gen.to_json()).encode())
    return gen


def _upload(table: Table, path: Path, rel: str) -> None:
    table.fs.makedirs(table._p(posixpath.dirname(rel)), exist_ok=True)
    if table.is_local:
        tmp = f"{table._p(rel)}.{os.getpid()}.tmp"
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while block := src.read(CHUNK):
                dst.write(block)
        os.replace(tmp, table._p(rel))
    else:
        try:
            table.fs.put_file(str(path), table._p(rel))
        except OSError as exc:
            raise StorageError(f"{table.uri(rel)} cannot be written: {exc}") from exc


def file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextmanager
def local_copy(table: Table, gen: Generation, role: str) -> Iterator[Path]:
    """A local file holding the generation's ``role`` file, its digest verified (a mismatch is a
    :class:`TableCorruptError`). Local tables are read in place; remote ones through a temporary copy."""
    rel = gen.files[role]
    if table.is_local:
        path = Path(table._p(rel))
        _verify(table, gen, rel, path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="facetier-derived-") as tmp:
        path = Path(tmp) / posixpath.basename(rel)
        try:
            table.fs.get_file(table._p(rel), str(path))
        except FileNotFoundError as exc:
            raise TableCorruptError(f"{table.uri(rel)} ({gen.kind} generation {gen.number}) is missing") from exc
        except OSError as exc:
            raise StorageError(f"{table.uri(rel)} cannot be read: {exc}") from exc
        _verify(table, gen, rel, path)
        yield path


def _verify(table: Table, gen: Generation, rel: str, path: Path) -> None:
    try:
        digest = file_digest(path)
    except FileNotFoundError as exc:
        raise TableCorruptError(f"{table.uri(rel)} ({gen.kind} generation {gen.number}) is missing") from exc
    if digest != gen.digests.get(rel):
        raise TableCorruptError(f"{table.uri(rel)} ({gen.kind} generation {gen.number}) does not match its recorded SHA-256; "
                                f"rebuild it (`facetier {'index' if gen.kind == INDEX_KIND else 'cluster'} --rebuild`)")


def verify(table: Table, gen: Generation) -> list[str]:
    """Problems with a generation's files (missing, or not matching their digest)."""
    problems = []
    for role in gen.files:
        try:
            with local_copy(table, gen, role):
                pass
        except TableCorruptError as exc:
            problems.append(str(exc))
    return problems


def removable(table: Table, kind: str, retention_hours: float) -> tuple[list[str], list[str]]:
    """(files only superseded generations older than ``retention_hours`` name, files no manifest names).

    Recent generations stay so an ``--as-of`` read of a recent version still finds its generation;
    a file no manifest names may be a run's upload in flight, so the caller judges those by age."""
    gens = generations(table, kind)
    cutoff = time.time() - retention_hours * 3600
    kept = [g for g in gens if g is gens[-1] or g.created_unix >= cutoff]
    keep = {name for g in kept for name in (g.manifest, *g.files.values())}
    named = {name for g in gens for name in (g.manifest, *g.files.values())}
    try:
        found = table.fs.find(table._p(DERIVED_DIR, kind))
    except FileNotFoundError:
        return [], []
    rels = [posixpath.relpath(p, table.path) for p in found]
    return sorted(r for r in rels if r in named and r not in keep), sorted(r for r in rels if r not in named)
