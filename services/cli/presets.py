"""`fashionchameleon presets`: the registry with the numbers that size a deployment.

Everything is derived from the preset (`shared.models.presets`, `KVCacheSpec`), never typed in.
"""

from __future__ import annotations

import argparse

from shared.cli import print_json
from shared.models.presets import PRESETS, Preset
from shared.runtime.config import DTYPE_NAMES


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("presets", help="list model presets with token and KV-cache sizes")
    p.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPE_NAMES), help="KV-cache dtype (default: bfloat16)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per preset instead of a table")
    p.set_defaults(run=run)


def describe(preset: Preset, dtype_name: str) -> dict:
    """A preset at its default resolution: token counts (per latent frame) and cache bytes."""
    from shared.runtime.kv_cache import KVCacheSpec
    from shared.runtime.pipeline import DTYPES

    st = preset.streaming
    spec = KVCacheSpec.from_preset(preset, DTYPES[dtype_name])
    return {
        "name": preset.name,
        "height": st.height,
        "width": st.width,
        "fps": st.fps,
        "layers": preset.dit.num_layers,
        "heads": preset.dit.num_attention_heads,
        "head_dim": preset.dit.attention_head_dim,
        "tokens_per_frame": preset.tokens_per_frame(),
        "max_cache_frames": st.max_cache_frames,
        "attended_frames": preset.attended_frames,  # cond + sink + window + chunk (latent frames)
        "trained_frames": preset.trained_frames,  # the recipe's sequence length, cond included
        "kv_cache_dtype": dtype_name,
        "kv_cache_bytes_per_frame": spec.bytes_per_frame,
        "kv_cache_bytes": spec.bytes,
    }


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def format_table(rows: list[dict]) -> str:
    header = ("preset", "resolution", "fps", "layers", "tokens/frame", "KV/frame", "KV/session")
    lines = [
        (
            r["name"],
            f"{r['width']}x{r['height']}",
            str(r["fps"]),
            str(r["layers"]),
            str(r["tokens_per_frame"]),
            _size(r["kv_cache_bytes_per_frame"]),
            _size(r["kv_cache_bytes"]),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]

    def fmt(cells: tuple[str, ...]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    note = f"KV cache: {rows[0]['kv_cache_dtype']}, cond + {rows[0]['max_cache_frames']} latent frames" if rows else ""
    return "\n".join([fmt(header), *(fmt(line) for line in lines), note])


def run(args: argparse.Namespace) -> int:
    rows = [describe(p, args.dtype) for p in PRESETS.values()]
    if args.json:
        for row in rows:
            print_json(row)
    else:
        print(format_table(rows))
    return 0
