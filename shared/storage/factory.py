"""`open_store`: the object store a `StorageConfig` describes.

Apart from config.py so that the stores (which take their config) and the factory (which
takes the stores) do not import each other. The minio SDK is imported only for the s3 backend.
"""

from __future__ import annotations

from shared.storage.base import ObjectStore
from shared.storage.config import StorageConfig
from shared.storage.local import LocalObjectStore


def open_store(config: StorageConfig) -> ObjectStore:
    """The store `config` describes (the minio SDK is imported only for the s3 backend)."""
    if config.backend == "local":
        return LocalObjectStore(config.local)
    if config.backend == "s3":
        from shared.storage.s3 import S3ObjectStore

        assert config.s3 is not None  # guaranteed by StorageConfig._check_backend
        return S3ObjectStore(config.s3)
    raise AssertionError(f"unhandled backend {config.backend!r}")
