"""Studio: the public, stateless gRPC gateway (auth, validation, orchestration).

Every replica can serve every call: sessions live on generator replicas, and everything a
gateway needs to know about them is in Redis (registry, control stream, output stream).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from fashionchameleon.v1 import common_pb2, encoder_pb2, generator_pb2, studio_pb2
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    abort_context,
    as_service_error,
    unwrap_remote,
)
from services.jobs.api import JobsApi
from services.studio.auth import ApiKeyAuth
from services.studio.validation import (
    Limits,
    new_session_id,
    parse_create_session,
    parse_stream_session,
    parse_switch_garment,
    parse_update_prompt,
    validate_session_id,
)
from shared.config import AppConfig
from shared.queue import (
    ChunkExpired,
    CommandType,
    ControlCommand,
    SessionClosed,
    SessionNotFound,
    SessionRegistry,
    SessionState,
    StreamEnded,
)
from shared.queue.config import connect
from shared.storage import GarmentCatalog, ObjectNotFound, open_store, upload_key
from shared.telemetry import HealthState, Metrics

log = logging.getLogger(__name__)

_STATES = {
    SessionState.CREATING: studio_pb2.Session.CREATING,
    SessionState.ACTIVE: studio_pb2.Session.ACTIVE,
    SessionState.CLOSING: studio_pb2.Session.CLOSING,
    SessionState.CLOSED: studio_pb2.Session.CLOSED,
    SessionState.EXPIRED: studio_pb2.Session.EXPIRED,
    SessionState.FAILED: studio_pb2.Session.FAILED,
}


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class StudioService(JobsApi):
    """Interactive sessions here; batch clip jobs (SubmitClips, GetJob, ...) from `JobsApi`."""

    def __init__(self, config_json: str, generator, encoder, jobs=None):
        self.config = AppConfig.from_json(config_json)
        self.jobs_config = self.config.jobs
        self.jobs_worker = jobs
        self.generator = generator
        self.encoder = encoder
        self.auth = ApiKeyAuth(self.config.auth.key_to_tenant())
        lim = self.config.limits
        self.limits = Limits(
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            min_image_side=lim.min_image_side,
            max_prompt_chars=lim.max_prompt_chars,
        )
        self.store = open_store(self.config.storage)
        self.catalog = GarmentCatalog(self.store)
        self.redis = None
        self.registry: SessionRegistry | None = None
        self.metrics = Metrics.create("auto")
        self.health = HealthState("studio")
        self.health.mark_ready()

    # ---- plumbing ----------------------------------------------------------------------
    def _registry(self) -> SessionRegistry:
        if self.registry is None:
            self.redis = connect(self.config.redis)
            self.registry = SessionRegistry(self.redis, self.config.redis)
        return self.registry

    def _tenant(self, grpc_context, metadata: list[tuple[str, str]] | None) -> str:
        if metadata is None:
            metadata = list(grpc_context.invocation_metadata()) if grpc_context is not None else []
        return self.auth.tenant_from_metadata(metadata)

    def _count(self, method: str, started: float, err: ServiceError | None) -> None:
        code = "OK" if err is None else err.code.name
        self.metrics.requests_total.inc(tags={"service": "studio", "method": method, "code": code})
        self.metrics.request_latency_seconds.observe(time.perf_counter() - started,
                                                     tags={"service": "studio", "method": method})
        rejection = None if err is None else _rejection(err)
        if rejection:
            self.metrics.rejections_total.inc(tags={"reason": rejection})

    async def _unary(self, grpc_context, method: str, empty: Callable[[], Any], body: Callable[[], Awaitable[Any]]):
        started = time.perf_counter()
        try:
            result = await body()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            err = as_service_error(unwrap_remote(exc))
            self._count(method, started, err)
            if not isinstance(unwrap_remote(exc), ServiceError):
                log.exception("studio call failed")
            if grpc_context is None:
                raise err from exc
            abort_context(grpc_context, err)
            return empty()
        self._count(method, started, None)
        return result

    async def _session_for(self, session_id: str, tenant: str):
        validate_session_id(session_id)
        try:
            return await self._registry().get_for_tenant(session_id, tenant)
        except SessionNotFound:
            raise NotFound(f"session {session_id} not found", reason="SESSION_NOT_FOUND",
                           metadata={"session_id": session_id}) from None

    async def _object_key(self, ref, tenant: str) -> tuple[str, str]:
        """(object key, garment/image id) for an ImageRef; uploads are stored content-addressed."""
        if ref.data is not None:
            key = upload_key(tenant, ref.data)
            await asyncio.to_thread(self.store.put_bytes_if_absent, key, ref.data)
            return key, ref.garment_id
        if ref.catalog_id is not None:
            for owner in (tenant, "public"):  # a tenant's own catalog first, then the shared one
                if await asyncio.to_thread(self.catalog.exists, ref.catalog_id, tenant=owner):
                    return self.catalog.key(ref.catalog_id, owner), ref.catalog_id
            raise NotFound(f"catalog garment {ref.catalog_id!r} not found", reason="CATALOG_ITEM_NOT_FOUND",
                           metadata={"catalog_id": ref.catalog_id})
        key = ref.object_key  # already scoped to this tenant by validation
        try:
            await asyncio.to_thread(self.store.stat, key)
        except ObjectNotFound:
            raise NotFound(f"object {key!r} not found", reason="OBJECT_NOT_FOUND") from None
        return key, key.rsplit("/", 1)[-1][:16]

    async def _encode_image(self, key: str, kind: int):
        req = encoder_pb2.EncodeImageRequest(image=common_pb2.ImageInput(object_key=key), kind=kind)
        return (await self.encoder.EncodeImage.remote(req)).latent

    def _session_proto(self, record) -> studio_pb2.Session:
        meta = record.meta
        return studio_pb2.Session(
            session_id=record.session_id,
            tenant=record.tenant,
            state=_STATES[record.state],
            created_at=_ts(record.created_at),
            expires_at=_ts(record.expires_at),
            idle_timeout_seconds=record.idle_ttl_s,
            chunks_generated=int(meta.get("chunks", 0)),
            garment_id=str(meta.get("garment_id", "")),
            width=int(meta.get("width", 0)),
            height=int(meta.get("height", 0)),
            fps=float(meta.get("fps", 0)),
            preset=str(meta.get("preset", "")),
            seed=int(meta.get("seed", 0)),
            prompt=str(meta.get("prompt", "")),
            prompt_revision=int(meta.get("prompt_revision", 0)),
            error_message=(record.reason or "") if record.state == SessionState.FAILED else "",
        )

    # ---- HTTP: health probes (Ray Serve routes HTTP on the app's prefix here) ----------
    async def __call__(self, request):
        from starlette.responses import JSONResponse

        probe = self.health.readiness() if request.url.path.rstrip("/").endswith("readyz") else self.health.liveness()
        return JSONResponse(probe.body, status_code=probe.status_code)

    async def check_health(self) -> None:
        self.health.check_health()

    # ---- CreateSession -----------------------------------------------------------------
    async def _idempotent(self, tenant: str, request_id: str | None, create: Callable[[], Awaitable[str]]) -> str:
        """Run `create` once per (tenant, request_id); a retry gets the first call's session id."""
        if request_id is None:
            return await create()
        key = f"{self.config.redis.namespace}:idem:{tenant}:{request_id}"
        if await self.redis.set(key, b"pending", nx=True, ex=600):
            try:
                session_id = await create()
            except BaseException:
                await self.redis.delete(key)
                raise
            await self.redis.set(key, session_id.encode(), ex=24 * 3600)
            return session_id
        for _ in range(200):  # the first call is still creating: wait for its answer
            value = await self.redis.get(key)
            if value is None:
                return await self._idempotent(tenant, request_id, create)  # it failed; try ourselves
            if value != b"pending":
                return value.decode()
            await asyncio.sleep(0.1)
        raise DeadlineExceeded("an earlier request with this request_id is still being processed", retry_after_s=1.0)

    async def CreateSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.Session:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            spec = parse_create_session(request, self.limits, tenant=tenant)
            registry = self._registry()
            session_id = await self._idempotent(tenant, spec.request_id, lambda: self._create(tenant, spec, request))
            return self._session_proto(await registry.get(session_id))

        return await self._unary(grpc_context, "CreateSession", studio_pb2.Session, body)

    async def _create(self, tenant: str, spec, request) -> str:
        """Store and encode the inputs, then open the session on a generator replica with room."""
        registry = self._registry()
        if await registry.count_active(tenant) >= self.config.limits.max_sessions_per_tenant:
            raise ResourceExhausted("too many open sessions for this tenant", reason="QUOTA_EXCEEDED",
                                    retry_after_s=10.0)
        (ref_key, _), (garment_key, garment_id) = await asyncio.gather(
            self._object_key(spec.reference, tenant), self._object_key(spec.garment, tenant)
        )
        reference, garment, prompt = await asyncio.gather(
            self._encode_image(ref_key, encoder_pb2.IMAGE_KIND_REFERENCE),
            self._encode_image(garment_key, encoder_pb2.IMAGE_KIND_GARMENT),
            self.encoder.EncodePrompt.remote(encoder_pb2.EncodePromptRequest(prompt=spec.prompt)),
        )
        seed = spec.seed if spec.seed is not None else secrets.randbits(63)
        opts = request.options
        state = generator_pb2.SessionState(
            seed=seed, reference_latent=reference, garment_latent=garment, garment_id=garment_id,
            prompt_embedding=prompt.embedding, prompt=spec.prompt, width=opts.width, height=opts.height,
            switch_options=opts.switch_options,
        )
        meta = {
            "garment_id": garment_id, "prompt": spec.prompt, "seed": seed, "prompt_revision": 0,
            "max_chunks": spec.options.max_chunks, "reference_key": ref_key, "garment_key": garment_key,
        }
        if spec.options.idle_timeout_seconds:
            meta["idle_ttl_s"] = spec.options.idle_timeout_seconds
        last_error: Exception | None = None
        for _ in range(self.config.generator.open_attempts):
            state.session_id = new_session_id()  # a new id hashes to another replica
            try:
                opened = await self.generator.options(session_id=state.session_id).open_session.remote(
                    state, tenant, meta
                )
                break
            except Exception as exc:  # noqa: BLE001
                cause = unwrap_remote(exc)
                if not isinstance(cause, ResourceExhausted):
                    raise cause from None
                last_error = cause
        else:
            raise last_error
        return opened.session_id

    # ---- StreamSession -----------------------------------------------------------------
    async def StreamSession(self, request, grpc_context=None, metadata=None) -> AsyncIterator[studio_pb2.VideoChunk]:
        started = time.perf_counter()
        try:
            tenant = self._tenant(grpc_context, metadata)
            session_id, resume = parse_stream_session(request)
            record = await self._session_for(session_id, tenant)
            registry = self._registry()
            output = registry.output(session_id)
            first = True
            index = resume
            try:
                async for chunk in output.iterate(resume):
                    msg = self._chunk_proto(session_id, chunk)
                    if first and not chunk.meta.get("init_included", False):
                        init = await self.redis.get(f"{self.config.redis.namespace}:session:{{{session_id}}}:init")
                        if init:
                            msg.fmp4 = init + msg.fmp4
                            msg.is_init_segment_included = True
                    first = False
                    index = chunk.index + 1
                    yield msg
                    await self._client_progress(session_id, chunk.index)
            except ChunkExpired as e:
                raise OutOfRange(str(e), reason="CHUNK_NOT_RETAINED", metadata={"oldest": e.oldest}) from None
            except StreamEnded:
                pass
            record = await registry.get(session_id) or record
            yield studio_pb2.VideoChunk(
                session_id=session_id, index=index, end_of_stream=True, end_state=_STATES[record.state]
            )
            self._count("StreamSession", started, None)
        except Exception as exc:  # noqa: BLE001
            err = as_service_error(unwrap_remote(exc))
            self._count("StreamSession", started, err)
            if grpc_context is None:
                raise err from exc
            abort_context(grpc_context, err)
            raise err from exc

    def _chunk_proto(self, session_id: str, chunk) -> studio_pb2.VideoChunk:
        m = chunk.meta
        fps = float(m.get("fps") or 24)
        first_frame = int(m.get("first_frame_index", 0))
        msg = studio_pb2.VideoChunk(
            session_id=session_id,
            index=chunk.index,
            fmp4=chunk.payload,
            num_frames=int(m.get("num_frames", 0)),
            first_frame_index=first_frame,
            start_seconds=first_frame / fps,
            duration_seconds=int(m.get("num_frames", 0)) / fps,
            fps=fps,
            garment_id=str(m.get("garment_id", "")),
            prompt_revision=int(m.get("prompt_revision", 0)),
            switch_applied=bool(m.get("switch_applied", False)),
            prompt_update_applied=bool(m.get("prompt_update_applied", False)),
            is_init_segment_included=bool(m.get("init_included", False)),
            generation_latency_seconds=float(m.get("generation_seconds", 0.0)),
            mime_type=str(m.get("mime_type", "")),
        )
        if "generated_at" in m:
            msg.generated_at.CopyFrom(_ts(float(m["generated_at"])))
        return msg

    async def _client_progress(self, session_id: str, index: int) -> None:
        """Tell the generator how far the client got (backpressure) and keep the session alive."""
        registry = self._registry()
        try:
            await registry.touch(session_id)
            await registry.set_state(session_id, SessionState.ACTIVE, client_index=index)
        except Exception:  # noqa: BLE001 - a session closing under us is not the reader's error
            pass

    # ---- SwitchGarment / UpdatePrompt ----------------------------------------------------
    async def _send_command(self, session_id: str, command: ControlCommand) -> int:
        control = self._registry().control(session_id)
        try:
            command_id = await control.send(command)
        except SessionClosed:
            raise FailedPrecondition(f"session {session_id} is closed", reason="SESSION_NOT_ACTIVE") from None
        effective = await control.wait_result(command_id, self.config.limits.switch_timeout_s)
        if effective is None:
            raise DeadlineExceeded(
                f"the command was queued but not applied within {self.config.limits.switch_timeout_s:.0f} s; "
                "it applies when the session resumes", reason="SESSION_NOT_ACTIVE", retry_after_s=1.0,
            )
        return effective

    async def SwitchGarment(self, request, grpc_context=None, metadata=None) -> studio_pb2.SwitchGarmentResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            spec = parse_switch_garment(request, self.limits, tenant=tenant)
            await self._session_for(spec.session_id, tenant)
            key, garment_id = await self._object_key(spec.garment, tenant)
            await self._encode_image(key, encoder_pb2.IMAGE_KIND_GARMENT)  # validates now, warms the cache
            sw = spec.options  # only what the caller set; the session's defaults fill the rest
            options = {
                name: value
                for name, value in (("refresh", sw.refresh), ("withdraw", sw.withdraw), ("disentangle", sw.disentangle))
                if value is not None
            }
            effective = await self._send_command(
                spec.session_id,
                ControlCommand(type=CommandType.SWITCH_GARMENT,
                               payload={"garment_key": key, "garment_id": garment_id, "options": options}),
            )
            await self._registry().set_state(spec.session_id, SessionState.ACTIVE, garment_id=garment_id)
            return studio_pb2.SwitchGarmentResponse(effective_chunk_index=effective, garment_id=garment_id)

        return await self._unary(grpc_context, "SwitchGarment", studio_pb2.SwitchGarmentResponse, body)

    async def UpdatePrompt(self, request, grpc_context=None, metadata=None) -> studio_pb2.UpdatePromptResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            session_id, prompt = parse_update_prompt(request, self.limits)
            await self._session_for(session_id, tenant)
            await self.encoder.EncodePrompt.remote(encoder_pb2.EncodePromptRequest(prompt=prompt))  # validate, warm
            revision = int(await self.redis.incr(f"{self.config.redis.namespace}:session:{{{session_id}}}:prompt_rev"))
            effective = await self._send_command(
                session_id,
                ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": prompt, "revision": revision}),
            )
            await self._registry().set_state(session_id, SessionState.ACTIVE, prompt=prompt, prompt_revision=revision)
            return studio_pb2.UpdatePromptResponse(effective_chunk_index=effective, prompt_revision=revision)

        return await self._unary(grpc_context, "UpdatePrompt", studio_pb2.UpdatePromptResponse, body)

    # ---- CloseSession / GetSession -------------------------------------------------------
    async def CloseSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.CloseSessionResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            await self._session_for(request.session_id, tenant)
            record = await self._registry().close(request.session_id, reason="closed")
            return studio_pb2.CloseSessionResponse(
                state=_STATES[record.state], chunks_generated=int(record.meta.get("chunks", 0))
            )

        return await self._unary(grpc_context, "CloseSession", studio_pb2.CloseSessionResponse, body)

    async def GetSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.Session:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            return self._session_proto(await self._session_for(request.session_id, tenant))

        return await self._unary(grpc_context, "GetSession", studio_pb2.Session, body)


_REASON_REJECTIONS = {
    "CAPACITY_EXHAUSTED": "capacity",
    "SESSION_LIMIT_REACHED": "session_limit",
    "QUOTA_EXCEEDED": "quota",
}


def _rejection(err: ServiceError) -> str | None:
    """The rejections_total reason for an error that refused a request, if any."""
    if err.reason in _REASON_REJECTIONS:
        return _REASON_REJECTIONS[err.reason]
    return {"UNAUTHENTICATED": "auth", "INVALID_ARGUMENT": "invalid"}.get(err.code.name)
