"""`fashionchameleon generate`: one clip from a person photo, a garment and a prompt, with
optional garment switches, streamed chunk by chunk into an H.264 MP4.

Everything the user gave is checked (images decoded, checkpoint configs read, output folder
probed) before a model is built, so bad input fails in well under a second of model time.
Prints a summary on stdout (`summarize`: JSON with --json or off a terminal, else `describe`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shared.cli import (
    CliError,
    add_engine_arguments,
    add_json_argument,
    check_output_file,
    emit,
    engine_config,
    fmt_seconds,
    read_image,
    shipped_checkpoint,
)
from shared.models.presets import Preset, get_preset
from shared.models.prompts import validate_prompt
from shared.runtime.config import EngineConfig

if TYPE_CHECKING:  # torch, PIL and the engine load when a clip is generated, not for --help
    from PIL import Image

    from shared.runtime.pipeline import Engine
    from shared.runtime.session import SwitchOptions

    from .stats import ChunkTiming

DESCRIPTION = """\
Generate a try-on clip. The first chunk has 9 pixel frames, later chunks 12, so N chunks give
9 + 12 (N - 1) frames at the preset's fps. A switch K:IMG changes the garment before chunk K
(chunk K is the first one wearing IMG); K must lie in 1..N-1. Same inputs and seed give the
same frames. Prints a summary on stdout: readable on a terminal, one JSON object with --json or
when stdout is not a terminal."""


@dataclass(frozen=True)
class Switch:
    chunk: int  # first chunk that wears the new garment
    path: str
    image: Image.Image


@dataclass(frozen=True)
class GenerateRequest:
    """A fully validated `generate` invocation (images decoded, output folder writable)."""

    checkpoint: Path | None  # None: random weights of `preset`
    preset: Preset
    config: EngineConfig
    weights_seed: int
    reference: Image.Image
    garment: Image.Image
    prompt: str
    chunks: int
    switches: dict[int, Switch]
    options: SwitchOptions
    seed: int
    out: Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate a try-on clip (MP4)", description=DESCRIPTION)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder (diffusers pipeline layout; default: the shipped toy model, checkpoints/toy)",
    )
    source.add_argument("--preset", metavar="NAME", help="random weights of a preset (see `fashionchameleon presets`)")
    p.add_argument("--reference", required=True, metavar="IMG", help="photo of the person")
    p.add_argument("--garment", required=True, metavar="IMG", help="garment image worn from the first chunk")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="motion / scene prompt")
    p.add_argument("--chunks", required=True, type=int, metavar="N", help="number of chunks to generate (>= 1)")
    p.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="CHUNK:IMG",
        help="switch to garment IMG before chunk CHUNK (1..N-1); repeatable",
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed of the session (default: 0)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights with --preset (default: 0)")
    add_engine_arguments(p)
    for step in ("refresh", "withdraw", "disentangle"):
        p.add_argument(
            f"--no-{step}", dest=step, action="store_false", help=f"skip the garment switch's {step} step (ablation)"
        )
    p.add_argument("--out", required=True, metavar="FILE", help="output MP4 path (folders are created)")
    add_json_argument(p)
    p.set_defaults(run=run)


# ---- validation ----------------------------------------------------------------------------
def parse_switch(spec: str, chunks: int) -> tuple[int, str]:
    """'K:IMG' -> (K, IMG), K in 1..chunks-1."""
    head, sep, path = spec.partition(":")
    if not sep or not path or not head.strip().lstrip("+-").isdigit():
        raise CliError(f"--switch {spec!r} is malformed; expected CHUNK:IMG, e.g. 3:garment.png")
    chunk = int(head)
    if not 1 <= chunk <= chunks - 1:
        bounds = f"1..{chunks - 1}" if chunks > 1 else "none: a single chunk has no boundary"
        raise CliError(f"--switch {spec!r}: chunk {chunk} is out of range (valid chunks: {bounds})")
    return chunk, path


def _source_preset(args: argparse.Namespace) -> Preset:
    from shared.models.checkpoint import CheckpointError, read_preset

    if args.preset is None and args.checkpoint is None:
        args.checkpoint = shipped_checkpoint()
    if args.preset is not None:
        try:
            return get_preset(args.preset)
        except KeyError as e:
            raise CliError(e.args[0]) from None
    try:
        preset, _ = read_preset(args.checkpoint)
    except CheckpointError as e:
        raise CliError(f"cannot read checkpoint: {e}") from None
    except ValueError as e:  # configs that do not describe a valid preset
        raise CliError(f"checkpoint {args.checkpoint} has an invalid config: {e}") from None
    return preset


def validate(args: argparse.Namespace) -> GenerateRequest:
    """Check everything, cheapest first; nothing here builds a model."""
    from shared.runtime.session import SwitchOptions

    if args.chunks < 1:
        raise CliError(f"--chunks must be at least 1, got {args.chunks}")
    parsed = [parse_switch(s, args.chunks) for s in args.switch]
    seen: set[int] = set()
    for chunk, _ in parsed:
        if chunk in seen:
            raise CliError(f"two --switch options for chunk {chunk}; give one garment per chunk")
        seen.add(chunk)
    try:
        validate_prompt(args.prompt)
    except ValueError as e:
        raise CliError(f"--prompt: {e}") from None
    preset = _source_preset(args)
    config = engine_config(args, preset)

    images: dict[str, Image.Image] = {}

    def image(path: str, what: str) -> Image.Image:
        if path not in images:
            images[path] = read_image(path, what)
        return images[path]

    reference = image(args.reference, "--reference")
    garment = image(args.garment, "--garment")
    switches = {chunk: Switch(chunk, path, image(path, f"--switch {chunk}")) for chunk, path in sorted(parsed)}
    out = check_output_file(args.out)
    return GenerateRequest(
        checkpoint=None if args.checkpoint is None else Path(args.checkpoint),
        preset=preset,
        config=config,
        weights_seed=args.weights_seed,
        reference=reference,
        garment=garment,
        prompt=args.prompt,
        chunks=args.chunks,
        switches=switches,
        options=SwitchOptions(refresh=args.refresh, withdraw=args.withdraw, disentangle=args.disentangle),
        seed=args.seed,
        out=out,
    )


def build_engine(req: GenerateRequest) -> Engine:
    from shared.models.checkpoint import CheckpointError, build_random
    from shared.runtime.pipeline import DTYPES, Engine

    if req.checkpoint is None:
        return Engine(build_random(req.preset, req.weights_seed, DTYPES[req.config.dtype]), req.config)
    try:
        return Engine.from_checkpoint(req.checkpoint, req.config)
    except (CheckpointError, OSError) as e:
        raise CliError(f"cannot load checkpoint {req.checkpoint}: {e}") from None


# ---- streaming -----------------------------------------------------------------------------
@dataclass
class StreamRecord:
    chunks: list[ChunkTiming]
    switches: list[dict]
    width: int
    height: int
    time_to_first_chunk_seconds: float
    total_seconds: float


def stream_to_mp4(engine: Engine, req: GenerateRequest) -> StreamRecord:
    """Open a session, generate `req.chunks` chunks (switching where asked) and write them as
    they come. The file appears at `req.out` only when complete (written next to it first)."""
    from shared.media.video import Mp4Writer

    from .stats import ChunkTiming

    partial = req.out.with_name(f".{req.out.name}.partial")
    session = engine.session()
    chunks: list[ChunkTiming] = []
    switches: list[dict] = []
    ttfc = 0.0
    size = (0, 0)
    start = time.perf_counter()
    try:
        with Mp4Writer(partial, fps=engine.preset.streaming.fps) as writer:
            session.open(req.reference, req.garment, req.prompt, seed=req.seed)
            for k in range(req.chunks):
                if k in req.switches:
                    sw = req.switches[k]
                    latency = session.switch_garment(sw.image, req.options)
                    switches.append({"chunk": k, "garment": sw.path, "latency_seconds": latency})
                result = session.next_chunk()
                if k == 0:
                    ttfc = time.perf_counter() - start
                    size = (int(result.frames.shape[2]), int(result.frames.shape[1]))
                writer.write(result.frames)  # uint8 [T, H, W, 3]
                chunks.append(ChunkTiming.of(result))
        os.replace(partial, req.out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        session.close()
    total = time.perf_counter() - start
    return StreamRecord(chunks, switches, size[0], size[1], ttfc, total)


def summarize(engine: Engine, req: GenerateRequest, record: StreamRecord, load_seconds: float) -> dict:
    """The JSON summary. Seconds are wall-clock; FPS definitions in `services.cli.stats`."""
    from .stats import stream_rates

    rates = stream_rates(record.chunks)
    return {
        "out": str(req.out),
        "frames": rates["frames"],
        "chunks": len(record.chunks),
        "width": record.width,
        "height": record.height,
        "fps": engine.preset.streaming.fps,
        "seed": req.seed,
        "checkpoint_id": engine.checkpoint_id,
        "preset": engine.preset.name,
        "device": req.config.device,
        "dtype": req.config.dtype,
        "load_seconds": load_seconds,
        "time_to_first_chunk_seconds": record.time_to_first_chunk_seconds,
        "total_seconds": record.total_seconds,
        "generate_seconds": rates["generate_seconds"],
        "decode_seconds": rates["decode_seconds"],
        "backbone_fps": rates["backbone_fps"],
        "end_to_end_fps": rates["end_to_end_fps"],
        "switches": record.switches,
        "per_chunk": [c.to_dict() for c in record.chunks],
    }


def _fps(rate: float | None) -> str:
    return "- FPS" if rate is None else f"{rate:.1f} FPS"


def describe(summary: dict) -> str:
    """`summarize`'s dict for people: what was written, by which model, how fast."""
    seconds = summary["frames"] / summary["fps"] if summary["fps"] else 0.0
    lines = [
        f"wrote {summary['out']}: {summary['frames']} frames in {summary['chunks']} chunks, "
        f"{summary['width']}x{summary['height']} at {summary['fps']} fps ({seconds:.1f} s of video), seed {summary['seed']}",
        f"  model     {summary['preset']} ({summary['checkpoint_id']}) on {summary['device']} {summary['dtype']}, "
        f"loaded in {fmt_seconds(summary['load_seconds'])}",
        f"  speed     first chunk after {fmt_seconds(summary['time_to_first_chunk_seconds'])}, "
        f"backbone {_fps(summary['backbone_fps'])}, end to end {_fps(summary['end_to_end_fps'])}, "
        f"total {fmt_seconds(summary['total_seconds'])}",
    ]
    for sw in summary["switches"]:
        lines.append(
            f"  switch    before chunk {sw['chunk']} to {sw['garment']} ({fmt_seconds(sw['latency_seconds'])})"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    req = validate(args)
    start = time.perf_counter()
    engine = build_engine(req)
    load_seconds = time.perf_counter() - start
    record = stream_to_mp4(engine, req)
    emit(args, summarize(engine, req, record, load_seconds), describe)
    return 0
