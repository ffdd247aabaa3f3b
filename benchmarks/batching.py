"""Sessions per replica: N sessions stepped in one batch vs one at a time (the engine alone).

    python benchmarks/batching.py --preset tiny --sessions 1,2,4,8
    python benchmarks/batching.py --preset small --sessions 1,2,4 --rounds 3 --json
    python benchmarks/batching.py --preset wan2.2-ti2v-5b --height 704 --width 1280 \\
        --device cuda --dtype bfloat16 --sessions 1,2,4 --json

Method. The engine is built once (random weights of a preset, or --checkpoint). For each N, N
sessions open (different references, garments, prompts and seeds) and run `--warmup` rounds,
then `--rounds` measured rounds; a round gives every session one chunk (DiT: denoising steps +
context pass; decode is another deployment's work and not timed here). Three ways of stepping
are timed alternately, round by round, each taking the first, second and third place in turn, so
drift and order effects hit all of them alike:

- serial: one session at a time (what a replica did before batching);
- full batch: all N sessions in one forward per step (`shared.runtime.pipeline.generate_batch`);
- scheduled: the batch sizes the generator's scheduler picks from the step times measured so
  far (`shared.runtime.scheduling.StepTimes.plan`), i.e. what a replica does.

Reported per N: generated FPS (pixel frames of all sessions / seconds; a steady chunk is 12
frames) for each way, `speedup` = scheduled / serial, round time p50/p99 (= each session's
inter-chunk time when all N are due together) and whether the scheduled round holds playback
speed. Then the sessions admission by compute accepts (`--headroom`), from the measured step
times (within the measured counts, and extrapolated past them), next to what the measured rounds
delivered. With `--json` the last line is one JSON
object with `results`: a list of {sessions, batched_fps, serial_fps, full_batch_fps, speedup,
...}. Never used as a timed assert in tests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from benchmarks.stream import device_name
from services.cli.stats import percentile
from shared.cli import CliError, Parser, add_engine_arguments, engine_config, quiet_libraries
from shared.models.checkpoint import CheckpointError, read_preset
from shared.models.presets import get_preset
from shared.runtime.pipeline import Engine, VideoSession, generate_batch
from shared.runtime.scheduling import StepTimes

PROMPTS = [
    "The person turns around slowly.",
    "The person walks to the left.",
    "The person waves with the right hand.",
    "The person stands still, facing the camera.",
]


def build_parser() -> Parser:
    p = Parser(prog="benchmarks/batching.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="random weights of this preset (default: tiny)")
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder instead of random weights")
    add_engine_arguments(p)
    p.add_argument("--sessions", default="1,2,4,8", help="comma-separated session counts (default: 1,2,4,8)")
    p.add_argument("--rounds", type=int, default=6, help="measured rounds per way of stepping (default: 6)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per way, not measured (default: 1)")
    p.add_argument("--headroom", type=float, default=0.2, help="admission headroom (default: 0.2 = 20%%)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="one JSON object as the last stdout line")
    return p


def session_counts(text: str) -> list[int]:
    try:
        counts = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise CliError(f"--sessions takes comma-separated integers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise CliError("--sessions needs counts >= 1")
    return counts


def inputs(i: int, height: int, width: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = rng.uniform(10, 40, 2)
    person = np.stack([128 + 100 * np.sin(x / a), 128 + 100 * np.cos(y / b), 128 + 60 * np.sin((x + y) / (a + b))], -1)
    garment = Image.new("RGB", (width // 2, height // 2), tuple(int(c) for c in rng.integers(0, 255, 3)))
    return Image.fromarray(person.astype(np.uint8)), garment


def open_sessions(engine: Engine, n: int) -> list[VideoSession]:
    st = engine.preset.streaming
    sessions = []
    for i in range(n):
        s = engine.session()
        person, garment = inputs(i, st.height, st.width)
        s.open(person, garment, PROMPTS[i % len(PROMPTS)], seed=1000 + i)
        sessions.append(s)
    return sessions


def timed_round(engine: Engine, sessions: list[VideoSession], sizes: list[int], times: StepTimes | None) -> float:
    """One chunk for every session, stepped in batches of `sizes` (in order); seconds."""
    engine.synchronize()
    start = time.perf_counter()
    at = 0
    for size in sizes:
        group = sessions[at : at + size]
        t0 = time.perf_counter()
        if size == 1:
            group[0].generate()
        else:
            generate_batch(group)
        engine.synchronize()
        if times is not None:
            times.observe(size, time.perf_counter() - t0)
        at += size
    return time.perf_counter() - start


def benchmark(args: argparse.Namespace) -> dict:
    counts = session_counts(args.sessions)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        preset = read_preset(args.checkpoint) if args.checkpoint else get_preset(args.preset)
    except (CheckpointError, KeyError, ValueError) as e:
        raise CliError(str(e)) from None
    config = engine_config(args, preset)
    engine = (
        Engine.from_checkpoint(args.checkpoint, config) if args.checkpoint else Engine.from_preset(preset.name, config)
    )
    st = engine.preset.streaming
    frames_per_chunk = 4 * st.chunk_frames  # a steady chunk: 12 pixel frames
    chunk_seconds = frames_per_chunk / st.fps
    times = StepTimes()
    results = []
    for n in counts:
        sessions = open_sessions(engine, n)
        ways = {"serial": [1] * n, "full_batch": [n]}
        for _ in range(args.warmup):  # not recorded: first steps of a size pay one-off costs
            for sizes in ways.values():
                timed_round(engine, sessions, sizes, None)
        rounds: dict[str, list[float]] = {"serial": [], "full_batch": [], "scheduled": []}
        plans = []
        order = ["serial", "full_batch", "scheduled"]
        for r in range(args.rounds):
            for way in order[r % 3 :] + order[: r % 3]:  # each way takes each position in turn
                if way == "scheduled":
                    plans.append(times.plan(n))
                    sizes = plans[-1]
                else:
                    sizes = ways[way]
                rounds[way].append(timed_round(engine, sessions, sizes, times))
        for s in sessions:
            s.close()
        fps = {way: n * frames_per_chunk * len(r) / sum(r) for way, r in rounds.items()}
        sched = rounds["scheduled"]
        results.append(
            {
                "sessions": n,
                "batched_fps": fps["scheduled"],
                "serial_fps": fps["serial"],
                "full_batch_fps": fps["full_batch"],
                "speedup": fps["scheduled"] / fps["serial"],
                "full_batch_speedup": fps["full_batch"] / fps["serial"],
                "plan": plans[-1],
                "round_p50_s": percentile(sched, 50),
                "round_p99_s": percentile(sched, 99),
                "serial_round_p99_s": percentile(rounds["serial"], 99),
                "holds_playback": percentile(sched, 99) <= chunk_seconds,
            }
        )
    admitted = times.realtime_sessions(chunk_seconds, args.headroom, limit=max(counts))
    # what admission would accept past the counts measured here (extrapolated step times): run
    # --sessions with that count to check it holds playback speed
    estimate = times.realtime_sessions(chunk_seconds, args.headroom, limit=256)
    delivered = max((r["sessions"] for r in results if r["holds_playback"]), default=0)
    return {
        "benchmark": "batching",
        "preset": engine.preset.name,
        "device": device_name(engine.device),
        "dtype": args.dtype,
        "resolution": f"{st.width}x{st.height}",
        "chunk_seconds": chunk_seconds,
        "headroom": args.headroom,
        "step_seconds": {str(k): v for k, v in times.table().items()},
        "admitted_sessions": admitted,
        "admission_estimate": estimate,
        "admitted_sessions_hold_playback": all(r["holds_playback"] for r in results if r["sessions"] <= admitted),
        "largest_measured_at_playback": delivered,
        "results": results,
    }


def print_table(r: dict, out) -> None:
    print(
        f"{r['preset']} {r['resolution']} {r['dtype']} on {r['device']}; a chunk plays {r['chunk_seconds']:.2f} s",
        file=out,
    )
    print(f"{'sessions':>8} {'serial FPS':>11} {'full-batch FPS':>15} {'scheduled FPS':>14} {'speedup':>8} "
          f"{'plan':>12} {'round p50/p99 s':>16} {'real time':>9}", file=out)  # fmt: skip
    for x in r["results"]:
        print(
            f"{x['sessions']:>8} {x['serial_fps']:>11.1f} {x['full_batch_fps']:>15.1f} {x['batched_fps']:>14.1f} "
            f"{x['speedup']:>7.2f}x {x['plan']!s:>12} {x['round_p50_s']:>7.3f}/{x['round_p99_s']:<8.3f} "
            f"{'yes' if x['holds_playback'] else 'no':>9}",
            file=out,
        )
    steps = ", ".join(f"{k}: {v * 1000:.0f} ms" for k, v in r["step_seconds"].items())
    print(f"step time by batch size: {steps}", file=out)
    print(
        f"admission by compute (headroom {r['headroom']:.0%}): {r['admitted_sessions']} of the measured counts "
        f"({r['admission_estimate']} extrapolated); measured at playback speed up to {r['largest_measured_at_playback']}",
        file=out,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        result = benchmark(args)
    except CliError as e:
        print(f"benchmarks/batching.py: error: {e}", file=sys.stderr)
        return 2
    print_table(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
