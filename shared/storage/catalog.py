"""Garment catalog (garment images addressable by id) and content-addressed upload keys.

Layout: `{prefix}{tenant}/{garment_id}`, e.g. "catalog/garments/public/<sha256>". The object
holds the image bytes (content type sniffed from the magic number) with user metadata plus a
reserved "sha256" entry, which makes re-adding the same image under the same id a no-op.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from shared.storage.base import (
    Data,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    normalize_metadata,
    validate_key,
    validate_prefix,
)

DEFAULT_TENANT = "public"
_SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HASH_META = "sha256"


class GarmentExists(StorageError):
    """`add` with an explicit garment id that already holds a different image."""


@dataclass(frozen=True)
class GarmentEntry:
    tenant: str
    garment_id: str
    key: str
    size: int  # bytes
    last_modified: datetime | None


def validate_slug(value: str, what: str = "garment id") -> str:
    """`value` if it matches [a-z0-9][a-z0-9._-]{0,63}, else ValueError."""
    if not isinstance(value, str) or not _SLUG.match(value):
        raise ValueError(f"{what} must match [a-z0-9][a-z0-9._-]{{0,63}}, got {value!r}")
    return value


def sha256_hex(data: Data) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(namespace: str, data: Data) -> str:
    """Deterministic key `{namespace}/{sha256(data)}`: the same bytes always land on one key.

    `namespace` is a key path without a trailing "/", e.g. "uploads/acme".
    """
    return validate_key(f"{validate_key(namespace)}/{sha256_hex(data)}")


def upload_key(tenant: str, data: Data) -> str:
    """Key of an uploaded image: `uploads/{tenant}/{sha256}`."""
    return content_key(f"uploads/{validate_slug(tenant, 'tenant')}", data)


def sniff_image_type(data: Data) -> str:
    """MIME type of a PNG, JPEG or WebP image from its magic number; ValueError otherwise."""
    head = bytes(data[:12])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    raise ValueError("garment image must be PNG, JPEG or WebP")


class GarmentCatalog:
    """Garment images per tenant, stored in any `ObjectStore`."""

    def __init__(self, store: ObjectStore, prefix: str = "catalog/garments/") -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"catalog prefix must end with '/', got {prefix!r}")
        self._store = store
        self._prefix = validate_prefix(prefix)

    def key(self, garment_id: str, tenant: str = DEFAULT_TENANT) -> str:
        return f"{self._prefix}{validate_slug(tenant, 'tenant')}/{validate_slug(garment_id)}"

    def add(
        self,
        image_bytes: Data,
        garment_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        overwrite: bool = False,
    ) -> str:
        """Store an image; return its id (the image's sha256 hex unless `garment_id` is given).

        Adding the same bytes under the same id again is a no-op. An explicit id that holds a
        different image raises `GarmentExists` unless `overwrite`.
        """
        content_type = sniff_image_type(image_bytes)
        digest = sha256_hex(image_bytes)
        garment_id = digest if garment_id is None else garment_id
        key = self.key(garment_id, tenant)
        user_meta = normalize_metadata(metadata)
        if _HASH_META in user_meta:
            raise ValueError(f"metadata key {_HASH_META!r} is reserved by the catalog")
        meta = {**user_meta, _HASH_META: digest}
        if overwrite:
            self._store.put_bytes(key, image_bytes, content_type, meta)
            return garment_id
        if self._store.put_bytes_if_absent(key, image_bytes, content_type, meta):
            return garment_id
        existing = self._store.stat(key).metadata or {}
        if existing.get(_HASH_META) != digest:
            raise GarmentExists(
                f"garment {garment_id!r} (tenant {tenant!r}) already holds a different image; "
                "pass overwrite=True to replace it"
            )
        return garment_id

    def get(self, garment_id: str, *, tenant: str = DEFAULT_TENANT, max_bytes: int | None = None) -> bytes:
        key = self.key(garment_id, tenant)
        try:
            return self._store.get_bytes(key, max_bytes=max_bytes)
        except ObjectNotFound:
            raise ObjectNotFound(key, self._missing(garment_id, tenant)) from None

    def info(self, garment_id: str, *, tenant: str = DEFAULT_TENANT) -> ObjectInfo:
        """Size, content type and metadata (with the reserved "sha256") of a garment image."""
        key = self.key(garment_id, tenant)
        try:
            return self._store.stat(key)
        except ObjectNotFound:
            raise ObjectNotFound(key, self._missing(garment_id, tenant)) from None

    def exists(self, garment_id: str, *, tenant: str = DEFAULT_TENANT) -> bool:
        return self._store.exists(self.key(garment_id, tenant))

    def list(self, tenant: str | None = None) -> Iterator[GarmentEntry]:
        """Garments of `tenant`, or of every tenant when None."""
        prefix = self._prefix if tenant is None else f"{self._prefix}{validate_slug(tenant, 'tenant')}/"
        for info in self._store.list(prefix, recursive=True):
            parts = info.key[len(self._prefix) :].split("/")
            if len(parts) != 2 or not all(_SLUG.match(p) for p in parts):
                continue  # not written by this catalog
            yield GarmentEntry(parts[0], parts[1], info.key, info.size, info.last_modified)

    def delete(self, garment_id: str, *, tenant: str = DEFAULT_TENANT) -> None:
        """Remove a garment; a missing one is not an error."""
        self._store.delete(self.key(garment_id, tenant))

    def _missing(self, garment_id: str, tenant: str) -> str:
        return f"garment {garment_id!r} not found in the catalog (tenant {tenant!r})"
