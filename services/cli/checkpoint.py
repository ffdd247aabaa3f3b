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
from typing import TYPE_CHECKING

from shared.cli import (
    CliError,
    Parser,
    add_json_argument,
    check_output_folder,
    emit,
    fmt_bytes,
    fmt_count,
    fmt_seconds,
    format_fields,
)
from shared.models.presets import get_preset

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

COMPONENTS = ("transformer", "vae", "text_encoder")
INIT_DTYPES = ("float32", "bfloat16")  # weights dtypes of `init` (names of torch dtypes)


def _read_preset(root):
    """(preset, checkpoint id) of a checkpoint folder, or a one-line CliError."""
    from shared.models.checkpoint import CheckpointError, read_preset

    try:
        return read_preset(root)
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    except ValueError as e:
        raise CliError(f"checkpoint {root} has an invalid config: {e}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="create or inspect checkpoint folders")
    sub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="{init,info,push}", parser_class=Parser)

    init = sub.add_parser("init", help="write a random-weight checkpoint of a preset")
    init.add_argument("--preset", required=True, metavar="NAME", help="preset (see `fashionchameleon presets`)")
    init.add_argument("--out", required=True, metavar="DIR", help="folder to create (must be new or empty)")
    init.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    init.add_argument("--dtype", default="float32", choices=INIT_DTYPES, help="weights dtype")
    init.add_argument("--force", action="store_true", help="write into a non-empty folder")
    add_json_argument(init)
    init.set_defaults(run=run_init)

    info = sub.add_parser("info", help="print a checkpoint's preset, sizes and configs (--json: all fields)")
    info.add_argument("dir", metavar="DIR", help="checkpoint folder")
    add_json_argument(info)
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
    add_json_argument(push)
    push.set_defaults(run=run_push)


def _module_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_init(args: argparse.Namespace) -> int:
    import torch

    from shared.models.checkpoint import build_random, save_checkpoint

    try:
        preset = get_preset(args.preset)
    except KeyError as e:
        raise CliError(e.args[0]) from None
    out = check_output_folder(args.out, force=args.force)
    start = time.perf_counter()
    components = build_random(preset, seed=args.seed, dtype=getattr(torch, args.dtype))
    save_checkpoint(components, out)
    params = {
        "transformer": _module_parameters(components.dit),
        "vae": _module_parameters(components.vae.module),
        "text_encoder": _module_parameters(components.text_encoder.model),
    }
    params["total"] = sum(params.values())
    emit(
        args,
        {
            "path": str(out),
            "preset": preset.name,
            "checkpoint_id": components.checkpoint_id,
            "seed": args.seed,
            "dtype": args.dtype,
            "tokenizer": components.text_encoder.config.tokenizer,
            "parameters": params,
            "seconds": time.perf_counter() - start,
        },
        _describe_init,
    )
    return 0


def _describe_init(r: dict) -> str:
    p = r["parameters"]
    return (
        f"wrote a random-weight {r['preset']} checkpoint ({r['dtype']}, seed {r['seed']}) to {r['path']} "
        f"in {fmt_seconds(r['seconds'])}\n"
        f"  id          {r['checkpoint_id']}\n"
        f"  parameters  {fmt_count(p['total'])} (transformer {fmt_count(p['transformer'])}, "
        f"VAE {fmt_count(p['vae'])}, text encoder {fmt_count(p['text_encoder'])})"
    )


def _weights_summary(folder: Path) -> dict:
    """Parameter count and dtypes from the safetensors headers of one component folder."""
    from safetensors import safe_open

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
    import torch

    from shared.runtime.kv_cache import KVCacheSpec

    root = Path(args.dir).expanduser().absolute()
    preset, checkpoint_id = _read_preset(root)
    weights = {name: _weights_summary(root / name) for name in COMPONENTS}
    params = {name: w["parameters"] for name, w in weights.items()}
    params["total"] = sum(params.values())
    vae = preset.vae.model_dump(mode="json", exclude={"latents_mean", "latents_std"})
    emit(
        args,
        {
            "path": str(root),
            "checkpoint_id": checkpoint_id,
            "preset": preset.name,
            "height": preset.streaming.height,
            "width": preset.streaming.width,
            "fps": preset.streaming.fps,
            "tokens_per_frame": preset.tokens_per_frame(),
            "kv_cache_bytes": {
                name: KVCacheSpec.from_preset(preset, getattr(torch, name)).bytes for name in INIT_DTYPES
            },
            "parameters": params,
            "weights": weights,
            "dit": preset.dit.model_dump(mode="json"),
            "vae": vae,
            "text_encoder": preset.text_encoder.model_dump(mode="json"),
            "streaming": preset.streaming.model_dump(mode="json"),
        },
        describe_info,
    )
    return 0


def describe_info(r: dict) -> str:
    """`checkpoint info` for people: what the folder is, its sizes, the streaming settings."""
    st, w = r["streaming"], r["weights"]
    weights = ", ".join(
        f"{name.replace('_', ' ')} {fmt_count(w[name]['parameters'])} ({'/'.join(w[name]['dtypes']) or 'no weights'})"
        for name in COMPONENTS
    )
    fields = {
        "checkpoint": f"{r['checkpoint_id']} (preset {r['preset']})",
        "video": f"{r['width']}x{r['height']} at {r['fps']} fps, {r['tokens_per_frame']} tokens per latent frame",
        "parameters": f"{fmt_count(r['parameters']['total'])}: {weights}",
        "DiT": f"{r['dit']['num_layers']} layers, {r['dit']['num_attention_heads']} heads x "
        f"{r['dit']['attention_head_dim']}",
        "KV cache": ", ".join(f"{fmt_bytes(n)} per session in {name}" for name, n in r["kv_cache_bytes"].items()),
        "streaming": f"chunks of {st['chunk_frames']} latent frames; cache cond {st['cond_frames']} + sink "
        f"{st['sink_frames']} + window {st['max_cache_frames'] - st['sink_frames']} frames; trained at "
        f"{st['trained_frames']}; RoPE {st['rope_policy']}",
    }
    return f"{r['path']}\n{format_fields(fields)}\n(`--json` prints every field)"


def run_push(args: argparse.Namespace) -> int:
    import hashlib
    import os

    from pydantic import ValidationError

    from services.checkpoint_sync import MARKER, UsageError, validate_checkpoint_id
    from shared.config import S3_ACCESS_KEY_ENV, S3_SECRET_KEY_ENV
    from shared.storage import StorageConfig, StorageError, open_store

    root = Path(args.dir).expanduser().absolute()
    _read_preset(root)
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
    emit(
        args,
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
        },
        lambda r: (
            f"pushed {r['path']} to {r['store']}{r['checkpoint_id']}/: {r['objects']} objects, "
            f"{r['uploaded']} uploaded ({fmt_bytes(r['bytes'])}), {r['skipped']} unchanged, {r['deleted']} deleted "
            f"in {fmt_seconds(r['seconds'])}"
        ),
    )
    return 0
