"""Service-level benchmark: time to first chunk, inter-chunk latency p50/p99 (over all chunks and
per session), visible switch latency p50/p99 and sessions per generator replica, over gRPC
against a running Studio (or the embedded default it starts itself).

    python benchmarks/service.py                       # embedded default, tiny preset, real time
    python benchmarks/service.py --checkpoint checkpoints/toy --decoder fast --concurrency 1,4,8 --max-batch 1,8
    python benchmarks/service.py --target HOST:PORT --api-key KEY --concurrency 1,2,4,8

"Sessions per replica" is the most sessions the suite admitted at a level where every admitted
session still played without a stall: sessions are generated one chunk ahead of playback (generator lead_chunks = 1), so a
gap up to two chunk durations is absorbed; --slack is that bound in chunk durations. A session
the suite refuses (RESOURCE_EXHAUSTED: admission by memory or by compute) counts as refused,
not as a stall. `--max-batch 1,8` (embedded only) starts the suite once per value of
`generator.max_batch_size`: 1 steps sessions one at a time, as before batching. The visible switch
latency is the time from the SwitchGarment call to the first chunk that wears the new garment.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from services.studio.client import StudioClient, StudioError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def pct(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def one_session(target: str, key: str, chunks: int, switch_every: int, seed: int, out: dict) -> None:
    person = (EXAMPLES / "person.png").read_bytes()
    garments = [(EXAMPLES / "garment-red.png").read_bytes(), (EXAMPLES / "garment-green.png").read_bytes()]
    with StudioClient(target, key) as c:
        t0 = time.perf_counter()
        try:
            s = c.create_session(
                person, garments[0], "A person walks toward the camera", seed=seed, options={"max_chunks": chunks}
            )
        except StudioError as e:
            if e.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            out.update(refused=True)
            return
        created = time.perf_counter()
        arrivals, switches, pending = [], [], None
        for chunk in c.stream(s.session_id):
            if chunk.end_of_stream:
                break
            now = time.perf_counter()
            arrivals.append(now)
            if pending is not None and chunk.switch_applied:
                switches.append(now - pending)
                pending = None
            if switch_every and chunk.index % switch_every == switch_every - 1 and chunk.index + 2 < chunks:
                pending = time.perf_counter()
                c.switch_garment(s.session_id, garments[(chunk.index // switch_every + 1) % 2])
        c.close_session(s.session_id)
    out.update(
        create=created - t0,
        ttfc=arrivals[0] - created if arrivals else float("nan"),
        gaps=[b - a for a, b in itertools.pairwise(arrivals)],
        switches=switches,
    )


def run_level(target: str, key: str, n: int, chunks: int, switch_every: int) -> dict:
    results = [dict() for _ in range(n)]
    threads = [
        threading.Thread(target=one_session, args=(target, key, chunks, switch_every, i, results[i])) for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gaps = [g for r in results for g in r.get("gaps", [])]
    switches = [s for r in results for s in r.get("switches", [])]
    ttfc = [r["ttfc"] for r in results if "ttfc" in r]
    per_session_p99 = [pct(r["gaps"], 99) for r in results if r.get("gaps")]
    per_session_p50 = [pct(r["gaps"], 50) for r in results if r.get("gaps")]
    return {
        "sessions": n,
        "completed": sum(1 for r in results if "gaps" in r),
        "refused": sum(1 for r in results if r.get("refused")),
        "ttfc_p50_s": statistics.median(ttfc) if ttfc else None,
        "ttfc_max_s": max(ttfc) if ttfc else None,
        "inter_chunk_p50_s": pct(gaps, 50) if gaps else None,
        "inter_chunk_p99_s": pct(gaps, 99) if gaps else None,
        "session_p50_median_s": statistics.median(per_session_p50) if per_session_p50 else None,
        "session_p99_worst_s": max(per_session_p99) if per_session_p99 else None,
        "switch_visible_p50_s": pct(switches, 50) if switches else None,
        "switch_visible_p99_s": pct(switches, 99) if switches else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target")
    p.add_argument("--api-key")
    p.add_argument("--preset", default="tiny", help="embedded default only")
    p.add_argument("--checkpoint", help="embedded default only: serve this checkpoint folder instead of --preset")
    p.add_argument("--decoder", choices=["vae", "fast"], default="vae", help="embedded default only")
    p.add_argument(
        "--headroom",
        type=float,
        help="embedded default only: generator.realtime_headroom (admission by compute; default: the embedded 1.0)",
    )
    p.add_argument(
        "--max-batch",
        default="8",
        help="embedded default only: comma-separated generator.max_batch_size values, one suite each (1: no batching)",
    )
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated session counts")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--switch-every", type=int, default=3, help="switch garment every K chunks (0: never)")
    p.add_argument(
        "--slack",
        type=float,
        default=2.0,
        help="p99 inter-chunk gap allowed, in chunk durations (2.0: the one-chunk lead buffer)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    chunk_seconds = 12 / 24
    counts = [int(n) for n in args.concurrency.split(",")]
    runs = []
    for max_batch in [None] if args.target else [int(b) for b in args.max_batch.split(",")]:
        with _suite(args, max_batch) as (target, key):
            levels = [run_level(target, key, n, args.chunks, args.switch_every) for n in counts]
        keeping_up = [  # every session the suite admitted completed and kept playback speed
            lv["completed"]
            for lv in levels
            if lv["completed"] + lv["refused"] == lv["sessions"]
            and (lv["session_p99_worst_s"] or 1e9) <= args.slack * chunk_seconds
        ]
        runs.append(
            {
                "target": target,
                "max_batch_size": max_batch,
                "levels": levels,
                "sessions_per_replica": max(keeping_up, default=0),
            }
        )
    summary = {"runs": runs, "sessions_per_replica": runs[-1]["sessions_per_replica"]}
    cols = [
        "sessions",
        "completed",
        "refused",
        "ttfc_p50_s",
        "inter_chunk_p50_s",
        "inter_chunk_p99_s",
        "session_p99_worst_s",
        "switch_visible_p50_s",
        "switch_visible_p99_s",
    ]
    out = sys.stderr if args.json else sys.stdout
    for run in runs:
        if run["max_batch_size"] is not None:
            print(f"generator.max_batch_size = {run['max_batch_size']}", file=out)
        print(" ".join(f"{c:>20}" for c in cols), file=out)
        for lv in run["levels"]:
            cells = (f"{lv[c]:.3f}" if isinstance(lv[c], float) else str(lv[c]) for c in cols)
            print(" ".join(f"{cell:>20}" for cell in cells), file=out)
        print(
            f"sessions per replica keeping playback speed (every session's p99 gap <= {args.slack} x "
            f"{chunk_seconds:.2f} s): {run['sessions_per_replica']}",
            file=out,
        )
    if args.json:
        print(json.dumps(summary))
    return 0


@contextlib.contextmanager
def _suite(args: argparse.Namespace, max_batch: int | None):
    """(target, api key) of the suite to measure: --target, or an embedded one started here."""
    if args.target:
        yield args.target, args.api_key
        return
    from services.launcher import start_embedded

    embedded = start_embedded(
        preset=args.preset,
        checkpoint=args.checkpoint,
        realtime=True,
        decoder=args.decoder,
        generator={
            **({"max_batch_size": max_batch} if max_batch else {}),
            **({"realtime_headroom": args.headroom} if args.headroom is not None else {}),
        },
        quiet=True,
    )
    try:
        yield embedded.grpc_target, embedded.api_key
    finally:
        embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
