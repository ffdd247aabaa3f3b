"""S3 object store through the minio SDK: AWS S3, MinIO, SeaweedFS or any S3 endpoint.

Keys are stored as `config.prefix + key` in `config.bucket`. User metadata travels as
`x-amz-meta-*` headers (lowercased keys; see base.normalize_metadata).

put_bytes_if_absent: with `conditional_put` (default) the PUT carries `If-None-Match: *`, so
the server refuses to overwrite (412) and exactly one of several racing writers wins. The
SDK's public `put_object` cannot send that header, so this one call goes through the SDK's
internal `_put_object` (checked at construction; see `_conditional_put`). With
`conditional_put=False` (servers that ignore the header) the store stats, then puts: two
writers racing on a missing key can both write and both get True, the last write winning.
That is harmless for content-addressed keys (both wrote the same bytes) and for
deterministic result keys whose writers produce equivalent results.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from shared.storage.base import (
    MAX_KEY_BYTES,
    Data,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    StorageError,
    check_expiry,
    normalize_metadata,
    resolve_content_type,
    validate_key,
    validate_prefix,
    write_file_atomically,
)
from shared.storage.config import S3StoreConfig

logger = logging.getLogger(__name__)

_META_HEADER = "x-amz-meta-"
_STREAM_CHUNK = 1 << 20  # 1 MiB
_CONDITIONAL_CONFLICT_RETRIES = 3


class S3ObjectStore(ObjectStore):
    """Objects in one S3 bucket (under an optional key prefix)."""

    def __init__(self, config: S3StoreConfig) -> None:
        self._config = config
        self._bucket = config.bucket
        self._prefix = config.prefix
        self._client = _make_client(config, config.endpoint, config.secure)
        if config.public_url is None:
            self._presign_client = self._client
        else:
            public = urlsplit(config.public_url)
            self._presign_client = _make_client(config, public.netloc, public.scheme == "https")
        self._conditional = config.conditional_put and callable(getattr(self._client, "_put_object", None))
        if config.conditional_put and not self._conditional:
            logger.warning("minio SDK lacks _put_object: put_bytes_if_absent falls back to stat+put")

    def __repr__(self) -> str:
        scheme = "https" if self._config.secure else "http"
        return f"S3ObjectStore({scheme}://{self._config.endpoint}/{self._bucket}/{self._prefix})"

    # -- writes ------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        with self._errors("ensure_bucket"):
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket, location=self._config.region)
            except S3Error as e:
                # Lost a creation race (BucketAlreadyOwnedByYou on AWS, BucketAlreadyExists on
                # some servers): fine as long as the bucket is now there for us.
                if not self._client.bucket_exists(self._bucket):
                    raise StorageError(f"cannot create bucket {self._bucket!r}: {e.code}: {e.message}") from e

    def put_bytes(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        name = self._name(key)
        content_type = resolve_content_type(key, content_type)
        metadata = normalize_metadata(metadata)
        size = memoryview(data).nbytes
        with self._errors("put", key):
            result = self._client.put_object(
                self._bucket,
                name,
                io.BytesIO(data),
                size,
                content_type=content_type,
                metadata=_meta_headers(metadata),
            )
        return ObjectInfo(key, size, _etag(result.etag), content_type, metadata)

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        name = self._name(key)
        content_type = resolve_content_type(key, content_type)
        metadata = normalize_metadata(metadata)
        size = os.stat(path).st_size  # FileNotFoundError for a missing source, as for open()
        with self._errors("put", key):
            result = self._client.fput_object(
                self._bucket, name, os.fspath(path), content_type=content_type, metadata=_meta_headers(metadata)
            )
        return ObjectInfo(key, size, _etag(result.etag), content_type, metadata)

    def put_bytes_if_absent(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        name = self._name(key)
        content_type = resolve_content_type(key, content_type)
        metadata = normalize_metadata(metadata)
        if not self._conditional:
            if self.exists(key):
                return False
            self.put_bytes(key, data, content_type, metadata)
            return True
        return self._conditional_put(key, name, bytes(data), content_type, metadata)

    def _conditional_put(self, key: str, name: str, data: bytes, content_type: str, metadata: dict[str, str]) -> bool:
        headers = {**_meta_headers(metadata), "Content-Type": content_type, "If-None-Match": "*"}
        for _ in range(_CONDITIONAL_CONFLICT_RETRIES):
            with self._errors("put_if_absent", key):
                try:
                    # SDK-internal: the public put_object cannot send If-None-Match.
                    self._client._put_object(self._bucket, name, data, headers)
                    return True
                except S3Error as e:
                    if e.code == "PreconditionFailed":  # 412: the key exists
                        return False
                    if e.code != "ConditionalRequestConflict":  # 409 racing write: AWS says retry
                        raise
        raise StorageError(f"put_if_absent {key!r}: conflicting writes kept winning")

    def delete(self, key: str) -> None:
        name = self._name(key)
        with self._errors("delete", key):
            self._client.remove_object(self._bucket, name)  # S3 answers 204 for missing keys too

    # -- reads -------------------------------------------------------------------------------

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        name = self._name(key)
        with self._errors("get", key):
            response = self._client.get_object(self._bucket, name)
            try:
                length = response.headers.get("Content-Length")
                if max_bytes is not None and length is not None and int(length) > max_bytes:
                    raise ObjectTooLarge(key, int(length), max_bytes)
                if max_bytes is None:
                    return response.read()
                data = response.read(max_bytes + 1)
                if len(data) > max_bytes:  # no Content-Length (chunked): found out by reading
                    raise ObjectTooLarge(key, None, max_bytes)
                return data
            finally:
                response.close()
                response.release_conn()

    def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        name = self._name(key)
        with self._errors("get", key):
            response = self._client.get_object(self._bucket, name)
            try:
                info = _info_from_headers(key, response.headers)
                write_file_atomically(path, response.stream(_STREAM_CHUNK), fsync=True)
            finally:
                response.close()
                response.release_conn()
        return info

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        with self._errors("stat", key):
            obj = self._client.stat_object(self._bucket, name)
        return ObjectInfo(
            key,
            obj.size or 0,
            (obj.etag or "").strip('"'),
            obj.content_type,
            _metadata_from_headers(obj.metadata or {}),
            obj.last_modified,
        )

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)  # here, not in the generator: bad prefixes fail at the call
        return self._list(self._prefix + prefix, recursive)

    def _list(self, full_prefix: str, recursive: bool) -> Iterator[ObjectInfo]:
        if len(full_prefix.encode()) > MAX_KEY_BYTES:
            return
        with self._errors("list", full_prefix[len(self._prefix) :]):
            for obj in self._client.list_objects(self._bucket, prefix=full_prefix, recursive=recursive):
                key = obj.object_name[len(self._prefix) :]
                if obj.is_dir:
                    yield ObjectInfo(key, 0, "", is_prefix=True)
                else:
                    etag = (obj.etag or "").strip('"')
                    yield ObjectInfo(key, obj.size or 0, etag, last_modified=obj.last_modified)

    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        name = self._name(key)
        expires = check_expiry(self._config.presign_expiry_s if expires_s is None else expires_s)
        with self._errors("presign", key):
            return self._presign_client.presigned_get_object(self._bucket, name, expires=timedelta(seconds=expires))

    # -- internals ---------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        """The S3 object name of `key` (validated, prefixed)."""
        name = self._prefix + validate_key(key)
        if len(name.encode()) > MAX_KEY_BYTES:
            raise InvalidKey(f"key {key!r} with prefix {self._prefix!r} exceeds {MAX_KEY_BYTES} bytes")
        return name

    @contextmanager
    def _errors(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate SDK and transport errors into StorageError / ObjectNotFound."""
        where = f"{op} {key!r}" if key is not None else op
        try:
            yield
        except S3Error as e:
            if e.code in ("NoSuchKey", "NoSuchObject") and key is not None:
                raise ObjectNotFound(key) from e
            if e.code == "NoSuchBucket":
                raise StorageError(
                    f"{where}: bucket {self._bucket!r} does not exist at {self._config.endpoint}; "
                    "call ensure_bucket() first"
                ) from e
            raise StorageError(f"{where} failed: {e.code}: {e.message}") from e
        except MinioException as e:
            raise StorageError(f"{where} failed: {e}") from e
        except urllib3.exceptions.HTTPError as e:
            raise StorageError(f"{where}: cannot reach S3 at {self._config.endpoint}: {e}") from e


def _make_client(config: S3StoreConfig, endpoint: str, secure: bool) -> Minio:
    http_client = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s),
        retries=urllib3.Retry(
            total=config.max_retries,
            backoff_factor=0.2,
            status_forcelist=[500, 502, 503, 504],
            allowed_methods=None,  # S3 writes are idempotent per key: retry every method
            raise_on_status=False,  # hand the last 5xx to minio, which turns it into S3Error
        ),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.fspath(config.ca_file) if config.ca_file else None,
    )
    return Minio(
        endpoint,
        access_key=config.access_key.get_secret_value() if config.access_key else None,
        secret_key=config.secret_key.get_secret_value() if config.secret_key else None,
        secure=secure,
        region=config.region,
        http_client=http_client,
    )


def _meta_headers(metadata: Mapping[str, str]) -> dict[str, str | list[str] | tuple[str]]:
    # Prefixed here: minio would send keys like "content-type" as real headers otherwise.
    return {_META_HEADER + k: v for k, v in metadata.items()}


def _etag(etag: str | None) -> str:
    # A completed PUT always answers with an ETag; the SDK types it optional.
    assert etag is not None, "S3 PUT answered without an ETag"
    return etag


def _metadata_from_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k[len(_META_HEADER) :].lower(): v for k, v in headers.items() if k.lower().startswith(_META_HEADER)}


def _info_from_headers(key: str, headers: Mapping[str, str]) -> ObjectInfo:
    modified = headers.get("Last-Modified")
    return ObjectInfo(
        key,
        int(headers.get("Content-Length") or 0),
        (headers.get("ETag") or "").strip('"'),
        headers.get("Content-Type"),
        _metadata_from_headers(headers),
        parsedate_to_datetime(modified) if modified else None,
    )
