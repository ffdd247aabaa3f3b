"""The object-store interface, its errors, and the validation both backends share.

Keys are S3-style: "/"-separated segments, e.g. "uploads/acme/<sha256>", "clips/<job>.mp4".
`validate_key` is the single gate for every key on every backend, so the local store cannot
be steered outside its root and the two backends accept exactly the same keys.

Semantics every backend follows (tests/storage_cases.py checks them on both):
- writes replace an object whole: data, content type and metadata together;
- `delete` of a missing key is a no-op; reads of a missing key raise `ObjectNotFound`;
- `list` uses S3 prefix semantics (a plain string prefix, "a/b" matches "a/b/c" and "a/bc");
  it yields size, etag and last_modified but leaves content_type/metadata as None (S3
  listings do not carry them; call `stat`);
- metadata keys are lowercased; values are printable ASCII; at most 2 KiB in all (S3's limit);
- etags are opaque change detectors (MD5 hex for single-part writes on both backends).
"""

from __future__ import annotations

import mimetypes
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

MAX_KEY_BYTES = 1024  # S3's limit on the UTF-8 length of a full key
MAX_METADATA_BYTES = 2048  # S3's limit on user metadata (keys + values)
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most 7 days
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_METADATA_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
_METADATA_VALUE = re.compile(r"^[\x20-\x7e]*$")

Data = bytes | bytearray | memoryview


class StorageError(Exception):
    """A storage operation failed (backend unreachable, permission denied, bucket missing...)."""


class ObjectNotFound(StorageError, KeyError):
    """No object under `key`. A KeyError too, so `except KeyError` works."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(key)
        self.key = key
        self.message = message or f"object {key!r} not found"

    def __str__(self) -> str:  # KeyError would print repr(args[0]); show the message instead
        return self.message


class ObjectTooLarge(StorageError):
    """`get_bytes(key, max_bytes)` found an object bigger than `max_bytes`."""

    def __init__(self, key: str, size: int | None, max_bytes: int) -> None:
        shown = "more than" if size is None else f"{size} bytes,"
        super().__init__(f"object {key!r} is {shown} over the limit of {max_bytes} bytes")
        self.key = key
        self.size = size
        self.max_bytes = max_bytes


class InvalidKey(StorageError, ValueError):
    """A key or prefix that no backend accepts (see `validate_key`)."""


class InvalidMetadata(StorageError, ValueError):
    """User metadata that does not survive an S3 round trip (see `normalize_metadata`)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object (or, with `is_prefix`, one common prefix).

    `size` is in bytes. `content_type` and `metadata` are None where the backend call does not
    return them (`list`); `last_modified` is None where the write response lacks it (S3 puts).
    """

    key: str
    size: int
    etag: str
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    last_modified: datetime | None = None
    is_prefix: bool = False  # a non-recursive listing's "directory" ("a/b/"); size 0, no etag


def validate_key(key: str) -> str:
    """Return `key` if it is a safe object key, else raise `InvalidKey`.

    Rules: a non-empty str of at most MAX_KEY_BYTES UTF-8 bytes; no leading or trailing "/";
    no empty, "." or ".." segments; no control characters (NUL included) and no backslash.
    """
    if not isinstance(key, str):
        raise InvalidKey(f"object key must be str, got {type(key).__name__}")
    if not key:
        raise InvalidKey("object key is empty")
    _check_chars(key, "object key")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidKey(f"object key must not start or end with '/': {key!r}")
    for segment in key.split("/"):
        _check_segment(segment, key)
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` if it is a safe listing prefix ("" lists everything), else raise `InvalidKey`.

    Complete segments (before the last "/") follow the key rules; the partial last segment is
    only matched as a string, so anything but ".." is allowed there.
    """
    if not isinstance(prefix, str):
        raise InvalidKey(f"prefix must be str, got {type(prefix).__name__}")
    if not prefix:
        return prefix
    _check_chars(prefix, "prefix")
    if prefix.startswith("/"):
        raise InvalidKey(f"prefix must not start with '/': {prefix!r}")
    *complete, partial = prefix.split("/")
    for segment in complete:
        _check_segment(segment, prefix)
    if partial == "..":
        raise InvalidKey(f"'..' in prefix {prefix!r}")
    return prefix


def _check_chars(text: str, what: str) -> None:
    try:
        n_bytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKey(f"{what} is not valid unicode: {text!r}") from None
    if n_bytes > MAX_KEY_BYTES:
        raise InvalidKey(f"{what} is {n_bytes} bytes, over the {MAX_KEY_BYTES}-byte limit")
    if _CONTROL_CHARS.search(text):
        raise InvalidKey(f"{what} contains a control character: {text!r}")
    if "\\" in text:
        raise InvalidKey(f"{what} contains a backslash: {text!r}")


def _check_segment(segment: str, key: str) -> None:
    if segment in ("", ".", ".."):
        raise InvalidKey(f"empty, '.' or '..' path segment in {key!r}")


def normalize_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """Lowercased copy of user metadata, or `InvalidMetadata` if S3 could not store it as is.

    Keys: [a-z0-9][a-z0-9-]* after lowercasing. Values: printable ASCII without leading or
    trailing spaces (S3 trims those). Total UTF-8 size of keys and values <= 2 KiB.
    """
    out: dict[str, str] = {}
    for raw_key, value in (metadata or {}).items():
        key = str(raw_key).lower()
        if not _METADATA_KEY.match(key):
            raise InvalidMetadata(f"metadata key {raw_key!r} must match [A-Za-z0-9][A-Za-z0-9-]*")
        if key in out:
            raise InvalidMetadata(f"metadata key {raw_key!r} given twice (keys are case-insensitive)")
        if not isinstance(value, str) or not _METADATA_VALUE.match(value):
            raise InvalidMetadata(f"metadata value of {raw_key!r} must be a printable ASCII str")
        if value != value.strip(" "):
            raise InvalidMetadata(f"metadata value of {raw_key!r} has leading/trailing spaces")
        out[key] = value
    size = sum(len(k) + len(v) for k, v in out.items())
    if size > MAX_METADATA_BYTES:
        raise InvalidMetadata(f"metadata is {size} bytes, over the {MAX_METADATA_BYTES}-byte limit")
    return out


def resolve_content_type(key: str, content_type: str | None) -> str:
    """`content_type` if given, else a guess from the key's extension, else octet-stream."""
    if content_type:
        if _CONTROL_CHARS.search(content_type) or not content_type.isascii():
            raise InvalidMetadata(f"invalid content type {content_type!r}")
        return content_type
    return mimetypes.guess_type(key, strict=False)[0] or DEFAULT_CONTENT_TYPE


def check_expiry(expires_s: int) -> int:
    """Presigned URL lifetime in seconds, within SigV4's 1 s .. 7 days."""
    if not isinstance(expires_s, int) or not 1 <= expires_s <= MAX_PRESIGN_EXPIRY_S:
        raise ValueError(f"expires_s must be an int in [1, {MAX_PRESIGN_EXPIRY_S}], got {expires_s!r}")
    return expires_s


def write_file_atomically(
    dest: str | os.PathLike[str], chunks: Iterable[Data], fsync: bool, tmp_prefix: str | None = None
) -> int:
    """Write `chunks` to a temp file beside `dest`, then rename it over `dest`; return the size.

    Readers see the old file or the new one, never a partial one; on error no temp file stays.
    Parent directories are created. The temp file is named `{tmp_prefix}<random>.part`
    (default prefix: "." + the start of dest's name).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name[:100]}." if tmp_prefix is None else tmp_prefix
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=prefix, suffix=".part")
    try:
        size = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


class ObjectStore(ABC):
    """Blob storage addressed by key; see the module docstring for the shared semantics."""

    @abstractmethod
    def ensure_bucket(self) -> None:
        """Create the bucket (S3) or root directory (local) if missing; idempotent."""

    @abstractmethod
    def put_bytes(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Create or replace the object `key` with `data`."""

    @abstractmethod
    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Create or replace the object `key` with the contents of the local file `path`.

        Streams: suitable for checkpoints of many GB (S3 uses multipart uploads, so the etag
        is then not an MD5).
        """

    @abstractmethod
    def put_bytes_if_absent(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Write `data` only if `key` does not exist; True if this call wrote it.

        For idempotent result writes under deterministic keys: a retried job finds its result
        already there and leaves it alone. Atomic on the local store and on S3 servers that
        honour `If-None-Match: *` (see S3StoreConfig.conditional_put).
        """

    @abstractmethod
    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's data; `ObjectTooLarge` (nothing read) if it exceeds `max_bytes`."""

    @abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Download the object to `path` atomically (temp file + rename); creates parents."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size, etag, content type, metadata and modification time of `key`."""

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        """Objects whose key starts with `prefix`.

        Non-recursive listings stop at the next "/" after the prefix and yield each such
        common prefix once, as an `ObjectInfo` with `is_prefix=True` and a key ending in "/".
        Order: by UTF-8 bytes on the local store and AWS/MinIO; SeaweedFS lists in its own
        tree order, so sort when order matters.
        """

    @abstractmethod
    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        """A URL that downloads `key` without credentials (local store: a file:// URL).

        `expires_s` defaults to the store's configured lifetime; the local store ignores it.
        The object need not exist yet.
        """
