"""One clip, rendered on the interactive engine path at full speed.

`render_clip` drives a `VideoSession` (open, next_chunk, switch_garment at the scheduled chunk
boundaries) exactly as a session on a generator replica would, minus playback pacing, and
encodes the frames into an H.264 MP4 as they come. It runs in a worker thread; the worker's
event loop talks to Redis and tells it to stop through `ClipControl`.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shared.jobs.spec import ClipSpec
from shared.media.video import Mp4Writer
from shared.runtime.pipeline import Engine


class RenderStopped(Exception):
    """The render was asked to stop at a chunk boundary (cancel, lost delivery, shutdown)."""


@dataclass
class ClipControl:
    """Shared by the render thread and the worker loop. `chunks_done` is written by the render
    thread only; `stop` is set by the loop (the thread checks it before every chunk)."""

    stop: threading.Event = field(default_factory=threading.Event)
    chunks_done: int = 0


@dataclass(frozen=True)
class RenderedClip:
    video: bytes  # MP4 (H.264)
    poster_png: bytes  # the clip's first frame
    frames: int  # pixel frames
    width: int  # pixels
    height: int
    fps: float
    frames_sha256: str  # raw uint8 RGB frames [T, H, W, 3], chunk after chunk
    open_seconds: float  # encoders + cond pass
    switch_seconds: float  # all scheduled garment switches
    generate_seconds: float  # DiT, all chunks
    decode_seconds: float  # streaming VAE decode, all chunks
    encode_seconds: float  # H.264 encoding
    per_chunk: list[dict]


def render_clip(engine: Engine, spec: ClipSpec, images: dict[str, Image.Image], control: ClipControl) -> RenderedClip:
    """Render `spec`; `images` maps every object key of the spec to its decoded image.

    Raises RenderStopped when `control.stop` is set before a chunk."""
    schedule = spec.schedule()
    fps = float(engine.preset.streaming.fps)
    hasher = hashlib.sha256()
    per_chunk: list[dict] = []
    poster: np.ndarray | None = None  # uint8 [H, W, 3]
    switch_s = generate_s = decode_s = encode_s = 0.0
    session = engine.session()
    with tempfile.TemporaryDirectory(prefix="fc-job-") as tmp:
        path = Path(tmp) / "clip.mp4"
        try:
            started = time.perf_counter()
            session.open(images[spec.reference_key], images[schedule[0]], spec.prompt, seed=spec.seed)
            open_s = time.perf_counter() - started
            with Mp4Writer(path, fps=fps) as writer:
                for k in range(spec.chunks):
                    if control.stop.is_set():
                        raise RenderStopped(f"stopped before chunk {k}")
                    if k > 0 and k in schedule:
                        switch_s += session.switch_garment(images[schedule[k]])
                    result = session.next_chunk()
                    frames = result.frames.numpy()  # uint8 [T, H, W, 3]
                    hasher.update(np.ascontiguousarray(frames).tobytes())
                    if poster is None:
                        poster = frames[0].copy()
                    t = time.perf_counter()
                    writer.write(frames)
                    encode_s += time.perf_counter() - t
                    generate_s += result.generate_seconds
                    decode_s += result.decode_seconds
                    per_chunk.append(
                        {
                            "index": k,
                            "frames": int(frames.shape[0]),
                            "switched": k > 0 and k in schedule,
                            "generate_seconds": result.generate_seconds,
                            "decode_seconds": result.decode_seconds,
                        }
                    )
                    control.chunks_done = k + 1
                n_frames = writer.frames_written
            video = path.read_bytes()
        finally:
            session.close()
    assert poster is not None  # spec.chunks >= 1
    buf = io.BytesIO()
    Image.fromarray(poster).save(buf, format="PNG")
    return RenderedClip(
        video=video,
        poster_png=buf.getvalue(),
        frames=n_frames,
        width=int(poster.shape[1]),
        height=int(poster.shape[0]),
        fps=fps,
        frames_sha256=hasher.hexdigest(),
        open_seconds=open_s,
        switch_seconds=switch_s,
        generate_seconds=generate_s,
        decode_seconds=decode_s,
        encode_seconds=encode_s,
        per_chunk=per_chunk,
    )
