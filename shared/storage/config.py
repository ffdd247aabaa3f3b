"""Typed configuration of the object store (the factory that opens one: `shared.storage.factory`).

Built once at the edge (service settings, CLI, tests) and passed to constructors; nothing in
this package reads environment variables. Credentials are `SecretStr` so they never show in
reprs or logs.

    StorageConfig.from_url("file:///var/lib/fashionchameleon")
    StorageConfig.from_url("s3://clips/prod/?endpoint=minio:9000&secure=false",
                           access_key=..., secret_key=...)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.storage.base import MAX_PRESIGN_EXPIRY_S, validate_prefix

# host:port or host, no scheme and no path: the form the minio SDK takes.
_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
# S3 bucket naming rules (lowercase, 3-63 chars, no leading/trailing dot or dash).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


class LocalStoreConfig(BaseModel):
    """The embedded default: objects are files under `root`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    root: Path = Path("var/storage")
    # fsync file and directory before a write returns (crash safety; a few ms per write).
    fsync: bool = True


class S3StoreConfig(BaseModel):
    """Any S3 endpoint reached through the minio SDK (MinIO, SeaweedFS, cloud S3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str = Field(description="host:port of the S3 API, no scheme")
    secure: bool = True  # https
    region: str = "us-east-1"  # set explicitly: an unset region costs a lookup per bucket
    bucket: str
    access_key: SecretStr | None = None  # both None: anonymous requests
    secret_key: SecretStr | None = None
    # Prepended to every key so several deployments can share one bucket ("" or ends with "/").
    prefix: str = ""
    # Default lifetime of presigned GET URLs; SigV4 allows at most 7 days.
    presign_expiry_s: int = Field(default=3600, ge=1, le=MAX_PRESIGN_EXPIRY_S)
    # Base URL clients use to reach the endpoint ("https://cdn.example.com"), when it differs
    # from `endpoint` (e.g. an in-cluster service name). Presigned URLs are signed for it.
    public_url: str | None = None
    # put_bytes_if_absent sends `If-None-Match: *` (AWS S3, MinIO, SeaweedFS >= 3.9x support it).
    # False: stat then put, which two racing writers can both win (see S3ObjectStore).
    conditional_put: bool = True
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)  # connection errors and 5xx, with backoff
    ca_file: Path | None = None  # CA bundle for a private TLS endpoint (default: system CAs)

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str) -> str:
        if not _ENDPOINT.match(v):
            raise ValueError(f"endpoint must be host[:port] without scheme or path, got {v!r}")
        return v

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, v: str) -> str:
        if not _BUCKET.match(v) or ".." in v:
            raise ValueError(f"invalid S3 bucket name {v!r}")
        return v

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        if v and not v.endswith("/"):
            raise ValueError(f"prefix must be empty or end with '/', got {v!r}")
        return validate_prefix(v)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"public_url must be http(s)://host[:port], got {v!r}")
        return v

    @model_validator(mode="after")
    def _check_credentials(self) -> S3StoreConfig:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("set both access_key and secret_key, or neither (anonymous)")
        return self


class StorageConfig(BaseModel):
    """Which object store a component uses; `open_store(config)` builds it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["local", "s3"] = "local"
    local: LocalStoreConfig = LocalStoreConfig()
    s3: S3StoreConfig | None = None

    @model_validator(mode="after")
    def _check_backend(self) -> StorageConfig:
        if self.backend == "s3" and self.s3 is None:
            raise ValueError("backend 's3' needs an `s3` section")
        return self

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        access_key: str | SecretStr | None = None,
        secret_key: str | SecretStr | None = None,
    ) -> StorageConfig:
        """Parse `file:///abs/path`, a bare path, or `s3://bucket[/prefix/]?endpoint=host:port`.

        S3 query parameters: endpoint (required), secure, region, public_url, conditional_put,
        presign_expiry_s. Credentials are arguments, never part of the URL.
        """
        parts = urlsplit(url)
        if parts.scheme in ("", "file"):
            if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
                raise ValueError(f"file URL must be file:///absolute/path, got {url!r}")
            if parts.query or parts.fragment:
                raise ValueError(f"file URL takes no query or fragment: {url!r}")
            path = unquote(parts.path) if parts.scheme == "file" else url
            if not path:
                raise ValueError("empty local storage path")
            return cls(backend="local", local=LocalStoreConfig(root=Path(path)))
        if parts.scheme != "s3":
            raise ValueError(f"unsupported storage URL scheme {parts.scheme!r} (file or s3)")
        if parts.username or parts.password:
            raise ValueError("pass credentials as arguments, not inside the storage URL")
        params = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)))
        unknown = set(params) - {
            "endpoint", "secure", "region", "public_url", "conditional_put", "presign_expiry_s"
        }  # fmt: skip
        if unknown:
            raise ValueError(f"unknown s3 URL parameters: {sorted(unknown)}")
        if "endpoint" not in params:
            raise ValueError("s3 URL needs ?endpoint=host:port")
        prefix = unquote(parts.path).lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        # pydantic parses "false"/"3600" into bool/int, and plain strings into SecretStr
        s3 = S3StoreConfig.model_validate(
            {"bucket": parts.netloc, "prefix": prefix, "access_key": access_key, "secret_key": secret_key, **params}
        )
        return cls(backend="s3", s3=s3)
