"""Batch jobs on Ray Serve: the `jobs` worker deployment (2 replicas), the Studio gateway with
the JobsApi RPCs over gRPC, a real redis-server and a real S3 server (SeaweedFS), the tiny
preset, and the `fashionchameleon batch` CLI against it.

One Ray instance serves the whole module (its start-up dominates the cost).
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from fashionchameleon.v1 import studio_pb2
from services.jobs import cli as batch
from services.jobs.client import JobsClient, clip_spec
from services.jobs.worker import worker_deployment
from services.launcher import free_port
from services.studio.client import StudioError
from services.studio.service import StudioService
from shared.cli import Parser
from shared.config import (
    AppConfig,
    AuthConfig,
    GeneratorConfig,
    LimitsConfig,
    ModelConfig,
    ServeConfig,
)
from shared.jobs import JobsConfig
from shared.sessionbus.config import RedisConfig
from shared.storage import open_store
from shared.storage.config import S3StoreConfig, StorageConfig
from tests.fixtures.redis_server import RedisUnavailable, start_redis_server
from tests.fixtures.seaweedfs import SeaweedFSUnavailable, start_seaweedfs

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.timeout(600)

KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
JOBS = JobsConfig(
    claim_idle_s=3.0,
    heartbeat_s=0.3,
    poll_s=0.2,
    backoff_base_s=0.5,
    backoff_max_s=1.0,
    min_workers=2,
    max_workers=2,
    depth_poll_s=1.0,
    results_prefix="batch",
    drain_timeout_s=2.0,
)


def png(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def suite():
    from ray.serve.config import HTTPOptions, gRPCOptions

    from services.app import STUDIO_SERVICER

    tmp = Path(tempfile.mkdtemp(prefix="fc-jobs-"))
    (tmp / "redis").mkdir()
    (tmp / "s3").mkdir()
    try:
        redis_url, stop_redis = start_redis_server(tmp / "redis")
    except RedisUnavailable as e:
        pytest.skip(str(e))
    try:
        s3 = start_seaweedfs(tmp / "s3")
    except SeaweedFSUnavailable as e:
        stop_redis()
        pytest.skip(str(e))
    config = AppConfig(
        model=ModelConfig(preset="tiny"),
        redis=RedisConfig(url=redis_url, namespace="jobsuite"),
        storage=StorageConfig(
            backend="s3",
            s3=S3StoreConfig(
                endpoint=s3.endpoint,
                secure=False,
                bucket="fashionchameleon",
                access_key=s3.access_key,
                secret_key=s3.secret_key,
            ),
        ),
        generator=GeneratorConfig(realtime=False),
        auth=AuthConfig(api_keys=KEYS),
        limits=LimitsConfig(max_image_bytes=2 * 2**20),
        serve=ServeConfig(grpc_port=free_port(), http_port=free_port()),
        jobs=JOBS,
    )
    store = open_store(config.storage)
    store.ensure_bucket()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(
        grpc_options=gRPCOptions(port=config.serve.grpc_port, grpc_servicer_functions=[STUDIO_SERVICER]),
        http_options=HTTPOptions(host="127.0.0.1", port=config.serve.http_port),
    )
    gateway = serve.deployment(StudioService, name="studio", ray_actor_options={"num_cpus": 0})
    serve.run(gateway.bind(config.to_json(), None, None), name=config.serve.app_name, route_prefix="/", blocking=False)
    serve.run(worker_deployment(config, JOBS), name="jobs", route_prefix=None, blocking=False)
    target = f"127.0.0.1:{config.serve.grpc_port}"
    _wait_serving(target)
    try:
        yield config, target, store, tmp
    finally:
        serve.shutdown()
        ray.shutdown()
        s3.stop()
        stop_redis()


def _wait_serving(target: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with JobsClient(target, KEYS["acme"], retries=0) as c:
                c.list_jobs(page_size=1)
            break
        except StudioError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while sum(r["running"] for r in _replicas()) < JOBS.min_workers:  # both workers up
        if time.monotonic() > deadline:
            raise TimeoutError("job workers did not start")
        time.sleep(0.5)


def _replicas() -> list[dict]:
    status = serve.status().applications.get("jobs")
    if status is None or "jobs" not in status.deployments:
        return [{"running": 0}]
    return [{"running": status.deployments["jobs"].replica_states.get("RUNNING", 0)}]


@pytest.fixture()
def client(suite):
    _, target, _, _ = suite
    with JobsClient(target, KEYS["acme"]) as c:
        yield c


def cli(*argv: str) -> int:
    parser = Parser(prog="fashionchameleon")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    batch.register(sub)
    args = parser.parse_args(list(argv))
    return args.run(args)


def videos_under(store, prefix: str) -> list[str]:
    return sorted(o.key for o in store.list(prefix) if o.key.endswith(".mp4"))


def wait_job(client: JobsClient, job_id: str, pred, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get_job(job_id)
        if pred(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: {job}")


def test_fifty_clips_through_the_cli_each_finish_with_one_result(suite, tmp_path, capsys):
    _, target, store, _ = suite
    for i in range(2):
        (tmp_path / f"model{i}.png").write_bytes(png(100 + i))
    for i in range(10):
        (tmp_path / f"garment{i}.png").write_bytes(png(200 + i))
    lines = [
        json.dumps(
            {
                "id": f"clip-{n:02d}",
                "reference": f"model{n % 2}.png",
                "garment": f"garment{n % 10}.png",
                "prompt": f"a person walks, take {n}",
                "chunks": 1,
                "labels": {"n": str(n)},
            }
        )
        for n in range(50)
    ]
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    started = time.monotonic()
    status = cli(
        "batch",
        "submit",
        str(manifest),
        "--wait",
        "--out",
        str(out),
        "--target",
        target,
        "--api-key",
        KEYS["acme"],
        "--timeout",
        "400",
    )
    elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert status == 0, summary
    assert summary["created"] == 50 and summary["states"] == {"SUCCEEDED": 50}
    assert "50/50 done (50 ok" in captured.err  # the progress bar
    job_ids = [j["job_id"] for j in summary["jobs"]]
    assert len(set(job_ids)) == 50
    for job_id in job_ids:  # exactly one result object per job
        assert len(videos_under(store, f"{JOBS.results_prefix}/acme/{job_id}/")) == 1
    assert len(videos_under(store, f"{JOBS.results_prefix}/acme/")) >= 50
    downloaded = sorted(p.name for p in out.iterdir())
    assert len(downloaded) == 150 and "clip-07.mp4" in downloaded
    manifest_07 = json.loads((out / "clip-07.json").read_text())
    assert manifest_07["inputs"]["labels"] == {"n": "7"} and manifest_07["inputs"]["chunks"] == 1
    print(f"50 clips in {elapsed:.1f} s", file=sys.stderr)
    # Submitting the same manifest again creates nothing.
    assert cli("batch", "submit", str(manifest), "--target", target, "--api-key", KEYS["acme"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["created"] == 0 and again["existing"] == 50
    assert [j["job_id"] for j in again["jobs"]] == job_ids


def test_worker_killed_mid_job_is_reclaimed_and_finishes_once(suite, client):
    _, _, store, _ = suite
    (job,) = client.submit_clips(
        [clip_spec(png(1), [(0, png(2)), (10, png(3))], "a person turns", 24, key="killed-worker")]
    )
    running = wait_job(client, job.job_id, lambda j: j.state == studio_pb2.Job.RUNNING and j.chunks_done >= 1)
    stats = serve.get_app_handle("jobs").stats.remote().result()  # the deployment answers
    assert running.attempts == 1
    pid = _pid_of_job_holder(suite, job.job_id)
    os.kill(pid, signal.SIGKILL)  # the worker process dies mid-job: no release, no more heartbeats
    done = wait_job(
        client, job.job_id, lambda j: j.state in (studio_pb2.Job.SUCCEEDED, studio_pb2.Job.FAILED), timeout_s=180
    )
    assert done.state == studio_pb2.Job.SUCCEEDED, done.error_message
    assert done.attempts == 2 and done.chunks_done == 24
    assert videos_under(store, f"{JOBS.results_prefix}/acme/{job.job_id}/") == [done.result.video_key]
    with urllib.request.urlopen(done.result.manifest_url, timeout=10) as response:  # presigned GET
        manifest = json.loads(response.read())
    assert manifest["attempt"] == 2 and manifest["job_id"] == job.job_id
    assert stats["pid"] > 0 and stats["consumer"].startswith("jobw-")


def _pid_of_job_holder(suite, job_id: str) -> int:
    import asyncio

    from shared.jobs import JobQueue
    from shared.redis_util import connect

    config, _, _, _ = suite

    async def worker_name() -> str:
        redis = connect(config.redis)
        try:
            record = await JobQueue(redis, JOBS, config.redis.namespace).get(job_id)
            return record.worker
        finally:
            await redis.aclose()

    name = asyncio.run(worker_name())  # "jobw-<host>-<pid>-<random>"
    return int(name.rsplit("-", 2)[1])


def test_api_idempotency_validation_isolation_and_cancel(suite, client):
    _, target, _, _ = suite
    spec = clip_spec(png(5), [(0, "object:" + _upload(suite, png(6)))], "a person waves", 1, key="api-same")
    first = client.submit_clips([spec])[0]
    second = client.submit_clips([spec])[0]
    assert first.created and not second.created and first.job_id == second.job_id
    with pytest.raises(StudioError) as err:
        client.submit_clips([clip_spec(png(5), [(0, png(6))], "another prompt", 1, key="api-same")])
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    before = len(list(client.iter_jobs()))
    bad_batch = [
        clip_spec(png(7), [(0, png(8))], "fine", 1, key="api-ok"),
        clip_spec(png(7), [(0, png(8)), (3, png(9))], "schedule past the end", 2, key="api-bad"),
    ]
    with pytest.raises(StudioError) as err:
        client.submit_clips(bad_batch)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.metadata["index"] == "1" and err.value.metadata["field"] == "clips[1].garments[1].chunk_index"
    assert len(list(client.iter_jobs())) == before  # nothing of the rejected batch was queued
    with JobsClient(target, KEYS["globex"]) as other, pytest.raises(StudioError) as err:
        other.get_job(first.job_id)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    wait_job(client, first.job_id, lambda j: j.state == studio_pb2.Job.SUCCEEDED)
    # Cancel while running: the stream shows CANCELLING then CANCELLED.
    (long,) = client.submit_clips([clip_spec(png(10), [(0, png(11))], "a long walk", 200, key="api-cancel")])
    wait_job(client, long.job_id, lambda j: j.state == studio_pb2.Job.RUNNING and j.chunks_done >= 1)
    assert client.cancel_job(long.job_id).state == studio_pb2.Job.CANCELLING
    states = [e.job.state for e in client.watch_jobs([long.job_id], timeout_s=60)]
    assert states[-1] == studio_pb2.Job.CANCELLED
    final = client.get_job(long.job_id)
    assert final.chunks_done < 200 and not final.HasField("result")
    assert client.cancel_job(long.job_id).state == studio_pb2.Job.CANCELLED  # idempotent


def _upload(suite, data: bytes) -> str:
    import hashlib

    _, _, store, _ = suite
    key = f"uploads/acme/{hashlib.sha256(data).hexdigest()}"
    store.put_bytes(key, data)
    return key
