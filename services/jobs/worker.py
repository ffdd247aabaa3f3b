"""Batch clip workers: claim a job from the Redis stream, render it, store the results.

`JobRunner` is the transport-free core (queue + store + engine), used by the Ray Serve
deployment `JobWorker` and directly by tests. One job at a time per runner: a clip uses the
whole engine at full speed.

Per job:
  1. If the job's result objects already exist (a previous attempt finished them but was
     lost before it could say so), the job completes from the stored manifest.
  2. Load the images from the object store; render on the interactive engine path
     (services/jobs/render.py) in a thread while the event loop heartbeats the delivery every
     `heartbeat_s` (progress in chunks, cancel requests, loss of the delivery).
  3. Write the MP4, the poster PNG and, last, the JSON manifest under deterministic keys
     (ResultKeys), then mark the job SUCCEEDED. An object left by a lost attempt is replaced
     only when its bytes differ, so every key holds exactly one object.
  A failed attempt is retried after a backoff, then dead-lettered (queue.py); errors in the
  input itself (an undecodable image) are dead-lettered at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

from services.common.model import load_engine
from services.jobs.render import ClipControl, RenderedClip, RenderStopped, render_clip
from shared.config import AppConfig
from shared.jobs.config import JobsConfig
from shared.jobs.queue import Claim, JobQueue
from shared.jobs.spec import JobResult, ResultKeys
from shared.media.images import ImageError, load_image
from shared.models.checkpoint import ALL_PARTS
from shared.redis_util import connect
from shared.runtime.pipeline import Engine
from shared.storage import ObjectStore, open_store
from shared.storage.base import ObjectNotFound
from shared.telemetry import Metrics

log = logging.getLogger(__name__)

# Failures that another attempt cannot fix: dead-lettered at once.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (ImageError,)


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:1000] if text else type(exc).__name__


def new_consumer_name(prefix: str = "jobw") -> str:
    """Unique per process incarnation; names the worker in job records (host and pid)."""
    return f"{prefix}-{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class JobRunner:
    def __init__(
        self,
        engine: Engine,
        store: ObjectStore,
        queue: JobQueue,
        config: JobsConfig,
        consumer: str,
        metrics: Metrics | None = None,
        model_id: str = "",
    ) -> None:
        self.engine = engine
        self.store = store
        self.queue = queue
        self.config = config
        self.consumer = consumer
        self.metrics = metrics
        self.model_id = model_id
        self.current: Claim | None = None
        self.jobs_done = 0
        self._stop_claiming = asyncio.Event()
        self._control: ClipControl | None = None
        self._stop_reason = ""

    # ---- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Claim and process jobs until `stop_claiming()`; a Redis outage is waited out."""
        block_ms = max(1, int(self.config.poll_s * 1000))
        while not self._stop_claiming.is_set():
            try:
                await self._report_depth()
                claim = await self.queue.claim(self.consumer, block_ms=block_ms)
                if claim is not None and not self._stop_claiming.is_set():
                    await self.process(claim)
                elif claim is not None:
                    await self.queue.release(claim)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job worker %s: loop error", self.consumer)
                await asyncio.sleep(self.config.poll_s)

    async def run_until_idle(self, idle_s: float = 0.5) -> int:
        """Process jobs until none came for `idle_s` (tests, one-shot tools); returns jobs done."""
        loop = asyncio.get_running_loop()
        block_ms = max(1, int(min(self.config.poll_s, idle_s) * 1000))
        done, idle_since = 0, loop.time()
        while loop.time() - idle_since < idle_s:
            claim = await self.queue.claim(self.consumer, block_ms=block_ms)
            if claim is not None:
                await self.process(claim)
                done += 1
                idle_since = loop.time()
        return done

    def stop_claiming(self, *, give_back_current: bool = True) -> None:
        """Claim nothing more; the job in progress is given back at its next chunk boundary
        (`give_back_current`) or finished."""
        self._stop_claiming.set()
        if give_back_current and self._control is not None:
            self._stop_reason = self._stop_reason or "shutdown"
            self._control.stop.set()

    async def _report_depth(self) -> None:
        if self.metrics is None:
            return
        depth = await self.queue.depth()
        self.metrics.job_queue_depth.set(depth.waiting, tags={"state": "waiting"})
        self.metrics.job_queue_depth.set(depth.in_flight, tags={"state": "in_flight"})

    # ---- one job -----------------------------------------------------------------------
    async def process(self, claim: Claim) -> str:
        """Run one attempt; returns its outcome: SUCCEEDED, RETRY, DEAD, CANCELLED, RELEASED
        or LOST."""
        control = ClipControl()
        self.current, self._control, self._stop_reason = claim, control, ""
        if self._stop_claiming.is_set():
            self._stop_reason = "shutdown"
            control.stop.set()
        heartbeat = asyncio.create_task(self._heartbeat(claim, control))
        try:
            return await self._attempt(claim, control)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self.current, self._control = None, None

    async def _attempt(self, claim: Claim, control: ClipControl) -> str:
        keys = ResultKeys.of(self.config.results_prefix, claim.tenant, claim.job_id, claim.spec_hash)
        timings: dict[str, float] = {"queue_seconds": max(0.0, time.time() - claim.created_ms / 1000)}
        try:
            result = await asyncio.to_thread(self._stored_result, keys, claim)
            if result is None:
                started = time.perf_counter()
                images = await asyncio.to_thread(self._load_images, claim)
                timings["load_inputs_seconds"] = time.perf_counter() - started
                started = time.perf_counter()
                rendered = await asyncio.to_thread(render_clip, self.engine, claim.spec, images, control)
                timings["render_seconds"] = time.perf_counter() - started
                if await self.queue.heartbeat(claim, control.chunks_done) == "LOST":
                    return "LOST"  # another worker owns the job now; it writes the results
                result = await asyncio.to_thread(self._store_results, keys, claim, rendered, timings)
        except RenderStopped:
            return await self._stopped(claim)
        except PERMANENT_ERRORS as exc:
            log.warning("job %s attempt %d: permanent failure: %s", claim.job_id, claim.attempt, exc)
            return await self.queue.fail(claim, describe_error(exc), retryable=False)
        except Exception as exc:
            log.warning("job %s attempt %d failed", claim.job_id, claim.attempt, exc_info=True)
            return await self.queue.fail(claim, describe_error(exc))
        finished_ms = await self.queue.complete(claim, result)
        if finished_ms is None:
            return "LOST"
        self.jobs_done += 1
        if self.metrics is not None:
            self.metrics.job_latency_seconds.observe(max(0.0, (finished_ms - claim.created_ms) / 1000))
        return "SUCCEEDED"

    async def _stopped(self, claim: Claim) -> str:
        if self._stop_reason == "cancel":
            return "CANCELLED" if await self.queue.cancelled(claim) else "LOST"
        if self._stop_reason == "lost":
            return "LOST"
        status = await self.queue.release(claim)
        return {"OK": "RELEASED"}.get(status, status)

    async def _heartbeat(self, claim: Claim, control: ClipControl) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                status = await self.queue.heartbeat(claim, control.chunks_done)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("job %s: heartbeat failed", claim.job_id, exc_info=True)
                continue
            if status in ("CANCELLING", "LOST"):
                self._stop_reason = self._stop_reason or ("cancel" if status == "CANCELLING" else "lost")
                control.stop.set()

    # ---- object store (run in threads) ---------------------------------------------------
    def _stored_result(self, keys: ResultKeys, claim: Claim) -> JobResult | None:
        """The result a previous attempt stored completely (manifest written last), if any."""
        try:
            manifest = json.loads(self.store.get_bytes(keys.manifest, max_bytes=2**20))
        except ObjectNotFound:
            return None
        if manifest.get("spec_hash") != claim.spec_hash:
            return None
        if not (self.store.exists(keys.video) and self.store.exists(keys.poster)):
            return None
        return JobResult.model_validate(manifest["result"])

    def _load_images(self, claim: Claim) -> dict[str, Any]:
        keys = {claim.spec.reference_key, *(g.object_key for g in claim.spec.garments)}
        return {key: load_image(self.store.get_bytes(key)) for key in sorted(keys)}

    def _put(self, key: str, data: bytes, content_type: str) -> None:
        """Write `key` once; replace only an object with other bytes (left by a lost attempt)."""
        if self.store.put_bytes_if_absent(key, data, content_type=content_type):
            return
        if self.store.stat(key).etag.strip('"') != hashlib.md5(data).hexdigest():
            self.store.put_bytes(key, data, content_type=content_type)

    def _store_results(self, keys: ResultKeys, claim: Claim, clip: RenderedClip, timings: dict) -> JobResult:
        started = time.perf_counter()
        self._put(keys.video, clip.video, "video/mp4")
        self._put(keys.poster, clip.poster_png, "image/png")
        result = JobResult(
            video_key=keys.video,
            manifest_key=keys.manifest,
            poster_key=keys.poster,
            video_bytes=len(clip.video),
            frames=clip.frames,
            fps=clip.fps,
            width=clip.width,
            height=clip.height,
            frames_sha256=clip.frames_sha256,
        )
        timings = {
            **timings,
            "open_seconds": clip.open_seconds,
            "switch_seconds": clip.switch_seconds,
            "generate_seconds": clip.generate_seconds,
            "decode_seconds": clip.decode_seconds,
            "encode_seconds": clip.encode_seconds,
            "upload_seconds": time.perf_counter() - started,
        }
        self._put(
            keys.manifest,
            manifest_bytes(claim, result, timings, clip, self.engine, self.model_id, self.consumer),
            "application/json",
        )
        return result


def manifest_bytes(
    claim: Claim, result: JobResult, timings: dict, clip: RenderedClip, engine: Engine, model_id: str, worker: str
) -> bytes:
    """The JSON manifest stored next to the clip (see services/jobs/README.md)."""
    spec = claim.spec
    manifest = {
        "job_id": claim.job_id,
        "tenant": claim.tenant,
        "idempotency_key": spec.idempotency_key,
        "spec_hash": claim.spec_hash,
        "inputs": {
            "reference": spec.reference_key,
            "garments": [{"chunk_index": g.chunk_index, "object_key": g.object_key} for g in spec.garments],
            "prompt": spec.prompt,
            "chunks": spec.chunks,
            "labels": spec.labels,
        },
        "seed": spec.seed,
        "checkpoint_id": engine.checkpoint_id,
        "model_id": model_id,
        "preset": engine.preset.name,
        "device": str(engine.device),
        "dtype": engine.config.dtype,
        "attempt": claim.attempt,
        "worker": worker,
        "created_at": claim.created_ms / 1000,
        "rendered_at": time.time(),
        "result": result.model_dump(mode="json"),
        "timings": timings,
        "per_chunk": clip.per_chunk,
    }
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


# --------------------------------------------------------------------------- Ray Serve


class JobWorker:
    """The `jobs` deployment: one `JobRunner` per replica, claiming in the background.

    Scales with queue depth (services/jobs/scaling.py). On shutdown (`__del__`, called by
    Serve before the replica stops) the job in progress is given back at its next chunk
    boundary, uncounted, and another replica takes it; a replica that dies instead loses its
    attempt, which is reclaimed after `claim_idle_s`.
    """

    async def __init__(self, config_json: str, jobs_json: str) -> None:
        self.config = AppConfig.from_json(config_json)
        self.jobs_config = JobsConfig.model_validate_json(jobs_json)
        engine = load_engine(self.config.model, ALL_PARTS)
        self.redis = connect(self.config.redis)
        self.metrics = Metrics.create("auto")
        queue = JobQueue(self.redis, self.jobs_config, self.config.redis.namespace, metrics=self.metrics)
        self.runner = JobRunner(
            engine,
            open_store(self.config.storage),
            queue,
            self.jobs_config,
            new_consumer_name(),
            self.metrics,
            self.config.model.model_id,
        )
        self._task = asyncio.create_task(self.runner.run())

    async def stats(self) -> dict:
        current = self.runner.current
        return {
            "consumer": self.runner.consumer,
            "pid": os.getpid(),
            "jobs_done": self.runner.jobs_done,
            "current_job": current.job_id if current else None,
        }

    async def check_health(self) -> None:
        if self._task.done():
            raise RuntimeError("job worker loop stopped") from self._task.exception()

    async def drain(self) -> None:
        """Stop claiming and give the job in progress back; returns when the loop has ended."""
        self.runner.stop_claiming()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), self.jobs_config.drain_timeout_s)

    async def __del__(self) -> None:
        await self.drain()


def worker_deployment(config: AppConfig, jobs: JobsConfig) -> serve.Application:
    """The bound `jobs` deployment of `build_app`."""
    policy = AutoscalingPolicy(
        policy_function="services.jobs.scaling:QueueDepthPolicy",
        policy_kwargs={"redis_json": config.redis.model_dump_json(), "jobs_json": jobs.model_dump_json()},
    )
    autoscaling = AutoscalingConfig(
        min_replicas=jobs.min_workers,
        max_replicas=jobs.max_workers,
        initial_replicas=max(1, jobs.min_workers),
        downscale_delay_s=jobs.downscale_delay_s,
        upscale_delay_s=0.0,
        policy=policy,
    )
    return serve.deployment(
        JobWorker,
        name="jobs",
        autoscaling_config=autoscaling,
        max_ongoing_requests=16,
        graceful_shutdown_timeout_s=jobs.drain_timeout_s + 10,
        ray_actor_options={"num_cpus": 0, "num_gpus": jobs.worker_gpus},
    ).bind(config.to_json(), jobs.model_dump_json())
