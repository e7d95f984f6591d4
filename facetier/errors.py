"""One typed error hierarchy for facetier.

Every error a user or a pipeline can meet derives from :class:`FacetierError` and carries a
stable ``error_class`` name; pipelines turn per-record errors into reject rows with that name
instead of crashing the job.
"""
from __future__ import annotations


class FacetierError(Exception):
    """Base of every error facetier raises on purpose."""

    @property
    def error_class(self) -> str:
        return type(self).__name__


# --- input records (become reject rows at the pipeline edge) ---------------------------------
class InputError(FacetierError):
    """A source record cannot be turned into faces."""


class EmptyFileError(InputError):
    """The file has zero bytes."""


class NotAnImageError(InputError):
    """The bytes are not an image format facetier reads."""


class CorruptImageError(InputError):
    """The image is truncated or otherwise undecodable."""


class ImageTooLargeError(InputError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class UnsafeMemberError(InputError):
    """An archive member name tries to escape its archive (absolute or ``..`` path)."""


class NoFaceError(InputError):
    """No face was detected in the photo."""


class FaceTooSmallError(InputError):
    """Every detected face is smaller than the minimum eye distance."""


class SourceReadError(InputError):
    """The source could not be read from its storage."""


class NotARegularFileError(SourceReadError):
    """The input is named like a photo but is a FIFO, a device, a socket or a directory (or a link to
    one): rejected from its metadata, never opened for reading (a FIFO would block the reader
    forever, ``/dev/zero`` never ends)."""


# --- bitstreams --------------------------------------------------------------------------------
class StreamError(FacetierError):
    """A layered bitstream cannot be decoded."""


class BadMagicError(StreamError):
    """The bytes do not start with the facetier magic."""


class UnsupportedVersionError(StreamError):
    """The stream was written by a newer, unknown format version."""


class TruncatedStreamError(StreamError):
    """The stream ends before the layers its header announces."""


class ChecksumError(StreamError):
    """A layer's payload does not match its checksum (corrupted bytes)."""


class ModelMismatchError(StreamError):
    """The stream was written with other weights than the codec decoding it."""


class MissingLayerError(StreamError):
    """A decode asked for a layer above what the stream holds."""


class RawStreamError(StreamError):
    """A rung's image bitstream cannot be stripped of its container, rebuilt or decoded."""


# --- models and configuration ------------------------------------------------------------------
class ModelError(FacetierError):
    """Weights or model configuration cannot be loaded."""


class CheckpointFormatError(ModelError):
    """A checkpoint file does not have the keys or shapes of the format it claims."""


class ConfigError(FacetierError):
    """A user-supplied option is invalid."""


# --- tables ------------------------------------------------------------------------------------
class TableError(FacetierError):
    """A facetier table is missing, damaged or in use."""


class TableNotFoundError(TableError):
    """No committed table (or no such version) exists at the table location."""


class LegacyTableError(TableError):
    """The table was published by an older facetier (JSON manifests): ``facetier migrate`` converts it."""


class ConcurrentCommitError(TableError):
    """Another run committed the table first; this run's staged shards were not published."""


class QueryError(TableError):
    """A query over the table failed."""


class QueryLimitError(QueryError):
    """A query ran past its time or memory limit (``--query-seconds``, ``--query-memory-mb``)."""


class TableCorruptError(TableError):
    """A committed file of the table cannot be read (truncated, overwritten, missing), or a family's
    Delta log is damaged (a lost or unreadable log file)."""


class StorageError(TableError):
    """The storage under a table root refused or could not be reached: no such bucket, denied
    credentials, a refused or dropped connection."""


class NotInTableError(TableError):
    """An id asked for is neither a face id nor a photo id of the table."""
