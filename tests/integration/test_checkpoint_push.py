"""`fashionchameleon checkpoint push` against a real SeaweedFS: the shipped toy checkpoint goes
up, `services.checkpoint_sync` (the Helm chart's init container) pulls it back byte-identical."""

from __future__ import annotations

import filecmp
import json
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from services.checkpoint_sync import sync_checkpoint
from services.cli.main import main
from shared.config import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
from shared.storage import S3StoreConfig, StorageConfig, open_store
from tests.fixtures.seaweedfs import SeaweedFSUnavailable, start_seaweedfs

TOY = Path(__file__).resolve().parents[2] / "checkpoints" / "toy"
BUCKET = "fc-push-tests"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_push_then_sync_is_byte_identical(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "seaweedfs").mkdir()
    try:
        server = start_seaweedfs(tmp_path / "seaweedfs")
    except SeaweedFSUnavailable as e:
        pytest.skip(f"SeaweedFS not available: {e}")
    try:
        run = uuid.uuid4().hex[:8]
        url = f"s3://{BUCKET}/{run}/checkpoints/?endpoint={server.endpoint}&secure=false"
        monkeypatch.setenv(S3_ACCESS_KEY_ENV, server.access_key)
        monkeypatch.setenv(S3_SECRET_KEY_ENV, server.secret_key)
        assert main(["checkpoint", "push", str(TOY), url, "--id", "toy-1"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["status"] == "pushed" and summary["objects"] == len(_files(TOY))
        assert summary["uploaded"] == summary["objects"] and summary["skipped"] == 0

        # Again: nothing changed, nothing uploaded.
        assert main(["checkpoint", "push", str(TOY), url, "--id", "toy-1"]) == 0
        again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (again["uploaded"], again["skipped"]) == (0, again["objects"])

        # What the chart's init container does: the store at the bucket root, --prefix <path>.
        store = open_store(
            StorageConfig(
                backend="s3",
                s3=S3StoreConfig(
                    endpoint=server.endpoint,
                    secure=False,
                    bucket=BUCKET,
                    access_key=SecretStr(server.access_key),
                    secret_key=SecretStr(server.secret_key),
                ),
            )
        )
        result = sync_checkpoint(store, "toy-1", tmp_path / "cache", prefix=f"{run}/checkpoints/")
        assert result["status"] == "synced"
        pulled = tmp_path / "cache" / "toy-1"
        assert [f for f in _files(pulled) if f != ".fc-checkpoint.json"] == _files(TOY)
        _, mismatch, errors = filecmp.cmpfiles(TOY, pulled, _files(TOY), shallow=False)
        assert (mismatch, errors) == ([], [])

        # Half the credentials: one error line naming the missing one, status 2.
        monkeypatch.delenv(S3_SECRET_KEY_ENV)
        assert main(["checkpoint", "push", str(TOY), url]) == 2
        assert "FASHIONCHAMELEON_S3_SECRET_KEY" in capsys.readouterr().err
    finally:
        server.stop()


def test_push_refuses_a_folder_that_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:
    assert main(["checkpoint", "push", str(tmp_path), str(tmp_path / "store")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


def test_push_to_a_local_store_and_delete_stale(tmp_path: Path, capsys) -> None:
    store_dir = tmp_path / "store"
    assert main(["checkpoint", "push", str(TOY), str(store_dir)]) == 0
    store = open_store(StorageConfig.from_url(str(store_dir)))
    store.put_bytes("toy/stale.bin", b"old")
    assert main(["checkpoint", "push", str(TOY), str(store_dir)]) == 2
    assert "--delete" in capsys.readouterr().err
    assert main(["checkpoint", "push", str(TOY), str(store_dir), "--delete"]) == 0
    assert not store.exists("toy/stale.bin")
    result = sync_checkpoint(store, "toy", tmp_path / "cache", prefix="")
    _, mismatch, errors = filecmp.cmpfiles(TOY, tmp_path / "cache" / "toy", _files(TOY), shallow=False)
    assert result["objects"] == len(_files(TOY)) and (mismatch, errors) == ([], [])
