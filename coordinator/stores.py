"""Which blob store this deployment uses, from its settings: S3 when `storage_url` says `s3://bucket[/prefix]`,
else the local disk (the embedded default)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from coordinator.settings import CoordinatorSettings
from coordinator.storage import BlobStore, DiskStore


def open_store(settings: CoordinatorSettings) -> BlobStore:
    """One store per process and configuration, so an object store's connection pool is shared."""
    return _open_store(settings.storage_url, settings.resolved_storage_dir, settings.s3_endpoint_url,
                       settings.s3_public_endpoint_url, settings.s3_region, settings.s3_access_key_id,
                       settings.s3_secret_access_key)


@cache
def _open_store(url: str | None, root: Path, endpoint: str | None, public: str | None, region: str,
                key_id: str | None, secret: str | None) -> BlobStore:
    if not url:
        return DiskStore(root)
    from coordinator.s3store import S3Store  # noqa: PLC0415 - boto3 is loaded only where S3 is used
    return S3Store.from_url(url, endpoint_url=endpoint, public_endpoint_url=public, region=region,
                            access_key_id=key_id, secret_access_key=secret)
