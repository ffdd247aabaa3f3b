"""Streaming throughput and latency of one session: the numbers the paper and the SLOs quote.

    python benchmarks/stream.py --preset tiny --device cpu --dtype float32 --chunks 8
    python benchmarks/stream.py --preset wan2.2-ti2v-5b --height 704 --width 1280 \\
        --device cuda --dtype bfloat16 --chunks 16 --warmup 2 --switch-every 4 --json

Method. The engine is built once (random weights of a preset, or --checkpoint). `--warmup` chunks
run first in a separate session with the same switch schedule and are thrown away, so kernels,
allocator and caches are warm. The measured session then opens and generates `--chunks` chunks,
switching garment before every chunk k with k % K == 0 (k > 0) when `--switch-every K` is given.
Timings come from the engine, which synchronizes CUDA around each phase.

Reported (units in the names):
- backbone FPS: pixel frames / DiT seconds (denoising + context pass), the paper's definition.
- end-to-end FPS: pixel frames / (DiT + streaming VAE decode) seconds; wall FPS also counts
  switches and host overhead (open excluded).
- time to first chunk: session open (encoders + cond forward) + first chunk + its decode.
- switch latency mean / max, per-chunk generate p50 / p99 (seconds).
- peak memory: torch.cuda.max_memory_allocated on CUDA (measured session only), peak RSS of the
  process on CPU (includes building the model).
- KV-cache bytes per session, from `KVCacheSpec` at the run's resolution and dtype.
Never used as a timed assert in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.hot_path import decoder_figures, hot_path_figures
from services.cli.stats import ChunkTiming, percentile, stream_rates
from shared.cli import (
    CliError,
    Parser,
    add_engine_arguments,
    engine_config,
    quiet_libraries,
)
from shared.models.checkpoint import CheckpointError, build_random, read_preset
from shared.models.presets import Preset, get_preset
from shared.runtime.kv_cache import KVCacheSpec
from shared.runtime.pipeline import DTYPES, Engine, VideoSession

PROMPT = "A person walks toward the camera, turns around and smiles; studio light, full body."


def build_parser() -> Parser:
    p = Parser(prog="benchmarks/stream.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="random weights of this preset (default: tiny)")
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder instead of random weights")
    add_engine_arguments(p)
    p.add_argument("--chunks", type=int, default=8, help="measured chunks (default: 8)")
    p.add_argument("--warmup", type=int, default=1, help="warmup chunks, excluded from the stats (default: 1)")
    p.add_argument("--switch-every", type=int, default=0, metavar="K", help="switch garment before every K-th chunk")
    p.add_argument("--no-context-pass", action="store_true", help="skip the clean context pass (experiment)")
    p.add_argument("--seed", type=int, default=0, help="noise and weights seed (default: 0)")
    p.add_argument("--json", action="store_true", help="JSON on stdout (the table goes to stderr)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (EngineConfig.compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs of the compiled blocks (CUDA only)")
    p.add_argument("--fp8", action="store_true", help="FP8 linear layers through torchao (Hopper CUDA only)")
    p.add_argument("--no-hot-path", action="store_true", help="skip the cache-overhead / diffusers / compile figures")
    p.add_argument("--no-compiled", action="store_true", help="hot-path figures without the compiled comparison")
    return p


# ---- inputs --------------------------------------------------------------------------------
def synthetic_inputs(height: int, width: int) -> tuple[Image.Image, list[Image.Image]]:
    """A smooth 'person' image and two garment images (deterministic, no files)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    person = np.stack([128 + 100 * np.sin(x / 23), 128 + 100 * np.cos(y / 19), 128 + 60 * np.sin((x + y) / 31)], -1)
    garments = [Image.new("RGB", (width // 2, height // 2), c) for c in ((200, 40, 40), (40, 40, 200))]
    return Image.fromarray(person.astype(np.uint8)), garments  # uint8 [H, W, 3]


def switch_before(k: int, every: int) -> bool:
    return every > 0 and k > 0 and k % every == 0


# ---- measurement ---------------------------------------------------------------------------
def run_session(
    engine: Engine, chunks: int, every: int, seed: int, reference: Image.Image, garments: list[Image.Image]
) -> dict:
    """One session, `chunks` chunks; returns raw timings (seconds)."""
    session: VideoSession = engine.session()
    timings: list[ChunkTiming] = []
    switch_seconds: list[float] = []
    latents: list[torch.Tensor] = []
    engine.synchronize()
    start = time.perf_counter()
    session.open(reference, garments[0], PROMPT, seed=seed)
    engine.synchronize()
    open_seconds = time.perf_counter() - start
    ttfc = 0.0
    for k in range(chunks):
        if switch_before(k, every):
            switch_seconds.append(session.switch_garment(garments[(len(switch_seconds) + 1) % 2]))
        result = session.next_chunk()
        timings.append(ChunkTiming.of(result))
        latents.append(result.latents)
        if k == 0:
            ttfc = time.perf_counter() - start
    wall = time.perf_counter() - start - open_seconds
    session.close()
    return {
        "open": open_seconds,
        "ttfc": ttfc,
        "wall": wall,
        "chunks": timings,
        "switches": switch_seconds,
        "latents": latents,
    }


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024, "peak_memory_kind": "process_rss"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def benchmark(args: argparse.Namespace) -> dict:
    if args.chunks < 1 or args.warmup < 0 or args.switch_every < 0:
        raise CliError("--chunks must be >= 1, --warmup and --switch-every >= 0")
    preset = _preset(args)
    overrides = {"context_pass": False} if args.no_context_pass else {}
    config = engine_config(args, preset, **overrides).model_copy(
        update={"compile": args.compile, "cuda_graphs": args.cuda_graphs, "fp8": args.fp8, "decoder": args.decoder}
    )

    start = time.perf_counter()
    try:
        if args.checkpoint:
            engine = Engine.from_checkpoint(args.checkpoint, config)
        elif args.decoder == "fast":
            engine = Engine.from_preset(preset.name, config, seed=args.seed)  # random fast decoder too
        else:
            engine = Engine(build_random(preset, args.seed, DTYPES[config.dtype]), config)
    except ValueError as e:  # GPU-only options on a CPU, a missing extra
        raise CliError(str(e)) from None
    load_seconds = time.perf_counter() - start
    st = engine.preset.streaming
    reference, garments = synthetic_inputs(st.height, st.width)

    if args.warmup:
        run_session(engine, args.warmup, args.switch_every, args.seed, reference, garments)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    raw = run_session(engine, args.chunks, args.switch_every, args.seed, reference, garments)

    chunks: list[ChunkTiming] = raw["chunks"]
    rates = stream_rates(chunks)
    gen = [c.generate_seconds for c in chunks]
    dec = [c.decode_seconds for c in chunks]
    sw = raw["switches"]
    hot = {} if args.no_hot_path else hot_path_figures(engine, seed=args.seed, compiled=not args.no_compiled)
    return {
        "preset": engine.preset.name,
        "checkpoint_id": engine.checkpoint_id,
        "device": str(engine.device),
        "device_name": device_name(engine.device),
        "dtype": config.dtype,
        "attention": config.attention_backend,
        "context_pass": st.context_pass,
        "height": st.height,
        "width": st.width,
        "fps_target": st.fps,
        "tokens_per_frame": engine.preset.tokens_per_frame(),
        "chunks": len(chunks),
        "warmup_chunks": args.warmup,
        "frames": rates["frames"],
        "load_seconds": load_seconds,
        "backbone_fps": rates["backbone_fps"],
        "end_to_end_fps": rates["end_to_end_fps"],
        "wall_fps": rates["frames"] / raw["wall"],
        "realtime_factor": (rates["end_to_end_fps"] or 0.0) / st.fps,
        "time_to_first_chunk_seconds": raw["ttfc"],
        "open_seconds": raw["open"],
        "generate_seconds": rates["generate_seconds"],
        "decode_seconds": rates["decode_seconds"],
        "generate_p50_seconds": percentile(gen, 50),
        "generate_p99_seconds": percentile(gen, 99),
        "decode_p50_seconds": percentile(dec, 50),
        "decode_p99_seconds": percentile(dec, 99),
        "switches": len(sw),
        "switch_latency_mean_seconds": sum(sw) / len(sw) if sw else None,
        "switch_latency_max_seconds": max(sw) if sw else None,
        "kv_cache_bytes": KVCacheSpec.from_preset(engine.preset, engine.dtype).bytes,
        **peak_memory(engine.device),
        "compile": config.compile,
        "cuda_graphs": config.cuda_graphs,
        "fp8": config.fp8,
        "decoder": config.decoder,
        **hot,
        **decoder_figures(engine, raw["latents"]),
        "torch": torch.__version__,
    }


def _preset(args: argparse.Namespace) -> Preset:
    try:
        return read_preset(args.checkpoint)[0] if args.checkpoint else get_preset(args.preset)
    except KeyError as e:
        raise CliError(e.args[0]) from None
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None


# ---- report --------------------------------------------------------------------------------
def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_table(r: dict) -> str:
    rows = [
        ("setup", f"{r['preset']} {r['width']}x{r['height']} {r['dtype']} on {r['device']} ({r['device_name']})"),
        ("attention / context pass", f"{r['attention']} / {'on' if r['context_pass'] else 'off'}"),
        ("chunks (warmup excluded)", f"{r['chunks']} ({r['frames']} frames; +{r['warmup_chunks']} warmup)"),
        ("backbone FPS (DiT only)", f"{r['backbone_fps']:.2f}"),
        ("end-to-end FPS (DiT + decode)",
         f"{r['end_to_end_fps']:.2f}  ({r['realtime_factor']:.2f}x of {r['fps_target']} fps)"),
        ("wall FPS (incl. switches)", f"{r['wall_fps']:.2f}"),
        ("time to first chunk", f"{_ms(r['time_to_first_chunk_seconds'])}  (open {_ms(r['open_seconds'])})"),
        ("generate per chunk p50 / p99", f"{_ms(r['generate_p50_seconds'])} / {_ms(r['generate_p99_seconds'])}"),
        ("decode per chunk p50 / p99", f"{_ms(r['decode_p50_seconds'])} / {_ms(r['decode_p99_seconds'])}"),
        ("switch latency mean / max", f"{_ms(r['switch_latency_mean_seconds'])} / "
         f"{_ms(r['switch_latency_max_seconds'])}  ({r['switches']} switches)"),
        (f"peak memory ({r['peak_memory_kind']})", _bytes(r["peak_memory_bytes"])),
        ("KV cache per session", _bytes(r["kv_cache_bytes"])),
        ("model load", f"{r['load_seconds']:.2f} s"),
    ]  # fmt: skip
    if r.get("cache_overhead_ratio") is not None:
        rows += [
            ("cached chunk / bare forwards", f"{r['cache_overhead_ratio']:.3f}  ({_ms(r['hot_path_chunk_seconds'])} vs "
             f"{r['forwards_per_chunk']} x {_ms(r['bare_forward_seconds'])}; goal <= 1.05)"),
            ("our forward / diffusers'", f"{r['forward_vs_diffusers_ratio']:.3f}  ({_ms(r['our_forward_seconds'])} vs "
             f"{_ms(r['diffusers_forward_seconds'])}, {r['forward_frames']} frames; goal <= 1.0)"),
        ]  # fmt: skip
    if r.get("compiled_chunk_seconds") is not None:
        rows.append(("chunk eager / compiled", f"{_ms(r['hot_path_chunk_seconds'])} / "
                     f"{_ms(r['compiled_chunk_seconds'])}  ({r['compile_speedup']:.2f}x; compile "
                     f"{r['compile_seconds']:.0f} s)"))  # fmt: skip
    if r.get("decode_speedup") is not None:
        rows.append(("fast decoder vs full", f"{r['decode_speedup']:.1f}x faster, {r['decode_psnr_db']:.1f} dB PSNR"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        result = benchmark(args)
    except CliError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(format_table(result), file=sys.stderr)
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
