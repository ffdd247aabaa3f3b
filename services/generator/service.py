"""Generator service: the DiT, the sessions' KV caches, and one streaming loop per session.

A session lives on the replica that admitted it. Its engine operations (open, switch, prompt,
next chunk, state) go through the one orchestrator, `shared.runtime.pipeline.VideoSession`, at
its latent level; this module adds only transport: Redis control and output streams, pacing,
leases, admission, and the encoder/decoder deployments. Its loop:

  1. applies control commands (switch garment, update prompt, close) from the session's Redis
     control stream at the chunk boundary, acknowledging the chunk index they take effect at; a
     garment switch that withdraws the history takes effect at the first chunk the client has not
     received: a chunk decoded but not yet sent is dropped and generated again (`_redo`);
  2. waits while the client is more than `max_client_lag_chunks` behind, and paces chunk k to
     be ready `lead_chunks` before its playback time (when `realtime`);
  3. generates chunk k in a batch with the replica's other sessions due at about the same time
     (`services.generator.batcher`: one DiT forward per denoising step for the whole batch);
  4. sends the latents to the decoder and, while the decoder works, goes on with chunk k+1;
     the decoded fMP4 piece of chunk k is appended to the session's Redis output stream.

Admission control: a session needs `KVCacheSpec.bytes`; a replica admits while the sum stays
within its KV budget and, with `realtime`, while every session still gets its chunks at playback
speed with `realtime_headroom` to spare, judged from the step times per batch size measured at
start and kept current by every step (`shared.runtime.scheduling`); else RESOURCE_EXHAUSTED with
RetryInfo (the gateway then tries the replica with the next most headroom).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field

import torch

from fashionchameleon.v1 import common_pb2, decoder_pb2, encoder_pb2, generator_pb2
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, unwrap_remote
from services.common.model import load_engine
from services.common.tensors import pad_text_embedding, tensor_from_proto, tensor_to_proto, trim_text_embedding
from shared.config import AppConfig
from shared.redis_util import connect
from shared.runtime.kv_cache import KVCacheSpec
from shared.runtime.pipeline import VideoSession, generate_batch
from shared.runtime.scheduling import Recent, StepTimes
from shared.runtime.session import PromptOptions, SwitchOptions
from shared.runtime.session import SessionState as EngineState
from shared.sessionbus import CommandType, SessionRegistry, SessionState
from shared.sessionbus.sessions import InvalidTransition, LeaseHeld, LeaseLost
from shared.sessionbus.streams import SessionClosed, SessionNotFound
from shared.telemetry import HealthState, Metrics

from .batcher import ChunkBatcher
from .routing import EXCLUDE_KEY as ROUTING_EXCLUDE_KEY
from .scaling import CAPACITY as SCALING_CAPACITY
from .scaling import SESSIONS as SCALING_SESSIONS

log = logging.getLogger(__name__)


def switch_options_from_proto(
    opts: common_pb2.SwitchOptions, default: SwitchOptions = SwitchOptions()
) -> SwitchOptions:
    """Unset fields take the session default (itself "on" unless the session said otherwise)."""
    return SwitchOptions(
        refresh=opts.refresh_garment_kv if opts.HasField("refresh_garment_kv") else default.refresh,
        withdraw=opts.withdraw_history_kv if opts.HasField("withdraw_history_kv") else default.withdraw,
        disentangle=opts.disentangle_reference_kv if opts.HasField("disentangle_reference_kv") else default.disentangle,
    )


def _state_blob(session: VideoSession, extra: dict) -> bytes:
    """The session's rebuild state as bytes (device->host copies: call it on a worker thread)."""
    state = session.state()
    state.text, _ = trim_text_embedding(state.text)
    state.extra = extra
    return state.to_bytes()


@dataclass
class _Pending:
    index: int
    response: object  # DeploymentResponse of the decoder call
    meta: dict
    started: float
    request: object = None  # the DecodeChunkRequest, re-sent with `reset` if the decoder lost the session
    prime: object = None  # latents (proto) of the chunk before: the primer of such a reset


@dataclass
class SessionRunner:
    service: GeneratorService
    session_id: str
    tenant: str
    session: VideoSession  # the orchestrator, driven at its latent level
    garment_id: str
    options: SwitchOptions
    max_chunks: int
    prompt_revision: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    playback_start: float | None = None
    task: asyncio.Task | None = None
    end_reason: str = "closed"
    _last_publish: float | None = None
    _paused: bool = False
    control_start: str = "0-0"  # where this runner starts reading commands (a rebuilt session resumes)
    restart_decode: bool = False  # a rebuilt session starts a new decode stream at its first chunk
    frame_offset: int = 0  # pixel frames published before this runner took over
    lease_lost: bool = False  # another replica took the session over: leave its records alone
    # The primer of the next decode stream (proto latents): a rebuilt session's last frame, encoded, or
    # the chunk before a chunk redone for a switch
    prime_latents: object = None
    idle_ttl_s: float | None = None  # the session's idle TTL (the decoder keeps its state a while longer)
    _last_latents: object = None  # latents (proto) of the last chunk sent to the decoder: a reset's primer
    _finishing: bool = False  # in finish(): cancelling now would cut the decoder close and the clip save
    _generate_s: float = 0.0  # the last chunk's generation wall time (waiting for its batch included)
    _decode_s: float = 0.0  # the last chunk's decode time
    _switch_issued: list = field(default_factory=list)  # issued_at of switches applied, not yet published
    _prompt_issued: list = field(default_factory=list)  # issued_at of prompt updates applied, not yet generated
    _redoing: tuple[int, float] | None = None  # (chunk, monotonic time) of a redo until that chunk is sent
    _superseded: _Pending | None = None  # a redone chunk's first decode: awaited before its redo is sent
    _init_segment: bytes | None = None  # the init segment the session's stream has (fMP4 ftyp + moov)

    def stop(self) -> None:
        """End the loop; finish() then frees the cache, closes the decode state and saves the
        clip. Idempotent, and never interrupts finish() itself."""
        if self.task is not None and not self._finishing:
            self.task.cancel()

    def _frames_before(self, k: int) -> int:
        """Stream frame index of chunk k's first pixel frame: 1 + 4 (f - 1) frames for chunk 0,
        4 f for every later one (resets re-prime the decoder, so counts never restart)."""
        f = self.session.preset.streaming.chunk_frames
        return 0 if k <= 0 else 1 + 4 * (f * k - 1)

    # ---- control ---------------------------------------------------------------------
    async def _apply(self, cmd, pending: _Pending | None) -> _Pending | None:
        svc = self.service
        if cmd.type == CommandType.SWITCH_GARMENT:
            started = time.perf_counter()
            p = cmd.payload
            garment = await svc.encode_garment(p["garment_key"])
            asked = SwitchOptions(**{**self.options.__dict__, **p.get("options", {})})
            options = self.session.switch_options(asked)  # the engine's rule for this chunk
            new_ref = None
            if options.disentangle:  # the new reference: the last frame of the chunk before, re-encoded
                if pending is not None:
                    await self._publish(pending)
                    pending = None
                frame = await svc.decoder.options(session_id=self.session_id).encode_last_frame.remote(
                    self.session_id, self.session.chunk_index - 1
                )
                new_ref = await asyncio.to_thread(tensor_from_proto, frame)
            async with svc.compute():
                await asyncio.to_thread(self.session.switch_latents, garment, options, new_ref)
            svc.switch_seconds.observe(time.perf_counter() - started)
            self.garment_id = p.get("garment_id", self.garment_id)
            await svc.persist(self)
            await svc.record_applied(self, garment_id=self.garment_id)
            if cmd.issued_at:  # observed when the first chunk wearing it is sent
                self._switch_issued.append(cmd.issued_at)
        elif cmd.type == CommandType.UPDATE_PROMPT:
            embedding = await svc.encode_prompt(cmd.payload["prompt"])
            prompt_options = PromptOptions(**cmd.payload.get("options", {}))  # cond KV always re-cached
            async with svc.compute():
                await asyncio.to_thread(self.session.set_prompt, embedding, cmd.payload["prompt"], prompt_options)
            self.prompt_revision = int(cmd.payload.get("revision", self.prompt_revision + 1))
            await svc.persist(self)
            await svc.record_applied(self, prompt=cmd.payload["prompt"], prompt_revision=self.prompt_revision)
            if cmd.issued_at:  # observed when the first chunk under it is generated
                self._prompt_issued.append(cmd.issued_at)
        return pending

    def _redo_wanted(self, commands: list, pending: _Pending) -> bool:
        """Whether this batch of control commands should go back to chunk `pending.index` (decoded,
        not yet sent to the client) instead of taking effect after it: when a garment switch in it
        withdraws the history (at chunk 0 there is none), so that chunk's history is dropped by the
        switch anyway; no close is among the commands (the client gets what was generated); and,
        when paced, the replica has compute to spare for one more session (a redo costs about one
        chunk: it must not make the other sessions late) and the chunk can be generated and decoded
        again before its playback time (the viewer sees the new garment a chunk earlier rather than a
        stall)."""
        cfg = self.service.config.generator
        if not cfg.redo_undelivered_on_switch or any(c.type == CommandType.CLOSE for _, c in commands):
            return False
        j = pending.index

        def withdraws(cmd) -> bool:
            asked = {**self.options.__dict__, **cmd.payload.get("options", {})}
            return j == 0 or bool(asked["withdraw"])

        if not any(c.type == CommandType.SWITCH_GARMENT and withdraws(c) for _, c in commands):
            return False
        if not cfg.realtime or self.playback_start is None:
            return True
        svc = self.service
        if not svc.has_spare_compute():
            return False
        deadline = self.playback_start + self._frames_before(j) / self.session.preset.streaming.fps
        # the switch (encodes, cond forward), the chunk again, and its decode after the primer's;
        # once redos were timed here, the slowest of the last few if that is more
        redo_s = (svc.switch_seconds.median or self._generate_s) + self._generate_s + 2 * self._decode_s
        redo_s = max(redo_s, svc.redo_seconds.max or 0.0)
        late = time.monotonic() + redo_s + cfg.redo_margin_s - deadline
        if late > 0:
            log.info(
                "session %s: chunk %d is sent as generated: redoing it for the switch would miss its playback "
                "time by %.3f s (estimated %.3f s)",
                self.session_id,
                j,
                late,
                redo_s,
            )
        return late <= 0

    def _redo(self, pending: _Pending) -> None:
        """Drop chunk `pending.index` (sent to the decoder, never published) and go back to it: the commands
        read now take effect there, the first chunk the client has not received. Its decode is
        left to finish while the switch is applied and the chunk generated again (the decoder holds
        the frame before it, a switch's new reference, throughout), awaited before the redone chunk
        goes to the decoder and thrown away; the redone chunk is decoded on a new decode stream primed
        with the chunk before, whose piece replaces the dropped one in the session's clip."""
        self._redoing = (pending.index, time.monotonic())
        self._superseded = pending  # its decode goes on meanwhile; the decoder holds the frame before either way
        j = pending.index
        self.session.rewind(j, prompt_updated=bool(pending.meta.get("prompt_update_applied")))
        self.restart_decode = True
        self.prime_latents = pending.prime
        self._last_latents = pending.prime
        self.service.metrics.chunks_redone_total.inc()
        log.info("session %s: chunk %d redone for a garment switch (it was not sent yet)", self.session_id, j)

    async def _drop_superseded(self) -> None:
        """Wait for the decode of a chunk dropped by a redo to end, and throw it away."""
        dropped, self._superseded = self._superseded, None
        if dropped is not None:
            with contextlib.suppress(Exception):  # whatever became of it, its piece is not used
                await dropped.response

    # ---- output ------------------------------------------------------------------------
    async def _publish(self, pending: _Pending) -> None:
        svc = self.service
        try:
            resp: decoder_pb2.DecodeChunkResponse = await pending.response
        except Exception as exc:
            if getattr(unwrap_remote(exc), "reason", None) != "SESSION_NOT_ON_REPLICA" or pending.request is None:
                raise
            # The decoder ring changed (e.g. it scaled): restart the decode stream at this chunk;
            # the piece carries a fresh init segment, which MSE players accept mid-stream.
            log.warning(
                "session %s: decoder lost its state, restarting decode at chunk %d", self.session_id, pending.index
            )
            pending.request.reset = True
            if pending.prime is not None:  # the previous chunk: the new decode state continues it
                pending.request.prime_latents.CopyFrom(pending.prime)
            resp = await svc.decoder.options(session_id=self.session_id).DecodeChunk.remote(pending.request)
        self._decode_s = resp.timings.total_seconds
        self._advance_playback_clock(pending.index)
        piece, init = resp.fmp4, resp.init_segment
        if init:  # chunk 0, or a restarted decode stream (a redo for a switch, a failover, a decoder move)
            if pending.index > 0 and self._init_segment is None:  # a rebuilt runner: the session's so far
                self._init_segment = await svc.redis.get(svc.init_key(self.session_id))
            if pending.index > 0 and init == self._init_segment and piece.startswith(init):
                # the same codec configuration: the stream goes on without a new init segment
                # (VideoChunk.is_init_segment_included: chunk 0 and codec changes only)
                piece, init = piece[len(init) :], b""
            else:
                self._init_segment = init
                await svc.redis.set(svc.init_key(self.session_id), init, ex=24 * 3600)
        if resp.last_frame_png:  # what a rebuilt session continues from
            key = svc.recovery_key(self.session_id, "last")
            await svc.redis.hset(
                key,
                mapping={
                    "chunk": pending.index,
                    "png": resp.last_frame_png,
                    "frames": resp.first_frame_index + resp.num_frames,
                    "played_from": self._playback_start_wall(),
                },
            )
            await svc.redis.expire(key, svc.recovery_ttl_s)
        meta = {
            **pending.meta,
            "num_frames": resp.num_frames,
            "first_frame_index": resp.first_frame_index,
            "init_included": bool(init),
            "mime_type": resp.mime_type,
            "fps": resp.fps,
            "decode_seconds": resp.timings.total_seconds,
            "ready_at": time.time(),
        }
        await svc.registry.output(self.session_id).append(pending.index, piece, meta)
        with contextlib.suppress(Exception):  # a session closing underneath is not an error here
            await svc.registry.set_state(
                self.session_id,
                SessionState.ACTIVE,
                chunks=pending.index + 1,
                frames=resp.first_frame_index + resp.num_frames,
            )
        if self._redoing is not None and self._redoing[0] == pending.index:
            svc.redo_seconds.observe(time.monotonic() - self._redoing[1])
            self._redoing = None
        if pending.meta.get("switch_applied"):  # issued -> the first chunk wearing it is sent
            for issued in self._switch_issued:
                svc.metrics.garment_switch_latency_seconds.observe(max(0.0, time.time() - issued))
            self._switch_issued.clear()
        now = time.monotonic()
        m = svc.metrics
        m.chunk_decode_seconds.observe(resp.timings.total_seconds)
        m.frames_generated_total.inc(resp.num_frames)
        if pending.index == 0:
            m.time_to_first_chunk_seconds.observe(now - self.opened_at)
        elif self._last_publish is not None:
            m.inter_chunk_latency_seconds.observe(now - self._last_publish)
        self._last_publish = now

    def _advance_playback_clock(self, k: int) -> None:
        """The playback clock pacing is measured against: it starts when chunk 0 goes out, and a
        chunk that goes out after its playback time (a failover, a slow replica) means the
        player stalled until now, so the clock moves on by that much: later chunks are paced
        from where playback really is, neither bursting to catch up nor held back."""
        now = time.monotonic()
        if k == 0 or self.playback_start is None:
            if k == 0 or self.service.config.generator.realtime:
                self.playback_start = now - self._frames_before(k) / self.session.preset.streaming.fps
            return
        late = now - (self.playback_start + self._frames_before(k) / self.session.preset.streaming.fps)
        if late > 0:
            self.playback_start += late

    def _playback_start_wall(self) -> float:
        """The playback clock's start as unix time (what a rebuilt session's clock resumes from)."""
        if self.playback_start is None:
            return 0.0
        return time.time() - (time.monotonic() - self.playback_start)

    async def _client_index(self) -> int | None:
        """Last chunk index the client received; None once the session ended underneath us."""
        record = await self.service.registry.get(self.session_id)
        if record is None or record.is_terminal:
            return None
        return int(record.meta.get("client_index", -1))

    async def _ended_underneath(self) -> bool:
        """True when the session's record left the open states (a close or the reaper), so an
        error of a write that lost that race is the session ending, not failing."""
        try:
            record = await self.service.registry.get(self.session_id)
        except Exception:  # noqa: BLE001 - cannot tell: treat as a failure
            return False
        return record is None or record.state not in (SessionState.CREATING, SessionState.ACTIVE)

    def _ready_time(self, k: int) -> float | None:
        """Monotonic time before which chunk k need not be generated (playback pacing)."""
        cfg = self.service.config.generator
        if not cfg.realtime or self.playback_start is None or k == 0:
            return None
        st = self.session.preset.streaming
        frames_before = 1 + 4 * (st.chunk_frames * k - 1)  # pixel frames of chunks 0..k-1
        per_chunk = 4 * st.chunk_frames / st.fps
        return self.playback_start + frames_before / st.fps - cfg.lead_chunks * per_chunk

    # ---- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        svc = self.service
        cfg = svc.config.generator
        control = svc.registry.control(self.session_id, start_id=self.control_start)
        pending: _Pending | None = None
        try:
            while True:
                commands = await control.read()
                if pending is not None and commands and self._redo_wanted(commands, pending):
                    self._redo(pending)  # chunk k-1 was not sent yet: the switch takes effect there
                    pending = None
                for command_id, cmd in commands:
                    if cmd.type == CommandType.CLOSE:
                        self.end_reason = str(cmd.payload.get("reason", "closed"))
                        return
                    pending = await self._apply(cmd, pending)
                    await control.ack_result(command_id, self.session.chunk_index)
                k = self.session.chunk_index
                if k >= self.max_chunks:
                    self.end_reason = "max_chunks"
                    return
                client = await self._client_index()
                if client is None:
                    self.end_reason = "closed"
                    return
                waiting = k - client > cfg.max_client_lag_chunks
                ready = None if waiting else self._ready_time(k)
                waiting = waiting or (ready is not None and time.monotonic() < ready)
                if waiting and pending is not None:
                    await self._publish(pending)  # nothing to overlap with: deliver it now
                    pending = None
                if k - client > cfg.max_client_lag_chunks:
                    if not self._paused:
                        self._paused = True
                        svc.metrics.session_paused_total.inc()
                    await asyncio.sleep(cfg.control_poll_s)  # client behind: stop generating
                    continue
                self._paused = False
                svc.metrics.client_lag_chunks.observe(max(0, k - client))
                if ready is not None and time.monotonic() < ready:
                    await asyncio.sleep(min(cfg.control_poll_s, ready - time.monotonic()))
                    continue
                started = time.perf_counter()
                chunk, latents = await svc.batcher.generate(self.session)  # batched with other due sessions
                gen_s = chunk.generate_seconds  # the step it was generated in (waiting for the batch excluded)
                self._generate_s = time.perf_counter() - started
                svc.metrics.chunk_generation_seconds.observe(gen_s)
                svc.metrics.chunks_generated_total.inc()
                if chunk.prompt_updated:  # issued -> the first chunk under the new prompt is generated
                    for issued in self._prompt_issued:
                        svc.metrics.prompt_update_latency_seconds.observe(max(0.0, time.time() - issued))
                    self._prompt_issued.clear()
                meta = {
                    "garment_id": self.garment_id,
                    "prompt_revision": self.prompt_revision,
                    "switch_applied": chunk.switched,
                    "prompt_update_applied": chunk.prompt_updated,
                    "generation_seconds": gen_s,
                    "generated_at": time.time(),
                    "width": self.session.preset.streaming.width,
                    "height": self.session.preset.streaming.height,
                }
                if pending is not None:
                    await self._publish(pending)  # chunk k-1 was decoded while chunk k was generated
                    pending = None
                restarted = self.restart_decode and k > 0
                request = decoder_pb2.DecodeChunkRequest(
                    session_id=self.session_id,
                    chunk_index=k,
                    latents=latents,
                    reset=k == 0 or self.restart_decode,
                    first_frame_index=self._frames_before(k),
                    return_last_frame_png=svc.config.generator.recovery,
                    idle_timeout_seconds=self._decoder_idle_timeout_s(),
                )
                if restarted and self.prime_latents is not None:  # a rebuilt session: the timeline goes on
                    request.prime_latents.CopyFrom(self.prime_latents)
                    self.prime_latents = None
                self.restart_decode = False
                await self._drop_superseded()  # the decoder takes a session's chunks in order
                response = svc.decoder.options(session_id=self.session_id).DecodeChunk.remote(request)
                pending = _Pending(k, response, meta, started, request, prime=self._last_latents)
                self._last_latents = request.latents
                if restarted:  # the client has waited out a failover: deliver now, do not overlap
                    await self._publish(pending)
                    pending = None
        except asyncio.CancelledError:
            if not self.lease_lost:
                self.end_reason = "closed"
        except Exception as exc:
            if await self._ended_underneath():  # closed / expired while we worked: not a failure
                log.info("session %s ended while a chunk was in flight (%s)", self.session_id, type(exc).__name__)
                self.end_reason = "closed"
                return
            log.exception("session %s failed", self.session_id)
            self.end_reason = "failed"
            with contextlib.suppress(Exception):
                await svc.registry.set_state(self.session_id, SessionState.FAILED, reason=str(exc)[:200])
        finally:
            # From here on the session ends exactly once: no cancel may cut the last publish,
            # the decoder close (which saves the clip) or the registry update.
            self._finishing = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(self._drop_superseded())
            if pending is not None and self.end_reason != "failed" and not self.lease_lost:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(self._publish(pending))
            await asyncio.shield(svc.finish(self))

    def _decoder_idle_timeout_s(self) -> float:
        """How long the decoder keeps this session's state without a chunk: past the session's
        idle TTL (a paused session ends by then) plus a failover."""
        redis = self.service.config.redis
        return float(self.idle_ttl_s or redis.session_idle_ttl_s) + 2 * redis.session_lease_s + 60.0


class GeneratorService:
    def __init__(self, config_json: str, decoder, encoder):
        self.config = AppConfig.from_json(config_json)
        self.engine = load_engine(self.config.model, frozenset({"dit"}))
        self.decoder = decoder
        self.encoder = encoder
        self.replica_id = f"gen-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.spec = KVCacheSpec.from_preset(self.engine.preset, self.engine.dtype)
        self.budget = self.config.generator.kv_cache_budget_bytes or self._default_budget()
        self.runners: dict[str, SessionRunner] = {}
        self._admitting: set[str] = set()  # admitted, runner not registered yet: counted as taken
        self._last_refusal = "capacity"  # what the last refused admission ran out of: capacity | compute
        self._recovering: dict[str, asyncio.Task] = {}  # rebuilds in flight, by session id
        self.redis = None
        self.registry: SessionRegistry | None = None
        self._compute_lock: asyncio.Lock | None = None
        self._background: asyncio.Task | None = None
        self.text_max_length = self.engine.preset.text_encoder.max_length
        self.metrics = Metrics.create("auto")
        self.step_times = StepTimes()
        # What a redo costs here (`SessionRunner._redo_wanted`): applying a garment switch, and whole
        # redos (decided -> the redone chunk sent)
        self.switch_seconds = Recent()
        self.redo_seconds = Recent()
        self.batcher: ChunkBatcher | None = None
        self._compute_gauged = -math.inf  # when the compute gauges were last set (monotonic)
        self.warmup_seconds = self._warm_up()
        self._gauge_sessions()
        self.health = HealthState("generator")
        self.health.mark_ready()
        try:  # Serve runs the constructor on the replica's event loop: rebuild orphans from now on,
            asyncio.get_running_loop()  # not from the first health check or request
        except RuntimeError:
            pass  # no loop (a test, a script): started by the first call
        else:
            self._start()

    def _default_budget(self) -> int:
        if self.engine.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.engine.device)
            return int(free * 0.9)
        return 4 * 2**30

    # ---- plumbing ----------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        self._start()

    def _start(self) -> None:
        """Connect and start the maintenance loop (on the running loop); idempotent."""
        if self.registry is None:
            self.redis = connect(self.config.redis)
            self.registry = SessionRegistry(self.redis, self.config.redis)
            self._compute_lock = asyncio.Lock()
            cfg = self.config.generator
            self.batcher = ChunkBatcher(
                self.step_times,
                self.compute,
                max_batch=cfg.max_batch_size,
                wait_s=cfg.batch_wait_s,
                observe=self._stepped,
                sessions=lambda: len(self.runners),
            )
            self._background = asyncio.create_task(self._maintain())

    @contextlib.asynccontextmanager
    async def compute(self):
        async with self._compute_lock:
            yield

    def init_key(self, session_id: str) -> str:
        return f"{self.config.redis.namespace}:session:{{{session_id}}}:init"

    def recovery_key(self, session_id: str, what: str) -> str:
        return f"{self.config.redis.namespace}:session:{{{session_id}}}:recovery:{what}"

    @property
    def recovery_ttl_s(self) -> int:
        return int(self.config.redis.session_idle_ttl_s + self.config.redis.terminal_retention_s + 60)

    async def record_applied(self, runner: SessionRunner, **fields) -> None:
        """Record what a control command changed (garment, prompt) in the session's record,
        in the order the commands were applied."""
        with contextlib.suppress(Exception):  # a session closing underneath is not an error here
            await self.registry.set_state(runner.session_id, SessionState.ACTIVE, **fields)

    # ---- batched stepping and compute capacity --------------------------------------------
    @property
    def chunk_seconds(self) -> float:
        """Playback time of one steady chunk (12 frames at 24 fps: 0.5 s)."""
        st = self.engine.preset.streaming
        return 4 * st.chunk_frames / st.fps

    def _warm_up(self) -> float:
        """Time one batched step per size in `warmup_batch_sizes` (within max_batch_size, the
        session limit and the KV budget) on throwaway sessions, so scheduling and admission by
        compute start from measured numbers. Returns the seconds it took."""
        cfg = self.config.generator
        fit = min(cfg.max_batch_size, cfg.max_sessions, self.budget // max(1, self.spec.bytes))
        sizes = sorted({b for b in cfg.warmup_batch_sizes if 1 <= b <= fit} | {1})
        if fit < 1:
            return 0.0
        started = time.perf_counter()
        preset = self.engine.preset
        shape = (1, preset.dit.in_channels, 1, *preset.latent_hw())
        gen = torch.Generator().manual_seed(0)
        text = torch.zeros(1, self.text_max_length, preset.dit.text_dim)
        sessions = []
        for i in range(max(sizes)):
            s = self.engine.session()
            s.open_latents(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), text, seed=i)
            sessions.append(s)
        try:
            for size in sizes:
                generate_batch(sessions[:size])  # first step of a size: kernels, allocator
                self.engine.synchronize()
                t0 = time.perf_counter()
                generate_batch(sessions[:size])
                self.engine.synchronize()
                self.step_times.observe(size, time.perf_counter() - t0)
            t0 = time.perf_counter()  # the engine's part of a garment switch (the encodes run elsewhere)
            sessions[0].switch_latents(
                torch.randn(shape, generator=gen), SwitchOptions(), torch.randn(shape, generator=gen)
            )
            self.engine.synchronize()
            self.switch_seconds.observe(time.perf_counter() - t0)
        finally:
            for s in sessions:
                s.close()
        log.info("generator step times by batch size: %s", self.step_times.table())
        self._gauge_compute()
        return time.perf_counter() - started

    def _stepped(self, size: int, seconds: float) -> None:
        self.metrics.batch_step_seconds.observe(seconds, tags={"batch_size": str(size)})
        self.metrics.batch_size.observe(size)
        now = time.monotonic()
        if now - self._compute_gauged >= 1.0:  # the capacity scan is not per-step work
            self._compute_gauged = now
            self._gauge_compute()

    def realtime_capacity(self) -> int:
        """Sessions this replica serves at playback speed with the configured headroom."""
        cfg = self.config.generator
        return self.step_times.realtime_sessions(
            self.chunk_seconds, cfg.realtime_headroom, limit=cfg.max_sessions, max_batch=cfg.max_batch_size
        )

    def realtime_headroom(self, sessions: int | None = None) -> float:
        """chunk playback time / time to step `sessions` (default: the open ones) once, minus 1."""
        n = len(self.runners) if sessions is None else sessions
        if n <= 0 or not self.step_times.measured:
            return 100.0
        verdict = self.step_times.admits(n, self.chunk_seconds, 0.0, self.config.generator.max_batch_size)
        return min(100.0, verdict.headroom)

    def _gauge_compute(self) -> None:
        if self.step_times.measured:
            self.metrics.realtime_headroom.set(self.realtime_headroom())
            self.metrics.realtime_session_capacity.set(self.realtime_capacity())

    def _compute_refusal(self, sessions: int) -> str | None:
        """Why `sessions` sessions would not all hold playback speed here (None: they would)."""
        cfg = self.config.generator
        if not (cfg.realtime and cfg.admit_by_compute and self.step_times.measured):
            return None
        verdict = self.step_times.admits(sessions, self.chunk_seconds, cfg.realtime_headroom, cfg.max_batch_size)
        if verdict.admitted:
            return None
        return (
            f"{sessions} sessions would need {verdict.round_seconds:.3f} s of compute per "
            f"{verdict.chunk_seconds:.2f} s chunk (headroom {cfg.realtime_headroom:.0%})"
        )

    def has_spare_compute(self) -> bool:
        """Whether the open sessions and one more would all hold playback speed with the configured
        headroom (by the admission rule; True when admission by compute is off or unmeasured)."""
        return self._compute_refusal(len(self.runners) + 1) is None

    def _try_admit(self, session_id: str) -> bool:
        """Check capacity (KV memory, and compute at playback speed) and take a slot in one step
        (no await in between), so concurrent opens and rebuilds never admit more sessions than
        fit. Release with `_admitting.discard`."""
        cap = self.capacity()
        if cap.free_bytes < self.spec.bytes or cap.active_sessions >= cap.max_sessions:
            self._last_refusal = "capacity"
            return False
        if self._compute_refusal(cap.active_sessions + 1) is not None:
            self._last_refusal = "compute"
            return False
        self._admitting.add(session_id)
        return True

    def chunks_for_duration(self, seconds: float) -> int:
        """Chunks to generate for `seconds` of video: the first chunk boundary at or past it."""
        st = self.engine.preset.streaming
        k = 1
        while (1 + 4 * (st.chunk_frames * k - 1)) / st.fps < seconds:
            k += 1
        return k

    async def persist(self, runner: SessionRunner) -> None:
        """Save what rebuilding the session elsewhere needs (latents, prompt, seed, options):
        a few latent frames, written at open and after each switch or prompt update."""
        if not self.config.generator.recovery:
            return
        extra = {
            "tenant": runner.tenant,
            "garment_id": runner.garment_id,
            "prompt_revision": runner.prompt_revision,
            "max_chunks": runner.max_chunks,
            "options": runner.options.__dict__,
        }
        blob = await asyncio.to_thread(_state_blob, runner.session, extra)  # device->host copies: off the loop
        await self.redis.set(self.recovery_key(runner.session_id, "state"), blob, ex=self.recovery_ttl_s)

    async def _recover(self, session_id: str) -> None:
        """Rebuild an orphaned session (its replica died) here: the last published frame becomes
        the reference, like a switch with withdraw + disentangle, and the stream goes on at the
        next chunk index with the same noise schedule. A rebuild that fails is retried (here or on
        another replica) up to `recovery_attempts` times; then the session ends FAILED."""
        if self.health.draining or not self._try_admit(session_id):
            return
        try:
            try:
                await self.registry.claim(session_id, self.replica_id)
            except (LeaseHeld, SessionNotFound, SessionClosed):
                return  # another replica was faster, or the session ended
            try:
                await self._rebuild(session_id)
            except Exception as exc:  # noqa: BLE001 - counted; the last try ends the session FAILED
                await self._rebuild_failed(session_id, exc)
        finally:
            self._admitting.discard(session_id)

    async def _rebuild_failed(self, session_id: str, exc: Exception) -> None:
        attempts_key = self.recovery_key(session_id, "attempts")
        attempts = int(await self.redis.incr(attempts_key))
        await self.redis.expire(attempts_key, self.recovery_ttl_s)
        limit = self.config.generator.recovery_attempts
        log.warning("session %s: rebuild %d of %d failed: %r", session_id, attempts, limit, exc)
        if attempts >= limit:
            reason = f"the session's replica was lost and rebuilding it failed {attempts} times ({type(exc).__name__})"
            with contextlib.suppress(Exception):
                await self.registry.set_state(session_id, SessionState.FAILED, reason=reason)
        with contextlib.suppress(Exception):  # let the next try claim it at once
            await self.registry.release(session_id, self.replica_id)

    async def _rebuild(self, session_id: str) -> None:
        """The claimed part of `_recover`: raises when the session cannot be rebuilt."""
        blob = await self.redis.get(self.recovery_key(session_id, "state"))
        if blob is None:
            await self.registry.set_state(session_id, SessionState.FAILED, reason="replica lost; no saved state")
            return
        saved = await asyncio.to_thread(EngineState.from_bytes, blob)  # tensors from bytes: off the loop
        last = await self.redis.hgetall(self.recovery_key(session_id, "last"))
        reference, next_chunk, frames = saved.reference, 0, 0
        if last:
            req = encoder_pb2.EncodeImageRequest(
                image=common_pb2.ImageInput(data=last[b"png"]), kind=encoder_pb2.IMAGE_KIND_FRAME
            )
            reference = await asyncio.to_thread(tensor_from_proto, (await self.encoder.EncodeImage.remote(req)).latent)
            next_chunk, frames = int(last[b"chunk"]) + 1, int(last[b"frames"])
        session = self.engine.session()
        text = await asyncio.to_thread(pad_text_embedding, saved.text, self.text_max_length)
        async with self.compute():
            await asyncio.to_thread(
                session.open_latents, reference, saved.garment, text, saved.seed, next_chunk, saved.prompt
            )
        extra = saved.extra
        try:  # the rebuild may have outlasted the lease: still ours? (else another replica has it)
            record = await self.registry.claim(session_id, self.replica_id)
        except (LeaseHeld, SessionNotFound, SessionClosed):
            session.close()
            return
        runner = SessionRunner(
            self,
            session_id,
            extra["tenant"],
            session,
            extra["garment_id"],
            SwitchOptions(**extra["options"]),
            max_chunks=int(extra["max_chunks"]),
            prompt_revision=int(extra["prompt_revision"]),
            control_start=await self.registry.control(session_id).last_acked_id(),
            restart_decode=True,
            frame_offset=frames,
            # the decoder re-primes with the last frame: chunk counts and the timeline go on
            prime_latents=await asyncio.to_thread(tensor_to_proto, reference) if last else None,
            idle_ttl_s=record.idle_ttl_s,
        )
        played_from = float(last.get(b"played_from", 0) or 0) if last else 0.0
        if played_from > 0:  # pacing resumes from the session's playback clock, not from scratch
            runner.playback_start = time.monotonic() - (time.time() - played_from)
        self.runners[session_id] = runner
        self._gauge_sessions()
        self.metrics.sessions_opened_total.inc()
        await self.redis.delete(self.recovery_key(session_id, "attempts"))
        log.warning("session %s rebuilt on %s at chunk %d", session_id, self.replica_id, next_chunk)
        runner.task = asyncio.create_task(runner.run())

    async def _recover_quietly(self, session_id: str) -> None:
        try:
            with contextlib.suppress(Exception):
                await self._recover(session_id)
        finally:
            self._recovering.pop(session_id, None)

    async def _lease_lost(self, session_id: str, runner: SessionRunner) -> None:
        """`renew` failed. The session either ended (the lease goes with a terminal state: the
        runner must still finish it here, decoder close and clip save included), was taken over
        by another replica (stop serving it and leave its records and decode state alone), or
        the lease merely lapsed (a stalled loop) and nobody took it: then keep it."""
        try:
            await self.registry.claim(session_id, self.replica_id)
            return  # lapsed, re-taken: still ours
        except LeaseHeld:
            runner.lease_lost = True  # lives on elsewhere
        except (SessionClosed, SessionNotFound):
            pass  # ended: finish it normally
        except Exception:  # noqa: BLE001 - Redis hiccup: try again next tick
            return
        runner.stop()

    async def _maintain(self) -> None:
        """Renew this replica's leases, reap idle sessions (any replica may reap any session) and
        refresh the gauges (Ray stops exporting a gauge that is not set again)."""
        cfg = self.config.generator
        while True:
            self._gauge_sessions()
            with contextlib.suppress(Exception):  # gateways skip a replica whose heartbeat lapsed
                if self.health.draining:
                    await self.registry.retire(self.replica_id)
                else:
                    await self.registry.heartbeat(self.replica_id)
            for sid, runner in list(self.runners.items()):
                try:
                    await self.registry.renew(sid, self.replica_id)
                except LeaseLost:
                    await self._lease_lost(sid, runner)
                except Exception:  # noqa: BLE001 - Redis hiccup: try again next tick
                    pass
            with contextlib.suppress(Exception):
                await self.registry.reap_expired()
            if self.config.generator.recovery:
                orphans: list[str] = []
                with contextlib.suppress(Exception):
                    orphans = await self.registry.orphaned()
                for sid in orphans:  # one session's trouble does not hold up the others
                    if sid not in self.runners and sid not in self._recovering:
                        # in the background: a rebuild takes a while, and the leases of this
                        # replica's own sessions must be renewed meanwhile
                        self._recovering[sid] = asyncio.create_task(self._recover_quietly(sid))
            await asyncio.sleep(min(cfg.reaper_interval_s, self.config.redis.session_lease_s / 3))

    async def encode_garment(self, object_key: str) -> torch.Tensor:
        req = encoder_pb2.EncodeImageRequest(
            image=common_pb2.ImageInput(object_key=object_key), kind=encoder_pb2.IMAGE_KIND_GARMENT
        )
        return await asyncio.to_thread(tensor_from_proto, (await self.encoder.EncodeImage.remote(req)).latent)

    async def encode_prompt(self, prompt: str) -> torch.Tensor:
        resp = await self.encoder.EncodePrompt.remote(encoder_pb2.EncodePromptRequest(prompt=prompt))
        return await asyncio.to_thread(
            lambda: pad_text_embedding(tensor_from_proto(resp.embedding), self.text_max_length)
        )

    # ---- capacity ----------------------------------------------------------------------
    def capacity(self) -> generator_pb2.GeneratorCapacity:
        taken = len(self.runners) + len(self._admitting - self.runners.keys())
        used = taken * self.spec.bytes
        return generator_pb2.GeneratorCapacity(
            replica_id=self.replica_id,
            kv_cache_budget_bytes=self.budget,
            kv_cache_bytes=used,
            free_bytes=max(0, self.budget - used),
            active_sessions=taken,
            max_sessions=min(self.config.generator.max_sessions, self.budget // max(1, self.spec.bytes)),
            session_kv_cache_bytes=self.spec.bytes,
            realtime_sessions=self.realtime_capacity() if self.step_times.measured else 0,
            realtime_headroom=self.realtime_headroom(taken),
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the generators' autoscaling policy reads (`services.generator.scaling`): open
        sessions and the sessions this replica serves at playback speed (its session limit when
        pacing or compute admission is off)."""
        cap = self.capacity()
        cfg = self.config.generator
        capacity = cap.max_sessions
        if cfg.realtime and cfg.admit_by_compute and self.step_times.measured:
            capacity = min(capacity, self.realtime_capacity())
        return {SCALING_SESSIONS: float(cap.active_sessions), SCALING_CAPACITY: float(capacity)}

    def record_routing_stats(self) -> dict:
        """What the generator's request router ranks replicas by (`services.generator.routing`);
        Serve polls it every `request_routing_stats_period_s`."""
        cap = self.capacity()
        cfg = self.config.generator
        by_memory = max(0, cap.max_sessions - cap.active_sessions) if cap.free_bytes >= self.spec.bytes else 0
        by_compute = by_memory
        if cfg.realtime and cfg.admit_by_compute and self.step_times.measured:
            by_compute = max(0, self.realtime_capacity() - cap.active_sessions)
        return {
            "replica_id": self.replica_id,
            "free_sessions": min(by_memory, by_compute),
            "headroom": cap.realtime_headroom,
            "draining": self.health.draining,
        }

    async def get_capacity(self) -> generator_pb2.GeneratorCapacity:
        return self.capacity()

    # ---- RPCs --------------------------------------------------------------------------
    async def open_session(
        self, state: generator_pb2.SessionState, tenant: str, meta: dict
    ) -> generator_pb2.GeneratorOpenSessionResponse:
        """Admit a session, run its cond forward and start its loop."""
        meta = {k: v for k, v in meta.items() if k != ROUTING_EXCLUDE_KEY}  # routing only: not session data
        await self._ensure_started()
        if self.health.draining:
            self.metrics.rejections_total.inc(tags={"reason": "draining"})
            raise ResourceExhausted("replica is draining", reason="CAPACITY_EXHAUSTED", retry_after_s=1.0)
        st = self.engine.preset.streaming
        served = self.engine.preset.name
        requested = str(meta.get("requested_preset") or "")
        if requested and requested != served:
            raise InvalidArgument(
                f"preset {requested!r} is not served here (this deployment runs {served!r})",
                reason="PRESET_UNAVAILABLE",
                metadata={"preset": requested, "served": served},
            )
        width, height = state.width or st.width, state.height or st.height  # 0 = the preset's default
        if (width, height) != (st.width, st.height):
            raise InvalidArgument(
                f"resolution {width}x{height} not served (this deployment runs {st.width}x{st.height})",
                reason="RESOLUTION_UNSUPPORTED",
            )
        sid = state.session_id
        latent_shape = (1, self.engine.preset.dit.in_channels, 1, *self.engine.preset.latent_hw())

        def inputs():  # wire bytes -> tensors (megabytes of text context): off the loop
            return (
                tensor_from_proto(state.reference_latent, expected_shape=latent_shape),
                tensor_from_proto(state.garment_latent, expected_shape=latent_shape),
                pad_text_embedding(tensor_from_proto(state.prompt_embedding), self.text_max_length),
            )

        reference, garment, text = await asyncio.to_thread(inputs)
        session = self.engine.session()
        if not self._try_admit(sid):  # capacity check and slot in one step: concurrent opens never overbook
            cap = self.capacity()
            why = self._last_refusal
            self.metrics.rejections_total.inc(tags={"reason": why})
            detail = (
                self._compute_refusal(cap.active_sessions + 1)
                if why == "compute"
                else f"{cap.active_sessions} sessions, {cap.free_bytes} bytes free"
            )
            raise ResourceExhausted(
                f"generator replica full ({detail})",
                reason="CAPACITY_EXHAUSTED",
                retry_after_s=self.chunk_seconds if why == "compute" else 5.0,
                metadata={"replica_id": self.replica_id, "limit": why},
            )
        try:
            await self.registry.create(sid, tenant, self.replica_id, meta, idle_ttl_s=meta.get("idle_ttl_s"))
        except BaseException:
            self._admitting.discard(sid)
            raise
        started = time.perf_counter()
        try:
            async with self.compute():
                await asyncio.to_thread(
                    session.open_latents, reference, garment, text, int(state.seed), 0, state.prompt
                )
        except BaseException:
            self._admitting.discard(sid)
            with contextlib.suppress(Exception):
                await self.registry.set_state(sid, SessionState.FAILED, reason="open failed")
            raise
        cond_s = time.perf_counter() - started
        max_chunks = min(
            int(meta.get("max_chunks") or 0) or self.config.generator.max_chunks_per_session,
            self.config.generator.max_chunks_per_session,
        )
        if float(meta.get("max_duration_seconds") or 0) > 0:  # video seconds, ended at a chunk boundary
            max_chunks = min(max_chunks, self.chunks_for_duration(float(meta["max_duration_seconds"])))
        runner = SessionRunner(
            self,
            sid,
            tenant,
            session,
            state.garment_id,
            switch_options_from_proto(state.switch_options),
            max_chunks=max_chunks,
        )
        self.runners[sid] = runner
        self._admitting.discard(sid)
        self._gauge_sessions()
        self.metrics.sessions_opened_total.inc()
        await self.registry.set_state(
            sid,
            SessionState.ACTIVE,
            width=st.width,
            height=st.height,
            fps=st.fps,
            preset=self.engine.preset.name,
            max_chunks=max_chunks,
        )
        await self.persist(runner)
        runner.task = asyncio.create_task(runner.run())
        return generator_pb2.GeneratorOpenSessionResponse(
            session_id=sid,
            replica_id=self.replica_id,
            next_chunk_index=0,
            session_kv_cache_bytes=self.spec.bytes,
            cond_seconds=cond_s,
            capacity=self.capacity(),
        )

    async def finish(self, runner: SessionRunner) -> None:
        """Free a finished session's cache and decoder state; end its record."""
        runner.session.close()
        self.runners.pop(runner.session_id, None)
        self._gauge_sessions()
        if runner.lease_lost:
            return  # the session lives on elsewhere: its records and decode state are not ours
        reason = runner.end_reason if runner.end_reason in ("failed", "expired") else "closed"
        self.metrics.sessions_closed_total.inc(tags={"reason": reason})
        save_key = f"clips/{runner.tenant}/{runner.session_id}.mp4" if self.config.generator.save_clips else None
        try:  # frees the decode state and stores the clip; a failure must not keep the record open
            await self.decoder.options(session_id=runner.session_id).CloseSession.remote(
                decoder_pb2.DecoderCloseSessionRequest(session_id=runner.session_id), save_key=save_key
            )
        except Exception:
            log.warning(
                "session %s: decoder close failed (clip %s not saved)", runner.session_id, save_key, exc_info=True
            )
        with contextlib.suppress(Exception):
            if runner.end_reason != "failed":
                await self._end_record(runner)
            await self.registry.release(runner.session_id, self.replica_id)

    async def _end_record(self, runner: SessionRunner) -> None:
        """A session that reached its max_chunks / max_duration_seconds ends EXPIRED (the
        server ended it); every other end is a close."""
        if runner.end_reason == "max_chunks":
            try:
                await self.registry.set_state(runner.session_id, SessionState.EXPIRED, reason="max_chunks")
                return
            except InvalidTransition:  # a close got there first
                pass
        await self.registry.close(runner.session_id, reason=runner.end_reason)

    async def CloseSession(self, request: generator_pb2.GeneratorCloseSessionRequest):
        await self._ensure_started()
        runner = self.runners.get(request.session_id)
        if runner is None:
            raise FailedPrecondition(
                f"session {request.session_id} is not on this replica", reason="SESSION_NOT_ON_REPLICA"
            )
        chunks = runner.session.chunk_index
        runner.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await runner.task
        return generator_pb2.GeneratorCloseSessionResponse(
            chunks_generated=chunks, freed_bytes=self.spec.bytes, capacity=self.capacity()
        )

    def _gauge_sessions(self) -> None:
        self.metrics.kv_cache_budget_bytes.set(self.budget)
        self.metrics.active_sessions.set(len(self.runners))
        self.metrics.kv_cache_bytes.set(len(self.runners) * self.spec.bytes)

    async def drain(self) -> int:
        """Stop admitting sessions (graceful drain); live ones run on. Returns live sessions."""
        self.health.start_draining("drain requested")
        return len(self.runners)

    async def __del__(self) -> None:
        """Graceful shutdown (Serve calls this within graceful_shutdown_timeout_s): stop admitting,
        let live sessions run to their end, then close what is left so caches and clips are
        released cleanly. Sessions are loops, not requests, so Serve cannot see them itself."""
        self.health.start_draining("replica shutting down")
        if self.registry is not None:
            with contextlib.suppress(Exception):
                await self.registry.retire(self.replica_id)
        deadline = time.monotonic() + self.config.generator.drain_timeout_s
        while self.runners and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for runner in list(self.runners.values()):
            runner.stop()
        await asyncio.gather(*(r.task for r in list(self.runners.values())), return_exceptions=True)

    async def check_health(self) -> None:
        await self._ensure_started()  # Serve calls this soon after start: maintenance runs from then on
        if self._background is not None and self._background.done():
            self.health.mark_unhealthy("maintenance loop stopped")
        self.health.check_health()
