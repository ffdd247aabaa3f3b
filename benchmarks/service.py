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
`generator.max_batch_size`: 1 steps sessions one at a time, as before batching.

Garment switches are clicked beside the stream (the call never holds up receiving), at a random
moment within a chunk's playback time after the chunk that triggers them arrives. The visible
switch latency is the time from the SwitchGarment call until the first chunk wearing the new garment
starts playing on a player that starts at chunk 0's arrival and plays at 1x (stalling when it has
nothing); "arrived" is until that chunk arrives. `switch_at_first_unreceived` counts the switches
that took effect at the first chunk the viewer had not received when clicking. `--redo on,off`
(embedded only) starts a suite per value of `generator.redo_undelivered_on_switch`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
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
    """One viewer: streams the session and, every `switch_every` chunks, clicks a garment (the
    SwitchGarment call runs beside the stream, as a page's click does, so receiving never waits
    for it)."""
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
        arrivals: dict[int, float] = {}
        durations: dict[int, float] = {}
        clicks: list[dict] = []
        threads: list[threading.Thread] = []
        rng = random.Random(seed)
        last = [-1]  # the last chunk index received

        def click(garment: bytes, delay: float) -> None:
            time.sleep(delay)  # a viewer clicks at any moment, not just as a chunk arrives
            received, sent = last[0], time.perf_counter()
            resp = c.switch_garment(s.session_id, garment)
            clicks.append({"sent": sent, "received": received, "effective": resp.effective_chunk_index})

        for chunk in c.stream(s.session_id):
            if chunk.end_of_stream:
                break
            arrivals[chunk.index] = time.perf_counter()
            last[0] = chunk.index
            durations[chunk.index] = chunk.duration_seconds
            if switch_every and chunk.index % switch_every == switch_every - 1 and chunk.index + 2 < chunks:
                garment = garments[(chunk.index // switch_every + 1) % 2]
                delay = rng.uniform(0.0, chunk.duration_seconds)
                threads.append(threading.Thread(target=click, args=(garment, delay)))
                threads[-1].start()
        for t in threads:
            t.join()
        c.close_session(s.session_id)
    # A player that starts at chunk 0's arrival and plays at 1x, stalling while it has nothing.
    plays: dict[int, float] = {}
    stalls: list[float] = []  # how long the player waited for each chunk that came after it was due
    for k in sorted(arrivals):
        due = plays[k - 1] + durations[k - 1] if k - 1 in plays else arrivals[k]
        plays[k] = max(arrivals[k], due)
        if arrivals[k] > due:
            stalls.append(arrivals[k] - due)
    order = sorted(arrivals)
    out.update(
        create=created - t0,
        ttfc=arrivals[order[0]] - created if order else float("nan"),
        gaps=[arrivals[b] - arrivals[a] for a, b in itertools.pairwise(order)],
        # call -> the first chunk wearing it arrives / starts playing; how many chunks past the
        # first one the viewer had not received when clicking it took effect (0: that one)
        switch_arrived=[arrivals[x["effective"]] - x["sent"] for x in clicks if x["effective"] in arrivals],
        switch_played=[plays[x["effective"]] - x["sent"] for x in clicks if x["effective"] in plays],
        switch_offset=[x["effective"] - (x["received"] + 1) for x in clicks],
        stalls=stalls,
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
    arrived = [s for r in results for s in r.get("switch_arrived", [])]
    played = [s for r in results for s in r.get("switch_played", [])]
    offsets = [s for r in results for s in r.get("switch_offset", [])]
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
        "switch_arrived_p50_s": pct(arrived, 50) if arrived else None,
        "switch_arrived_p99_s": pct(arrived, 99) if arrived else None,
        "switch_visible_p50_s": pct(played, 50) if played else None,
        "switch_visible_p99_s": pct(played, 99) if played else None,
        "stalls": sum(len(r.get("stalls", [])) for r in results),
        "stall_seconds": sum(sum(r.get("stalls", [])) for r in results),
        "switches": len(offsets),
        "switch_at_first_unreceived": sum(1 for o in offsets if o <= 0),
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
    p.add_argument(
        "--redo",
        default="on",
        help="embedded only: comma-separated on/off, generator.redo_undelivered_on_switch, one suite each",
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
    if args.target:
        suites = [(None, None)]
    else:
        redo = [{"on": True, "off": False}[v.strip()] for v in args.redo.split(",")]
        suites = list(itertools.product([int(b) for b in args.max_batch.split(",")], redo))
    for max_batch, redo in suites:
        with _suite(args, max_batch, redo) as (target, key):
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
                "redo_undelivered_on_switch": redo,
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
        "stalls",
        "stall_seconds",
        "switches",
        "switch_at_first_unreceived",
    ]
    out = sys.stderr if args.json else sys.stdout
    for run in runs:
        if run["max_batch_size"] is not None:
            print(
                f"generator.max_batch_size = {run['max_batch_size']}, "
                f"redo_undelivered_on_switch = {run['redo_undelivered_on_switch']}",
                file=out,
            )
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
def _suite(args: argparse.Namespace, max_batch: int | None, redo: bool | None):
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
            **({"redo_undelivered_on_switch": redo} if redo is not None else {}),
        },
        quiet=True,
    )
    try:
        yield embedded.grpc_target, embedded.api_key
    finally:
        embedded.stop()


if __name__ == "__main__":
    sys.exit(main())
