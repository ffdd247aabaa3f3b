"""Object storage behind one interface: S3 (minio SDK) or the local filesystem.

    from shared.storage import StorageConfig, open_store, GarmentCatalog
    store = open_store(StorageConfig.from_url("file:///var/lib/fc"))
    store.ensure_bucket()
    catalog = GarmentCatalog(store)

`S3ObjectStore` is imported lazily, so local-only use does not need the minio SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.storage.base import (
    InvalidKey,
    InvalidMetadata,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    normalize_metadata,
    validate_key,
    validate_prefix,
)
from shared.storage.catalog import (
    DEFAULT_TENANT,
    GarmentCatalog,
    GarmentEntry,
    GarmentExists,
    content_key,
    sniff_image_type,
    upload_key,
    validate_slug,
)
from shared.storage.config import LocalStoreConfig, S3StoreConfig, StorageConfig
from shared.storage.factory import open_store
from shared.storage.local import LocalObjectStore

if TYPE_CHECKING:
    from shared.storage.s3 import S3ObjectStore

__all__ = [
    "DEFAULT_TENANT",
    "GarmentCatalog",
    "GarmentEntry",
    "GarmentExists",
    "InvalidKey",
    "InvalidMetadata",
    "LocalObjectStore",
    "LocalStoreConfig",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "ObjectTooLarge",
    "S3ObjectStore",
    "S3StoreConfig",
    "StorageConfig",
    "StorageError",
    "content_key",
    "normalize_metadata",
    "open_store",
    "sniff_image_type",
    "upload_key",
    "validate_key",
    "validate_prefix",
    "validate_slug",
]


def __getattr__(name: str) -> Any:
    if name == "S3ObjectStore":
        from shared.storage.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
