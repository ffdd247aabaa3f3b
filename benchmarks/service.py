"""Service-level benchmark: time to first chunk, inter-chunk latency p50/p99, switch latency
and sessions per generator replica, over gRPC against a running Studio (or the embedded
default it starts itself).

    python benchmarks/service.py                       # embedded default, tiny preset, real time
    python benchmarks/service.py --target HOST:PORT --api-key KEY --concurrency 1,2,4,8

"Sessions per replica" is the largest concurrency at which every session still plays without
a stall: sessions are generated one chunk ahead of playback (generator lead_chunks = 1), so a
gap up to two chunk durations is absorbed; --slack is that bound in chunk durations.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.studio.client import StudioClient

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
        s = c.create_session(
            person, garments[0], "A person walks toward the camera", seed=seed, options={"max_chunks": chunks}
        )
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
    return {
        "sessions": n,
        "completed": sum(1 for r in results if "gaps" in r),
        "ttfc_p50_s": statistics.median(ttfc) if ttfc else None,
        "ttfc_max_s": max(ttfc) if ttfc else None,
        "inter_chunk_p50_s": pct(gaps, 50) if gaps else None,
        "inter_chunk_p99_s": pct(gaps, 99) if gaps else None,
        "switch_visible_mean_s": statistics.mean(switches) if switches else None,
        "switch_visible_max_s": max(switches) if switches else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target")
    p.add_argument("--api-key")
    p.add_argument("--preset", default="tiny", help="embedded default only")
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

    embedded = None
    if args.target:
        target, key = args.target, args.api_key
    else:
        from services.launcher import start_embedded

        embedded = start_embedded(preset=args.preset, realtime=True)
        target, key = embedded.grpc_target, embedded.api_key
    try:
        chunk_seconds = 12 / 24
        levels = [run_level(target, key, int(n), args.chunks, args.switch_every) for n in args.concurrency.split(",")]
    finally:
        if embedded is not None:
            embedded.stop()
    keeping_up = [
        lv["sessions"]
        for lv in levels
        if lv["completed"] == lv["sessions"] and (lv["inter_chunk_p99_s"] or 1e9) <= args.slack * chunk_seconds
    ]
    summary = {"target": target, "levels": levels, "sessions_per_replica": max(keeping_up, default=0)}
    if args.json:
        print(json.dumps(summary))
        return 0
    cols = [
        "sessions",
        "completed",
        "ttfc_p50_s",
        "ttfc_max_s",
        "inter_chunk_p50_s",
        "inter_chunk_p99_s",
        "switch_visible_mean_s",
        "switch_visible_max_s",
    ]
    print(" ".join(f"{c:>22}" for c in cols))
    for lv in levels:
        print(" ".join(f"{(f'{lv[c]:.3f}' if isinstance(lv[c], float) else str(lv[c])):>22}" for c in cols))
    print(
        f"sessions per replica keeping playback speed (p99 gap <= {args.slack} x {chunk_seconds:.2f} s): "
        f"{summary['sessions_per_replica']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
