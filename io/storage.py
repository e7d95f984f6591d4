"""How delta-rs reaches the object store a table root names, from the same environment fsspec reads.

Commits on S3 must be atomic put-if-absent so racing writers never overwrite each other's log
entry. facetier asks delta-rs for S3's conditional writes (``If-None-Match``, which AWS S3, MinIO
and moto honour) unless the user configured a locking provider (``AWS_S3_LOCKING_PROVIDER=dynamodb``)
themselves. GCS creates objects with generation preconditions natively; nothing to set.
"""
from __future__ import annotations

import os


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
