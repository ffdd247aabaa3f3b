"""Batch jobs end to end without Ray: a real redis-server, a real S3 server (SeaweedFS), the
tiny engine and `JobRunner`s in this process (the Ray deployment is tested in test_jobs_ray.py).

Every test gets its own Redis namespace, tenant and results prefix.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from services.jobs.worker import JobRunner
from shared.jobs import (
    ClipSpec,
    GarmentAt,
    IdempotencyConflict,
    JobQueue,
    JobsConfig,
    JobState,
)
from shared.media.video import probe_video, read_frames
from shared.redis_util import connect
from shared.runtime.pipeline import Engine
from shared.sessionbus.config import RedisConfig
from shared.storage import open_store
from shared.storage.config import S3StoreConfig, StorageConfig
from tests.fixtures.redis_server import RedisUnavailable, start_redis_server
from tests.fixtures.seaweedfs import SeaweedFSUnavailable, start_seaweedfs

pytestmark = pytest.mark.timeout(180)


def png(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    try:
        url, stop = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as e:
        pytest.skip(str(e))
    yield url
    stop()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    try:
        s3 = start_seaweedfs(tmp_path_factory.mktemp("s3"))
    except SeaweedFSUnavailable as e:
        pytest.skip(str(e))
    config = StorageConfig(
        backend="s3",
        s3=S3StoreConfig(
            endpoint=s3.endpoint, secure=False, bucket="jobs-test", access_key=s3.access_key, secret_key=s3.secret_key
        ),
    )
    store = open_store(config)
    store.ensure_bucket()
    yield store
    s3.stop()


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


FAST = dict(claim_idle_s=1.0, heartbeat_s=0.1, poll_s=0.1, backoff_base_s=0.5, backoff_max_s=2.0, backoff_jitter=0.0)


class Env:
    """One test's namespace: a queue, a tenant, images in the store, runners."""

    def __init__(self, redis_url: str, store, engine, **config) -> None:
        self.namespace = f"t{uuid.uuid4().hex[:8]}"
        self.tenant = f"acme{uuid.uuid4().hex[:6]}"
        self.config = JobsConfig(**{**FAST, "results_prefix": f"jobs-{self.namespace}", **config})
        self.redis = connect(RedisConfig(url=redis_url, namespace=self.namespace))
        self.queue = JobQueue(self.redis, self.config, self.namespace)
        self.store = store
        self.engine = engine
        self.images: dict[int, str] = {}

    def image(self, seed: int) -> str:
        if seed not in self.images:
            key = f"uploads/{self.tenant}/img-{seed}"
            self.store.put_bytes(key, png(seed))
            self.images[seed] = key
        return self.images[seed]

    def spec(
        self,
        key: str,
        *,
        chunks: int = 1,
        seed: int = 7,
        garments=((0, 2),),
        reference: int = 1,
        prompt: str = "a person walks",
    ) -> ClipSpec:
        return ClipSpec(
            reference_key=self.image(reference),
            garments=tuple(GarmentAt(chunk_index=k, object_key=self.image(g)) for k, g in garments),
            prompt=prompt,
            chunks=chunks,
            seed=seed,
            idempotency_key=key,
        )

    def runner(self, name: str = "w1") -> JobRunner:
        queue = JobQueue(self.redis, self.config, self.namespace)
        return JobRunner(self.engine, self.store, queue, self.config, f"{name}-{uuid.uuid4().hex[:4]}")

    def objects(self, job_id: str) -> list[str]:
        return sorted(o.key for o in self.store.list(f"{self.config.results_prefix}/{self.tenant}/{job_id}/"))


def run(redis_url, store, engine, scenario, **config):
    async def main():
        env = Env(redis_url, store, engine, **config)
        try:
            return await scenario(env)
        finally:
            await env.redis.aclose()

    return asyncio.run(main())


async def wait_state(env: Env, job_id: str, states, timeout_s: float = 30.0, chunks_done: int = 0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = await env.queue.get(job_id)
        if record.state in states and record.chunks_done >= chunks_done:
            return record
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} still {record.state} ({record.chunks_done} chunks)")


def test_same_idempotency_key_is_one_job(redis_url, store, engine):
    async def scenario(env: Env):
        first = await env.queue.submit(env.tenant, [env.spec("clip-a"), env.spec("clip-a")])
        again = await env.queue.submit(env.tenant, [env.spec("clip-a")])
        assert first[0].created and not first[1].created and not again[0].created
        assert first[0].record.job_id == first[1].record.job_id == again[0].record.job_id
        depth = await env.queue.depth()
        assert depth.waiting == 1
        # The key with another spec is refused, and the whole batch with it.
        with pytest.raises(IdempotencyConflict) as err:
            await env.queue.submit(env.tenant, [env.spec("clip-b"), env.spec("clip-a", prompt="another prompt")])
        assert err.value.index == 1
        assert (await env.queue.depth()).waiting == 1
        page, _ = await env.queue.list(env.tenant, 10)
        assert [r.spec.idempotency_key for r in page] == ["clip-a"]
        # Another tenant's key space is its own.
        other = await env.queue.submit(env.tenant + "x", [env.spec("clip-a")])
        assert other[0].created and other[0].record.job_id != first[0].record.job_id
        assert await env.runner().run_until_idle() == 2
        done = await env.queue.get(first[0].record.job_id)
        assert done.state == JobState.SUCCEEDED and done.attempts == 1
        assert len([k for k in env.objects(done.job_id) if k.endswith(".mp4")]) == 1

    run(redis_url, store, engine, scenario)


def test_results_manifest_poster_and_reproducible_frames(redis_url, store, engine):
    async def scenario(env: Env):
        a, b = await env.queue.submit(
            env.tenant,
            [
                env.spec("rerun-1", chunks=2, garments=((0, 2), (1, 3))),
                env.spec("rerun-2", chunks=2, garments=((0, 2), (1, 3))),
            ],
        )
        assert await env.runner().run_until_idle() == 2
        ra, rb = [await env.queue.get(s.record.job_id) for s in (a, b)]
        assert ra.state == rb.state == JobState.SUCCEEDED
        assert ra.result.frames_sha256 == rb.result.frames_sha256  # same spec + seed: same frames
        assert ra.result.video_key != rb.result.video_key  # but each job its own objects
        video_a, video_b = env.store.get_bytes(ra.result.video_key), env.store.get_bytes(rb.result.video_key)
        assert np.array_equal(read_frames(video_a), read_frames(video_b))
        info = probe_video(video_a)
        assert info.num_frames == ra.result.frames == 9 + 12
        manifest = json.loads(env.store.get_bytes(ra.result.manifest_key))
        assert manifest["seed"] == 7 and manifest["checkpoint_id"] == engine.checkpoint_id
        assert manifest["inputs"]["garments"][1]["chunk_index"] == 1
        assert {"queue_seconds", "generate_seconds", "decode_seconds", "upload_seconds"} <= set(manifest["timings"])
        poster = Image.open(io.BytesIO(env.store.get_bytes(ra.result.poster_key)))
        assert poster.format == "PNG" and poster.size == (ra.result.width, ra.result.height)
        assert env.objects(ra.job_id) == sorted([ra.result.video_key, ra.result.manifest_key, ra.result.poster_key])
        # Another seed gives another video.
        (c,) = await env.queue.submit(env.tenant, [env.spec("rerun-3", chunks=2, seed=8, garments=((0, 2), (1, 3)))])
        await env.runner().run_until_idle()
        assert (await env.queue.get(c.record.job_id)).result.frames_sha256 != ra.result.frames_sha256

    run(redis_url, store, engine, scenario)


def test_always_failing_job_is_dead_lettered_without_delaying_others(redis_url, store, engine):
    async def scenario(env: Env):
        missing = f"uploads/{env.tenant}/deleted-after-submit"
        bad = ClipSpec(
            reference_key=missing,
            garments=(GarmentAt(chunk_index=0, object_key=env.image(2)),),
            prompt="p",
            chunks=1,
            seed=1,
            idempotency_key="bad",
        )
        subs = await env.queue.submit(env.tenant, [bad] + [env.spec(f"good-{i}") for i in range(3)])
        bad_id, good_ids = subs[0].record.job_id, [s.record.job_id for s in subs[1:]]
        runner = env.runner()
        task = asyncio.create_task(runner.run())
        try:
            done = await env.queue.wait_for([bad_id, *good_ids], env.tenant, timeout_s=60)
        finally:
            runner.stop_claiming()
            await task
        dead, goods = done[0], done[1:]
        assert dead.state == JobState.FAILED and dead.attempts == env.config.max_attempts == 3
        assert "ObjectNotFound" in dead.error
        (letter,) = await env.queue.dead_letters()
        assert letter.job_id == bad_id and letter.attempts == 3 and "ObjectNotFound" in letter.reason
        assert all(g.state == JobState.SUCCEEDED and g.attempts == 1 for g in goods)
        # The good jobs ran while the bad one waited out its backoffs (0.5 s, then 1 s).
        assert max(g.finished_ms for g in goods) < dead.finished_ms
        assert max(g.started_ms for g in goods) - dead.created_ms < 500 + 1000 * len(goods)
        assert (await env.queue.depth()).total == 0

    run(redis_url, store, engine, scenario)


def test_bad_image_is_dead_lettered_at_once(redis_url, store, engine):
    async def scenario(env: Env):
        key = f"uploads/{env.tenant}/not-an-image"
        env.store.put_bytes(key, b"this is not an image at all")
        spec = ClipSpec(
            reference_key=key,
            garments=(GarmentAt(chunk_index=0, object_key=env.image(2)),),
            prompt="p",
            chunks=1,
            seed=1,
            idempotency_key="corrupt",
        )
        (sub,) = await env.queue.submit(env.tenant, [spec])
        await env.runner().run_until_idle()
        record = await env.queue.get(sub.record.job_id)
        assert record.state == JobState.FAILED and record.attempts == 1 and "ImageError" in record.error

    run(redis_url, store, engine, scenario)


def test_cancel_before_processing(redis_url, store, engine):
    async def scenario(env: Env):
        keep, drop = await env.queue.submit(env.tenant, [env.spec("keep"), env.spec("drop")])
        cancelled = await env.queue.cancel(env.tenant, drop.record.job_id)
        assert cancelled.state == JobState.CANCELLED
        assert (await env.queue.cancel(env.tenant, drop.record.job_id)).state == JobState.CANCELLED  # idempotent
        assert await env.runner().run_until_idle() == 1
        assert (await env.queue.get(keep.record.job_id)).state == JobState.SUCCEEDED
        assert (await env.queue.get(drop.record.job_id)).state == JobState.CANCELLED
        assert env.objects(drop.record.job_id) == []
        assert (await env.queue.depth()).total == 0

    run(redis_url, store, engine, scenario)


def test_cancel_during_processing_stops_at_a_chunk_boundary(redis_url, store, engine):
    async def scenario(env: Env):
        (sub,) = await env.queue.submit(env.tenant, [env.spec("long", chunks=40)])
        job_id = sub.record.job_id
        runner = env.runner()
        task = asyncio.create_task(runner.run_until_idle())
        await wait_state(env, job_id, {JobState.RUNNING}, chunks_done=1)
        assert (await env.queue.cancel(env.tenant, job_id)).state == JobState.CANCELLING
        record = await wait_state(env, job_id, {JobState.CANCELLED})
        await task
        assert 1 <= record.chunks_done < 40 and record.result is None
        assert env.objects(job_id) == []
        assert (await env.queue.depth()).total == 0

    run(redis_url, store, engine, scenario)


def test_lost_worker_job_is_reclaimed_and_finishes_once(redis_url, store, engine):
    async def scenario(env: Env):
        (sub,) = await env.queue.submit(env.tenant, [env.spec("orphan", chunks=6)])
        job_id = sub.record.job_id
        doomed = env.runner("doomed")
        task = asyncio.create_task(doomed.run_until_idle())
        await wait_state(env, job_id, {JobState.RUNNING}, chunks_done=1)
        task.cancel()  # the worker vanishes: no more heartbeats, no release
        with pytest.raises(asyncio.CancelledError):
            await task
        survivor = env.runner("survivor")
        assert await survivor.run_until_idle(idle_s=2 * env.config.claim_idle_s) == 1
        record = await env.queue.get(job_id)
        assert record.state == JobState.SUCCEEDED and record.attempts == 2
        assert record.worker == "" and "stopped heartbeating" not in record.error
        videos = [k for k in env.objects(job_id) if k.endswith(".mp4")]
        assert videos == [record.result.video_key]
        manifest = json.loads(env.store.get_bytes(record.result.manifest_key))
        assert manifest["attempt"] == 2 and manifest["worker"] == survivor.consumer

    run(redis_url, store, engine, scenario)


def test_stored_results_complete_a_resubmitted_job_without_rendering(redis_url, store, engine):
    async def scenario(env: Env):
        (sub,) = await env.queue.submit(env.tenant, [env.spec("again")])
        await env.runner().run_until_idle()
        first = await env.queue.get(sub.record.job_id)
        await env.redis.delete(env.queue.keys.record(first.job_id))  # the record's retention ran out
        (again,) = await env.queue.submit(env.tenant, [env.spec("again")])
        assert again.created and again.record.job_id == first.job_id
        runner = env.runner()
        runner.engine = None  # would fail if it rendered
        await runner.run_until_idle()
        second = await env.queue.get(first.job_id)
        assert second.state == JobState.SUCCEEDED and second.result == first.result
        assert len(env.objects(first.job_id)) == 3

    run(redis_url, store, engine, scenario)


def test_list_pages_and_events(redis_url, store, engine):
    async def scenario(env: Env):
        subs = await env.queue.submit(env.tenant, [env.spec(f"p{i}") for i in range(5)])
        seen, token = [], ""
        while True:
            page, token = await env.queue.list(env.tenant, 2, token)
            seen += [r.job_id for r in page]
            if not token:
                break
        assert sorted(seen) == sorted(s.record.job_id for s in subs) and len(seen) == 5
        queued, _ = await env.queue.list(env.tenant, 10, "", frozenset({JobState.SUCCEEDED}))
        assert queued == []
        events = await env.queue.events(env.tenant, "0-0", None)
        assert [e.state for e in events] == [JobState.QUEUED] * 5

    run(redis_url, store, engine, scenario)
