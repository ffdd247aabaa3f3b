"""`fashionchameleon checkpoint init|info`: random-weight checkpoints and what a folder holds.

`init` writes the diffusers pipeline layout (`shared.models.checkpoint`) for any preset, so the
services, the trainer and `generate --checkpoint` can be exercised without downloaded weights.
`info` reads only configs and safetensors headers: it never loads a weight.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open

from shared.models.checkpoint import CheckpointError, build_random, read_preset, save_checkpoint
from shared.models.presets import get_preset
from shared.runtime.kv_cache import KVCacheSpec

from .common import CliError, Parser, check_output_folder, print_json

COMPONENTS = ("transformer", "vae", "text_encoder")
INIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="create or inspect checkpoint folders")
    sub = p.add_subparsers(dest="checkpoint_command", required=True, metavar="{init,info}", parser_class=Parser)

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
                for key in f.keys():
                    tensor = f.get_slice(key)
                    count += math.prod(tensor.get_shape())
                    dtypes.add(tensor.get_dtype())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
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
