"""S3 object store against a real SeaweedFS server (started once per session on loopback).

The shared behaviour suite (tests/storage_cases.py) runs on both backends through the
parametrized `store` fixture, so local and S3 stores are held to the same behaviour; the
tests below it cover what only S3 has (signed URLs over HTTP, credentials, buckets, prefixes).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

pytest.register_assert_rewrite("tests.storage_cases")

from minio import Minio

from shared.storage import (
    LocalObjectStore,
    LocalStoreConfig,
    ObjectNotFound,
    ObjectStore,
    S3StoreConfig,
    StorageConfig,
    StorageError,
    open_store,
)
from shared.storage.s3 import S3ObjectStore
from tests.fixtures.seaweedfs import SeaweedFS, SeaweedFSUnavailable, free_ports, start_seaweedfs
from tests.storage_cases import CatalogContract, ObjectStoreContract

BUCKET = "fc-storage-tests"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    t0 = time.perf_counter()
    try:
        server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    except SeaweedFSUnavailable as e:
        pytest.skip(f"SeaweedFS not available: {e}")
    print(f"\nSeaweedFS S3 ready at {server.endpoint} in {time.perf_counter() - t0:.2f}s")
    yield server
    server.stop()


def s3_config(server: SeaweedFS, **overrides) -> S3StoreConfig:
    fields = dict(
        endpoint=server.endpoint,
        secure=False,
        bucket=BUCKET,
        access_key=SecretStr(server.access_key),
        secret_key=SecretStr(server.secret_key),
        prefix=f"tests/{uuid.uuid4().hex}/",  # one namespace per test in the shared bucket
        max_retries=0,
    )
    return S3StoreConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    S3ObjectStore(s3_config(seaweedfs)).ensure_bucket()
    return BUCKET


@pytest.fixture
def s3_store(seaweedfs: SeaweedFS, s3_bucket: str) -> S3ObjectStore:
    return S3ObjectStore(s3_config(seaweedfs))


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """The same empty store contract on each backend (SeaweedFS starts only for "s3")."""
    if request.param == "local":
        local = LocalObjectStore(LocalStoreConfig(root=tmp_path / "store"))
        local.ensure_bucket()
        return local
    return request.getfixturevalue("s3_store")


class TestStoreContract(ObjectStoreContract):
    pass


class TestCatalogContract(CatalogContract):
    pass


# -- S3 only -------------------------------------------------------------------------------


def raw_client(server: SeaweedFS) -> Minio:
    return Minio(server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1")


def test_objects_live_under_the_prefix_with_s3_metadata(seaweedfs: SeaweedFS, s3_store: S3ObjectStore) -> None:
    s3_store.put_bytes("clips/job-1.mp4", b"video", metadata={"Job-Id": "j1"})
    prefix = s3_store._prefix
    obj = raw_client(seaweedfs).stat_object(BUCKET, f"{prefix}clips/job-1.mp4")
    assert obj.size == 5 and obj.content_type == "video/mp4"
    assert obj.metadata["x-amz-meta-job-id"] == "j1"


def test_prefixes_isolate_stores_sharing_a_bucket(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    a = S3ObjectStore(s3_config(seaweedfs))
    b = S3ObjectStore(s3_config(seaweedfs))
    a.put_bytes("k", b"from a")
    assert not b.exists("k")
    assert [i.key for i in a.list("")] == ["k"] and list(b.list("")) == []


def test_presigned_url_is_signed_http_and_tamper_proof(s3_store: S3ObjectStore) -> None:
    s3_store.put_bytes("p/report.json", b'{"score": 1}')
    url = s3_store.presigned_get_url("p/report.json", expires_s=120)
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    assert parts.scheme == "http" and query["X-Amz-Expires"] == ["120"]
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b'{"score": 1}'
    unsigned = urllib.parse.urlunsplit(parts._replace(query=""))
    other_key = url.replace("report.json", "other.json")
    for bad in (unsigned, other_key):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=10)
        assert err.value.code == 403


def test_presigned_url_uses_public_url(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_config(seaweedfs, public_url="https://media.example.com"))
    url = store.presigned_get_url("clips/x.mp4")
    assert url.startswith(f"https://media.example.com/{BUCKET}/tests/")
    assert "X-Amz-Expires=3600" in url  # presign_expiry_s default


def test_wrong_secret_is_a_storage_error(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_config(seaweedfs, secret_key=SecretStr("wrong-secret")))
    with pytest.raises(StorageError) as err:
        store.put_bytes("k", b"x")
    assert not isinstance(err.value, ObjectNotFound)
    with pytest.raises(StorageError):
        store.get_bytes("k")


def test_missing_bucket_says_to_call_ensure_bucket(seaweedfs: SeaweedFS) -> None:
    store = S3ObjectStore(s3_config(seaweedfs, bucket=f"absent-{uuid.uuid4().hex[:12]}"))
    with pytest.raises(StorageError, match="ensure_bucket"):
        store.get_bytes("k")
    with pytest.raises(StorageError, match="ensure_bucket"):
        list(store.list(""))


def test_ensure_bucket_creates_a_new_bucket(seaweedfs: SeaweedFS) -> None:
    name = f"fresh-{uuid.uuid4().hex[:12]}"
    store = S3ObjectStore(s3_config(seaweedfs, bucket=name, prefix=""))
    store.ensure_bucket()
    store.ensure_bucket()
    client = raw_client(seaweedfs)
    assert client.bucket_exists(name)
    client.remove_bucket(name)


def test_unreachable_endpoint_is_a_storage_error(s3_bucket: str, seaweedfs: SeaweedFS) -> None:
    (port,) = free_ports(1)
    store = S3ObjectStore(s3_config(seaweedfs, endpoint=f"127.0.0.1:{port}", connect_timeout_s=1.0))
    with pytest.raises(StorageError, match="cannot reach S3"):
        store.get_bytes("k")


def test_put_if_absent_without_conditional_header(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    store = S3ObjectStore(s3_config(seaweedfs, conditional_put=False))
    assert store.put_bytes_if_absent("r/k", b"first") is True
    assert store.put_bytes_if_absent("r/k", b"second") is False
    assert store.get_bytes("r/k") == b"first"


def test_open_store_from_url(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    url = f"s3://{BUCKET}/tests/{uuid.uuid4().hex}?endpoint={seaweedfs.endpoint}&secure=false"
    store = open_store(StorageConfig.from_url(url, access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key))
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("k", b"via url")
    assert store.get_bytes("k") == b"via url"
