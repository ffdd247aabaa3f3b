"""Local-filesystem object store: the shared behaviour suite plus local-only guarantees
(root confinement, on-disk layout, crash atomicity, sidecars) and the pure helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

pytest.register_assert_rewrite("tests.storage_cases")

import shared.storage.local as local_module
from shared.storage import (
    InvalidKey,
    InvalidMetadata,
    LocalObjectStore,
    LocalStoreConfig,
    S3StoreConfig,
    StorageConfig,
    content_key,
    normalize_metadata,
    open_store,
    sniff_image_type,
    upload_key,
    validate_key,
    validate_prefix,
)
from tests.storage_cases import INVALID_KEYS, CatalogContract, ObjectStoreContract


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    s = LocalObjectStore(LocalStoreConfig(root=tmp_path / "store"))
    s.ensure_bucket()
    return s


class TestLocalStoreContract(ObjectStoreContract):
    pass


class TestLocalCatalogContract(CatalogContract):
    pass


# -- root confinement ----------------------------------------------------------------------


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize(
    "key",
    INVALID_KEYS + ["../../etc/passwd", "a/../../../x", "/etc/passwd", "..\\..\\x", "a/\x00/../x"],
    ids=repr,
)
def test_keys_cannot_escape_root(tmp_path: Path, key: str) -> None:
    root = tmp_path / "deep" / "store"
    s = LocalObjectStore(LocalStoreConfig(root=root))
    s.ensure_bucket()
    before = _tree(tmp_path)
    with pytest.raises(InvalidKey):
        s.put_bytes(key, b"pwned")
    assert _tree(tmp_path) == before


def test_every_file_stays_under_root_for_tricky_valid_keys(tmp_path: Path) -> None:
    root = tmp_path / "store"
    s = LocalObjectStore(LocalStoreConfig(root=root))
    tricky = ["%2E%2E/x", "..%2F..%2Fx", "...", "a.../b", "~/x", "a@/b", "x#meta.json", "#tmp-1", "a%40/b"]
    for key in tricky:
        s.put_bytes(key, key.encode())
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} <= {root, *root.rglob("*")}
    for key in tricky:
        assert s.get_bytes(key) == key.encode()
    assert sorted(i.key for i in s.list("")) == sorted(tricky)


def test_on_disk_layout_is_readable_and_collision_free(store: LocalObjectStore) -> None:
    store.put_bytes("a/b c/x.png", b"1")
    store.put_bytes("a", b"2")  # object "a" beside prefix "a/"
    store.put_bytes("a/b c/x.png#meta.json", b"3")  # looks like a sidecar; is an object
    files = sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file())
    assert files == [
        "a/b%20c/x.png",
        "a/b%20c/x.png#meta.json",
        "a/b%20c/x.png%23meta.json",
        "a/b%20c/x.png%23meta.json#meta.json",
        "a@",  # object "a" beside the folder "a"
        "a@#meta.json",
    ]
    assert store.get_bytes("a/b c/x.png") == b"1"
    assert store.get_bytes("a") == b"2"
    assert store.get_bytes("a/b c/x.png#meta.json") == b"3"


def test_on_disk_path_mirrors_the_key(store: LocalObjectStore) -> None:
    store.put_bytes("clips/dev/ses_x.mp4", b"mp4", metadata={"v": "1"})
    assert (store.root / "clips" / "dev" / "ses_x.mp4").read_bytes() == b"mp4"
    assert store.presigned_get_url("clips/dev/ses_x.mp4") == (store.root / "clips/dev/ses_x.mp4").as_uri()
    assert store.stat("clips/dev/ses_x.mp4").metadata == {"v": "1"}


def test_object_moves_aside_when_a_key_below_it_needs_the_folder(store: LocalObjectStore) -> None:
    store.put_bytes("m/a", b"object", metadata={"v": "1"})
    store.put_bytes("m/a/child", b"child")
    assert (store.root / "m" / "a@").read_bytes() == b"object"
    assert (store.root / "m" / "a" / "child").read_bytes() == b"child"
    assert (store.get_bytes("m/a"), dict(store.stat("m/a").metadata)) == (b"object", {"v": "1"})
    assert [i.key for i in store.list("m/")] == ["m/a", "m/a/child"]
    store.put_bytes("m/a", b"again")  # rewritten where it is
    assert (store.root / "m" / "a@").read_bytes() == b"again" and store.exists("m/a")
    assert store.put_bytes_if_absent("m/a", b"x") is False
    store.delete("m/a/child")  # the folder goes; the object stays readable beside it
    assert [i.key for i in store.list("")] == ["m/a"] and store.get_bytes("m/a") == b"again"
    store.delete("m/a")
    assert list(store.root.iterdir()) == []


def test_overlong_segment_rejected_clearly(store: LocalObjectStore) -> None:
    with pytest.raises(InvalidKey, match="too long for the local store"):
        store.put_bytes("x/" + "é" * 100, b"x")  # 200 UTF-8 bytes -> 600 chars once quoted
    store.put_bytes("x/" + "e" * 240, b"fits")


# -- atomicity, sidecars -------------------------------------------------------------------


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "#tmp-" in p.name or p.name.endswith(".part")]


def test_crash_before_publishing_keeps_the_old_object(store: LocalObjectStore, monkeypatch) -> None:
    store.put_bytes("k/obj", b"old", metadata={"v": "1"})
    real_replace = os.replace
    data_path = store.root / "k" / "obj"

    def crash_on_data(src, dst):
        if Path(dst) == data_path:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(local_module.os, "replace", crash_on_data)
    with pytest.raises(OSError, match="simulated crash"):
        store.put_bytes("k/obj", b"new data")
    monkeypatch.undo()
    assert store.get_bytes("k/obj") == b"old"
    st = store.stat("k/obj")
    # The new sidecar landed but does not describe the old data: detected, etag recomputed.
    assert (st.size, st.etag) == (3, hashlib.md5(b"old").hexdigest())
    assert _temp_files(store.root) == []


def test_failed_write_leaves_no_temp_files(store: LocalObjectStore, monkeypatch) -> None:
    store.put_bytes("t/k", b"old")

    def half_write(f, data) -> str:
        f.write(bytes(data[:3]))
        raise OSError("disk full")

    monkeypatch.setattr(local_module, "_write_all", half_write)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("t/k", b"new data")
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes_if_absent("t/other", b"new data")
    assert _temp_files(store.root) == []
    assert store.get_bytes("t/k") == b"old" and not store.exists("t/other")


def test_missing_sidecar_falls_back_to_data(store: LocalObjectStore) -> None:
    store.put_bytes("s/k.png", b"pixels", content_type="image/x-custom", metadata={"a": "b"})
    (store.root / "s" / "k.png#meta.json").unlink()
    st = store.stat("s/k.png")
    assert (st.size, st.etag, st.content_type, dict(st.metadata)) == (
        6, hashlib.md5(b"pixels").hexdigest(), "image/png", {}
    )  # fmt: skip
    assert [i.etag for i in store.list("s/")] == [st.etag]


def test_temp_and_sidecar_files_are_not_listed(store: LocalObjectStore) -> None:
    store.put_bytes("l/k", b"x")
    (store.root / "l" / "#tmp-leftover").write_bytes(b"junk")
    assert [i.key for i in store.list("")] == ["l/k"]


def test_delete_prunes_empty_directories(store: LocalObjectStore) -> None:
    store.put_bytes("a/x/y/z", b"1")
    store.put_bytes("a/keep", b"2")
    store.delete("a/x/y/z")
    assert not (store.root / "a" / "x").exists()
    assert [(i.key, i.is_prefix) for i in store.list("a/", recursive=False)] == [("a/keep", False)]
    store.delete("a/keep")
    assert list(store.root.iterdir()) == []


def test_listing_is_in_utf8_byte_order(store: LocalObjectStore) -> None:
    ks = ["a/b", "a/b/c", "a-1", "a/bc", "a0", "b", "Z", "é", "a/b-"]
    for k in ks:
        store.put_bytes(k, b"x")
    assert [i.key for i in store.list("")] == sorted(ks, key=str.encode)
    flat = [i.key for i in store.list("", recursive=False)]
    assert flat == sorted(["Z", "a-1", "a/", "a0", "b", "é"], key=str.encode)


def test_presigned_url_is_a_file_url_under_root(store: LocalObjectStore) -> None:
    url = store.presigned_get_url("p/clip 1.mp4")
    assert url == (store.root / "p" / "clip%201.mp4").as_uri()
    assert url.startswith("file:///")


def test_unsynced_store_and_missing_root(tmp_path: Path) -> None:
    s = LocalObjectStore(LocalStoreConfig(root=tmp_path / "not-yet", fsync=False))
    assert list(s.list("")) == []
    assert not s.exists("k")
    s.put_bytes("k", b"x")  # creates the root on demand
    assert s.get_bytes("k") == b"x"


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = LocalObjectStore(LocalStoreConfig(root=Path("rel/store")))
    assert s.root == tmp_path / "rel" / "store"


# -- validation helpers --------------------------------------------------------------------


def test_validate_key_accepts_and_rejects() -> None:
    assert validate_key("uploads/acme/abc") == "uploads/acme/abc"
    assert validate_key("x" * 1024) == "x" * 1024
    for bad in INVALID_KEYS:
        with pytest.raises(InvalidKey):
            validate_key(bad)
    with pytest.raises(InvalidKey):
        validate_key(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # InvalidKey is a ValueError too
        validate_key("\ud800")  # lone surrogate: not encodable


def test_validate_prefix() -> None:
    for ok in ["", "a", "a/", "a/b", "a/.", "a/.hid", "a/b/..."]:
        assert validate_prefix(ok) == ok
    for bad in ["/a", "..", "a/..", "../b", "a//", "a\x00"]:
        with pytest.raises(InvalidKey):
            validate_prefix(bad)


def test_normalize_metadata() -> None:
    assert normalize_metadata(None) == {}
    assert normalize_metadata({"Garment-ID": "g1", "x": ""}) == {"garment-id": "g1", "x": ""}
    with pytest.raises(InvalidMetadata):
        normalize_metadata({"k": "é"})


def test_content_and_upload_keys() -> None:
    data = b"image bytes"
    digest = hashlib.sha256(data).hexdigest()
    assert content_key("clips/acme", data) == f"clips/acme/{digest}"
    assert upload_key("acme", data) == f"uploads/acme/{digest}"
    assert upload_key("acme", data) == upload_key("acme", bytearray(data))
    assert upload_key("acme", data) != upload_key("acme", data + b"!")
    for bad in ["", "/abs", "a/", "../x"]:
        with pytest.raises(InvalidKey):
            content_key(bad, data)
    with pytest.raises(ValueError):
        upload_key("Acme/../x", data)


def test_sniff_image_type() -> None:
    assert sniff_image_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert sniff_image_type(b"\xff\xd8\xff\xdb") == "image/jpeg"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    for bad in [b"", b"GIF89a", b"RIFF\x00\x00\x00\x00WAVE"]:
        with pytest.raises(ValueError):
            sniff_image_type(bad)


# -- configuration -------------------------------------------------------------------------


def test_config_from_file_url_and_bare_path() -> None:
    assert StorageConfig.from_url("file:///var/lib/fc%20store").local.root == Path("/var/lib/fc store")
    assert StorageConfig.from_url("file://localhost/srv/x").local.root == Path("/srv/x")
    assert StorageConfig.from_url("./var/storage").local.root == Path("var/storage")
    assert StorageConfig().backend == "local"
    for bad in ["file://host/x", "file:///x?y=1", "gs://bucket", ""]:
        with pytest.raises(ValueError):
            StorageConfig.from_url(bad)


def test_config_from_s3_url() -> None:
    cfg = StorageConfig.from_url(
        "s3://fc-clips/prod/v1?endpoint=minio.svc:9000&secure=false&region=eu-west-1"
        "&conditional_put=false&presign_expiry_s=600&public_url=https://cdn.example.com",
        access_key="AK",
        secret_key="SK",
    )
    s3 = cfg.s3
    assert cfg.backend == "s3" and s3 is not None
    assert (s3.bucket, s3.prefix, s3.endpoint, s3.secure, s3.region) == (
        "fc-clips", "prod/v1/", "minio.svc:9000", False, "eu-west-1"
    )  # fmt: skip
    assert (s3.conditional_put, s3.presign_expiry_s, s3.public_url) == (False, 600, "https://cdn.example.com")
    assert s3.secret_key.get_secret_value() == "SK"
    assert "SK" not in repr(cfg) and "SK" not in str(cfg.model_dump())
    assert StorageConfig.from_url("s3://b-1?endpoint=h:1").s3.prefix == ""


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/p",  # no endpoint
        "s3://bucket?endpoint=http://h:9000",  # scheme in endpoint
        "s3://Bucket?endpoint=h:9000",  # uppercase bucket
        "s3://ab?endpoint=h:9000",  # too short
        "s3://user:pw@bucket?endpoint=h:9000",  # credentials in URL
        "s3://bucket?endpoint=h:9000&colour=red",  # unknown parameter
        "s3://bucket?endpoint=h:9000&presign_expiry_s=999999999",
        "s3://bucket/../x?endpoint=h:9000",
    ],
)
def test_config_from_bad_s3_url(url: str) -> None:
    with pytest.raises(ValueError):
        StorageConfig.from_url(url)


def test_config_validation() -> None:
    with pytest.raises(ValidationError):
        StorageConfig(backend="s3")  # no s3 section
    with pytest.raises(ValidationError):
        S3StoreConfig(endpoint="h:1", bucket="bkt", access_key=SecretStr("only-one"))
    with pytest.raises(ValidationError):
        S3StoreConfig(endpoint="h:1", bucket="bkt", prefix="no-slash")
    with pytest.raises(ValidationError):
        S3StoreConfig(endpoint="h:1", bucket="bkt", public_url="ftp://x")
    with pytest.raises(ValidationError):
        StorageConfig(backend="gcs")  # type: ignore[arg-type]
    cfg = S3StoreConfig(endpoint="[::1]:9000", bucket="bkt")
    with pytest.raises(ValidationError):
        cfg.bucket = "other"  # type: ignore[misc]  # frozen


def test_open_store_local(tmp_path: Path) -> None:
    store = open_store(StorageConfig.from_url(tmp_path.as_uri()))
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path
