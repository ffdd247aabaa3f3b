"""Behaviour suite every `ObjectStore` backend must pass (shared by unit and integration tests).

A test module binds it to a backend by defining a `store` fixture (an empty store whose
bucket exists) and subclassing the contract classes:

    @pytest.fixture(params=["local", "s3"])
    def store(request, tmp_path): ...

    class TestStore(ObjectStoreContract): pass
    class TestCatalog(CatalogContract): pass
"""

from __future__ import annotations

import array
import hashlib
import os
import threading
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from shared.storage import (
    GarmentCatalog,
    GarmentExists,
    InvalidKey,
    InvalidMetadata,
    ObjectNotFound,
    ObjectStore,
    ObjectTooLarge,
)

INVALID_KEYS = [
    "",
    "/abs",
    "a/",
    "a//b",
    "..",
    "../escape",
    "a/../../escape",
    "a/./b",
    ".",
    "a\x00b",
    "a\nb",
    "a\\b",
    "x" * 1025,
    "é" * 513,  # 1026 UTF-8 bytes
]
INVALID_PREFIXES = ["/a", "../", "a/../b", "..", "a/..", "a\x00", "a//b"]

PNG = b"\x89PNG\r\n\x1a\n"
JPEG = b"\xff\xd8\xff\xe0"


def png(payload: bytes) -> bytes:
    """Bytes the catalog accepts as a PNG (it only sniffs the signature)."""
    return PNG + payload


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def keys(infos) -> list[str]:
    return sorted(i.key for i in infos)


class ObjectStoreContract:
    """Object store behaviour; needs a `store` fixture."""

    # -- round trips -------------------------------------------------------------------------

    def test_put_get_roundtrip(self, store: ObjectStore) -> None:
        data = os.urandom(1000)
        info = store.put_bytes("uploads/t1/blob", data)
        assert info.key == "uploads/t1/blob" and info.size == 1000
        assert store.get_bytes("uploads/t1/blob") == data

    def test_bytes_like_and_empty_objects(self, store: ObjectStore) -> None:
        store.put_bytes("b/bytearray", bytearray(b"abc"))
        store.put_bytes("b/memoryview", memoryview(b"xyz"))
        store.put_bytes("b/empty", b"")
        wide = memoryview(array.array("I", [1, 2, 3]))  # 3 items, 12 bytes
        assert store.put_bytes("b/wide", wide).size == 12
        assert store.get_bytes("b/wide") == wide.tobytes()
        assert store.get_bytes("b/bytearray") == b"abc"
        assert store.get_bytes("b/memoryview") == b"xyz"
        assert store.get_bytes("b/empty") == b""
        assert store.stat("b/empty").size == 0

    def test_put_info_matches_stat(self, store: ObjectStore) -> None:
        data = b"hello world"
        put = store.put_bytes("s/obj.bin", data, content_type="video/mp4", metadata={"Tenant": "acme"})
        st = store.stat("s/obj.bin")
        assert put.etag == st.etag == md5(data)  # single-part writes: MD5 hex on both backends
        assert (put.size, put.content_type, dict(put.metadata)) == (11, "video/mp4", {"tenant": "acme"})
        assert (st.size, st.content_type, dict(st.metadata)) == (11, "video/mp4", {"tenant": "acme"})
        assert st.last_modified is not None and st.last_modified.tzinfo is not None
        assert abs(datetime.now(UTC) - st.last_modified) < timedelta(minutes=5)
        assert not st.is_prefix

    def test_content_type_guessed_from_key(self, store: ObjectStore) -> None:
        assert store.put_bytes("ct/photo.png", b"x").content_type == "image/png"
        assert store.stat("ct/photo.png").content_type == "image/png"
        store.put_bytes("ct/noext", b"x")
        assert store.stat("ct/noext").content_type == "application/octet-stream"

    def test_metadata_is_user_metadata_only(self, store: ObjectStore) -> None:
        # Header-like names must stay metadata, never become real headers of the object.
        meta = {"Content-Type": "text/evil", "Cache-Control": "no-store", "x-amz-acl": "public-read"}
        store.put_bytes("m/obj.png", b"x", metadata=meta)
        st = store.stat("m/obj.png")
        assert st.content_type == "image/png"
        assert dict(st.metadata) == {
            "content-type": "text/evil",
            "cache-control": "no-store",
            "x-amz-acl": "public-read",
        }

    @pytest.mark.parametrize(
        "meta",
        [
            {"bad key": "v"},
            {"under_score": "v"},
            {"k": "non-ascii é"},
            {"k": " padded"},
            {"k": "line\nbreak"},
            {"k": 1},
            {"Dup": "a", "dup": "b"},
            {"k": "x" * 2100},
        ],
    )
    def test_invalid_metadata_rejected_before_writing(self, store: ObjectStore, meta) -> None:
        with pytest.raises(InvalidMetadata):
            store.put_bytes("m/never", b"x", metadata=meta)
        assert not store.exists("m/never")

    def test_overwrite_replaces_data_and_metadata(self, store: ObjectStore) -> None:
        store.put_bytes("o/k", b"first", content_type="text/plain", metadata={"a": "1", "b": "2"})
        store.put_bytes("o/k", b"second!", metadata={"c": "3"})
        st = store.stat("o/k")
        assert store.get_bytes("o/k") == b"second!"
        assert (st.size, st.etag, st.content_type, dict(st.metadata)) == (
            7, md5(b"second!"), "application/octet-stream", {"c": "3"}
        )  # fmt: skip

    def test_readers_never_see_a_partial_overwrite(self, store: ObjectStore) -> None:
        versions = [b"a" * 200_000, b"b" * 50_000]
        store.put_bytes("atomic/k", versions[0])
        seen: set[bytes] = set()
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                seen.add(store.get_bytes("atomic/k"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(20):
                store.put_bytes("atomic/k", versions[i % 2])
        finally:
            stop.set()
            reader.join()
        assert seen and seen <= set(versions)

    # -- missing objects, delete -------------------------------------------------------------

    def test_missing_object(self, store: ObjectStore, tmp_path: Path) -> None:
        for call in (
            lambda: store.get_bytes("nope/x"),
            lambda: store.stat("nope/x"),
            lambda: store.get_file("nope/x", tmp_path / "dest"),
        ):
            with pytest.raises(ObjectNotFound) as err:
                call()
            assert isinstance(err.value, KeyError)
            assert "nope/x" in str(err.value) and err.value.key == "nope/x"
        assert not store.exists("nope/x")
        assert not (tmp_path / "dest").exists()

    def test_delete_is_idempotent(self, store: ObjectStore) -> None:
        store.put_bytes("d/k", b"x")
        store.delete("d/k")
        store.delete("d/k")
        store.delete("d/never-existed")
        assert not store.exists("d/k")
        with pytest.raises(ObjectNotFound):
            store.get_bytes("d/k")

    # -- size limits ---------------------------------------------------------------------------

    def test_max_bytes(self, store: ObjectStore) -> None:
        store.put_bytes("big/k", b"x" * 100)
        store.put_bytes("big/empty", b"")
        assert store.get_bytes("big/k", max_bytes=100) == b"x" * 100
        assert store.get_bytes("big/empty", max_bytes=0) == b""
        with pytest.raises(ObjectTooLarge) as err:
            store.get_bytes("big/k", max_bytes=99)
        assert err.value.size == 100 and err.value.max_bytes == 99
        assert "big/k" in str(err.value)

    # -- files ---------------------------------------------------------------------------------

    def test_put_file_get_file_roundtrip_multipart_sized(self, store: ObjectStore, tmp_path: Path) -> None:
        src = tmp_path / "ckpt.safetensors"
        data = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MiB: S3 uploads it in parts
        src.write_bytes(data)
        put = store.put_file("ckpt/model.safetensors", src, metadata={"step": "1000"})
        assert put.size == len(data)
        dest = tmp_path / "out" / "nested" / "model.safetensors"  # parents get created
        got = store.get_file("ckpt/model.safetensors", dest)
        assert dest.read_bytes() == data
        assert got.size == len(data) and got.etag == store.stat("ckpt/model.safetensors").etag
        assert dict(got.metadata) == {"step": "1000"}

    def test_get_file_replaces_existing_file_and_leaves_no_temp(self, store: ObjectStore, tmp_path: Path) -> None:
        store.put_bytes("f/clip.mp4", b"new content")
        dest = tmp_path / "downloads" / "clip.mp4"
        dest.parent.mkdir()
        dest.write_bytes(b"old content that is longer")
        info = store.get_file("f/clip.mp4", dest)
        assert dest.read_bytes() == b"new content"
        assert info.content_type == "video/mp4"
        assert [p.name for p in dest.parent.iterdir()] == ["clip.mp4"]

    def test_put_file_missing_source(self, store: ObjectStore, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError):
            store.put_file("f/x", tmp_path / "absent")

    # -- listing -------------------------------------------------------------------------------

    def _populate(self, store: ObjectStore) -> None:
        for key in ["a/b", "a/b/c", "a/bc", "a/x/y/z", "ab", "b"]:
            store.put_bytes(key, key.encode())

    def test_list_recursive_string_prefix(self, store: ObjectStore) -> None:
        self._populate(store)
        assert keys(store.list("")) == ["a/b", "a/b/c", "a/bc", "a/x/y/z", "ab", "b"]
        assert keys(store.list("a/b")) == ["a/b", "a/b/c", "a/bc"]
        assert keys(store.list("a/")) == ["a/b", "a/b/c", "a/bc", "a/x/y/z"]
        assert keys(store.list("a/x/y/")) == ["a/x/y/z"]
        assert keys(store.list("a")) == ["a/b", "a/b/c", "a/bc", "a/x/y/z", "ab"]
        assert keys(store.list("zzz")) == []
        assert keys(store.list("zzz/deeper/")) == []

    def test_list_entries_carry_size_and_etag(self, store: ObjectStore) -> None:
        store.put_bytes("l/k", b"12345", metadata={"a": "b"})
        (info,) = list(store.list("l/"))
        assert (info.key, info.size, info.etag, info.is_prefix) == ("l/k", 5, md5(b"12345"), False)
        assert info.content_type is None and info.metadata is None  # listing does not carry them
        assert info.last_modified is not None

    def test_list_non_recursive_yields_common_prefixes(self, store: ObjectStore) -> None:
        self._populate(store)
        entries = list(store.list("a/", recursive=False))
        assert keys(e for e in entries if not e.is_prefix) == ["a/b", "a/bc"]
        assert keys(e for e in entries if e.is_prefix) == ["a/b/", "a/x/"]
        top = list(store.list("", recursive=False))
        assert keys(e for e in top if not e.is_prefix) == ["ab", "b"]
        assert keys(e for e in top if e.is_prefix) == ["a/"]
        assert all(e.size == 0 for e in top if e.is_prefix)

    def test_list_after_delete(self, store: ObjectStore) -> None:
        self._populate(store)
        store.delete("a/b")
        assert keys(store.list("a/b")) == ["a/b/c", "a/bc"]

    def test_object_and_prefix_with_the_same_name_coexist(self, store: ObjectStore) -> None:
        store.put_bytes("same/name", b"object")
        store.put_bytes("same/name/child", b"child")
        assert store.get_bytes("same/name") == b"object"
        assert store.get_bytes("same/name/child") == b"child"
        store.delete("same/name")
        assert store.get_bytes("same/name/child") == b"child"

    # -- keys ----------------------------------------------------------------------------------

    @pytest.mark.parametrize("key", INVALID_KEYS, ids=repr)
    def test_invalid_keys_rejected_everywhere(self, store: ObjectStore, key: str, tmp_path: Path) -> None:
        calls = [
            lambda: store.put_bytes(key, b"x"),
            lambda: store.put_bytes_if_absent(key, b"x"),
            lambda: store.put_file(key, tmp_path / "src"),
            lambda: store.get_bytes(key),
            lambda: store.get_file(key, tmp_path / "dest"),
            lambda: store.stat(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
            lambda: store.presigned_get_url(key),
        ]
        (tmp_path / "src").write_bytes(b"x")
        for call in calls:
            with pytest.raises(InvalidKey):
                call()
        assert list(store.list("")) == []

    @pytest.mark.parametrize("prefix", INVALID_PREFIXES, ids=repr)
    def test_invalid_prefixes_rejected(self, store: ObjectStore, prefix: str) -> None:
        with pytest.raises(InvalidKey):
            store.list(prefix)  # at the call, before iterating

    def test_unusual_but_valid_keys_roundtrip(self, store: ObjectStore) -> None:
        odd = [
            "u/spaces and ü ñ 日本.png",
            "u/sym +&=?#%;,!$'()*@~.bin",
            "u/%2F..%2Fescape",  # percent-escapes are literal characters, never decoded
            "u/a.b/.hidden",
            "u/...",
            "u/" + "k" * 200,
        ]
        for i, key in enumerate(odd):
            store.put_bytes(key, str(i).encode())
        for i, key in enumerate(odd):
            assert store.get_bytes(key) == str(i).encode()
        assert keys(store.list("u/")) == sorted(odd)

    # -- conditional writes --------------------------------------------------------------------

    def test_put_if_absent(self, store: ObjectStore) -> None:
        assert store.put_bytes_if_absent("r/result.json", b'{"v":1}', metadata={"job": "1"}) is True
        assert store.put_bytes_if_absent("r/result.json", b'{"v":2}', metadata={"job": "2"}) is False
        st = store.stat("r/result.json")
        assert store.get_bytes("r/result.json") == b'{"v":1}'
        assert (st.content_type, dict(st.metadata)) == ("application/json", {"job": "1"})
        store.delete("r/result.json")
        assert store.put_bytes_if_absent("r/result.json", b"again") is True

    def test_put_if_absent_has_one_winner(self, store: ObjectStore) -> None:
        n = 8
        barrier = threading.Barrier(n)
        results: dict[int, bool] = {}

        def write(i: int) -> None:
            barrier.wait()
            results[i] = store.put_bytes_if_absent("race/k", f"writer {i}".encode())

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for i, won in results.items() if won]
        assert len(winners) == 1
        assert store.get_bytes("race/k") == f"writer {winners[0]}".encode()

    # -- URLs, buckets -------------------------------------------------------------------------

    def test_presigned_url_downloads_the_object(self, store: ObjectStore) -> None:
        data = os.urandom(3000)
        store.put_bytes("p/clip 1.mp4", data)
        url = store.presigned_get_url("p/clip 1.mp4", expires_s=60)
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == data

    @pytest.mark.parametrize("expires_s", [0, -1, 7 * 24 * 3600 + 1])
    def test_presign_expiry_bounds(self, store: ObjectStore, expires_s: int) -> None:
        with pytest.raises(ValueError):
            store.presigned_get_url("p/k", expires_s=expires_s)

    def test_ensure_bucket_is_idempotent(self, store: ObjectStore) -> None:
        store.ensure_bucket()
        store.put_bytes("e/k", b"x")
        store.ensure_bucket()
        assert store.get_bytes("e/k") == b"x"


class CatalogContract:
    """GarmentCatalog behaviour on any backend; needs a `store` fixture."""

    @pytest.fixture
    def catalog(self, store: ObjectStore) -> GarmentCatalog:
        return GarmentCatalog(store)

    def test_add_defaults_to_content_hash_id(self, catalog: GarmentCatalog) -> None:
        image = png(b"red dress")
        gid = catalog.add(image, metadata={"Name": "red-dress"})
        assert gid == hashlib.sha256(image).hexdigest()
        assert catalog.get(gid) == image
        info = catalog.info(gid)
        assert info.key == f"catalog/garments/public/{gid}"
        assert info.content_type == "image/png"
        assert dict(info.metadata) == {"name": "red-dress", "sha256": gid}
        assert catalog.add(image) == gid  # same bytes: same id, no error

    def test_add_with_slug(self, catalog: GarmentCatalog) -> None:
        jpeg = JPEG + b"coat"
        assert catalog.add(jpeg, "winter-coat_01.v2") == "winter-coat_01.v2"
        assert catalog.info("winter-coat_01.v2").content_type == "image/jpeg"
        assert catalog.add(jpeg, "winter-coat_01.v2") == "winter-coat_01.v2"  # same bytes: no-op
        with pytest.raises(GarmentExists):
            catalog.add(png(b"other"), "winter-coat_01.v2")
        assert catalog.get("winter-coat_01.v2") == jpeg
        catalog.add(png(b"other"), "winter-coat_01.v2", overwrite=True)
        assert catalog.get("winter-coat_01.v2") == png(b"other")

    @pytest.mark.parametrize("bad", ["Red", "-x", ".x", "a/b", "", "a" * 65, "..", "ü", "a b"])
    def test_invalid_ids_rejected(self, catalog: GarmentCatalog, bad: str) -> None:
        with pytest.raises(ValueError):
            catalog.add(png(b"x"), bad)
        with pytest.raises(ValueError):
            catalog.get(bad)
        with pytest.raises(ValueError):
            catalog.add(png(b"x"), tenant=bad)
        assert list(catalog.list()) == []

    def test_longest_slug_accepted(self, catalog: GarmentCatalog) -> None:
        assert catalog.add(png(b"x"), "a" * 64) == "a" * 64

    def test_rejects_non_images_and_reserved_metadata(self, catalog: GarmentCatalog) -> None:
        with pytest.raises(ValueError, match="PNG, JPEG or WebP"):
            catalog.add(b"GIF89a....")
        with pytest.raises(ValueError, match="reserved"):
            catalog.add(png(b"x"), metadata={"SHA256": "forged"})
        assert list(catalog.list()) == []

    def test_get_missing_has_clear_message(self, catalog: GarmentCatalog) -> None:
        with pytest.raises(ObjectNotFound, match="garment 'ghost' not found in the catalog"):
            catalog.get("ghost")
        with pytest.raises(KeyError):
            catalog.info("ghost", tenant="acme")
        assert not catalog.exists("ghost")

    def test_tenants_and_listing(self, catalog: GarmentCatalog, store: ObjectStore) -> None:
        shared_id = catalog.add(png(b"shared"))
        acme_id = catalog.add(png(b"acme"), "acme-shirt", tenant="acme")
        catalog.add(png(b"acme2"), "acme-pants", tenant="acme")
        store.put_bytes("catalog/garments/acme/nested/not-a-garment", b"x")  # foreign object
        assert catalog.exists(acme_id, tenant="acme") and not catalog.exists(acme_id)
        entries = sorted(catalog.list("acme"), key=lambda e: e.garment_id)
        assert [(e.tenant, e.garment_id) for e in entries] == [("acme", "acme-pants"), ("acme", "acme-shirt")]
        assert entries[1].key == "catalog/garments/acme/acme-shirt"
        assert entries[1].size == len(png(b"acme"))
        everything = {(e.tenant, e.garment_id) for e in catalog.list()}
        assert everything == {("public", shared_id), ("acme", "acme-shirt"), ("acme", "acme-pants")}
        assert list(catalog.list("nobody")) == []

    def test_delete(self, catalog: GarmentCatalog) -> None:
        gid = catalog.add(png(b"gone"))
        catalog.delete(gid)
        catalog.delete(gid)
        with pytest.raises(ObjectNotFound):
            catalog.get(gid)
        assert list(catalog.list()) == []

    def test_custom_prefix(self, store: ObjectStore) -> None:
        catalog = GarmentCatalog(store, prefix="tenant-data/garments/")
        gid = catalog.add(png(b"p"))
        assert store.exists(f"tenant-data/garments/public/{gid}")
        with pytest.raises(ValueError):
            GarmentCatalog(store, prefix="no-trailing-slash")
