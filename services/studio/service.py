"""Studio: the public, stateless gRPC gateway (auth, validation, orchestration).

Every replica can serve every call: sessions live on generator replicas, and everything a
gateway needs to know about them is in Redis (registry, control stream, output stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from fashionchameleon.v1 import common_pb2, encoder_pb2, generator_pb2, studio_pb2
from services.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    abort_context,
    as_service_error,
    unwrap_remote,
)
from services.common.offload import IMAGE_DECODE_WORKERS, BlockingPool
from services.common.validation import Limits
from services.generator.routing import EXCLUDE_KEY as EXCLUDE_REPLICAS
from services.jobs.api import JobsApi
from services.studio.auth import ApiKeyAuth
from services.studio.health import StudioHealth
from services.studio.validation import (
    new_session_id,
    parse_create_session,
    parse_request_id,
    parse_stream_session,
    parse_switch_garment,
    parse_update_prompt,
    prompt_options_payload,
    validate_session_id,
)
from services.studio.viewer import (
    ViewerTokens,
    actions_from_proto,
    actions_to_proto,
    player_path,
    resolve_ttl,
)
from services.studio.wire import MalformedRequest, malformed_error
from shared.config import AppConfig
from shared.redis_util import connect
from shared.sessionbus import (
    TERMINAL_STATES,
    ChunkExpired,
    CommandType,
    ControlCommand,
    RequestReused,
    SessionClosed,
    SessionNotFound,
    SessionRegistry,
    SessionState,
    StreamEnded,
)
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


class StudioService(StudioHealth):
    """Interactive sessions here; batch clip jobs (SubmitClips, GetJob, ...) delegate to the
    composed `JobsApi` (services/jobs/api.py)."""

    def __init__(self, config_json: str, generator, encoder, jobs=None):
        self.config = AppConfig.from_json(config_json)
        self.jobs_worker = jobs
        self.generator = generator
        self.encoder = encoder
        self.auth = ApiKeyAuth.from_digests(self.config.auth.digest_to_tenant())  # the config holds digests only
        lim = self.config.limits
        self.limits = Limits(
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            min_image_side=lim.min_image_side,
            max_prompt_chars=lim.max_prompt_chars,
        )
        self.store = open_store(self.config.storage)
        self.catalog = GarmentCatalog(self.store)
        self.blocking = BlockingPool(IMAGE_DECODE_WORKERS, "studio-images")  # image decoding, off the event loop
        self.jobs_api = JobsApi(
            redis=self.config.redis,
            jobs=self.config.jobs,
            limits=self.limits,
            store=self.store,
            catalog=self.catalog,
            blocking=self.blocking,
            tenant=self._tenant,
            unary=self._unary,
        )
        self.redis = None
        self.registry: SessionRegistry | None = None
        self.viewers: ViewerTokens | None = None
        self.metrics = Metrics.create("auto")
        self.health = HealthState("studio")
        self.health.mark_ready()

    # ---- plumbing ----------------------------------------------------------------------
    def _registry(self) -> SessionRegistry:
        if self.registry is None:
            self.redis = connect(self.config.redis)
            self.registry = SessionRegistry(self.redis, self.config.redis)
        return self.registry

    def _viewer_tokens(self) -> ViewerTokens:
        if self.viewers is None:
            registry = self._registry()
            self.viewers = ViewerTokens(self.redis, self.config.redis.namespace, self.config.viewer, registry)
        return self.viewers

    def _tenant(self, grpc_context, metadata: list[tuple[str, str]] | None) -> str:
        if metadata is None:
            metadata = list(grpc_context.invocation_metadata()) if grpc_context is not None else []
        return self.auth.tenant_from_metadata(metadata)

    def _count(self, method: str, started: float, err: ServiceError | None) -> None:
        code = "OK" if err is None else err.code.name
        self.metrics.requests_total.inc(tags={"service": "studio", "method": method, "code": code})
        self.metrics.request_latency_seconds.observe(
            time.perf_counter() - started, tags={"service": "studio", "method": method}
        )
        rejection = None if err is None else _rejection(err)
        if rejection:
            self.metrics.rejections_total.inc(tags={"reason": rejection})

    async def _unary(self, grpc_context, method: str, empty: Callable[[], Any], body: Callable[[], Awaitable[Any]]):
        started = time.perf_counter()
        try:
            result = await body()
        except Exception as exc:
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
            raise NotFound(
                f"session {session_id} not found", reason="SESSION_NOT_FOUND", metadata={"session_id": session_id}
            ) from None

    async def _object_key(self, ref, tenant: str) -> tuple[str, str]:
        """(object key, garment/image id) for an ImageRef; uploads are stored content-addressed."""
        if ref.data is not None:
            key = await self.blocking.run(upload_key, tenant, ref.data)  # hashes up to max_image_bytes
            await asyncio.to_thread(self.store.put_bytes_if_absent, key, ref.data)
            return key, ref.garment_id
        if ref.catalog_id is not None:
            owner = await self.catalog_owner(ref.catalog_id, tenant)
            return self.catalog.key(ref.catalog_id, owner), ref.catalog_id
        key = ref.object_key  # already scoped to this tenant by validation
        try:
            await asyncio.to_thread(self.store.stat, key)
        except ObjectNotFound:
            raise NotFound(f"object {key!r} not found", reason="OBJECT_NOT_FOUND") from None
        return key, key.rsplit("/", 1)[-1][:16]

    async def catalog_owner(self, catalog_id: str, tenant: str) -> str:
        """Whose catalog item `catalog_id` is for `tenant`: the tenant's own first, then the shared
        one (a tenant's item shadows a shared one with the same id). NOT_FOUND otherwise."""
        for owner in (tenant, "public"):
            try:
                if await asyncio.to_thread(self.catalog.exists, catalog_id, tenant=owner):
                    return owner
            except ValueError:  # not a catalog id at all (the browser path passes ids unvalidated)
                break
        raise NotFound(
            f"catalog garment {catalog_id!r} not found",
            reason="CATALOG_ITEM_NOT_FOUND",
            metadata={"catalog_id": catalog_id},
        )

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
            options=_session_options(meta, record.idle_ttl_s),
            frames_generated=int(meta.get("frames", 0)),
            error_message=(record.reason or "") if record.state in (SessionState.FAILED, SessionState.EXPIRED) else "",
        )

    # ---- HTTP: probes, the player page and its WebSocket (services/studio/http.py) ------
    def __serve_build_asgi_app__(self):
        """Ray Serve's late-bound ASGI ingress (`serve.ingress()` in services/app.py): the
        app is built on the replica, after __init__, around this instance."""
        from services.studio.http import build_http_app

        return build_http_app(self)

    async def check_health(self) -> None:
        self.health.check_health()

    # ---- CreateSession -----------------------------------------------------------------
    async def _idempotent(
        self, tenant: str, request_id: str | None, create: Callable[[], Awaitable[str]], fingerprint: str = ""
    ) -> str:
        """Run `create` once per (tenant, request_id); a retry gets the first call's session id.
        A request_id reused with another request body (`fingerprint`) is ALREADY_EXISTS."""
        if request_id is None:
            return await create()
        key = f"{self.config.redis.namespace}:idem:{tenant}:{request_id}"
        pending = json.dumps({"fp": fingerprint, "pending": True}).encode()
        if await self.redis.set(key, pending, nx=True, ex=600):
            try:
                session_id = await create()
            except BaseException:
                await self.redis.delete(key)
                raise
            await self.redis.set(key, json.dumps({"fp": fingerprint, "session_id": session_id}).encode(), ex=24 * 3600)
            return session_id
        for _ in range(200):  # the first call is still creating: wait for its answer
            value = await self.redis.get(key)
            if value is None:
                return await self._idempotent(tenant, request_id, create, fingerprint)  # it failed; try ourselves
            first = _idempotency_value(value)
            if first.get("fp", fingerprint) != fingerprint:
                raise AlreadyExists(
                    "request_id: already used for a different CreateSession request; use a new request_id",
                    reason="IDEMPOTENCY_KEY_REUSED",
                    metadata={"field": "request_id"},
                )
            if first.get("session_id"):
                return first["session_id"]
            await asyncio.sleep(0.1)
        raise DeadlineExceeded("an earlier request with this request_id is still being processed", retry_after_s=1.0)

    async def CreateSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.Session:
        async def body():
            return await self._create_session(self._tenant(grpc_context, metadata), request)

        return await self._unary(grpc_context, "CreateSession", studio_pb2.Session, body)

    async def _create_session(self, tenant: str, request) -> studio_pb2.Session:
        spec = await self.blocking.run(parse_create_session, request, self.limits, tenant=tenant)  # decodes images
        registry = self._registry()
        session_id = await self._idempotent(
            tenant, spec.request_id, lambda: self._create(tenant, spec, request), _create_fingerprint(spec, request)
        )
        return self._session_proto(await registry.get(session_id))

    async def _create(self, tenant: str, spec, request) -> str:
        """Reserve one of the tenant's session slots (atomically: concurrent creates never exceed
        the quota), then create; the slot is given back if the create fails."""
        registry = self._registry()
        quota = self.config.limits.max_sessions_per_tenant
        reservation = f"r-{secrets.token_hex(8)}"
        if not await registry.reserve_quota(tenant, reservation, quota):
            raise ResourceExhausted(
                f"too many open sessions for this tenant (quota {quota})",
                reason="QUOTA_EXCEEDED",
                metadata={"quota": quota},
                retry_after_s=10.0,
            )
        try:
            session_id = await self._create_reserved(tenant, spec, request)
        except BaseException:
            with contextlib.suppress(Exception):
                await registry.release_quota(tenant, reservation)
            raise
        await registry.hold_quota(tenant, reservation, session_id)
        return session_id

    async def _create_reserved(self, tenant: str, spec, request) -> str:
        """Store and encode the inputs, then open the session on a generator replica with room."""
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
            seed=seed,
            reference_latent=reference,
            garment_latent=garment,
            garment_id=garment_id,
            prompt_embedding=prompt.embedding,
            prompt=spec.prompt,
            width=opts.width,
            height=opts.height,
            switch_options=opts.switch_options,
        )
        meta = {
            "garment_id": garment_id,
            "prompt": spec.prompt,
            "seed": seed,
            "prompt_revision": 0,
            "max_chunks": spec.options.max_chunks,
            "reference_key": ref_key,
            "garment_key": garment_key,
            "max_duration_seconds": spec.options.max_duration_seconds or 0.0,
            "requested_preset": spec.options.preset or "",
            "switch_options": spec.options.switch.explicit(),
        }
        if spec.options.idle_timeout_seconds:
            meta["idle_ttl_s"] = spec.options.idle_timeout_seconds
        lease_s = self.config.redis.session_lease_s
        if await self._registry().live_generators() == []:  # every replica's heartbeat lapsed
            raise Unavailable(
                "no generator replica is up (one is being replaced); retry shortly",
                reason="GENERATOR_UNAVAILABLE",
                retry_after_s=lease_s,
            )
        last_error: Exception | None = None
        refused: list[str] = []  # replicas that were full for this open: the router ranks them last
        for _ in range(self.config.generator.open_attempts):
            state.session_id = new_session_id()
            meta[EXCLUDE_REPLICAS] = refused
            call = self.generator.options(session_id=state.session_id).open_session.remote(state, tenant, meta)
            try:
                opened = await asyncio.wait_for(call, self.config.generator.open_timeout_s)
                break
            except TimeoutError:
                # No replica took it in time (the only one died and Serve is replacing it). A
                # session the late call might still open has nobody streaming it: close it.
                with contextlib.suppress(Exception):
                    call.cancel()
                with contextlib.suppress(Exception):
                    await self._registry().close(state.session_id, reason="open timed out")
                raise Unavailable(
                    f"no generator replica took the session within {self.config.generator.open_timeout_s:.0f} s; "
                    "retry shortly",
                    reason="GENERATOR_UNAVAILABLE",
                    retry_after_s=lease_s,
                ) from None
            except Exception as exc:  # noqa: BLE001
                cause = unwrap_remote(exc)
                if not isinstance(cause, ResourceExhausted):
                    raise cause from None
                last_error = cause
                replica = cause.metadata.get("replica_id") if cause.metadata else None
                if replica:
                    refused.append(str(replica))
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
            async for msg in self.stream_chunks(record, resume):
                yield msg
            self._count("StreamSession", started, None)
        except Exception as exc:
            err = as_service_error(unwrap_remote(exc))
            self._count("StreamSession", started, err)
            if grpc_context is None:
                raise err from exc
            abort_context(grpc_context, err)
            raise err from exc

    async def stream_chunks(self, record, resume: int) -> AsyncIterator[studio_pb2.VideoChunk]:
        """The session's chunks from index `resume` on, as StreamSession sends them (the init
        segment in front of the first one, then each chunk once, in order, then the
        end-of-stream marker), reporting the reader's progress after each chunk is taken.
        `record` is the session's record, already authorised. The one read path of the output
        stream: gRPC's StreamSession and the browser WebSocket (services/studio/http.py) share it."""
        session_id = record.session_id
        registry = self._registry()
        output = registry.output(session_id)
        bounds = await output.bounds()
        if resume > bounds.next_index:  # a chunk that does not exist yet (or ever, once ended)
            raise OutOfRange(
                f"resume_from_index {resume} is past the end of the stream (next index {bounds.next_index})",
                reason="RESUME_PAST_END",
                metadata={"next_index": bounds.next_index},
            )
        first = True
        index = resume
        try:
            async for chunk in output.iterate(resume):
                msg = self._chunk_proto(session_id, chunk, record)
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
        ended = await output.bounds()
        if ended.end_reason is not None:
            index = ended.next_index  # the marker's index: the number of chunks generated
        yield studio_pb2.VideoChunk(
            session_id=session_id, index=index, end_of_stream=True, end_state=_STATES[record.state]
        )

    def _chunk_proto(self, session_id: str, chunk, record=None) -> studio_pb2.VideoChunk:
        m = chunk.meta
        session_meta = record.meta if record is not None else {}
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
            width=int(m.get("width") or session_meta.get("width") or 0),
            height=int(m.get("height") or session_meta.get("height") or 0),
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
    async def _send_command(
        self,
        session_id: str,
        command: ControlCommand,
        *,
        request_id: str | None = None,
        fingerprint: str = "",
        assign_revision: bool = False,
    ) -> tuple[int, int | None]:
        """Publish `command` once per request_id and wait until it is applied: (effective chunk
        index, assigned prompt revision). A retry of a request_id gets the first call's answer."""
        control = self._registry().control(session_id)
        try:
            sent = await control.send_once(
                command, request_id=request_id, fingerprint=fingerprint, assign_revision=assign_revision
            )
        except SessionClosed:
            raise FailedPrecondition(f"session {session_id} is closed", reason="SESSION_NOT_ACTIVE") from None
        except RequestReused:
            raise AlreadyExists(
                "request_id: already used on this session for a different request; use a new request_id",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"field": "request_id"},
            ) from None
        effective = await control.wait_result(sent.command_id, self.config.limits.switch_timeout_s)
        if effective is None:
            raise DeadlineExceeded(
                f"the command was queued but not applied within {self.config.limits.switch_timeout_s:.0f} s; "
                "it applies when the session resumes",
                reason="SESSION_NOT_ACTIVE",
                retry_after_s=1.0,
            )
        return effective, sent.revision

    async def SwitchGarment(self, request, grpc_context=None, metadata=None) -> studio_pb2.SwitchGarmentResponse:
        async def body():
            return await self.switch_garment(self._tenant(grpc_context, metadata), request)

        return await self._unary(grpc_context, "SwitchGarment", studio_pb2.SwitchGarmentResponse, body)

    async def switch_garment(self, tenant: str, request) -> studio_pb2.SwitchGarmentResponse:
        """SwitchGarment for an already authenticated `tenant` (gRPC and the browser WebSocket)."""
        spec = await self.blocking.run(parse_switch_garment, request, self.limits, tenant=tenant)  # decodes
        await self._session_for(spec.session_id, tenant)
        key, garment_id = await self._object_key(spec.garment, tenant)
        await self._encode_image(key, encoder_pb2.IMAGE_KIND_GARMENT)  # validates now, warms the cache
        sw = spec.options  # only what the caller set; the session's defaults fill the rest
        options = {
            name: value
            for name, value in (("refresh", sw.refresh), ("withdraw", sw.withdraw), ("disentangle", sw.disentangle))
            if value is not None
        }
        payload = {"garment_key": key, "garment_id": garment_id, "options": options}
        effective, _ = await self._send_command(  # the generator records the applied garment
            spec.session_id,
            ControlCommand(type=CommandType.SWITCH_GARMENT, payload=payload),
            request_id=spec.request_id,
            fingerprint=_digest(payload),
        )
        return studio_pb2.SwitchGarmentResponse(effective_chunk_index=effective, garment_id=garment_id)

    async def UpdatePrompt(self, request, grpc_context=None, metadata=None) -> studio_pb2.UpdatePromptResponse:
        async def body():
            return await self.update_prompt(self._tenant(grpc_context, metadata), request)

        return await self._unary(grpc_context, "UpdatePrompt", studio_pb2.UpdatePromptResponse, body)

    async def update_prompt(self, tenant: str, request) -> studio_pb2.UpdatePromptResponse:
        """UpdatePrompt for an already authenticated `tenant` (gRPC and the browser WebSocket)."""
        session_id, prompt = parse_update_prompt(request, self.limits)
        await self._session_for(session_id, tenant)
        await self.encoder.EncodePrompt.remote(encoder_pb2.EncodePromptRequest(prompt=prompt))  # validate, warm
        # The revision is assigned and the command published in one step (revision order is
        # stream order); the generator records the applied prompt and revision.
        payload = {"prompt": prompt}
        if options := prompt_options_payload(request.options):  # what the update re-caches
            payload["options"] = options
        effective, revision = await self._send_command(
            session_id,
            ControlCommand(type=CommandType.UPDATE_PROMPT, payload=payload),
            request_id=parse_request_id(request.request_id, self.limits),
            fingerprint=_digest(payload),
            assign_revision=True,
        )
        return studio_pb2.UpdatePromptResponse(effective_chunk_index=effective, prompt_revision=revision)

    # ---- CloseSession / GetSession -------------------------------------------------------
    async def CloseSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.CloseSessionResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            await self._session_for(request.session_id, tenant)
            record = await self._registry().close(request.session_id, reason="closed")
            await self._viewer_tokens().revoke_session(request.session_id)  # its viewer tokens die with it
            return studio_pb2.CloseSessionResponse(
                state=_STATES[record.state], chunks_generated=int(record.meta.get("chunks", 0))
            )

        return await self._unary(grpc_context, "CloseSession", studio_pb2.CloseSessionResponse, body)

    async def GetSession(self, request, grpc_context=None, metadata=None) -> studio_pb2.Session:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            return self._session_proto(await self._session_for(request.session_id, tenant))

        return await self._unary(grpc_context, "GetSession", studio_pb2.Session, body)

    # ---- CreateViewerToken ---------------------------------------------------------------
    async def CreateViewerToken(
        self, request, grpc_context=None, metadata=None
    ) -> studio_pb2.CreateViewerTokenResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            ttl_s = resolve_ttl(request.ttl_seconds, self.config.viewer)
            actions = actions_from_proto(request.actions)
            record = await self._session_for(request.session_id, tenant)
            if record.state in TERMINAL_STATES:
                raise FailedPrecondition(
                    f"session {record.session_id} has ended ({record.state.value})",
                    reason="SESSION_NOT_ACTIVE",
                    metadata={"session_id": record.session_id},
                )
            token, grant = await self._viewer_tokens().mint(tenant, record.session_id, actions, ttl_s)
            return studio_pb2.CreateViewerTokenResponse(
                token=token,
                expires_at=_ts(grant.expires_at),
                actions=actions_to_proto(grant.actions),
                player_path=player_path(record.session_id, token),
            )

        return await self._unary(grpc_context, "CreateViewerToken", studio_pb2.CreateViewerTokenResponse, body)

    # ---- batch clip jobs: the composed JobsApi -----------------------------------------
    async def SubmitClips(self, request, grpc_context=None, metadata=None) -> studio_pb2.SubmitClipsResponse:
        return await self.jobs_api.SubmitClips(request, grpc_context, metadata)

    async def GetJob(self, request, grpc_context=None, metadata=None) -> studio_pb2.Job:
        return await self.jobs_api.GetJob(request, grpc_context, metadata)

    async def ListJobs(self, request, grpc_context=None, metadata=None) -> studio_pb2.ListJobsResponse:
        return await self.jobs_api.ListJobs(request, grpc_context, metadata)

    async def CancelJob(self, request, grpc_context=None, metadata=None) -> studio_pb2.Job:
        return await self.jobs_api.CancelJob(request, grpc_context, metadata)

    async def WatchJobs(self, request, grpc_context=None, metadata=None) -> AsyncIterator[studio_pb2.JobEvent]:
        async for event in self.jobs_api.WatchJobs(request, grpc_context, metadata):
            yield event


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


# ---- request fingerprints, resolved options ----------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _image_fingerprint(ref) -> str:
    if ref.data is not None:
        return f"data:{ref.sha256}"
    return f"catalog:{ref.catalog_id}" if ref.catalog_id is not None else f"key:{ref.object_key}"


def _create_fingerprint(spec, request) -> str:
    """What a CreateSession asks for, without its request_id (uploads by content hash)."""
    return _digest(
        {
            "reference": _image_fingerprint(spec.reference),
            "garment": _image_fingerprint(spec.garment),
            "prompt": spec.prompt,
            "options": request.options.SerializeToString(deterministic=True).hex(),
        }
    )


def _idempotency_value(value: bytes) -> dict:
    """The stored answer of a CreateSession request_id (older writers stored the bare session id)."""
    if value.startswith(b"{"):
        return json.loads(value)
    if value == b"pending":
        return {}
    return {"session_id": value.decode()}


def _session_options(meta: dict, idle_timeout_s: float) -> common_pb2.SessionOptions:
    """Session.options: what the session runs with, defaults filled in."""
    opts = common_pb2.SessionOptions(
        seed=int(meta.get("seed", 0)),
        max_chunks=int(meta.get("max_chunks", 0)),
        max_duration_seconds=float(meta.get("max_duration_seconds") or 0.0),
        width=int(meta.get("width", 0)),
        height=int(meta.get("height", 0)),
        preset=str(meta.get("preset", "")),
        idle_timeout_seconds=float(idle_timeout_s),
    )
    explicit = meta.get("switch_options") or {}
    for name in ("refresh_garment_kv", "withdraw_history_kv", "disentangle_reference_kv"):
        setattr(opts.switch_options, name, bool(explicit.get(name, True)))
    return opts


# ---- request bytes that did not parse (services/studio/wire.py) ----------------------------------


def _refusing_malformed(name: str, method: Callable, empty: Callable[[], Any], streaming: bool) -> Callable:
    """`method`, answering a MalformedRequest with INVALID_ARGUMENT / REQUEST_MALFORMED after
    authenticating the caller like any request."""
    import functools

    if streaming:

        @functools.wraps(method)
        async def stream(self, request, grpc_context=None, metadata=None):
            if isinstance(request, MalformedRequest):
                started = time.perf_counter()
                try:
                    self._tenant(grpc_context, metadata)
                    err = malformed_error(request)
                except ServiceError as e:
                    err = e
                self._count(name, started, err)
                if grpc_context is not None:
                    abort_context(grpc_context, err)
                raise err
            async for message in method(self, request, grpc_context, metadata):
                yield message

        return stream

    @functools.wraps(method)
    async def unary(self, request, grpc_context=None, metadata=None):
        if isinstance(request, MalformedRequest):

            async def body():
                self._tenant(grpc_context, metadata)
                raise malformed_error(request)

            return await self._unary(grpc_context, name, empty, body)
        return await method(self, request, grpc_context, metadata)

    return unary


def _guard_rpcs(cls: type) -> None:
    from google.protobuf import message_factory

    for rpc in studio_pb2.DESCRIPTOR.services_by_name["Studio"].methods:
        method = getattr(cls, rpc.name, None)
        if method is None:
            continue
        empty = message_factory.GetMessageClass(rpc.output_type)
        setattr(cls, rpc.name, _refusing_malformed(rpc.name, method, empty, rpc.server_streaming))


_guard_rpcs(StudioService)
