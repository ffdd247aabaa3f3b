"""Generator service: the DiT, the sessions' KV caches, and one streaming loop per session.

A session lives on the replica that admitted it. Its loop:

  1. applies control commands (switch garment, update prompt, close) from the session's Redis
     control stream at the chunk boundary, acknowledging the chunk index they take effect at;
  2. waits while the client is more than `max_client_lag_chunks` behind, and paces chunk k to
     be ready `lead_chunks` before its playback time (when `realtime`);
  3. generates chunk k (one DiT step at a time per replica, sessions take turns);
  4. sends the latents to the decoder and, while the decoder works, goes on with chunk k+1;
     the decoded fMP4 piece of chunk k is appended to the session's Redis output stream.

Admission control: a session needs `KVCacheSpec.bytes`; a replica admits while the sum stays
within its KV budget, else RESOURCE_EXHAUSTED (the gateway then tries another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from shared.queue import CommandType, SessionRegistry, SessionState
from shared.queue.sessions import LeaseHeld, LeaseLost
from shared.queue.streams import SessionClosed, SessionNotFound
from shared.queue.config import connect
from shared.runtime.kv_cache import KVCacheSpec
from shared.runtime.session import SessionState as EngineState
from shared.runtime.session import StreamingSession, SwitchOptions
from shared.telemetry import HealthState, Metrics

log = logging.getLogger(__name__)


def switch_options_from_proto(opts: common_pb2.SwitchOptions, default: SwitchOptions = SwitchOptions()) -> SwitchOptions:
    """Unset fields take the session default (itself "on" unless the session said otherwise)."""
    return SwitchOptions(
        refresh=opts.refresh_garment_kv if opts.HasField("refresh_garment_kv") else default.refresh,
        withdraw=opts.withdraw_history_kv if opts.HasField("withdraw_history_kv") else default.withdraw,
        disentangle=opts.disentangle_reference_kv if opts.HasField("disentangle_reference_kv") else default.disentangle,
    )


@dataclass
class _Pending:
    index: int
    response: object  # DeploymentResponse of the decoder call
    meta: dict
    started: float
    request: object = None  # the DecodeChunkRequest, re-sent with `reset` if the decoder lost the session


@dataclass
class SessionRunner:
    service: "GeneratorService"
    session_id: str
    tenant: str
    session: StreamingSession
    garment_id: str
    options: SwitchOptions
    max_chunks: int
    prompt_revision: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    playback_start: float | None = None
    task: asyncio.Task | None = None
    end_reason: str = "closed"
    _switch_applied: bool = False
    _prompt_applied: bool = False
    _last_publish: float | None = None
    _paused: bool = False
    control_start: str = "0-0"  # where this runner starts reading commands (a rebuilt session resumes)
    restart_decode: bool = False  # a rebuilt session starts a new decode stream at its first chunk
    frame_offset: int = 0  # pixel frames published before this runner took over
    lease_lost: bool = False  # another replica took the session over: leave its records alone

    # ---- control ---------------------------------------------------------------------
    async def _apply(self, cmd, pending: _Pending | None) -> _Pending | None:
        svc = self.service
        k = self.session.chunk_index
        if cmd.type == CommandType.SWITCH_GARMENT:
            p = cmd.payload
            garment = await svc.encode_garment(p["garment_key"])
            options = SwitchOptions(**{**self.options.__dict__, **p.get("options", {})})
            new_ref = None
            if k == 0:  # nothing streamed yet: the new garment simply replaces the old one
                options = SwitchOptions(refresh=True, withdraw=False, disentangle=False)
            elif options.disentangle:
                if pending is not None:
                    await self._publish(pending)
                    pending = None
                new_ref = tensor_from_proto(
                    await svc.decoder.options(session_id=self.session_id).encode_last_frame.remote(self.session_id)
                )
            async with svc.compute():
                await asyncio.to_thread(self.session.switch_garment, garment, new_ref, options)
            self.garment_id = p.get("garment_id", self.garment_id)
            self._switch_applied = True
            await svc.persist(self)
            if cmd.issued_at:
                svc.metrics.garment_switch_latency_seconds.observe(max(0.0, time.time() - cmd.issued_at))
        elif cmd.type == CommandType.UPDATE_PROMPT:
            embedding = await svc.encode_prompt(cmd.payload["prompt"])
            self.session.set_prompt(embedding, cmd.payload["prompt"])
            self.prompt_revision = int(cmd.payload.get("revision", self.prompt_revision + 1))
            self._prompt_applied = True
            await svc.persist(self)
            if cmd.issued_at:
                svc.metrics.prompt_update_latency_seconds.observe(max(0.0, time.time() - cmd.issued_at))
        return pending

    # ---- output ------------------------------------------------------------------------
    async def _publish(self, pending: _Pending) -> None:
        svc = self.service
        try:
            resp: decoder_pb2.DecodeChunkResponse = await pending.response
        except Exception as exc:  # noqa: BLE001
            if getattr(unwrap_remote(exc), "reason", None) != "SESSION_NOT_ON_REPLICA" or pending.request is None:
                raise
            # The decoder ring changed (e.g. it scaled): restart the decode stream at this chunk;
            # the piece carries a fresh init segment, which MSE players accept mid-stream.
            log.warning("session %s: decoder lost its state, restarting decode at chunk %d",
                        self.session_id, pending.index)
            pending.request.reset = True
            resp = await svc.decoder.options(session_id=self.session_id).DecodeChunk.remote(pending.request)
        if resp.init_segment:
            await svc.redis.set(svc.init_key(self.session_id), resp.init_segment, ex=24 * 3600)
        if resp.last_frame_png:  # what a rebuilt session continues from
            key = svc.recovery_key(self.session_id, "last")
            await svc.redis.hset(key, mapping={"chunk": pending.index, "png": resp.last_frame_png,
                                               "frames": resp.first_frame_index + resp.num_frames})
            await svc.redis.expire(key, svc.recovery_ttl_s)
        meta = {
            **pending.meta,
            "num_frames": resp.num_frames,
            "first_frame_index": resp.first_frame_index,
            "init_included": bool(resp.init_segment),
            "mime_type": resp.mime_type,
            "fps": resp.fps,
            "decode_seconds": resp.timings.total_seconds,
            "ready_at": time.time(),
        }
        await svc.registry.output(self.session_id).append(pending.index, resp.fmp4, meta)
        with contextlib.suppress(Exception):  # a session closing underneath is not an error here
            await svc.registry.set_state(self.session_id, SessionState.ACTIVE, chunks=pending.index + 1)
        now = time.monotonic()
        m = svc.metrics
        m.chunk_decode_seconds.observe(resp.timings.total_seconds)
        m.frames_generated_total.inc(resp.num_frames)
        if pending.index == 0:
            self.playback_start = now
            m.time_to_first_chunk_seconds.observe(now - self.opened_at)
        elif self._last_publish is not None:
            m.inter_chunk_latency_seconds.observe(now - self._last_publish)
        self._last_publish = now

    async def _client_index(self) -> int | None:
        """Last chunk index the client received; None once the session ended underneath us."""
        record = await self.service.registry.get(self.session_id)
        if record is None or record.is_terminal:
            return None
        return int(record.meta.get("client_index", -1))

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
                for command_id, cmd in await control.read():
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
                async with svc.compute():
                    latents = await asyncio.to_thread(self.session.next_chunk)
                gen_s = time.perf_counter() - started
                svc.metrics.chunk_generation_seconds.observe(gen_s)
                svc.metrics.chunks_generated_total.inc()
                meta = {
                    "garment_id": self.garment_id,
                    "prompt_revision": self.prompt_revision,
                    "switch_applied": self._switch_applied,
                    "prompt_update_applied": self._prompt_applied,
                    "generation_seconds": gen_s,
                    "generated_at": time.time(),
                }
                self._switch_applied = self._prompt_applied = False
                if pending is not None:
                    await self._publish(pending)  # chunk k-1 was decoded while chunk k was generated
                    pending = None
                request = decoder_pb2.DecodeChunkRequest(
                    session_id=self.session_id, chunk_index=k, latents=tensor_to_proto(latents.cpu()),
                    reset=k == 0 or self.restart_decode, first_frame_index=self.frame_offset,
                    return_last_frame_png=svc.config.generator.recovery,
                )
                self.restart_decode = False
                response = svc.decoder.options(session_id=self.session_id).DecodeChunk.remote(request)
                pending = _Pending(k, response, meta, started, request)
        except asyncio.CancelledError:
            if not self.lease_lost:
                self.end_reason = "closed"
        except Exception as exc:  # noqa: BLE001 - the session fails, the replica keeps serving
            log.exception("session %s failed", self.session_id)
            self.end_reason = "failed"
            with contextlib.suppress(Exception):
                await svc.registry.set_state(self.session_id, SessionState.FAILED, reason=str(exc)[:200])
        finally:
            if pending is not None and self.end_reason != "failed" and not self.lease_lost:
                with contextlib.suppress(Exception):
                    await self._publish(pending)
            await svc.finish(self)


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
        self.redis = None
        self.registry: SessionRegistry | None = None
        self._compute_lock: asyncio.Lock | None = None
        self._background: asyncio.Task | None = None
        self.text_max_length = self.engine.preset.text_encoder.max_length
        self.metrics = Metrics.create("auto")
        self._gauge_sessions()
        self.health = HealthState("generator")
        self.health.mark_ready()

    def _default_budget(self) -> int:
        if self.engine.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.engine.device)
            return int(free * 0.9)
        return 4 * 2**30

    # ---- plumbing ----------------------------------------------------------------------
    async def _ensure_started(self) -> None:
        if self.registry is None:
            self.redis = connect(self.config.redis)
            self.registry = SessionRegistry(self.redis, self.config.redis)
            self._compute_lock = asyncio.Lock()
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

    async def persist(self, runner: "SessionRunner") -> None:
        """Save what rebuilding the session elsewhere needs (latents, prompt, seed, options):
        a few latent frames, written at open and after each switch or prompt update."""
        if not self.config.generator.recovery:
            return
        s = runner.session
        text, _ = trim_text_embedding(s.text_raw.cpu())
        state = s.state()
        state.text = text
        state.extra = {
            "tenant": runner.tenant, "garment_id": runner.garment_id, "prompt_revision": runner.prompt_revision,
            "max_chunks": runner.max_chunks, "options": runner.options.__dict__,
        }
        await self.redis.set(self.recovery_key(runner.session_id, "state"), state.to_bytes(), ex=self.recovery_ttl_s)

    async def _recover(self, session_id: str) -> None:
        """Rebuild an orphaned session (its replica died) here: the last published frame becomes
        the reference, like a switch with withdraw + disentangle, and the stream goes on at the
        next chunk index with the same noise schedule."""
        cap = self.capacity()
        if self.health.draining or cap.free_bytes < self.spec.bytes or cap.active_sessions >= cap.max_sessions:
            return
        try:
            await self.registry.claim(session_id, self.replica_id)
        except (LeaseHeld, SessionNotFound, SessionClosed):
            return  # another replica was faster, or the session ended
        blob = await self.redis.get(self.recovery_key(session_id, "state"))
        if blob is None:
            await self.registry.set_state(session_id, SessionState.FAILED, reason="replica lost; no saved state")
            return
        saved = EngineState.from_bytes(blob)
        last = await self.redis.hgetall(self.recovery_key(session_id, "last"))
        reference, next_chunk, frames = saved.reference, 0, 0
        if last:
            req = encoder_pb2.EncodeImageRequest(
                image=common_pb2.ImageInput(data=last[b"png"]), kind=encoder_pb2.IMAGE_KIND_FRAME
            )
            reference = tensor_from_proto((await self.encoder.EncodeImage.remote(req)).latent)
            next_chunk, frames = int(last[b"chunk"]) + 1, int(last[b"frames"])
        session = StreamingSession(self.engine.dit, self.engine.preset, self.engine.device, self.engine.dtype,
                                   rope=self.engine.rope)
        text = pad_text_embedding(saved.text, self.text_max_length)
        async with self.compute():
            await asyncio.to_thread(session.open, reference, saved.garment, text, saved.seed, next_chunk, saved.prompt)
        extra = saved.extra
        runner = SessionRunner(
            self, session_id, extra["tenant"], session, extra["garment_id"], SwitchOptions(**extra["options"]),
            max_chunks=int(extra["max_chunks"]), prompt_revision=int(extra["prompt_revision"]),
            control_start=await self.registry.control(session_id).last_acked_id(),
            restart_decode=True, frame_offset=frames,
        )
        self.runners[session_id] = runner
        self._gauge_sessions()
        self.metrics.sessions_opened_total.inc()
        log.warning("session %s rebuilt on %s at chunk %d", session_id, self.replica_id, next_chunk)
        runner.task = asyncio.create_task(runner.run())

    async def _maintain(self) -> None:
        """Renew this replica's leases, reap idle sessions (any replica may reap any session) and
        refresh the gauges (Ray stops exporting a gauge that is not set again)."""
        cfg = self.config.generator
        while True:
            self._gauge_sessions()
            for sid, runner in list(self.runners.items()):
                try:
                    await self.registry.renew(sid, self.replica_id)
                except LeaseLost:  # taken over or finished elsewhere: stop serving it here
                    runner.lease_lost = True
                    runner.task.cancel()
                except Exception:  # noqa: BLE001 - Redis hiccup: try again next tick
                    pass
            with contextlib.suppress(Exception):
                await self.registry.reap_expired()
            if self.config.generator.recovery:
                with contextlib.suppress(Exception):
                    for sid in await self.registry.orphaned():
                        await self._recover(sid)
            await asyncio.sleep(min(cfg.reaper_interval_s, self.config.redis.session_lease_s / 3))

    async def encode_garment(self, object_key: str) -> torch.Tensor:
        req = encoder_pb2.EncodeImageRequest(
            image=common_pb2.ImageInput(object_key=object_key), kind=encoder_pb2.IMAGE_KIND_GARMENT
        )
        return tensor_from_proto((await self.encoder.EncodeImage.remote(req)).latent)

    async def encode_prompt(self, prompt: str) -> torch.Tensor:
        resp = await self.encoder.EncodePrompt.remote(encoder_pb2.EncodePromptRequest(prompt=prompt))
        return pad_text_embedding(tensor_from_proto(resp.embedding), self.text_max_length)

    # ---- capacity ----------------------------------------------------------------------
    def capacity(self) -> generator_pb2.GeneratorCapacity:
        used = len(self.runners) * self.spec.bytes
        return generator_pb2.GeneratorCapacity(
            replica_id=self.replica_id,
            kv_cache_budget_bytes=self.budget,
            kv_cache_bytes=used,
            free_bytes=max(0, self.budget - used),
            active_sessions=len(self.runners),
            max_sessions=min(self.config.generator.max_sessions, self.budget // max(1, self.spec.bytes)),
            session_kv_cache_bytes=self.spec.bytes,
        )

    async def get_capacity(self) -> generator_pb2.GeneratorCapacity:
        return self.capacity()

    # ---- RPCs --------------------------------------------------------------------------
    async def open_session(
        self, state: generator_pb2.SessionState, tenant: str, meta: dict
    ) -> generator_pb2.GeneratorOpenSessionResponse:
        """Admit a session, run its cond forward and start its loop."""
        await self._ensure_started()
        cap = self.capacity()
        if self.health.draining:
            self.metrics.rejections_total.inc(tags={"reason": "draining"})
            raise ResourceExhausted("replica is draining", reason="CAPACITY_EXHAUSTED", retry_after_s=1.0)
        if cap.free_bytes < self.spec.bytes or cap.active_sessions >= cap.max_sessions:
            self.metrics.rejections_total.inc(tags={"reason": "capacity"})
            raise ResourceExhausted(
                f"generator replica full ({cap.active_sessions} sessions, {cap.free_bytes} bytes free)",
                reason="CAPACITY_EXHAUSTED",
                retry_after_s=5.0,
            )
        st = self.engine.preset.streaming
        if (state.width, state.height) not in ((0, 0), (st.width, st.height)):
            raise InvalidArgument(
                f"resolution {state.width}x{state.height} not served (this deployment runs {st.width}x{st.height})",
                reason="RESOLUTION_UNSUPPORTED",
            )
        sid = state.session_id
        latent_shape = (1, self.engine.preset.dit.in_channels, 1, *self.engine.preset.latent_hw())
        reference = tensor_from_proto(state.reference_latent, expected_shape=latent_shape)
        garment = tensor_from_proto(state.garment_latent, expected_shape=latent_shape)
        text = pad_text_embedding(tensor_from_proto(state.prompt_embedding), self.text_max_length)
        session = StreamingSession(self.engine.dit, self.engine.preset, self.engine.device, self.engine.dtype,
                                   rope=self.engine.rope)
        await self.registry.create(sid, tenant, self.replica_id, meta, idle_ttl_s=meta.get("idle_ttl_s"))
        started = time.perf_counter()
        try:
            async with self.compute():
                await asyncio.to_thread(session.open, reference, garment, text, int(state.seed), 0, state.prompt)
        except Exception:
            await self.registry.set_state(sid, SessionState.FAILED, reason="open failed")
            raise
        cond_s = time.perf_counter() - started
        runner = SessionRunner(
            self, sid, tenant, session, state.garment_id,
            switch_options_from_proto(state.switch_options),
            max_chunks=min(int(meta.get("max_chunks") or 0) or self.config.generator.max_chunks_per_session,
                           self.config.generator.max_chunks_per_session),
        )
        self.runners[sid] = runner
        self._gauge_sessions()
        self.metrics.sessions_opened_total.inc()
        await self.registry.set_state(
            sid, SessionState.ACTIVE, width=st.width, height=st.height, fps=st.fps, preset=self.engine.preset.name
        )
        await self.persist(runner)
        runner.task = asyncio.create_task(runner.run())
        return generator_pb2.GeneratorOpenSessionResponse(
            session_id=sid, replica_id=self.replica_id, next_chunk_index=0,
            session_kv_cache_bytes=self.spec.bytes, cond_seconds=cond_s, capacity=self.capacity(),
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
        with contextlib.suppress(Exception):
            await self.decoder.options(session_id=runner.session_id).CloseSession.remote(
                decoder_pb2.DecoderCloseSessionRequest(session_id=runner.session_id), save_key=save_key
            )
        with contextlib.suppress(Exception):
            if runner.end_reason != "failed":
                await self.registry.close(runner.session_id, reason=runner.end_reason)
            await self.registry.release(runner.session_id, self.replica_id)

    async def CloseSession(self, request: generator_pb2.GeneratorCloseSessionRequest):
        await self._ensure_started()
        runner = self.runners.get(request.session_id)
        if runner is None:
            raise FailedPrecondition(f"session {request.session_id} is not on this replica",
                                     reason="SESSION_NOT_ON_REPLICA")
        chunks = runner.session.chunk_index
        runner.task.cancel()
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
        deadline = time.monotonic() + self.config.generator.drain_timeout_s
        while self.runners and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        for runner in list(self.runners.values()):
            runner.task.cancel()
        await asyncio.gather(*(r.task for r in list(self.runners.values())), return_exceptions=True)

    async def check_health(self) -> None:
        await self._ensure_started()  # Serve calls this soon after start: maintenance runs from then on
        if self._background is not None and self._background.done():
            self.health.mark_unhealthy("maintenance loop stopped")
        self.health.check_health()
