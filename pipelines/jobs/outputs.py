"""Where decode and edit jobs write: a folder on any fsspec URI, one file per output, atomically.

A half-written file never appears under its final name: on local disk the bytes go to a hidden
temporary name that is renamed into place; on object storage (``gs://``, ``s3://``) one PUT
creates the object whole or not at all. So a file that exists is complete, and a rerun can skip it.
"""
from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from facetier.errors import ConfigError

JOB_DIR = "_facetier"  # per-batch results of a running job, removed when it finishes


class OutputFolder:
    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        if not uri:
            raise ConfigError("an output folder is needed (--out)")
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise ConfigError(f"--out {uri} is a file, not a folder: nothing was written")
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--out {uri} cannot be created: {exc.strerror or exc}") from exc
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise ConfigError(f"--out {uri} is not writable: nothing was written")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri_of(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        """Whether a finished output is there: a file of zero bytes (a copy or upload that stopped
        before its first byte) is not one, and is written again."""
        try:
            return int(self.fs.info(self.path(name)).get("size") or 0) > 0
        except FileNotFoundError:
            return False

    def write(self, name: str, data: bytes) -> None:
        target = self.path(name)
        if not self.local:
            self.fs.pipe_file(target, data)
            return
        parent, base = os.path.split(target)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{base}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)

    def read(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def list(self, folder: str) -> list[str]:
        """Names (relative to this folder) of the files under ``folder``; empty when it does not exist."""
        try:
            found = self.fs.find(self.path(folder))
        except FileNotFoundError:
            return []
        prefix = self.root.rstrip("/") + "/"
        return sorted(p.removeprefix(prefix) for p in found)

    def remove(self, folder: str) -> None:
        try:
            self.fs.rm(self.path(folder), recursive=True)
        except FileNotFoundError:
            pass
