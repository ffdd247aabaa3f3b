"""`python -m services.checkpoint_sync` (the chart's init container) and the environment
handling of `services.serve_entry`, on the local-filesystem store."""

from __future__ import annotations

import json
import os

import pytest

from services.checkpoint_sync import MARKER, CheckpointNotFound, UsageError, main, sync_checkpoint
from services.serve_entry import config_from_env
from shared.storage import open_store
from shared.storage.config import LocalStoreConfig, StorageConfig


@pytest.fixture
def store(tmp_path):
    return open_store(StorageConfig(backend="local", local=LocalStoreConfig(root=tmp_path / "store", fsync=False)))


def put_checkpoint(store, ckpt_id: str, files: dict[str, bytes], prefix: str = "checkpoints/") -> None:
    for rel, data in files.items():
        store.put_bytes(f"{prefix}{ckpt_id}/{rel}", data)


FILES = {
    "model_index.json": b'{"_class_name": "x"}',
    "transformer/config.json": b"{}",
    "transformer/diffusion_pytorch_model.safetensors": os.urandom(4096),
    "vae/config.json": b"{}",
}


def read_tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def test_sync_copies_the_folder_atomically_and_is_idempotent(store, tmp_path):
    put_checkpoint(store, "ckpt-1", FILES)
    dest = tmp_path / "cache"
    first = sync_checkpoint(store, "ckpt-1", dest)
    assert first["status"] == "synced" and first["objects"] == len(FILES)
    assert read_tree(dest / "ckpt-1") == FILES
    assert not [p for p in dest.iterdir() if ".partial-" in p.name]
    again = sync_checkpoint(store, "ckpt-1", dest)
    assert again["status"] == "present" and again["bytes"] == 0


def test_a_changed_listing_or_a_damaged_cache_is_synced_again(store, tmp_path):
    put_checkpoint(store, "ckpt-1", FILES)
    dest = tmp_path / "cache"
    sync_checkpoint(store, "ckpt-1", dest)
    store.put_bytes("checkpoints/ckpt-1/vae/config.json", b'{"changed": true}')
    assert sync_checkpoint(store, "ckpt-1", dest)["status"] == "synced"
    assert (dest / "ckpt-1" / "vae" / "config.json").read_bytes() == b'{"changed": true}'
    (dest / "ckpt-1" / MARKER).unlink()  # e.g. a crash between download and marker
    assert sync_checkpoint(store, "ckpt-1", dest)["status"] == "synced"


def test_missing_checkpoint_and_bad_ids_fail_cleanly(store, tmp_path):
    put_checkpoint(store, "ckpt-1", FILES)
    with pytest.raises(CheckpointNotFound, match="checkpoints/ckpt-2/"):
        sync_checkpoint(store, "ckpt-2", tmp_path / "cache")
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(UsageError):
            sync_checkpoint(store, bad, tmp_path / "cache")
    assert not (tmp_path / "cache" / "ckpt-2").exists()


def test_keep_prunes_least_recently_used_checkpoints(store, tmp_path):
    dest = tmp_path / "cache"
    for i in range(4):
        put_checkpoint(store, f"ckpt-{i}", {"model_index.json": b"{}"})
        sync_checkpoint(store, f"ckpt-{i}", dest)
        os.utime(dest / f"ckpt-{i}" / MARKER, (1000 + i, 1000 + i))
    os.utime(dest / "ckpt-0" / MARKER, (5000, 5000))  # ckpt-0 used most recently
    result = sync_checkpoint(store, "ckpt-1", dest, keep=2)
    assert sorted(result["removed"]) == ["ckpt-2", "ckpt-3"]
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == ["ckpt-0", "ckpt-1"]


def test_main_reads_the_store_from_the_environment(store, tmp_path, capsys):
    put_checkpoint(store, "ckpt-1", FILES, prefix="models/")
    env = {
        "FASHIONCHAMELEON_CONFIG": json.dumps(
            {"storage": {"backend": "local", "local": {"root": str(tmp_path / "store")}}}
        )
    }
    dest = tmp_path / "cache"
    argv = ["--checkpoint-id", "ckpt-1", "--dest", str(dest), "--prefix", "models/", "--keep", "3"]
    assert main(argv, env) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "synced" and summary["path"] == str(dest / "ckpt-1")
    assert main(["--checkpoint-id", "nope", "--dest", str(dest), "--prefix", "models/"], env) == 3
    assert main(argv, {**env, "FASHIONCHAMELEON_S3_ACCESS_KEY": "only-one"}) == 2


S3_CONFIG = {"storage": {"backend": "s3", "s3": {"endpoint": "minio:9000", "bucket": "fc-prod", "secure": False}}}


def test_config_from_env_merges_s3_credentials_and_redis_and_keys(tmp_path):
    env = {
        "FASHIONCHAMELEON_CONFIG": json.dumps(S3_CONFIG),
        "FASHIONCHAMELEON_S3_ACCESS_KEY": "AK",
        "FASHIONCHAMELEON_S3_SECRET_KEY": "SK",
        "FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": "key-acme-0123456789"}),
        "FASHIONCHAMELEON_REDIS_URL": "redis://:pw@redis:6379/0",
    }
    config = config_from_env(env)
    assert config.storage.s3.access_key.get_secret_value() == "AK"
    assert config.storage.s3.secret_key.get_secret_value() == "SK"
    assert config.redis.url == "redis://:pw@redis:6379/0"
    assert config.auth.key_to_tenant() == {"key-acme-0123456789": "acme"}
    # The config may also be a file path, as AppConfig.from_env allows.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(S3_CONFIG))
    assert config_from_env({**env, "FASHIONCHAMELEON_CONFIG": str(path)}).storage.s3.access_key is not None
    # Without credentials: anonymous, exactly what AppConfig.from_env gives.
    assert config_from_env({"FASHIONCHAMELEON_CONFIG": json.dumps(S3_CONFIG)}).storage.s3.access_key is None


def test_config_from_env_refuses_half_or_misplaced_credentials():
    with pytest.raises(ValueError, match="set both"):
        config_from_env({"FASHIONCHAMELEON_CONFIG": json.dumps(S3_CONFIG), "FASHIONCHAMELEON_S3_ACCESS_KEY": "AK"})
    with pytest.raises(ValueError, match=r"no storage\.s3 section"):
        config_from_env({"FASHIONCHAMELEON_S3_ACCESS_KEY": "AK", "FASHIONCHAMELEON_S3_SECRET_KEY": "SK"})
