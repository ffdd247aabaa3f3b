"""The batch job RPCs of the Studio gateway: SubmitClips, GetJob, ListJobs, CancelJob, WatchJobs.

`JobsApi` is a part the gateway composes (`StudioService.jobs_api`; its RPC methods delegate
here), with the gateway's conventions: the tenant from the API key, validation into frozen
specs, errors as ServiceError mapped by the gateway's unary runner (unary calls) or like
StreamSession (the WatchJobs stream), other tenants' jobs indistinguishable from missing ones.

What the gateway hands it: the Redis and jobs settings, `Limits`, the object store and garment
catalog, the `BlockingPool` that image decoding and hashing run in (off the event loop),
`tenant(grpc_context, metadata) -> str` and `unary(grpc_context, method, empty, body)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from fashionchameleon.v1 import studio_pb2
from services.common.errors import (
    AlreadyExists,
    NotFound,
    abort_context,
    as_service_error,
)
from services.common.offload import BlockingPool
from services.common.validation import ImageRef, Limits
from services.jobs.validation import (
    PROTO_STATES,
    ClipRequest,
    field_prefix,
    parse_list_jobs,
    parse_submit_clips,
    parse_watch_jobs,
    validate_job_id,
)
from shared.jobs.config import JobsConfig
from shared.jobs.queue import IdempotencyConflict, JobNotFound, JobQueue
from shared.jobs.spec import ClipSpec, GarmentAt, JobRecord, derived_seed
from shared.redis_util import RedisConnection, connect
from shared.storage import GarmentCatalog, ObjectNotFound, ObjectStore, upload_key


def _ts_ms(ms: int | None) -> Timestamp | None:
    if ms is None:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


def job_proto(record: JobRecord, *, created: bool = False) -> studio_pb2.Job:
    """A Job message from its record (no URLs; see JobsApi._with_urls)."""
    spec = record.spec
    job = studio_pb2.Job(
        job_id=record.job_id,
        tenant=record.tenant,
        state=PROTO_STATES[record.state],
        idempotency_key=spec.idempotency_key,
        created=created,
        created_at=_ts_ms(record.created_ms),
        updated_at=_ts_ms(record.updated_ms),
        started_at=_ts_ms(record.started_ms),
        finished_at=_ts_ms(record.finished_ms),
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        chunks_done=record.chunks_done,
        chunks_total=spec.chunks,
        seed=spec.seed,
        prompt=spec.prompt,
        labels=spec.labels,
        error_message=record.error,
        next_attempt_at=_ts_ms(record.next_attempt_ms),
    )
    if record.result is not None:
        r = record.result
        job.result.CopyFrom(
            studio_pb2.JobResult(
                video_key=r.video_key,
                manifest_key=r.manifest_key,
                poster_key=r.poster_key,
                video_bytes=r.video_bytes,
                frames=r.frames,
                fps=r.fps,
                width=r.width,
                height=r.height,
            )
        )
    return job


class JobsApi:
    """The batch job RPCs over the job queue on Redis (`shared.jobs`), for a gateway to compose."""

    def __init__(
        self,
        *,
        redis: RedisConnection,
        jobs: JobsConfig,
        limits: Limits,
        store: ObjectStore,
        catalog: GarmentCatalog,
        blocking: BlockingPool,
        tenant: Callable[[Any, list[tuple[str, str]] | None], str],
        unary: Callable[[Any, str, Callable[[], Any], Callable[[], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self.redis_config = redis
        self.jobs_config = jobs
        self.limits = limits
        self.store = store
        self.catalog = catalog
        self.blocking = blocking
        self._tenant = tenant
        self._unary = unary
        self._job_queue: JobQueue | None = None

    def _jobs(self) -> JobQueue:
        if self._job_queue is None:
            self._job_queue = JobQueue(connect(self.redis_config), self.jobs_config, self.redis_config.namespace)
        return self._job_queue

    async def _job_for(self, job_id: str, tenant: str) -> JobRecord:
        validate_job_id(job_id)
        try:
            return await self._jobs().get_for_tenant(job_id, tenant)
        except JobNotFound:
            raise NotFound(f"job {job_id} not found", metadata={"job_id": job_id}) from None

    # ---- images ------------------------------------------------------------------------
    async def _job_image_key(self, ref: ImageRef, tenant: str, cache: dict) -> str:
        """Object key of a validated image: uploads are stored content-addressed, catalog ids
        resolve to the tenant's catalog then the public one, object keys must exist."""
        ident = ("data", ref.sha256) if ref.data is not None else (ref.source, ref.catalog_id or ref.object_key)
        if ident in cache:
            return cache[ident]
        if ref.data is not None:
            key = await self.blocking.run(upload_key, tenant, ref.data)  # hashes up to max_image_bytes
            await asyncio.to_thread(self.store.put_bytes_if_absent, key, ref.data, ref.content_type)
        elif ref.catalog_id is not None:
            for owner in (tenant, "public"):
                if await asyncio.to_thread(self.catalog.exists, ref.catalog_id, tenant=owner):
                    key = self.catalog.key(ref.catalog_id, owner)
                    break
            else:
                raise NotFound(
                    f"catalog garment {ref.catalog_id!r} not found",
                    reason="CATALOG_ITEM_NOT_FOUND",
                    metadata={"catalog_id": ref.catalog_id},
                )
        else:
            key = ref.object_key
            try:
                await asyncio.to_thread(self.store.stat, key)
            except ObjectNotFound:
                raise NotFound("object not found", reason="OBJECT_NOT_FOUND") from None
        cache[ident] = key
        return key

    async def _clip_spec(self, clip: ClipRequest, index: int, tenant: str, cache: dict) -> ClipSpec:
        with field_prefix(f"clips[{index}]", index):
            with field_prefix("reference"):
                reference = await self._job_image_key(clip.reference, tenant, cache)
            garments = []
            for i, (chunk, ref) in enumerate(clip.garments):
                with field_prefix(f"garments[{i}].garment"):
                    garments.append(
                        GarmentAt(chunk_index=chunk, object_key=await self._job_image_key(ref, tenant, cache))
                    )
        seed = clip.seed if clip.seed is not None else derived_seed(tenant, clip.idempotency_key)
        return ClipSpec(
            reference_key=reference,
            garments=tuple(garments),
            prompt=clip.prompt,
            chunks=clip.chunks,
            seed=seed,
            idempotency_key=clip.idempotency_key,
            labels=clip.labels,
        )

    # ---- RPCs --------------------------------------------------------------------------
    async def SubmitClips(self, request, grpc_context=None, metadata=None) -> studio_pb2.SubmitClipsResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            # decodes every uploaded image: off the event loop
            clips = await self.blocking.run(parse_submit_clips, request, self.limits, self.jobs_config, tenant=tenant)
            cache: dict = {}
            specs = [await self._clip_spec(clip, i, tenant, cache) for i, clip in enumerate(clips)]
            try:
                submitted = await self._jobs().submit(tenant, specs)
            except IdempotencyConflict as e:
                raise AlreadyExists(
                    f"clips[{e.index}].idempotency_key: already used for a different clip spec (job {e.job_id}); "
                    "use a new key for a new clip",
                    reason="IDEMPOTENCY_KEY_REUSED",
                    metadata={"index": e.index, "field": f"clips[{e.index}].idempotency_key", "job_id": e.job_id},
                ) from None
            return studio_pb2.SubmitClipsResponse(jobs=[job_proto(s.record, created=s.created) for s in submitted])

        return await self._unary(grpc_context, "SubmitClips", studio_pb2.SubmitClipsResponse, body)

    async def GetJob(self, request, grpc_context=None, metadata=None) -> studio_pb2.Job:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            record = await self._job_for(request.job_id, tenant)
            return await asyncio.to_thread(self._with_urls, job_proto(record))

        return await self._unary(grpc_context, "GetJob", studio_pb2.Job, body)

    def _with_urls(self, job: studio_pb2.Job) -> studio_pb2.Job:
        if not job.HasField("result"):
            return job
        expiry = self.jobs_config.presign_expiry_s
        r = job.result
        r.video_url = self.store.presigned_get_url(r.video_key, expires_s=expiry)
        r.manifest_url = self.store.presigned_get_url(r.manifest_key, expires_s=expiry)
        r.poster_url = self.store.presigned_get_url(r.poster_key, expires_s=expiry)
        r.urls_expire_at.FromMilliseconds(int((time.time() + expiry) * 1000))
        return job

    async def ListJobs(self, request, grpc_context=None, metadata=None) -> studio_pb2.ListJobsResponse:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            spec = parse_list_jobs(request, self.jobs_config)
            records, token = await self._jobs().list(tenant, spec.page_size, spec.page_token, spec.states)
            return studio_pb2.ListJobsResponse(jobs=[job_proto(r) for r in records], next_page_token=token)

        return await self._unary(grpc_context, "ListJobs", studio_pb2.ListJobsResponse, body)

    async def CancelJob(self, request, grpc_context=None, metadata=None) -> studio_pb2.Job:
        async def body():
            tenant = self._tenant(grpc_context, metadata)
            validate_job_id(request.job_id)
            try:
                record = await self._jobs().cancel(tenant, request.job_id)
            except JobNotFound:
                raise NotFound(f"job {request.job_id} not found", metadata={"job_id": request.job_id}) from None
            return job_proto(record)

        return await self._unary(grpc_context, "CancelJob", studio_pb2.Job, body)

    async def WatchJobs(self, request, grpc_context=None, metadata=None) -> AsyncIterator[studio_pb2.JobEvent]:
        try:
            tenant = self._tenant(grpc_context, metadata)
            job_ids = parse_watch_jobs(request, self.jobs_config)
            async for event in self._watch(tenant, job_ids):
                yield event
        except Exception as exc:
            err = as_service_error(exc)
            if grpc_context is None:
                raise err from exc
            abort_context(grpc_context, err)
            raise err from exc

    async def _watch(self, tenant: str, job_ids: list[str]) -> AsyncIterator[studio_pb2.JobEvent]:
        queue = self._jobs()
        after = await queue.last_event_id(tenant)  # before the snapshot: no change is missed
        seen: dict[str, tuple] = {}
        pending: set[str] = set()
        for job_id in job_ids:
            record = await self._job_for(job_id, tenant)
            seen[job_id] = (record.state, record.chunks_done, record.attempts)
            if not record.is_terminal:
                pending.add(job_id)
            yield studio_pb2.JobEvent(job=job_proto(record))
        if job_ids and not pending:
            return
        block_ms = min(5000, self.redis_config.max_block_ms or 5000)
        while True:
            for event in await queue.events(tenant, after, block_ms):
                after = event.event_id
                if job_ids and event.job_id not in pending:
                    continue
                record = await queue.get(event.job_id)
                if record is None:
                    continue
                key = (record.state, record.chunks_done, record.attempts)
                if seen.get(record.job_id) == key:
                    continue
                seen[record.job_id] = key
                yield studio_pb2.JobEvent(job=job_proto(record), event_id=event.event_id)
                if job_ids and record.is_terminal:
                    pending.discard(record.job_id)
                    if not pending:
                        return
