"""Pull a checkpoint folder from the object store into a node-local cache (a pod init container).

    python -m services.checkpoint_sync --checkpoint-id fc-2026-09-01 \
        --dest /var/cache/fashionchameleon/checkpoints [--prefix checkpoints/] [--keep 3]

The store is the one `FASHIONCHAMELEON_CONFIG` names (its `storage` section, credentials from
`FASHIONCHAMELEON_S3_ACCESS_KEY`/`_SECRET_KEY`, see `services.serve_entry.config_from_env`).
Every object under `<prefix><id>/` is copied to `<dest>/<id>/` keeping the relative layout,
so the services load it with `model.checkpoint = <dest>/<id>`.

- Atomic: objects land in a hidden temp folder that is renamed into place only once every
  object is down and its size checked, so a replica never sees half a checkpoint.
- Idempotent and shared: a marker file records the listing (key, size, etag) it was built
  from; a later run (another pod on the same node, a restarted pod) that finds the same
  listing does nothing. A file lock serialises pods of one node on a hostPath cache.
- Bounded: with `--keep N` only the N most recently used checkpoints stay in `--dest`
  (never the one being synced; checkpoints of a previous rollout still serving keep being
  "used" by their pods' restarts).

Exit status: 0 synced or already present, 2 bad arguments or configuration, 3 the checkpoint
is not in the store, 1 any other failure. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from shared.storage import ObjectStore, open_store, validate_prefix

MARKER = ".fc-checkpoint.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SyncError(Exception):
    exit_code = 1


class UsageError(SyncError):
    exit_code = 2


class CheckpointNotFound(SyncError):
    exit_code = 3


def validate_checkpoint_id(checkpoint_id: str) -> str:
    if not _ID.match(checkpoint_id) or checkpoint_id in (".", ".."):
        raise UsageError(
            f"invalid checkpoint id {checkpoint_id!r}: 1-128 characters of [A-Za-z0-9._-], starting alphanumeric"
        )
    return checkpoint_id


def _listing(store: ObjectStore, prefix: str) -> dict[str, dict]:
    return {
        info.key[len(prefix) :]: {"size": info.size, "etag": info.etag}
        for info in store.list(prefix, recursive=True)
        if not info.is_prefix
    }


def _read_marker(folder: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / MARKER).read_text())
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prune(dest: Path, keep: int, current: str) -> list[str]:
    """Remove all but the `keep` most recently used synced checkpoints (never `current`)."""
    synced = [p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MARKER).is_file()]
    synced.sort(key=lambda p: (p / MARKER).stat().st_mtime, reverse=True)
    removed = []
    kept = 1  # the current one
    for folder in synced:
        if folder.name == current:
            continue
        if kept < keep:
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    return removed


def sync_checkpoint(
    store: ObjectStore,
    checkpoint_id: str,
    dest: str | os.PathLike[str],
    *,
    prefix: str = "checkpoints/",
    keep: int = 0,
) -> dict:
    """Make `<dest>/<checkpoint_id>` an exact copy of the store's `<prefix><checkpoint_id>/`."""
    validate_checkpoint_id(checkpoint_id)
    if prefix and not prefix.endswith("/"):
        raise UsageError(f"--prefix must be empty or end with '/', got {prefix!r}")
    validate_prefix(prefix)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = f"{prefix}{checkpoint_id}/"
    target = dest / checkpoint_id
    started = time.monotonic()
    with _locked(dest / f".{checkpoint_id}.lock"):
        listing = _listing(store, source)
        if not listing:
            raise CheckpointNotFound(f"no objects under {source!r} in the object store")
        marker = _read_marker(target)
        if marker is not None and marker.get("objects") == listing:
            os.utime(target / MARKER)  # "recently used", for --keep
            status, nbytes = "present", 0
        else:
            tmp = dest / f".{checkpoint_id}.partial-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                nbytes = 0
                for rel, meta in sorted(listing.items()):
                    path = tmp / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    info = store.get_file(source + rel, path)
                    size = path.stat().st_size
                    if size != meta["size"]:
                        raise SyncError(f"{source + rel}: got {size} bytes, listing said {meta['size']}")
                    if info.etag and meta["etag"] and info.etag != meta["etag"]:
                        raise SyncError(f"{source + rel} changed during the sync (etag {info.etag} != {meta['etag']})")
                    nbytes += size
                (tmp / MARKER).write_text(json.dumps({"id": checkpoint_id, "source": source, "objects": listing}))
                if target.exists():
                    stale = dest / f".{checkpoint_id}.stale-{os.getpid()}"
                    os.rename(target, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            status = "synced"
        removed = _prune(dest, keep, checkpoint_id) if keep > 0 else []
    return {
        "status": status,
        "checkpoint_id": checkpoint_id,
        "path": str(target),
        "objects": len(listing),
        "bytes": nbytes,
        "removed": removed,
        "seconds": round(time.monotonic() - started, 3),
    }


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.checkpoint_sync", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint-id", required=True, help="folder name under --prefix in the object store")
    p.add_argument("--dest", required=True, help="node-local cache folder; the checkpoint lands in DEST/ID")
    p.add_argument("--prefix", default="checkpoints/", help="object-store prefix of checkpoints (default checkpoints/)")
    p.add_argument("--keep", type=int, default=0, help="keep at most N synced checkpoints in DEST (0: keep all)")
    args = p.parse_args(argv)
    try:
        from services.serve_entry import config_from_env

        try:
            config = config_from_env(environ)
        except ValueError as e:
            raise UsageError(f"configuration: {e}") from None
        summary = sync_checkpoint(
            open_store(config.storage), args.checkpoint_id, args.dest, prefix=args.prefix, keep=max(0, args.keep)
        )
    except SyncError as e:
        print(json.dumps({"status": "error", "error": str(e)}), flush=True)
        print(f"checkpoint_sync: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the init container reports and fails; kubelet retries
        print(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}"}), flush=True)
        print(f"checkpoint_sync: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
