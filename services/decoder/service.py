"""Decoder service: per-session streaming VAE decode and fragmented-MP4 muxing.

Each session keeps its causal-conv decode state and its fMP4 muxer on one replica (the
generator reaches it through a consistent-hash router keyed by session id). A chunk that
arrives out of order, or for a session this replica does not hold, is refused with ABORTED
/ SESSION_NOT_ON_REPLICA; the caller may then retry with `reset`, which starts a new decode
stream and a new init segment; the stream's timeline (decode times, frame numbers) and the
session's clip go on across it, and `prime_latents` keep the first chunk after it whole.
State of sessions whose generator vanished without closing them is evicted after an idle
timeout.

The saved clip is the whole session even when its decode moved between replicas (the router's
ring changed: the decoder scaled). A replica's clip is one contiguous run of chunks; a replica that
gives a run up (its state is evicted, it shuts down, or the session comes back to it after a gap)
uploads the run as a part, `clip-parts/{session}/{first:08d}-{end:08d}.mp4`; the replica that
closes the session uploads its own run and `final.json` (the clip's key and end). Whichever of
them completes the chain 0..end assembles the clip at its key (one init segment, every fragment
in order, streamed through a local file) and deletes the parts. Without a ring change the closing
replica holds the whole run and uploads it directly, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from fashionchameleon.v1 import decoder_pb2
from services.common.errors import Aborted, FailedPrecondition
from services.common.model import load_engine
from services.common.tensors import tensor_from_proto, tensor_to_proto
from shared.config import AppConfig
from shared.media.fmp4 import FragmentedMp4Muxer, split_init_segment
from shared.runtime.decode import StreamingDecoder, StreamingFastDecoder, to_uint8_frames
from shared.storage import ObjectNotFound, open_store

log = logging.getLogger(__name__)


@dataclass
class _DecodeSession:
    decoder: StreamingDecoder | StreamingFastDecoder
    muxer: FragmentedMp4Muxer
    next_chunk: int
    first_chunk: int  # first chunk of the current decode stream (since the last reset)
    next_frame: int  # stream frame index of the next decoded frame (the timeline, never reset)
    init_segment: bytes = b""
    # The last pixel frame [1, 3, H, W] in [-1, 1] of the last two chunks decoded (a primer counts
    # as the chunk before its stream's first): a switch's new reference is the last frame of the
    # chunk before the one it takes effect at, which may be the chunk before the last decoded one
    # (the generator drops a decoded chunk it has not published yet and redoes it with the switch).
    last_frames: dict[int, torch.Tensor] = field(default_factory=dict)
    clip: _Clip | None = None  # the session's whole video so far, across resets
    idle_timeout_s: float = 0.0
    last_used: float = field(default_factory=time.monotonic)


class _Clip:
    """The session's fMP4 on local disk, one init segment then every chunk's fragment in order.

    A reset that re-decodes from chunk k truncates what was written from chunk k on (a rebuilt
    generator replaces chunks its dead predecessor decoded but never published) and writes the
    new muxer's identical init segment only once."""

    def __init__(self, first_chunk: int = 0) -> None:
        fd, self.path = tempfile.mkstemp(prefix="fc-clip-", suffix=".mp4")
        self.file = os.fdopen(fd, "w+b")
        self.init: bytes | None = None
        self.offsets: dict[int, int] = {}  # chunk index -> where its fragment starts
        self.first_chunk = first_chunk  # the run of chunks this file holds: [first_chunk, end)

    @property
    def end(self) -> int:
        return max(self.offsets) + 1 if self.offsets else self.first_chunk

    def holds_up_to(self, chunk_index: int) -> bool:
        """Whether a stream restarting at `chunk_index` continues this run (no gap before it)."""
        return self.first_chunk <= chunk_index <= self.end

    def append(self, chunk_index: int, piece: bytes) -> None:
        if chunk_index in self.offsets:  # re-decoded after a reset: replace it and what follows
            self.file.truncate(self.offsets[chunk_index])
            self.file.seek(self.offsets[chunk_index])
            self.offsets = {k: v for k, v in self.offsets.items() if k < chunk_index}
        if self.init is not None and piece.startswith(self.init):
            piece = piece[len(self.init) :]
        elif self.init is None:
            with contextlib.suppress(ValueError):
                self.init, _ = split_init_segment(piece)
        self.offsets[chunk_index] = self.file.tell()
        self.file.write(piece)

    @property
    def size(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class DecoderService:
    def __init__(self, config_json: str):
        self.config = AppConfig.from_json(config_json)
        self.engine = load_engine(self.config.model, frozenset({"vae"}))
        self.sessions: dict[str, _DecodeSession] = {}
        self._lock = threading.Lock()  # the VAE: one decode/encode at a time
        self._table = threading.Lock()  # the session table, touched from worker threads
        self.store = open_store(self.config.storage) if self.config.generator.save_clips else None
        r = self.config.redis
        # A live session decodes a chunk at least every idle TTL (a paused one ends by then)
        # plus a failover; past that its generator vanished without closing it.
        self.default_idle_timeout_s = r.session_idle_ttl_s + r.session_lease_s + 60.0
        self._sweeper: asyncio.Task | None = None

    def _drop(self, session: _DecodeSession) -> None:
        with contextlib.suppress(Exception):
            session.muxer.close()
        if session.clip is not None:
            session.clip.close()

    # ---- clips whose decode moved between replicas (see the module docstring) ---------------
    @staticmethod
    def _parts_prefix(session_id: str) -> str:
        return f"clip-parts/{session_id}/"

    def _give_up_run(self, session_id: str, clip: _Clip) -> None:
        """Upload the run `clip` holds as a part (if it holds any), free it, and assemble the
        session's clip if that completes it. Never raises: a store outage loses only this run."""
        try:
            if self.store is not None and clip.size > 0:
                clip.file.flush()
                key = f"{self._parts_prefix(session_id)}{clip.first_chunk:08d}-{clip.end:08d}.mp4"
                self.store.put_file(key, clip.path, "video/mp4")
                self._assemble(session_id)
        except Exception:
            log.exception(
                "decoder: session %s: could not store its clip's chunks %d..%d",
                session_id,
                clip.first_chunk,
                clip.end - 1,
            )
        finally:
            clip.close()

    def _assemble(self, session_id: str) -> bool:
        """Assemble the session's clip from its parts if `final.json` is there and the parts
        cover 0..end; then delete the parts. True once assembled."""
        prefix = self._parts_prefix(session_id)
        try:
            final = json.loads(self.store.get_bytes(prefix + "final.json", max_bytes=4096))
        except ObjectNotFound:
            return False
        runs: dict[int, tuple[int, str]] = {}
        for info in self.store.list(prefix):
            name = info.key[len(prefix) :]
            if name.endswith(".mp4"):
                first, end = (int(x) for x in name[:-4].split("-"))
                runs[first] = (end, info.key)
        chain, pos = [], 0
        while pos < int(final["end"]):
            if pos not in runs:
                return False  # a run is still held by another replica
            end, key = runs[pos]
            chain.append(key)
            pos = end
        fd, path = tempfile.mkstemp(prefix="fc-clip-", suffix=".mp4")
        os.close(fd)
        part_path = path + ".part"
        try:
            with open(path, "wb") as out:
                for i, key in enumerate(chain):
                    self.store.get_file(key, part_path)
                    with open(part_path, "rb") as part:
                        if i > 0:  # each run starts with the (identical) init segment: keep one
                            _skip_init_segment(part)
                        while block := part.read(1 << 20):
                            out.write(block)
            self.store.put_file(final["save_key"], path, "video/mp4")
        finally:
            for leftover in (path, part_path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        for key in [*(k for _, k in runs.values()), prefix + "final.json"]:
            with contextlib.suppress(Exception):
                self.store.delete(key)
        log.info("decoder: session %s: clip assembled from %d runs at %s", session_id, len(chain), final["save_key"])
        return True

    def shutdown(self) -> None:
        """Give up every run this replica holds (scale-down: the sessions go on elsewhere)."""
        with self._table:
            held = list(self.sessions.items())
            self.sessions.clear()
        for session_id, session in held:
            with contextlib.suppress(Exception):
                session.muxer.close()
            if session.clip is not None:
                self._give_up_run(session_id, session.clip)

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        with contextlib.suppress(Exception):
            self.shutdown()

    def evict_idle(self, now: float | None = None) -> list[str]:
        """Drop the decode state of sessions no chunk arrived for within their idle timeout
        (their generator vanished without a CloseSession). Returns the evicted ids."""
        now = time.monotonic() if now is None else now
        with self._table:
            gone = [sid for sid, s in self.sessions.items() if now - s.last_used > s.idle_timeout_s]
            dropped = [self.sessions.pop(sid) for sid in gone]
        for sid, session in zip(gone, dropped):
            with contextlib.suppress(Exception):
                session.muxer.close()
            if session.clip is not None:  # its decode may go on elsewhere: keep what it holds
                self._give_up_run(sid, session.clip)
        if gone:
            log.warning("decoder: evicted %d idle session(s) whose generator went away: %s", len(gone), gone)
        return gone

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, min(60.0, self.default_idle_timeout_s / 4)))
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.evict_idle)

    def _start_stream(self, req: decoder_pb2.DecodeChunkRequest, old: _DecodeSession | None) -> _DecodeSession:
        """A new causal decode state and muxer at req.chunk_index; the timeline and the clip go on."""
        st = self.engine.preset.streaming
        fps = req.encode.fps or st.fps
        crf = req.encode.crf if req.encode.HasField("crf") else 23
        muxer = FragmentedMp4Muxer(
            st.width,
            st.height,
            fps=fps,
            crf=crf,
            preset=req.encode.encoder_preset or "veryfast",
            start_frame=req.first_frame_index,
            start_sequence=req.chunk_index,
        )
        decoder = self.engine.streaming_decoder()  # the VAE's, or the distilled fast one
        if req.reset and req.HasField("prime_latents") and req.chunk_index > 0:
            # Decode what precedes the chunk in the video and drop those frames: the causal
            # caches then continue the stream, so this chunk gets 4 f frames, not 1 + 4 (f - 1).
            prime = tensor_from_proto(req.prime_latents).to(self.engine.device, self.engine.dtype)
            with self._lock:
                primed = decoder.decode_chunk(prime)
            last_frames = {req.chunk_index - 1: primed[:, :, -1].clone()}
        else:
            last_frames = {}
        clip = None
        if old is not None:
            with contextlib.suppress(Exception):
                old.muxer.close()  # the replaced muxer's encoder is freed now, not at GC
            if old.clip is not None:
                if req.chunk_index > 0 and old.clip.holds_up_to(req.chunk_index):
                    clip = old.clip  # a rebuild re-decoding from here: the run goes on
                elif req.chunk_index > 0:  # back after a gap decoded elsewhere: keep this run
                    self._give_up_run(req.session_id, old.clip)
                else:  # the session starts over from chunk 0
                    old.clip.close()
        if clip is None and self.store is not None:
            clip = _Clip(first_chunk=req.chunk_index)
        return _DecodeSession(
            decoder,
            muxer,
            req.chunk_index,
            req.chunk_index,
            next_frame=req.first_frame_index,
            clip=clip,
            idle_timeout_s=req.idle_timeout_seconds or self.default_idle_timeout_s,
            last_frames=last_frames,
        )

    def _decode_sync(self, req: decoder_pb2.DecodeChunkRequest) -> decoder_pb2.DecodeChunkResponse:
        start = time.perf_counter()
        st = self.engine.preset.streaming
        with self._table:
            session = self.sessions.get(req.session_id)
        if req.reset or session is None:
            if session is None and req.chunk_index != 0 and not req.reset:
                raise Aborted(
                    f"session {req.session_id} is not decoded on this replica", reason="SESSION_NOT_ON_REPLICA"
                )
            session = self._start_stream(req, session)
            with self._table:
                self.sessions[req.session_id] = session
        session.last_used = time.monotonic()
        if req.chunk_index != session.next_chunk:
            raise Aborted(
                f"chunk {req.chunk_index} arrived, expected {session.next_chunk}", reason="CHUNK_OUT_OF_ORDER"
            )
        latents = tensor_from_proto(req.latents).to(self.engine.device, self.engine.dtype)
        with self._lock:
            pixels = session.decoder.decode_chunk(latents)  # [1, 3, T, H, W]
        vae_s = time.perf_counter() - start
        frames = to_uint8_frames(pixels)
        encode_start = time.perf_counter()
        piece = session.muxer.add_chunk(frames.numpy())
        encode_s = time.perf_counter() - encode_start
        if session.clip is not None:
            session.clip.append(req.chunk_index, piece)
        init = b""
        if session.next_chunk == session.first_chunk:
            session.init_segment, _ = split_init_segment(piece)
            init = session.init_segment
        session.next_chunk += 1
        first_frame = session.next_frame
        session.next_frame += frames.shape[0]
        session.last_used = time.monotonic()
        resp = decoder_pb2.DecodeChunkResponse(
            session_id=req.session_id,
            chunk_index=req.chunk_index,
            fmp4=piece,
            num_frames=frames.shape[0],
            first_frame_index=first_frame,
            init_segment=init,
            mime_type=session.muxer.mime_type,
            width=st.width,
            height=st.height,
            fps=float(st.fps),
            timings=decoder_pb2.DecodeTimings(
                vae_decode_seconds=vae_s, video_encode_seconds=encode_s, total_seconds=time.perf_counter() - start
            ),
        )
        last = pixels[:, :, -1].clone()  # a copy: a view would keep the whole chunk's pixels alive
        session.last_frames = {k: v for k, v in session.last_frames.items() if k == req.chunk_index - 1}
        session.last_frames[req.chunk_index] = last
        last = last.float().cpu()
        if req.return_last_frame_tensor:
            resp.last_frame.CopyFrom(tensor_to_proto(last))
        if req.return_last_frame_png:
            buf = io.BytesIO()
            Image.fromarray(frames[-1].numpy()).save(buf, format="PNG")
            resp.last_frame_png = buf.getvalue()
        return resp

    async def DecodeChunk(self, request: decoder_pb2.DecodeChunkRequest) -> decoder_pb2.DecodeChunkResponse:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())
        return await asyncio.to_thread(self._decode_sync, request)

    def _encode_last_frame_sync(self, session_id: str, chunk_index: int | None):
        with self._table:
            session = self.sessions.get(session_id)
        if session is None or not session.last_frames:
            raise Aborted(f"session {session_id} has no decoded frame on this replica", reason="SESSION_NOT_ON_REPLICA")
        if chunk_index is None:
            chunk_index = max(session.last_frames)
        frame = session.last_frames.get(chunk_index)
        if frame is None:
            held = sorted(session.last_frames)
            raise FailedPrecondition(
                f"session {session_id}: the last frame of chunk {chunk_index} is not held (held: chunks {held})",
                reason="CHUNK_OUT_OF_ORDER",
                metadata={"held": ",".join(map(str, held))},
            )
        with self._lock:
            latent = self.engine.encode_frame(frame)  # decode-encode round trip
        return tensor_to_proto(latent.cpu())

    async def encode_last_frame(self, session_id: str, chunk_index: int | None = None):
        """The last frame of chunk `chunk_index` of a session (default: of the last chunk decoded),
        VAE-encoded as an image: a switch's new reference. The last two chunks decoded are held;
        another is FAILED_PRECONDITION / CHUNK_OUT_OF_ORDER (metadata "held")."""
        return await asyncio.to_thread(self._encode_last_frame_sync, session_id, chunk_index)

    def _close_sync(self, session_id: str, save_key: str | None) -> decoder_pb2.DecoderCloseSessionResponse:
        with self._table:
            session = self.sessions.pop(session_id, None)
        if session is None:
            return decoder_pb2.DecoderCloseSessionResponse()
        freed = session.decoder.state_bytes()
        clip = session.clip
        try:
            if clip is not None and save_key and clip.size > 0:
                clip.file.flush()
                if clip.first_chunk == 0:  # the whole session decoded here
                    # streamed from disk (S3: multipart), never read whole into memory
                    self.store.put_file(save_key, clip.path, "video/mp4")
                else:  # earlier runs were decoded on other replicas: assemble with theirs
                    final = {"save_key": save_key, "end": clip.end}
                    self.store.put_bytes(
                        self._parts_prefix(session_id) + "final.json", json.dumps(final).encode(), "application/json"
                    )
                    session.clip = None
                    self._give_up_run(session_id, clip)
        finally:
            self._drop(session)
        return decoder_pb2.DecoderCloseSessionResponse(
            chunks_decoded=session.next_chunk - session.first_chunk, freed_bytes=freed
        )

    async def CloseSession(
        self, request: decoder_pb2.DecoderCloseSessionRequest, save_key: str | None = None
    ) -> decoder_pb2.DecoderCloseSessionResponse:
        """Free the session's decode state; with `save_key`, store the whole clip there first."""
        return await asyncio.to_thread(self._close_sync, request.session_id, save_key)

    def num_sessions(self) -> int:
        return len(self.sessions)


def _skip_init_segment(f) -> None:
    """Position `f` (an fMP4 file) after its init segment (ftyp + moov)."""
    while header := f.read(8):
        size, kind = struct.unpack(">I4s", header)
        if kind == b"moov":
            f.seek(size - 8, os.SEEK_CUR)
            return
        f.seek(size - 8, os.SEEK_CUR)
    raise ValueError("no moov box: not an MP4 init segment")
