"""How delta-rs reaches the object store a table root names, from the same environment fsspec reads.

Commits on S3 must be atomic put-if-absent so racing writers never overwrite each other's log
entry. facetier asks delta-rs for S3's conditional writes (``If-None-Match``, which AWS S3, MinIO
and moto honour) unless the user configured a locking provider (``AWS_S3_LOCKING_PROVIDER=dynamodb``)
themselves. GCS creates objects with generation preconditions natively; nothing to set.
"""
from __future__ import annotations

import os
import re

from facetier.errors import StorageError

# What object-store clients (delta-rs' object_store, s3fs/botocore, gcsfs) say when the storage
# itself refuses, as opposed to a file of the table being damaged
_REFUSALS = (
    ("no such bucket", r"NoSuchBucket|bucket does not exist|bucket .*not found|The specified bucket"),
    ("access denied", r"AccessDenied|Access Denied|Forbidden|\b403\b|InvalidAccessKeyId|SignatureDoesNotMatch|credential|Unauthorized|\b401\b"),
    ("connection refused or lost", r"Connection refused|ConnectionRefused|connect error|error sending request|Could not connect|"
                                   r"dns error|timed out|Connection reset|ConnectTimeout|EndpointConnectionError|ServerDisconnected"),
)


def storage_error(exc: BaseException, uri: str, *, always: bool = False) -> StorageError | None:
    """A :class:`StorageError` naming ``uri`` when ``exc`` is the storage refusing (or, with ``always``,
    whatever it is), else None: the caller then treats it as damage."""
    text = f"{type(exc).__name__}: {exc}"
    for what, pattern in _REFUSALS:
        if re.search(pattern, text, re.IGNORECASE):
            return StorageError(f"{uri}: {what} ({_brief(text)})")
    if isinstance(exc, PermissionError):
        return StorageError(f"{uri}: access denied ({_brief(text)})")
    if isinstance(exc, ConnectionError):
        return StorageError(f"{uri}: connection refused or lost ({_brief(text)})")
    return StorageError(f"{uri}: {_brief(text)}") if always else None


def _brief(text: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("\u21b3", "->")  # object_store colours its cause chain
    return " ".join(plain.split())[:400]


def delta_storage_options(root: str) -> dict[str, str]:
    scheme = root.split("://", 1)[0].lower() if "://" in root else "file"
    opts: dict[str, str] = {}
    if scheme in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["AWS_ENDPOINT_URL"] = endpoint
            if endpoint.startswith("http://"):
                opts["AWS_ALLOW_HTTP"] = "true"
        if not os.environ.get("AWS_S3_LOCKING_PROVIDER"):
            opts["conditional_put"] = "etag"
        if not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
            opts["AWS_REGION"] = "us-east-1"
    elif scheme in ("gs", "gcs"):
        # an emulator: delta-rs speaks GCS's XML API, so GOOGLE_BASE_URL may name an endpoint other
        # than the JSON one STORAGE_EMULATOR_HOST gives gcsfs; plain HTTP. Credentials: delta-rs finds
        # application default credentials itself
        emulator = os.environ.get("GOOGLE_BASE_URL") or os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            opts["google_base_url"] = emulator if "://" in emulator else f"http://{emulator}"
            opts["allow_http"] = "true"
        if key := os.environ.get("GOOGLE_SERVICE_ACCOUNT_KEY"):  # a service account's JSON key given inline
            opts["google_service_account_key"] = key
    return opts
