"""shared.telemetry's ray backend, scraped from a local Ray node's metrics export port.

What Ray 2.60 needs, found here: `ray.init(_metrics_export_port=PORT)` is enough, also with
`include_dashboard=False` (the per-node dashboard *agent* still starts and serves
http://NODE:PORT/metrics). Core workers push application metrics to that agent every
`metrics_report_interval_ms` (default 10 s), set to 500 ms below through `_system_config`
(or the `RAY_metrics_report_interval_ms` environment variable). The agent exports each
metric as `ray_<name>`, adding `Component`, `NodeAddress`, `SessionName`, `Version`,
`WorkerId`; inside a Serve replica, `ray.serve.metrics` adds `deployment`, `replica` and
`application`.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from shared.telemetry import Metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRAPE_DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def metrics_port() -> Iterator[int]:
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process; these tests need their own local node")
    port = _free_port()
    try:
        ray.init(
            num_cpus=1,
            include_dashboard=False,
            _metrics_export_port=port,
            _system_config={"metrics_report_interval_ms": 500},
            log_to_driver=False,
        )
    except (RuntimeError, OSError) as exc:  # a machine that cannot start Ray (sandbox, no shm)
        pytest.skip(f"cannot start a local Ray node: {type(exc).__name__}: {exc}")
    try:
        yield port
    finally:
        ray.shutdown()


def _scrape(port: int) -> list[Sample]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return []  # the agent's exporter is not up yet
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _named(samples: list[Sample], name: str) -> list[Sample]:
    """Samples of catalog sample `name`, with or without Ray's `ray_` prefix."""
    return [s for s in samples if s.name in (name, f"ray_{name}")]


def _wait_for(port: int, name: str, **labels: str) -> list[Sample]:
    """Scrape until a sample `name` carrying `labels` appears; all samples of that scrape."""
    deadline = time.monotonic() + SCRAPE_DEADLINE_S
    while True:
        samples = _scrape(port)
        if any(labels.items() <= s.labels.items() for s in _named(samples, name)):
            return samples
        if time.monotonic() > deadline:
            seen = sorted({s.name for s in samples if "fashionchameleon" in s.name})
            pytest.fail(f"{name} {labels} not exported within {SCRAPE_DEADLINE_S:.0f} s; saw {seen}")
        time.sleep(0.25)


def _only(samples: list[Sample], name: str, **labels: str) -> Sample:
    matching = [s for s in _named(samples, name) if labels.items() <= s.labels.items()]
    assert len(matching) == 1, matching
    return matching[0]


@ray.remote(num_cpus=0)
class Recorder:
    def __init__(self) -> None:
        self.metrics = Metrics.create()  # auto: this worker is connected to Ray

    def record(self) -> str:
        m = self.metrics
        m.chunks_generated_total.inc(3)
        m.sessions_closed_total.inc(tags={"reason": "expired"})
        m.active_sessions.inc()
        m.active_sessions.inc()
        m.active_sessions.dec()
        m.chunk_generation_seconds.observe(0.4)
        return m.backend


def test_actor_metrics_reach_the_export_port(metrics_port: int):
    recorder = Recorder.remote()
    assert ray.get(recorder.record.remote()) == "ray"

    samples = _wait_for(metrics_port, "fashionchameleon_chunks_generated_total")
    chunks = _only(samples, "fashionchameleon_chunks_generated_total")
    assert chunks.value == 3.0
    assert {"SessionName", "NodeAddress"} <= chunks.labels.keys()  # Ray's own labels

    samples = _wait_for(metrics_port, "fashionchameleon_chunk_generation_seconds_count")
    assert _only(samples, "fashionchameleon_sessions_closed_total", reason="expired").value == 1.0
    assert _only(samples, "fashionchameleon_active_sessions").value == 1.0
    assert _only(samples, "fashionchameleon_chunk_generation_seconds_count").value == 1.0
    bucket = "fashionchameleon_chunk_generation_seconds_bucket"
    assert _only(samples, bucket, le="0.3").value == 0.0
    assert _only(samples, bucket, le="0.5").value == 1.0
    ray.kill(recorder)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class TinyGenerator:
    def __init__(self) -> None:
        self.metrics = Metrics.create()  # in __init__: the replica context exists now

    def __call__(self, frames: int) -> str:
        self.metrics.frames_generated_total.inc(frames)
        return self.metrics.backend


def test_serve_replica_metrics_carry_deployment_tags(metrics_port: int):
    try:
        handle = serve.run(TinyGenerator.bind(), name="telemetry-test", route_prefix=None)
        assert handle.remote(17).result(timeout_s=60) == "ray"
        name = "fashionchameleon_frames_generated_total"
        samples = _wait_for(metrics_port, name, deployment="TinyGenerator")
        frames = _only(samples, name, deployment="TinyGenerator")
        assert frames.value == 17.0
        assert frames.labels["application"] == "telemetry-test"
        assert frames.labels["replica"]
    finally:
        serve.shutdown()
