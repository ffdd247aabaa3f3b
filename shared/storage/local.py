"""Local-filesystem object store: the embedded default, with the S3 store's behaviour.

On-disk layout under `root` mirrors the keys, e.g. for key "clips/dev/ses_x.mp4":

    clips/dev/ses_x.mp4               the object's bytes (what presigned file:// URLs point at)
    clips/dev/ses_x.mp4#meta.json     sidecar: content type, metadata, etag, identity of the data

Each key segment is percent-encoded (`quote(seg, safe="")`: "b c" is stored as "b%20c"), so an
encoded segment is never "/" (and `validate_key` rules out "." and ".."), never contains "#"
(sidecars and temp files, which never collide with objects) and never ends with "@". S3 lets
keys "a" and "a/b" coexist where a filesystem cannot hold a file and a folder both named "a":
then the object's file is "a@" beside the folder "a" (an object is written there when the
folder exists, and moved there when a key below it needs the folder). Readers look at "a",
then "a@". Together with `validate_key` this confines every path to `root`.

Folders from the earlier layout (each folder name suffixed with "@", e.g. "clips@/dev@/...")
are not read: nothing is migrated, the objects stored that way are simply not seen.

Writes go to a temp file in the target directory, are fsynced and renamed into place
(`os.replace`), so readers see the old object or the new one, never a torn one. The sidecar is
renamed into place just before the data and records the data file's (inode, size, mtime), so
a reader that catches the two renames half done, or a sidecar orphaned by a crash, is
detected: `stat` then recomputes the etag and reports the guessed content type and no
metadata. Deletes remove empty parent directories, so non-recursive listings never show
prefixes without objects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat as stat_module
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote

from shared.storage.base import (
    Data,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
    check_expiry,
    normalize_metadata,
    resolve_content_type,
    validate_key,
    validate_prefix,
    write_file_atomically,
)
from shared.storage.config import LocalStoreConfig

_ALT_SUFFIX = "@"  # an object's file beside a folder of the same name; quote(..., safe="")
# always escapes "@" and "#"
_SIDECAR_SUFFIX = "#meta.json"
_TMP_PREFIX = "#tmp-"
_MAX_NAME_BYTES = 255 - len(_SIDECAR_SUFFIX) - len(_ALT_SUFFIX)  # common filesystem limit on one name
_COPY_CHUNK = 1 << 20  # 1 MiB


class LocalObjectStore(ObjectStore):
    """Objects as files under `config.root`; safe for several processes on one host."""

    def __init__(self, config: LocalStoreConfig) -> None:
        self._config = config
        self._root = Path(os.path.abspath(config.root))

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"LocalObjectStore(root={str(self._root)!r})"

    # -- writes ------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)

    def put_bytes(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        info = self._write(key, lambda f: _write_all(f, data), content_type, metadata, if_absent=False)
        assert info is not None  # only if_absent writes can lose
        return info

    def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        validate_key(key)  # before touching `path`: an invalid key is reported as such
        with open(path, "rb") as src:
            info = self._write(key, lambda f: _copy(src, f), content_type, metadata, if_absent=False)
        assert info is not None
        return info

    def put_bytes_if_absent(
        self,
        key: str,
        data: Data,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        info = self._write(key, lambda f: _write_all(f, data), content_type, metadata, if_absent=True)
        return info is not None

    def delete(self, key: str) -> None:
        path = self._data_path(key)
        for candidate in (path, _alt_path(path)):
            # Sidecar first: a put racing with this delete can then at worst orphan a sidecar
            # (ignored by readers), never expose its data with the wrong metadata.
            _sidecar_path(candidate).unlink(missing_ok=True)
            with contextlib.suppress(IsADirectoryError, PermissionError):  # a folder: not this object
                if not candidate.is_dir():
                    candidate.unlink(missing_ok=True)
        self._prune_empty_dirs(path.parent)

    # -- reads -------------------------------------------------------------------------------

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        with self._open(key) as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(key, size, max_bytes)
            return f.read()

    def get_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        with self._open(key) as f:
            info = self._info(key, Path(f.name), os.fstat(f.fileno()))
            write_file_atomically(path, iter(lambda: f.read(_COPY_CHUNK), b""), self._config.fsync)
        return info

    def stat(self, key: str) -> ObjectInfo:
        path = self._data_path(key)
        for candidate in (path, _alt_path(path)):
            try:
                st = candidate.stat()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if stat_module.S_ISREG(st.st_mode):
                return self._info(key, candidate, st)
        raise ObjectNotFound(key)

    def exists(self, key: str) -> bool:
        path = self._data_path(key)
        return path.is_file() or _alt_path(path).is_file()

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        validate_prefix(prefix)  # here, not in the generator: bad prefixes fail at the call
        head, _, partial = prefix.rpartition("/")
        directory = self._root.joinpath(*(_name(s) for s in head.split("/"))) if head else self._root
        return self._walk(directory, head + "/" if head else "", partial, recursive)

    def presigned_get_url(self, key: str, expires_s: int | None = None) -> str:
        if expires_s is not None:
            check_expiry(expires_s)
        path = self._data_path(key)
        alt = _alt_path(path)
        return (alt if not path.is_file() and alt.is_file() else path).as_uri()

    # -- internals ---------------------------------------------------------------------------

    def _data_path(self, key: str) -> Path:
        *dirs, name = validate_key(key).split("/")
        file_name = _name(name)
        if len(file_name.encode()) > _MAX_NAME_BYTES or any(len(_name(d).encode()) > 255 for d in dirs):
            raise InvalidKey(f"a segment of {key!r} is too long for the local store once encoded")
        path = self._root.joinpath(*(_name(d) for d in dirs), file_name)
        # Defence in depth: validate_key and the encoding already rule this out.
        if os.path.commonpath([self._root, path]) != str(self._root):
            raise InvalidKey(f"key {key!r} escapes the store root")
        return path

    def _open(self, key: str) -> BinaryIO:
        path = self._data_path(key)
        for candidate in (path, _alt_path(path)):
            try:
                return open(candidate, "rb")
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue
        raise ObjectNotFound(key)

    def _target(self, path: Path) -> Path:
        """Where to write the object whose plain path is `path`: where it is now, else beside
        a folder of the same name, else the plain path."""
        alt = _alt_path(path)
        return alt if alt.is_file() or path.is_dir() else path

    def _make_dirs(self, directory: Path) -> None:
        """mkdir -p `directory`; an object's file in the way moves aside to its "@" name."""
        for _ in range(10):
            try:
                directory.mkdir(parents=True, exist_ok=True)
                return
            except (FileExistsError, NotADirectoryError):
                pass
            # The nearest ancestor (or `directory` itself) that is a file: an object; move it.
            blocker = directory
            while blocker != self._root and not blocker.is_file():
                blocker = blocker.parent
            if blocker != self._root:
                with contextlib.suppress(FileNotFoundError):
                    os.replace(blocker, _alt_path(blocker))
                with contextlib.suppress(FileNotFoundError):
                    os.replace(_sidecar_path(blocker), _sidecar_path(_alt_path(blocker)))
        raise OSError(f"could not create the folder {directory}")

    def _write(
        self,
        key: str,
        fill: Callable[[BinaryIO], str],
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        *,
        if_absent: bool,
    ) -> ObjectInfo | None:
        """Write via `fill(file) -> md5 hex` to a temp file, then publish it at `key`.

        if_absent: publish with link(2), which fails if the key exists (atomic; returns None).
        """
        plain = self._data_path(key)
        content_type = resolve_content_type(key, content_type)
        metadata = normalize_metadata(metadata)
        fd, tmp = self._mkstemp(plain.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                etag = fill(f)
                f.flush()
                if self._config.fsync:
                    os.fsync(f.fileno())
                st = os.fstat(f.fileno())
            sidecar = {
                "content_type": content_type,
                "metadata": metadata,
                "etag": etag,
                "data": _identity(st),
            }
            path = self._target(plain)
            if if_absent:
                if path is plain and _alt_path(plain).is_file():
                    return None
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    if not path.is_dir():
                        return None
                    path = _alt_path(plain)  # a folder of the same name appeared meanwhile
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return None
                self._write_sidecar(path, sidecar)
            else:
                self._write_sidecar(path, sidecar)
                try:
                    os.replace(tmp, path)
                except IsADirectoryError:  # a folder of the same name appeared meanwhile
                    _sidecar_path(path).unlink(missing_ok=True)
                    path = _alt_path(plain)
                    self._write_sidecar(path, sidecar)
                    os.replace(tmp, path)
            if self._config.fsync:
                _fsync_dir(path.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)  # after link(2), or on error
        return ObjectInfo(key, st.st_size, etag, content_type, metadata, _mtime(st))

    def _mkstemp(self, directory: Path) -> tuple[int, str]:
        # A concurrent delete may prune `directory` between mkdir and mkstemp: retry.
        for _ in range(10):
            self._make_dirs(directory)
            try:
                return tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)
            except FileNotFoundError:
                continue
        raise OSError(f"could not create a temp file in {directory}")

    def _write_sidecar(self, path: Path, sidecar: dict) -> None:
        payload = json.dumps(sidecar, sort_keys=True).encode()
        write_file_atomically(_sidecar_path(path), [payload], self._config.fsync, tmp_prefix=_TMP_PREFIX)

    def _info(self, key: str, path: Path, st: os.stat_result) -> ObjectInfo:
        sidecar = _read_sidecar(path, st)
        if sidecar is None:  # mid-write or orphaned sidecar: derive what the data tells
            etag = _md5_file(path)
            content_type, metadata = resolve_content_type(key, None), {}
        else:
            etag, content_type, metadata = sidecar["etag"], sidecar["content_type"], sidecar["metadata"]
        return ObjectInfo(key, st.st_size, etag, content_type, metadata, _mtime(st))

    def _walk(self, directory: Path, key_base: str, partial: str, recursive: bool) -> Iterator[ObjectInfo]:
        """Objects under `directory` (keys start with `key_base`) whose next segment starts with
        `partial`, in UTF-8 byte order: entries sort by decoded segment, directories as "seg/".
        """
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # a prefix no stored key can have
                return
            raise
        found: dict[str, tuple[os.DirEntry[str], bool]] = {}
        for entry in entries:
            if "#" in entry.name:  # sidecars and temp files
                continue
            alt = entry.name.endswith(_ALT_SUFFIX)
            if entry.is_dir(follow_symlinks=False) and not alt:  # "x@" folders: the earlier layout
                segment, is_dir = unquote(entry.name), True
            elif entry.is_file(follow_symlinks=False):
                segment, is_dir = unquote(entry.name[: -len(_ALT_SUFFIX)] if alt else entry.name), False
            else:
                continue
            rel = segment + "/" if is_dir else segment
            if segment.startswith(partial) and not (alt and rel in found):  # both names: mid-move
                found[rel] = (entry, is_dir)
        items = sorted(((rel, entry, is_dir) for rel, (entry, is_dir) in found.items()), key=lambda i: i[0].encode())
        for rel, entry, is_dir in items:
            key = key_base + rel
            if is_dir and recursive:
                yield from self._walk(Path(entry.path), key, "", recursive)
            elif is_dir:
                yield ObjectInfo(key, 0, "", is_prefix=True)
            else:
                try:
                    info = self._info(key, Path(entry.path), entry.stat(follow_symlinks=False))
                except FileNotFoundError:  # deleted while listing
                    continue
                yield ObjectInfo(info.key, info.size, info.etag, last_modified=info.last_modified)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self._root and self._root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop
                return
            directory = directory.parent


def _name(segment: str) -> str:
    return quote(segment, safe="")


def _alt_path(path: Path) -> Path:
    """Where the object of plain path `path` lives when a folder holds that name."""
    return path.with_name(path.name + _ALT_SUFFIX)


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _identity(st: os.stat_result) -> list[int]:
    """What ties a sidecar to one version of the data file (rename keeps all three)."""
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _read_sidecar(path: Path, st: os.stat_result) -> dict | None:
    try:
        sidecar = json.loads(_sidecar_path(path).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if sidecar.get("data") != _identity(st):
        return None
    return sidecar


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC)


def _write_all(f: BinaryIO, data: Data) -> str:
    f.write(data)
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _copy(src: BinaryIO, dst: BinaryIO) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    while chunk := src.read(_COPY_CHUNK):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
