"""Listing and reading source photos through fsspec: folders, globs, tar/zip archives, URI lists.

Local paths, ``gs://`` (gcsfs) and ``s3://`` (s3fs) all go through the same calls. Archive
members are addressed as ``ARCHIVE_URI!member/name.jpg``; a member whose name is absolute or
contains ``..`` is listed (so it is counted) but reading it raises :class:`UnsafeMemberError`.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

from facetier.errors import ConfigError, NotARegularFileError, SourceReadError, UnsafeMemberError

MEMBER_SEP = "!"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
LIST_SUFFIXES = (".txt", ".lst")
# A source is held whole while it is hashed, decoded and recompressed into the original layer (JPEG XL
# needs the whole file), so this bound is what bounds an encode worker's memory per input. Sizes
# come from listings and archive headers: a larger input is rejected without being read.
MAX_SOURCE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, order=True)
class SourceRef:
    """One input photo: a file URI, or a member of an archive."""

    uri: str
    member: str | None = None
    # what the listing says about the bytes (size and a change marker: mtime, ETag, generation, a member's
    # CRC); None when the listing cannot tell, and then the input is read on every run
    fingerprint: str | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return self.uri if self.member is None else f"{self.uri}{MEMBER_SEP}{self.member}"

    @staticmethod
    def parse(key: str) -> SourceRef:
        if MEMBER_SEP in key and key.split(MEMBER_SEP, 1)[0].lower().endswith(ARCHIVE_SUFFIXES):
            uri, member = key.split(MEMBER_SEP, 1)
            return SourceRef(uri, member)
        return SourceRef(key)


def key_bytes(key: str) -> bytes:
    """A source key as bytes, deterministically, for hashing: names that are not UTF-8 reach Python
    surrogate-escaped (PEP 383); ``surrogatepass`` also takes a lone surrogate no filesystem made."""
    return key.encode("utf-8", "surrogatepass")


def storable_uri(key: str) -> tuple[str, bytes | None]:
    """(valid UTF-8 text for the tables, the name's raw bytes when the name is not UTF-8, else None).

    The text shows undecodable bytes as ``\\xNN`` escapes; the raw bytes are stored beside it, so
    ``os.fsdecode(raw)`` opens the very file again.
    """
    try:
        raw = key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte (a hand-written list line)
        return key.encode("utf-8", "backslashreplace").decode("utf-8"), key_bytes(key)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace"), raw


def key_of(uri: str, raw: bytes | None) -> str:
    """The source key a stored (``source_uri``, ``source_uri_raw``) pair was made from: the inverse of :func:`storable_uri`."""
    if raw is None:
        return uri
    key = raw.decode("utf-8", "surrogateescape")
    return key if storable_uri(key) == (uri, raw) else raw.decode("utf-8", "surrogatepass")


# Listing fields that change when an object's bytes change, most specific first: object stores' content
# hashes and generations, then modification times (local files, and stores that give nothing better).
_CHANGE_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "mtime", "LastModified", "last_modified", "updated")


def fingerprint_of(info: dict[str, Any]) -> str | None:
    """A listing entry's fingerprint: its size and the first change marker the filesystem gives, or None."""
    marker = next((info[k] for k in _CHANGE_FIELDS if info.get(k) not in (None, "")), None)
    if marker is None or info.get("size") is None:
        return None
    return f"{info['size']}:{marker}"


def source_key(key: str, fingerprint: str | None) -> int | None:
    """A signed 64-bit key of (name, fingerprint): what the table records per input so a later run can skip
    an unchanged input without reading it. None without a fingerprint."""
    if fingerprint is None:
        return None
    digest = hashlib.sha256(key_bytes(key) + b"\0" + fingerprint.encode("utf-8", "backslashreplace")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def content_id(data: bytes) -> str:
    """Stable photo id: the first 32 hex digits of the SHA-256 of the file's bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def is_unsafe_member(name: str) -> bool:
    parts = name.replace("\\", "/")
    return parts.startswith("/") or (len(parts) > 1 and parts[1] == ":") or ".." in parts.split("/")


def _is_archive(path: str) -> bool:
    return path.lower().endswith(ARCHIVE_SUFFIXES)


def _archive_members(fs: fsspec.AbstractFileSystem, path: str) -> list[tuple[str, str]]:
    """(member name, fingerprint from its header: size and CRC for zip, size and mtime for tar)."""
    with fs.open(path, "rb") as fh:
        if path.lower().endswith(".zip"):
            with zipfile.ZipFile(fh) as zf:
                return [(i.filename, f"{i.file_size}:crc{i.CRC:08x}") for i in zf.infolist() if not i.is_dir()]
        with tarfile.open(fileobj=fh, mode="r:*") as tf:
            return [(m.name, f"{m.size}:{m.mtime}") for m in tf.getmembers() if m.isfile()]


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def _protocol_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if _is_local(fs) else f"{_protocol(fs)}://{path}"


def list_sources(src: str) -> list[SourceRef]:
    """Every input under ``src`` (sorted, so shards are deterministic)."""
    fs, path = fsspec.core.url_to_fs(src)
    refs: list[SourceRef] = []
    if any(ch in path for ch in "*?["):
        files = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") == "file"}
    elif fs.isdir(path):
        files = {p: i for p, i in fs.find(path, detail=True).items() if not posixpath.basename(p).startswith(".")}
    elif fs.isfile(path):
        if path.lower().endswith(LIST_SUFFIXES):
            with fs.open(path, "rb") as fh:  # bytes: a line that is not UTF-8 is a name like any other
                lines = [ln.decode("utf-8", "surrogateescape").strip() for ln in fh]
            base = _protocol_uri(fs, posixpath.dirname(path))
            folders: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
            return sorted({ref for ln in lines if ln and not ln.startswith("#") for ref in _expand(_resolve(ln, base, fs), folders)})
        files = {path: fs.info(path)}
    else:
        raise ConfigError(f"no such source: {src}")
    for p, info in files.items():
        uri = _protocol_uri(fs, p)
        if _is_archive(p) and info.get("type", "file") == "file":  # an "archive" that is a FIFO or device is not opened: its read rejects it
            refs += [SourceRef(uri, m, _member_fingerprint(m, fp)) for m, fp in _archive_members(fs, p)]
        else:
            refs.append(SourceRef(uri, None, fingerprint_of(info)))
    return sorted(set(refs))


def _member_fingerprint(member: str, header: str | None) -> str | None:
    # a name that escapes its archive is rejected for the name alone, whatever its bytes: never read again
    return "unsafe-name" if is_unsafe_member(member) else header


def _resolve(line: str, base: str, fs: fsspec.AbstractFileSystem) -> str:
    """Lines of a list file are URIs, absolute paths, or paths relative to the list's folder
    (or to its ``images/`` subfolder, the layout of the LFW and UTKFace split lists)."""
    if "://" in line or line.startswith("/"):
        return line
    direct = posixpath.join(base, line)
    if fs.exists(direct.split(MEMBER_SEP)[0]):
        return direct
    return posixpath.join(base, "images", line)


def _expand(line: str, folders: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> Iterable[SourceRef]:
    """The inputs one list line names; a file's fingerprint comes from one listing of its folder,
    shared (``folders``) by every line in that folder, not from a request per line."""
    ref = SourceRef.parse(line)
    if ref.member is None and _is_archive(ref.uri):
        return list_sources(ref.uri)
    if ref.member is not None:  # one member named in a list: its header is not read here
        return [SourceRef(ref.uri, ref.member, _member_fingerprint(ref.member, None))]
    fs, path = fsspec.core.url_to_fs(ref.uri)
    folder = (_protocol_uri(fs, ""), posixpath.dirname(path))
    if folder not in folders:
        try:
            folders[folder] = {e["name"]: e for e in fs.ls(folder[1], detail=True)}
        except (OSError, ValueError):  # missing or unreadable: listed all the same, so the read fails and is counted
            folders[folder] = {}
    info = folders[folder].get(path)
    return [SourceRef(ref.uri, None, fingerprint_of(info) if info else None)]


def read_source(ref: SourceRef, max_bytes: int = MAX_SOURCE_BYTES) -> bytes:
    """The bytes of one input; storage failures become :class:`SourceReadError`."""
    if ref.member is not None and is_unsafe_member(ref.member):
        raise UnsafeMemberError(f"archive member {ref.member!r} escapes its archive")
    try:
        fs, path = fsspec.core.url_to_fs(ref.uri)
        if ref.member is None:
            if _is_local(fs):
                return _read_local(path, max_bytes)
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise SourceReadError(f"{size} bytes exceeds the {max_bytes} byte source limit")
            if size is not None:
                return fs.cat_file(path)
            with fs.open(path, "rb") as fh:
                return _bounded(fh, max_bytes)
        if _is_local(fs):
            _require_regular(path)
        with fs.open(path, "rb") as fh:
            if path.lower().endswith(".zip"):
                with zipfile.ZipFile(fh) as zf:
                    info = zf.getinfo(ref.member)
                    if info.file_size > max_bytes:
                        raise SourceReadError(f"member of {info.file_size} bytes exceeds the source limit")
                    return zf.read(info)
            with tarfile.open(fileobj=fh, mode="r:*") as tf:
                member = tf.getmember(ref.member)
                if member.size > max_bytes:
                    raise SourceReadError(f"member of {member.size} bytes exceeds the source limit")
                extracted = tf.extractfile(member)
                if extracted is None:
                    raise SourceReadError(f"{ref.member} is not a regular file")
                return extracted.read()
    except (SourceReadError, UnsafeMemberError):
        raise
    except (OSError, KeyError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        raise SourceReadError(f"{type(exc).__name__}: {exc}") from exc


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _require_regular(path: str) -> os.stat_result:
    """The file's status (a link followed); only regular files are inputs, known from metadata alone."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "not a regular file")
        raise NotARegularFileError(f"{path} is {kind}, not a regular file: not read")
    return st


def _read_local(path: str, max_bytes: int) -> bytes:
    """A local regular file's bytes, read no further than the source limit (it may grow while read)."""
    st = _require_regular(path)
    if st.st_size > max_bytes:
        raise SourceReadError(f"{st.st_size} bytes exceeds the {max_bytes} byte source limit")
    with open(path, "rb") as fh:
        return _bounded(fh, max_bytes)


def _bounded(fh: Any, max_bytes: int) -> bytes:
    data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise SourceReadError(f"more than the {max_bytes} byte source limit (its size was not known before reading)")
    return data
