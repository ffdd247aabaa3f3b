"""`fashionchameleon checkpoint init|info|push`: random-weight checkpoints, what a folder holds,
and uploading one to the object store the Helm chart's `checkpoint-sync` init container pulls from.

`init` writes the diffusers pipeline layout (`shared.models.checkpoint`) for any preset, so the
services, the trainer and `generate --checkpoint` can be exercised without downloaded weights.
`info` reads only configs and safetensors headers: it never loads a weight. `push` copies a
folder to `<store>/<id>/` (the layout `services.checkpoint_sync` reads) with S3 credentials from
`FASHIONCHAMELEON_S3_ACCESS_KEY` / `FASHIONCHAMELEON_S3_SECRET_KEY`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open

from shared.cli import CliError, Parser, check_output_folder, print_json
from shared.models.checkpoint import CheckpointError, build_random, read_preset, save_checkpoint
from shared.models.presets import get_preset
from shared.runtime.kv_cache import KVCacheSpec

COMPONENTS = ("transformer", "vae", "text_encoder")
INIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="create or inspect checkpoint folders")
    sub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="{init,info,push}", parser_class=Parser)

    init = sub.add_parser("init", help="write a random-weight checkpoint of a preset")
    init.add_argument("--preset", required=True, metavar="NAME", help="preset (see `fashionchameleon presets`)")
    init.add_argument("--out", required=True, metavar="DIR", help="folder to create (must be new or empty)")
    init.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    init.add_argument("--dtype", default="float32", choices=sorted(INIT_DTYPES), help="weights dtype")
    init.add_argument("--force", action="store_true", help="write into a non-empty folder")
    init.set_defaults(run=run_init)

    info = sub.add_parser("info", help="print a checkpoint's preset and config summary as JSON")
    info.add_argument("dir", metavar="DIR", help="checkpoint folder")
    info.set_defaults(run=run_info)

    push = sub.add_parser(
        "push",
        help="upload a checkpoint folder to the object store (the Helm chart's checkpoint-sync pulls it)",
        description="Upload DIR to STORE/ID/ (e.g. s3://fashionchameleon/checkpoints/?endpoint=s3.example:443 "
        "-> checkpoints/ID/... in bucket fashionchameleon), which `python -m services.checkpoint_sync "
        "--checkpoint-id ID` pulls. S3 credentials come from FASHIONCHAMELEON_S3_ACCESS_KEY and "
        "FASHIONCHAMELEON_S3_SECRET_KEY (both or neither). Objects already there with the same size and "
        "MD5 are skipped, so a re-run after a failure uploads only what is missing.",
    )
    push.add_argument("dir", metavar="DIR", help="checkpoint folder (checked with `checkpoint info` rules)")
    push.add_argument(
        "store",
        metavar="STORE",
        help="s3://bucket[/prefix/]?endpoint=host:port[&secure=false], or a local store folder",
    )
    push.add_argument(
        "--id",
        dest="checkpoint_id",
        metavar="ID",
        help="checkpoint id, the folder name under STORE (default: DIR's name)",
    )
    push.add_argument(
        "--delete",
        action="store_true",
        help="also delete objects under STORE/ID/ that DIR does not have (default: refuse)",
    )
    push.set_defaults(run=run_push)


def _module_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_init(args: argparse.Namespace) -> int:
    try:
        preset = get_preset(args.preset)
    except KeyError as e:
        raise CliError(e.args[0]) from None
    out = check_output_folder(args.out, force=args.force)
    start = time.perf_counter()
    components = build_random(preset, seed=args.seed, dtype=INIT_DTYPES[args.dtype])
    save_checkpoint(components, out)
    params = {
        "transformer": _module_parameters(components.dit),
        "vae": _module_parameters(components.vae.module),
        "text_encoder": _module_parameters(components.text_encoder.model),
    }
    params["total"] = sum(params.values())
    print_json(
        {
            "path": str(out),
            "preset": preset.name,
            "checkpoint_id": components.checkpoint_id,
            "seed": args.seed,
            "dtype": args.dtype,
            "tokenizer": components.text_encoder.config.tokenizer,
            "parameters": params,
            "seconds": time.perf_counter() - start,
        }
    )
    return 0


def _weights_summary(folder: Path) -> dict:
    """Parameter count and dtypes from the safetensors headers of one component folder."""
    count, dtypes = 0, set()
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict: no __iter__)
                    tensor = f.get_slice(key)
                    count += math.prod(tensor.get_shape())
                    dtypes.add(tensor.get_dtype())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers
            raise CliError(f"cannot read weights {file}: {e}") from None
    return {"parameters": count, "dtypes": sorted(dtypes), "files": len(files)}


def run_info(args: argparse.Namespace) -> int:
    root = Path(args.dir).expanduser().absolute()
    try:
        preset, checkpoint_id = read_preset(root)
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    except ValueError as e:
        raise CliError(f"checkpoint {root} has an invalid config: {e}") from None
    weights = {name: _weights_summary(root / name) for name in COMPONENTS}
    params = {name: w["parameters"] for name, w in weights.items()}
    params["total"] = sum(params.values())
    vae = preset.vae.model_dump(mode="json", exclude={"latents_mean", "latents_std"})
    print_json(
        {
            "path": str(root),
            "checkpoint_id": checkpoint_id,
            "preset": preset.name,
            "height": preset.streaming.height,
            "width": preset.streaming.width,
            "fps": preset.streaming.fps,
            "tokens_per_frame": preset.tokens_per_frame(),
            "kv_cache_bytes": {
                name: KVCacheSpec.from_preset(preset, dtype).bytes for name, dtype in INIT_DTYPES.items()
            },
            "parameters": params,
            "weights": weights,
            "dit": preset.dit.model_dump(mode="json"),
            "vae": vae,
            "text_encoder": preset.text_encoder.model_dump(mode="json"),
            "streaming": preset.streaming.model_dump(mode="json"),
        }
    )
    return 0


def run_push(args: argparse.Namespace) -> int:
    import hashlib
    import os

    from pydantic import ValidationError

    from services.checkpoint_sync import MARKER, UsageError, validate_checkpoint_id
    from shared.config import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
    from shared.storage import StorageConfig, StorageError, open_store

    root = Path(args.dir).expanduser().absolute()
    try:
        read_preset(root)
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    except ValueError as e:
        raise CliError(f"checkpoint {root} has an invalid config: {e}") from None
    checkpoint_id = args.checkpoint_id or root.name
    try:
        validate_checkpoint_id(checkpoint_id)
    except UsageError as e:
        raise CliError(f"{e} (pass --id)") from None
    access, secret = os.environ.get(S3_ACCESS_KEY_ENV) or None, os.environ.get(S3_SECRET_KEY_ENV) or None
    if (access is None) != (secret is None):
        raise CliError(f"set both {S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV}, or neither")
    try:
        config = StorageConfig.from_url(args.store, access_key=access, secret_key=secret)
    except (ValueError, ValidationError) as e:
        raise CliError(f"STORE: {' '.join(str(e).split())}") from None
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.name != MARKER and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    rel_keys = {p.relative_to(root).as_posix(): p for p in files}
    prefix = f"{checkpoint_id}/"
    start = time.perf_counter()
    uploaded = skipped = nbytes = 0
    try:
        store = open_store(config)
        store.ensure_bucket()
        existing = {i.key[len(prefix) :]: i for i in store.list(prefix) if not i.is_prefix}
        extra = sorted(set(existing) - set(rel_keys))
        if extra and not args.delete:
            raise CliError(
                f"{args.store} already holds {prefix} with {len(extra)} object(s) that {root} lacks "
                f"(e.g. {extra[0]!r}): pass --delete to remove them, or push under another --id"
            )
        for rel, path in rel_keys.items():
            size = path.stat().st_size
            old = existing.get(rel)
            if old is not None and old.size == size:
                with path.open("rb") as f:
                    if hashlib.file_digest(f, "md5").hexdigest() == old.etag.strip('"'):
                        skipped += 1
                        continue
            store.put_file(prefix + rel, path)
            uploaded += 1
            nbytes += size
        for rel in extra:
            store.delete(prefix + rel)
    except StorageError as e:
        raise CliError(f"object store: {' '.join(str(e).split())}") from None
    print_json(
        {
            "status": "pushed",
            "checkpoint_id": checkpoint_id,
            "path": str(root),
            "store": str(config.local.root)
            if config.backend == "local"
            else f"s3://{config.s3.bucket}/{config.s3.prefix}",
            "objects": len(rel_keys),
            "uploaded": uploaded,
            "skipped": skipped,
            "deleted": len(extra),
            "bytes": nbytes,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return 0
