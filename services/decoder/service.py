"""Decoder service: per-session streaming VAE decode and fragmented-MP4 muxing.

Each session keeps its causal-conv decode state and its fMP4 muxer on one replica (the
generator reaches it through a consistent-hash router keyed by session id). A chunk that
arrives out of order, or for a session this replica does not hold, is refused with ABORTED
/ SESSION_NOT_ON_REPLICA; the caller may then retry with `reset`, which starts a new decode
stream and a new init segment.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
from PIL import Image

from fashionchameleon.v1 import decoder_pb2
from services.common.errors import Aborted
from services.common.model import load_engine
from services.common.tensors import tensor_from_proto, tensor_to_proto
from shared.config import AppConfig
from shared.media.fmp4 import FragmentedMp4Muxer, split_init_segment
from shared.runtime.decode import StreamingDecoder, to_uint8_frames
from shared.storage import open_store


@dataclass
class _DecodeSession:
    decoder: StreamingDecoder
    muxer: FragmentedMp4Muxer
    next_chunk: int
    first_chunk: int
    init_segment: bytes = b""
    last_frame: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1]
    clip: object | None = None  # temporary file collecting the session's fMP4 pieces
    frame_offset: int = 0  # pixel frames of the stream before this decode stream started


class DecoderService:
    def __init__(self, config_json: str):
        self.config = AppConfig.from_json(config_json)
        self.engine = load_engine(self.config.model, frozenset({"vae"}))
        self.sessions: dict[str, _DecodeSession] = {}
        self._lock = threading.Lock()
        self.store = open_store(self.config.storage) if self.config.generator.save_clips else None

    def _decode_sync(self, req: decoder_pb2.DecodeChunkRequest) -> decoder_pb2.DecodeChunkResponse:
        start = time.perf_counter()
        st = self.engine.preset.streaming
        session = self.sessions.get(req.session_id)
        if req.reset or session is None:
            if session is None and req.chunk_index != 0 and not req.reset:
                raise Aborted(f"session {req.session_id} is not decoded on this replica", reason="SESSION_NOT_ON_REPLICA")
            fps = req.encode.fps or st.fps
            crf = req.encode.crf if req.encode.HasField("crf") else 23
            muxer = FragmentedMp4Muxer(st.width, st.height, fps=fps, crf=crf, preset=req.encode.encoder_preset or "veryfast")
            if session is not None and session.clip is not None:
                session.clip.close()
            session = _DecodeSession(
                StreamingDecoder(self.engine.vae), muxer, req.chunk_index, req.chunk_index,
                frame_offset=req.first_frame_index,
            )
            if self.store is not None:
                session.clip = tempfile.TemporaryFile(prefix="fc-clip-")
            self.sessions[req.session_id] = session
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
            session.clip.write(piece)
        init = b""
        if session.next_chunk == session.first_chunk:
            session.init_segment, _ = split_init_segment(piece)
            init = session.init_segment
        session.next_chunk += 1
        resp = decoder_pb2.DecodeChunkResponse(
            session_id=req.session_id,
            chunk_index=req.chunk_index,
            fmp4=piece,
            num_frames=frames.shape[0],
            first_frame_index=session.frame_offset + session.decoder.frames_decoded - frames.shape[0],
            init_segment=init,
            mime_type=session.muxer.mime_type,
            width=st.width,
            height=st.height,
            fps=float(st.fps),
            timings=decoder_pb2.DecodeTimings(
                vae_decode_seconds=vae_s, video_encode_seconds=encode_s, total_seconds=time.perf_counter() - start
            ),
        )
        session.last_frame = pixels[:, :, -1]  # [1, 3, H, W] in [-1, 1], kept for a switch
        last = session.last_frame.float().cpu()
        if req.return_last_frame_tensor:
            resp.last_frame.CopyFrom(tensor_to_proto(last))
        if req.return_last_frame_png:
            buf = io.BytesIO()
            Image.fromarray(frames[-1].numpy()).save(buf, format="PNG")
            resp.last_frame_png = buf.getvalue()
        return resp

    async def DecodeChunk(self, request: decoder_pb2.DecodeChunkRequest) -> decoder_pb2.DecodeChunkResponse:
        return await asyncio.to_thread(self._decode_sync, request)

    def _encode_last_frame_sync(self, session_id: str):
        session = self.sessions.get(session_id)
        if session is None or session.last_frame is None:
            raise Aborted(f"session {session_id} has no decoded frame on this replica", reason="SESSION_NOT_ON_REPLICA")
        with self._lock:
            latent = self.engine.encode_frame(session.last_frame)  # decode-encode round trip
        return tensor_to_proto(latent.cpu())

    async def encode_last_frame(self, session_id: str):
        """The last decoded frame of a session, VAE-encoded as an image: the switch's new reference."""
        return await asyncio.to_thread(self._encode_last_frame_sync, session_id)

    async def CloseSession(
        self, request: decoder_pb2.DecoderCloseSessionRequest, save_key: str | None = None
    ) -> decoder_pb2.DecoderCloseSessionResponse:
        """Free the session's decode state; with `save_key`, store the whole clip there first."""
        session = self.sessions.pop(request.session_id, None)
        if session is None:
            return decoder_pb2.DecoderCloseSessionResponse()
        freed = session.decoder.state_bytes()
        session.muxer.close()
        if session.clip is not None:
            if save_key and session.clip.tell() > 0:
                session.clip.seek(0)
                await asyncio.to_thread(self.store.put_bytes, save_key, session.clip.read(), "video/mp4")
            session.clip.close()
        return decoder_pb2.DecoderCloseSessionResponse(
            chunks_decoded=session.next_chunk - session.first_chunk, freed_bytes=freed
        )

    def num_sessions(self) -> int:
        return len(self.sessions)


def frame_tensor(resp: decoder_pb2.DecodeChunkResponse) -> torch.Tensor:
    """The last decoded frame [1, 3, H, W] in [-1, 1] of a response that asked for it."""
    return tensor_from_proto(resp.last_frame)
