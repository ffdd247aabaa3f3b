"""Where the videos come from: the engine in this process, or a running Studio over gRPC.

Both write the sample's video to a file and return a `GenerationRecord` with the timings.
Timing definitions (reported next to the numbers):

engine backend (in process, one session per sample)
  backbone_fps                 pixel frames / DiT seconds (denoising steps + context pass),
                               the paper's FPS; VAE decode and video encoding excluded
  end_to_end_fps               pixel frames / (DiT + streaming VAE decode) seconds
  time_to_first_chunk_seconds  open (image + prompt encoding, cond pass) to the first chunk
                               decoded
  switch_latency_seconds       compute time of each garment switch (garment encode, KV
                               refresh / withdraw, reference disentangle)
studio backend (over the public API)
  backbone_fps                 unavailable: the API does not expose DiT seconds
  end_to_end_fps               pixel frames / seconds from CreateSession to the last chunk
                               received (capped at playback speed when the generator paces)
  time_to_first_chunk_seconds  CreateSession call to the first chunk received
  switch_latency_seconds       SwitchGarment call to the arrival of the first chunk wearing
                               the new garment; the switch is asked for when the chunk before
                               the planned one arrives, and takes effect where the server says
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .bench import Benchmark, ChunkPlan, Sample

ENGINE_TIMING = "engine"
STUDIO_TIMING = "studio"


@dataclass
class GenerationRecord:
    sample_id: str
    backend: str  # "engine" | "studio"
    frames: int  # pixel frames in the video (cut to the sample's length)
    chunks: int
    width: int
    height: int
    fps: float
    seed: int
    segments: list[dict]  # {"start": frame, "end": frame, "garment": manifest ref, "chunk": first chunk}
    switches: list[dict]  # {"planned_chunk", "effective_chunk", "garment", "latency_seconds"}
    time_to_first_chunk_seconds: float | None
    total_seconds: float
    generate_seconds: float | None  # DiT seconds (engine only)
    decode_seconds: float | None  # VAE decode seconds (engine only)
    per_chunk: list[dict] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationRecord:
        return cls(**d)


class Backend(Protocol):
    kind: str

    def describe(self) -> dict[str, Any]:
        """What generated the videos (checkpoint id, preset, target...): part of the run identity."""

    def plan(self) -> ChunkPlan: ...

    def generate(self, bench: Benchmark, sample: Sample, out: Path, frames: int, seed: int) -> GenerationRecord: ...


def _segments_from_starts(starts: list[tuple[int, int, str]], total: int) -> list[dict]:
    """[(first frame, first chunk, garment ref)] -> segments covering [0, total)."""
    segs = []
    for i, (start, chunk, ref) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else total
        if start < total:
            segs.append({"start": start, "end": min(end, total), "garment": ref, "chunk": chunk})
    return segs


class EngineBackend:
    """Generates with an in-process `Engine` (checkpoint folder or preset)."""

    kind = ENGINE_TIMING

    def __init__(self, engine, switch_options=None, fps: float | None = None, crf: int = 18):
        from shared.runtime.session import SwitchOptions

        self.engine = engine
        self.options = switch_options or SwitchOptions()
        self.fps = fps or float(engine.preset.streaming.fps)
        self.crf = crf
        st = engine.preset.streaming
        self._plan = ChunkPlan.from_latent(st.chunk_frames, engine.preset.vae.scale_factor_temporal)

    def describe(self) -> dict[str, Any]:
        e = self.engine
        return {
            "backend": self.kind,
            "checkpoint_id": e.checkpoint_id,
            "preset": e.preset.name,
            "height": e.preset.streaming.height,
            "width": e.preset.streaming.width,
            "device": e.config.device,
            "dtype": e.config.dtype,
            "attention_backend": e.config.attention_backend,
            "switch_options": asdict(self.options),
        }

    def plan(self) -> ChunkPlan:
        return self._plan

    def generate(self, bench: Benchmark, sample: Sample, out: Path, frames: int, seed: int) -> GenerationRecord:
        from shared.media.video import Mp4Writer

        chunks = self._plan.chunks_for(frames)
        switches = {sw.chunk: sw for sw in sample.switches}
        images = {
            ref: bench.image(ref) for ref in {sample.reference, sample.garment, *(s.garment for s in sample.switches)}
        }
        session = self.engine.session()
        partial = out.with_name(f".{out.name}.partial")
        starts = [(0, 0, sample.garment)]
        sw_records, per_chunk = [], []
        ttfc, written, size = None, 0, (0, 0)
        gen_s = dec_s = 0.0
        start = time.perf_counter()
        try:
            with Mp4Writer(partial, fps=self.fps, crf=self.crf) as writer:
                session.open(images[sample.reference], images[sample.garment], sample.prompt, seed=seed)
                for k in range(chunks):
                    if k in switches:
                        latency = session.switch_garment(images[switches[k].garment], self.options)
                        sw_records.append(
                            {
                                "planned_chunk": k,
                                "effective_chunk": k,
                                "garment": switches[k].garment,
                                "latency_seconds": latency,
                            }
                        )
                    r = session.next_chunk()
                    if ttfc is None:
                        ttfc = time.perf_counter() - start
                        size = (int(r.frames.shape[2]), int(r.frames.shape[1]))
                    if r.switched:
                        starts.append((r.first_frame, k, switches[k].garment))
                    keep = r.frames[: max(0, frames - written)]  # uint8 [T, H, W, 3]
                    if len(keep):
                        writer.write(keep)
                        written += len(keep)
                    gen_s += r.generate_seconds
                    dec_s += r.decode_seconds
                    per_chunk.append(
                        {
                            "index": r.index,
                            "frames": int(r.frames.shape[0]),
                            "generate_seconds": r.generate_seconds,
                            "decode_seconds": r.decode_seconds,
                            "switched": r.switched,
                        }
                    )
            os.replace(partial, out)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            session.close()
        return GenerationRecord(
            sample_id=sample.id,
            backend=self.kind,
            frames=written,
            chunks=chunks,
            width=size[0],
            height=size[1],
            fps=self.fps,
            seed=seed,
            segments=_segments_from_starts(starts, written),
            switches=sw_records,
            time_to_first_chunk_seconds=ttfc,
            total_seconds=time.perf_counter() - start,
            generate_seconds=gen_s,
            decode_seconds=dec_s,
            per_chunk=per_chunk,
            model=self.describe(),
        )


class StudioBackend:
    """Generates through a running Studio (`services.studio.client.StudioClient`)."""

    kind = STUDIO_TIMING

    def __init__(
        self,
        client,
        target: str,
        plan: ChunkPlan | None = None,
        session_options: dict | None = None,
        switch_options: dict | None = None,
    ):
        self.client = client
        self.target = target
        self._plan = plan or ChunkPlan()
        self.session_options = dict(session_options or {})
        self.switch_options = switch_options

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.kind,
            "target": self.target,
            "session_options": self.session_options,
            "switch_options": self.switch_options,
        }

    def plan(self) -> ChunkPlan:
        return self._plan

    def generate(self, bench: Benchmark, sample: Sample, out: Path, frames: int, seed: int) -> GenerationRecord:
        from shared.media.video import probe_video

        chunks = self._plan.chunks_for(frames)
        switches = {sw.chunk: sw for sw in sample.switches}
        data = {
            ref: bench.image_bytes(ref)
            for ref in {sample.reference, sample.garment, *(s.garment for s in sample.switches)}
        }
        options = {**self.session_options, "max_chunks": chunks}
        start = time.monotonic()
        session = self.client.create_session(
            data[sample.reference], data[sample.garment], sample.prompt, seed=seed, options=options
        )
        sid = session.session_id
        pending: list[dict] = []  # switches asked for, waiting for their first chunk
        sw_records: list[dict] = []
        starts = [(0, 0, sample.garment)]
        per_chunk: list[dict] = []
        arrivals: list[float] = []
        lock = threading.Lock()

        def on_chunk(chunk) -> None:
            if not (chunk.fmp4 or chunk.num_frames):
                return
            now = time.monotonic()
            arrivals.append(now)
            per_chunk.append(
                {
                    "index": int(chunk.index),
                    "frames": int(chunk.num_frames),
                    "arrival_seconds": now - start,
                    "generation_latency_seconds": chunk.generation_latency_seconds,
                    "switched": bool(chunk.switch_applied),
                }
            )
            with lock:
                if chunk.switch_applied and pending:
                    rec = pending.pop(0)
                    rec["effective_chunk"] = int(chunk.index)
                    rec["latency_seconds"] = now - rec.pop("_asked")
                    sw_records.append(rec)
                    starts.append((int(chunk.first_frame_index), int(chunk.index), rec["garment"]))
                nxt = int(chunk.index) + 1
                if nxt in switches:
                    sw = switches[nxt]
                    asked = time.monotonic()
                    resp = self.client.switch_garment(sid, data[sw.garment], options=self.switch_options)
                    pending.append(
                        {
                            "planned_chunk": nxt,
                            "announced_chunk": int(resp.effective_chunk_index),
                            "garment": sw.garment,
                            "_asked": asked,
                        }
                    )

        try:
            self.client.save(sid, out, max_chunks=chunks, on_chunk=on_chunk)
        finally:
            try:
                self.client.close_session(sid)
            except Exception:  # noqa: BLE001 - the video is what matters; the server reaps it anyway
                pass
        for rec in pending:  # asked for but never seen applied
            rec.pop("_asked", None)
            sw_records.append({**rec, "effective_chunk": None, "latency_seconds": None})
        info = probe_video(out)
        total_frames = min(frames, info.num_frames)
        end = arrivals[-1] if arrivals else time.monotonic()
        return GenerationRecord(
            sample_id=sample.id,
            backend=self.kind,
            frames=total_frames,
            chunks=len(per_chunk),
            width=int(session.width or info.width),
            height=int(session.height or info.height),
            fps=float(session.fps or info.fps),
            seed=int(session.seed),
            segments=_segments_from_starts(starts, total_frames),
            switches=sw_records,
            time_to_first_chunk_seconds=(arrivals[0] - start) if arrivals else None,
            total_seconds=end - start,
            generate_seconds=None,
            decode_seconds=None,
            per_chunk=per_chunk,
            model={**self.describe(), "preset": session.preset},
        )
