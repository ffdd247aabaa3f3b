"""`fashionchameleon up` (the embedded default) and `fashionchameleon demo` (a scripted session).

`up` starts a local Ray, a local redis-server (unless --redis-url), the local filesystem store
(DEFAULT_STORE, kept after exit) and all deployments, prints where it listens as JSON and
serves until interrupted. Both report their start-up stages with elapsed time on stderr; Ray's
own log lines stay off stderr unless `fashionchameleon -v`. `demo`
talks to a running Studio (--target) or starts the embedded default itself, opens a session,
switches garment twice, saves the MP4 and prints latency figures.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

from PIL import Image, ImageDraw

from shared.cli import CliError, print_json, shipped_checkpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO_PROMPT = "The person waves with the right hand steadily."  # a caption of the toy world
DEFAULT_STORE = "fashionchameleon-store"  # `up`'s object store: in the current folder, kept after exit


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start the embedded default service suite and serve until interrupted")
    _model_args(up)
    up.add_argument("--redis-url", help="use this Redis instead of starting a local redis-server")
    up.add_argument(
        "--store",
        default=DEFAULT_STORE,
        metavar="DIR",
        help=f"folder of the local object store, kept after exit: saved clips land in "
        f"DIR/clips/<tenant>/<session>.mp4 (default: ./{DEFAULT_STORE})",
    )
    up.add_argument("--grpc-port", type=int, default=9000, help="Studio gRPC port (default 9000)")
    up.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="Studio HTTP port: the player page, its WebSocket and the health probes (default: a free port)",
    )
    up.add_argument("--api-key", help="API key for tenant 'dev' (default: a random one, printed)")
    up.set_defaults(run=run_up)

    demo = subparsers.add_parser("demo", help="open a session, switch garment twice, save the MP4, print latencies")
    _model_args(demo)
    demo.add_argument("--target", help="a running Studio (host:port); default: start the embedded default")
    demo.add_argument("--api-key", help="API key for --target")
    demo.add_argument("--chunks", type=int, default=8, help="chunks to stream (default 8)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--prompt", default=DEMO_PROMPT, help=f"motion prompt (default: {DEMO_PROMPT!r})")
    demo.add_argument("--out", default="demo.mp4", help="where to save the clip (default demo.mp4)")
    demo.set_defaults(run=run_demo)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="random weights of a preset (speed tests; default: the shipped toy model)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the shipped toy model, checkpoints/toy)")
    p.add_argument("--no-realtime", action="store_true", help="generate as fast as possible, not at playback pace")
    p.add_argument(
        "--decoder",
        choices=["vae", "fast"],
        default="vae",
        help="streaming decoder: the checkpoint's VAE (default) or its distilled fast decoder",
    )


def _model_source(args) -> tuple[str, str | None]:
    """(preset, checkpoint) for the launcher: a named one, else the shipped toy checkpoint."""
    if args.checkpoint is not None and args.preset is not None:
        raise CliError("give --checkpoint or --preset, not both")
    if args.checkpoint is None and args.preset is None:
        return "toy", shipped_checkpoint()
    return args.preset or "tiny", args.checkpoint


class Stages:
    """Start-up stages on stderr, each with the time since the command started: `[ 12.3s] ...`."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {line}", file=sys.stderr, flush=True)


def _start(args, stage: Stages, **extra):
    from services.launcher import start_embedded

    preset, checkpoint = _model_source(args)
    stage(f"model: {checkpoint or f'random weights of preset {preset!r}'}")
    try:
        emb = start_embedded(
            preset=preset,
            checkpoint=checkpoint,
            realtime=not args.no_realtime,
            decoder=args.decoder,
            quiet=not getattr(args, "verbose", False),
            stage=stage,
            **extra,
        )
    except RuntimeError as e:
        raise CliError(str(e)) from None
    stage(f"ready: Studio gRPC on {emb.grpc_target}")
    return emb


STOP_DEADLINE_S = 9.0  # SIGINT/SIGTERM -> `up` has exited, however the shutdown goes
SERVE_DRAIN_S = 4.0  # of which Serve's graceful shutdown (replicas drain) may take this long


def _check_api_key(api_key: str | None) -> None:
    """The key rules of AuthConfig (length, characters) as a one-line CLI error."""
    from pydantic import ValidationError

    from shared.config import AuthConfig

    if api_key is not None:
        try:
            AuthConfig(api_keys={"dev": api_key})
        except ValidationError as e:
            raise CliError(f"--api-key: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _exit_after(seconds: float, status: int) -> None:
    """Leave the process after `seconds` even if the shutdown is stuck (the reaper ends the children)."""

    def leave() -> None:
        print_json({"status": "stopped", "forced": True})
        os._exit(status)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def run_up(args) -> int:
    """Serve until SIGINT or SIGTERM, then stop within STOP_DEADLINE_S. Every process `up`
    starts (redis-server, Ray's) ends with it, even when `up` itself is killed: a watchdog
    (`services.child_reaper`) ends whatever outlives it."""
    from services.launcher import start_child_reaper

    _check_api_key(args.api_key)
    stage = Stages()
    start_child_reaper()  # first: whatever happens next, nothing we start outlives us
    store = Path(args.store).expanduser().absolute()
    emb = _start(
        args,
        stage,
        redis_url=args.redis_url,
        store_root=str(store),
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        api_key=args.api_key,
    )
    try:
        player = emb.dev_player_url(*_player_inputs(), DEMO_PROMPT)
    except Exception:
        emb.stop(serve_timeout_s=SERVE_DRAIN_S)
        raise
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        if stop.is_set():  # a second Ctrl-C: leave now
            os._exit(128 + signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    print_json({"status": "serving", **emb.describe()})
    tenant = emb.describe()["tenant"]
    stage(f"serving (Ctrl-C stops); API key for tenant {tenant!r}: {emb.api_key}")
    stage(f"saved clips go to {store / 'clips' / tenant}/<session>.mp4 (kept after exit)")
    stage(f"watch in a browser (each load opens a new session of tenant {tenant!r}): {player}")
    try:
        stop.wait()
    finally:
        stage("stopping")
        _exit_after(STOP_DEADLINE_S, 1)
        emb.stop(serve_timeout_s=SERVE_DRAIN_S)
    print_json({"status": "stopped"})
    return 0


def _image_bytes(name: str, fallback_color: tuple[int, int, int]) -> bytes:
    path = EXAMPLES / name
    if path.exists():
        return path.read_bytes()
    img = Image.new("RGB", (240, 320), (230, 230, 230))  # installed without the examples folder
    ImageDraw.Draw(img).rectangle((60, 60, 180, 260), fill=fallback_color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _player_inputs() -> tuple[bytes, dict[str, bytes]]:
    """The dev player's inputs: the example person and the two example garments (catalog ids
    "red" and "green"; the first is worn when a session opens)."""
    person = _image_bytes("person.png", (90, 110, 150))
    garments = {
        "red": _image_bytes("garment-red.png", (200, 40, 50)),
        "green": _image_bytes("garment-green.png", (40, 150, 80)),
    }
    return person, garments


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_demo(args) -> int:
    from fashionchameleon.v1 import studio_pb2
    from services.studio.client import StudioClient
    from shared.media.video import probe_video

    if args.chunks < 5:
        raise CliError("--chunks must be at least 5 (two switches need room)")
    emb = None
    if args.target:
        if not args.api_key:
            raise CliError("--target needs --api-key")
        target, api_key = args.target, args.api_key
    else:
        from services.launcher import start_child_reaper

        start_child_reaper()  # the embedded suite's processes end with this one, even if it is killed
        emb = _start(args, Stages())
        target, api_key = emb.grpc_target, emb.api_key
    person = _image_bytes("person.png", (90, 110, 150))
    garments = [_image_bytes("garment-red.png", (200, 40, 50)), _image_bytes("garment-green.png", (40, 150, 80))]
    # (not before chunk, garment): the first switch after receiving chunk 1, the second after chunk 3
    # and not before the first one shows (sent earlier, it would replace the first in its chunk)
    plan = [(1, garments[1]), (3, garments[0])]
    try:
        with StudioClient(target, api_key) as client:
            t0 = time.perf_counter()
            session = client.create_session(
                person,
                garments[0],
                args.prompt,
                seed=args.seed,
                options={"max_chunks": args.chunks},
            )
            created = time.perf_counter()
            arrivals: list[float] = []
            switches: list[dict] = []
            frames = 0
            out = Path(args.out)
            with out.open("wb") as f:
                for chunk in client.stream(session.session_id):
                    if chunk.end_of_stream:
                        break
                    now = time.perf_counter()
                    arrivals.append(now)
                    f.write(chunk.fmp4)
                    frames += chunk.num_frames
                    for s in switches:
                        if chunk.switch_applied and "visible_seconds" not in s and chunk.index >= s["effective_chunk"]:
                            s["visible_seconds"] = now - s["sent"]
                    due = plan and chunk.index >= plan[0][0] and chunk.index + 1 < args.chunks
                    if due and all(chunk.index >= s["effective_chunk"] for s in switches):
                        _, garment = plan.pop(0)
                        sent = time.perf_counter()
                        resp = client.switch_garment(session.session_id, garment)
                        switches.append(
                            {
                                "after_chunk": chunk.index,
                                "effective_chunk": resp.effective_chunk_index,
                                "sent": sent,
                                "ack_seconds": time.perf_counter() - sent,
                            }
                        )
            closed = client.close_session(session.session_id)
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        info = probe_video(out)
        print_json(
            {
                "session_id": session.session_id,
                "target": target,
                "out": str(out),
                "chunks": len(arrivals),
                "frames": frames,
                "mp4_frames": info.num_frames,
                "create_seconds": round(created - t0, 4),
                "time_to_first_chunk_seconds": round(arrivals[0] - created, 4) if arrivals else None,
                "inter_chunk_p50_seconds": _round(_pct(gaps, 50)),
                "inter_chunk_p99_seconds": _round(_pct(gaps, 99)),
                "switches": [{k: _round(v) for k, v in s.items() if k != "sent"} for s in switches],
                "final_state": studio_pb2.Session.State.Name(closed.state),  # e.g. "CLOSED", not its number
            }
        )
    finally:
        if emb is not None:
            emb.stop()
    return 0


def _round(v):
    return round(v, 4) if isinstance(v, float) else v
