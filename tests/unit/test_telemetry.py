"""shared.telemetry on the prometheus_client backend, and HealthState.

Every test builds its own `CollectorRegistry`, so nothing touches the process-global one.
"""

from __future__ import annotations

import json
import typing
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import (
    generate_latest as generate_openmetrics,
)

from shared.telemetry import (
    METRICS,
    PREFIX,
    Draining,
    HealthState,
    MetricKind,
    Metrics,
    MetricSpec,
    MetricTagError,
    NotReady,
    Unhealthy,
    ray_is_active,
    render_prometheus,
    start_http_server,
    timer,
)

# Names the architecture and the services rely on (without the prefix).
REQUIRED = {
    "time_to_first_chunk_seconds": MetricKind.HISTOGRAM,
    "inter_chunk_latency_seconds": MetricKind.HISTOGRAM,
    "chunk_generation_seconds": MetricKind.HISTOGRAM,
    "chunk_decode_seconds": MetricKind.HISTOGRAM,
    "garment_switch_latency_seconds": MetricKind.HISTOGRAM,
    "prompt_update_latency_seconds": MetricKind.HISTOGRAM,
    "request_latency_seconds": MetricKind.HISTOGRAM,
    "job_latency_seconds": MetricKind.HISTOGRAM,
    "client_lag_chunks": MetricKind.HISTOGRAM,
    "active_sessions": MetricKind.GAUGE,
    "kv_cache_bytes": MetricKind.GAUGE,
    "kv_cache_budget_bytes": MetricKind.GAUGE,
    "job_queue_depth": MetricKind.GAUGE,
    "sessions_opened_total": MetricKind.COUNTER,
    "sessions_closed_total": MetricKind.COUNTER,
    "session_paused_total": MetricKind.COUNTER,
    "chunks_generated_total": MetricKind.COUNTER,
    "chunks_redone_total": MetricKind.COUNTER,
    "frames_generated_total": MetricKind.COUNTER,
    "requests_total": MetricKind.COUNTER,
    "rejections_total": MetricKind.COUNTER,
    "encoder_cache_hits_total": MetricKind.COUNTER,
    "encoder_cache_misses_total": MetricKind.COUNTER,
    "job_retries_total": MetricKind.COUNTER,
    "jobs_completed_total": MetricKind.COUNTER,
    "jobs_dead_lettered_total": MetricKind.COUNTER,
}


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(registry: CollectorRegistry) -> Metrics:
    return Metrics.create("prometheus", registry=registry)


def _value(registry: CollectorRegistry, sample: str, **labels: str) -> float | None:
    return registry.get_sample_value(PREFIX + sample, labels)


# --- the catalog ------------------------------------------------------------------------


def test_catalog_has_every_required_metric_with_its_kind():
    assert {name: spec.kind for name, spec in METRICS.items() if name in REQUIRED} == REQUIRED


# The module whose code path promises each metric (ARCHITECTURE.md's telemetry table).
UPDATED_BY = {
    **dict.fromkeys(
        (
            "time_to_first_chunk_seconds",
            "inter_chunk_latency_seconds",
            "chunk_generation_seconds",
            "chunk_decode_seconds",
            "garment_switch_latency_seconds",
            "prompt_update_latency_seconds",
            "client_lag_chunks",
            "active_sessions",
            "kv_cache_bytes",
            "kv_cache_budget_bytes",
            "sessions_opened_total",
            "sessions_closed_total",
            "session_paused_total",
            "chunks_generated_total",
            "chunks_redone_total",
            "frames_generated_total",
            "rejections_total",
            "batch_step_seconds",
            "batch_size",
            "realtime_headroom",
            "realtime_session_capacity",
        ),
        "services/generator/service.py",
    ),
    "requests_total": "services/studio/service.py",
    "request_latency_seconds": "services/studio/service.py",
    "encoder_cache_hits_total": "services/encoder/service.py",
    "encoder_cache_misses_total": "services/encoder/service.py",
    "job_queue_depth": "services/jobs/worker.py",
    "job_latency_seconds": "services/jobs/worker.py",
    "job_retries_total": "shared/jobs/queue.py",
    "jobs_completed_total": "shared/jobs/queue.py",
    "jobs_dead_lettered_total": "shared/jobs/queue.py",
}


def _metrics_used(path: str) -> set[str]:
    """Names read off a `Metrics` object (`<...>.metrics.NAME`) in a module's source."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(__file__).resolve().parents[2] / path).read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute | ast.Name):
            owner = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
            if owner in {"metrics", "m", "_metrics"}:
                used.add(node.attr)
    return used


def test_every_catalog_metric_is_updated_by_the_code_that_promises_it():
    assert set(UPDATED_BY) == set(METRICS), "each metric names the module that updates it"
    for path in sorted(set(UPDATED_BY.values())):
        missing = {name for name, where in UPDATED_BY.items() if where == path} - _metrics_used(path)
        assert not missing, f"{path} never updates {sorted(missing)}"


@pytest.mark.parametrize("spec", METRICS.values(), ids=lambda spec: spec.short_name)
def test_catalog_naming_conventions(spec: MetricSpec):
    assert spec.name == PREFIX + spec.short_name
    assert spec.description
    assert spec.name.endswith("_total") == (spec.kind is MetricKind.COUNTER)
    base = spec.name.removesuffix("_total")
    assert base.endswith("_seconds") == (spec.unit == "seconds")
    assert base.endswith("_bytes") == (spec.unit == "bytes")
    assert (spec.buckets is not None) == (spec.kind is MetricKind.HISTOGRAM)
    # Ray Serve adds these itself; session ids and other unbounded values are never tags.
    assert not {"deployment", "replica", "application", "route", "session", "session_id"} & set(spec.tag_keys)


def test_latency_buckets_span_5ms_to_60s():
    buckets = METRICS["time_to_first_chunk_seconds"].buckets
    assert buckets is not None and buckets[0] == 0.005 and buckets[-1] == 60.0


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"name": "fashionchameleon_chunks", "kind": MetricKind.COUNTER}, "_total"),
        ({"name": "fashionchameleon_depth_total", "kind": MetricKind.GAUGE}, "_total"),
        ({"name": "chunks_total", "kind": MetricKind.COUNTER}, "name must match"),
        ({"name": "fashionchameleon_wait_seconds", "unit": "ms"}, "_seconds"),
        ({"name": "fashionchameleon_wait", "unit": "seconds"}, "_seconds"),
        ({"kind": MetricKind.HISTOGRAM}, "buckets"),
        ({"kind": MetricKind.HISTOGRAM, "buckets": (1.0, 0.5)}, "increasing"),
        ({"tag_keys": ("replica",)}, "Ray Serve"),
        ({"tag_keys": ("a",), "tag_values": {"b": ("x",)}}, "tag_values"),
    ],
)
def test_spec_rejects_convention_breaks(kwargs: dict, problem: str):
    fields = {"name": "fashionchameleon_depth", "kind": MetricKind.GAUGE, "description": "d", "unit": "jobs"}
    with pytest.raises(ValueError, match=problem):
        MetricSpec(**{**fields, **kwargs})


def test_metrics_annotations_match_catalog():
    kinds = {"Counter": MetricKind.COUNTER, "Gauge": MetricKind.GAUGE, "Histogram": MetricKind.HISTOGRAM}
    hints = typing.get_type_hints(Metrics)
    annotated = {name: kinds[hint.__name__] for name, hint in hints.items() if hint.__name__ in kinds}
    assert annotated == {name: spec.kind for name, spec in METRICS.items()}


# --- the prometheus backend -------------------------------------------------------------


def test_exposition_declares_every_metric_with_its_type(m: Metrics, registry: CollectorRegistry):
    text = render_prometheus(registry).decode()
    for spec in METRICS.values():
        assert f"# TYPE {spec.name} {spec.kind.value}\n" in text, spec.name
        assert f"# HELP {spec.name} {spec.description}\n" in text, spec.name


def test_openmetrics_exposition_declares_units(m: Metrics, registry: CollectorRegistry):
    text = generate_openmetrics(registry).decode()
    for spec in METRICS.values():
        if spec.unit in ("seconds", "bytes"):
            assert f"# UNIT {spec.name} {spec.unit}\n" in text, spec.name


def test_histogram_buckets_are_exposed(m: Metrics, registry: CollectorRegistry):
    spec = METRICS["chunk_generation_seconds"]
    m.chunk_generation_seconds.observe(0.12)
    for bound in spec.buckets or ():
        expected = 1.0 if bound >= 0.12 else 0.0
        assert _value(registry, "chunk_generation_seconds_bucket", le=str(bound)) == expected
    assert _value(registry, "chunk_generation_seconds_bucket", le="+Inf") == 1.0
    assert _value(registry, "chunk_generation_seconds_count") == 1.0
    assert _value(registry, "chunk_generation_seconds_sum") == pytest.approx(0.12)


def test_counter_inc_with_tags(m: Metrics, registry: CollectorRegistry):
    m.chunks_generated_total.inc()
    m.chunks_generated_total.inc(2)
    m.frames_generated_total.inc(0)
    tags = {"service": "fashionchameleon.v1.Studio", "method": "CreateSession", "code": "OK"}
    m.requests_total.inc(tags=tags)
    m.sessions_closed_total.inc(tags={"reason": "expired"})
    assert _value(registry, "chunks_generated_total") == 3.0
    assert _value(registry, "frames_generated_total") == 0.0
    assert _value(registry, "requests_total", **tags) == 1.0
    assert _value(registry, "sessions_closed_total", reason="expired") == 1.0
    assert _value(registry, "sessions_closed_total", reason="closed") is None
    with pytest.raises(ValueError, match="only go up"):
        m.chunks_generated_total.inc(-1)


def test_gauge_set_inc_dec(m: Metrics, registry: CollectorRegistry):
    m.kv_cache_budget_bytes.set(8 * 2**30)
    m.active_sessions.inc()
    m.active_sessions.inc(2)
    m.active_sessions.dec()
    m.job_queue_depth.set(4, tags={"state": "waiting"})
    assert _value(registry, "kv_cache_budget_bytes") == 8 * 2**30
    assert _value(registry, "active_sessions") == 2.0
    assert _value(registry, "job_queue_depth", state="waiting") == 4.0


def test_tag_values_are_stringified(m: Metrics, registry: CollectorRegistry):
    m.requests_total.inc(tags={"service": "s", "method": "m", "code": 0})
    assert _value(registry, "requests_total", service="s", method="m", code="0") == 1.0


@pytest.mark.parametrize(
    "record, problem",
    [
        (lambda m: m.chunks_generated_total.inc(tags={"reason": "x"}), "unknown \\['reason'\\]"),
        (lambda m: m.sessions_closed_total.inc(), "missing \\['reason'\\]"),
        (lambda m: m.sessions_closed_total.inc(tags={"reason": "timeout"}), "not one of"),
        (lambda m: m.requests_total.inc(tags={"service": "s", "methd": "m", "code": "OK"}), "methd"),
        (lambda m: m.request_latency_seconds.observe(0.1, tags={"service": "s"}), "missing \\['method'\\]"),
        (lambda m: m.job_queue_depth.set(1, tags={"state": "pending"}), "not one of"),
        (lambda m: m.encoder_cache_hits_total.inc(tags={"kind": "person"}), "not one of"),
    ],
)
def test_bad_tags_raise(m: Metrics, record, problem: str):
    with pytest.raises(MetricTagError, match=problem):
        record(m)


def test_default_tags_apply_where_declared_and_yield_to_call_site(registry: CollectorRegistry):
    m = Metrics.create("prometheus", registry=registry, default_tags={"service": "fashionchameleon.v1.Generator"})
    m.requests_total.inc(tags={"method": "NextChunk", "code": "OK"})
    m.requests_total.inc(tags={"service": "other", "method": "NextChunk", "code": "OK"})
    m.chunks_generated_total.inc()  # declares no `service` tag: the default does not apply
    svc = "fashionchameleon.v1.Generator"
    assert _value(registry, "requests_total", service=svc, method="NextChunk", code="OK") == 1.0
    assert _value(registry, "requests_total", service="other", method="NextChunk", code="OK") == 1.0
    assert _value(registry, "chunks_generated_total") == 1.0


def test_bad_default_tags_raise(registry: CollectorRegistry):
    with pytest.raises(MetricTagError, match="servce"):
        Metrics.create("prometheus", registry=registry, default_tags={"servce": "x"})
    with pytest.raises(MetricTagError, match="not one of"):
        Metrics.create("prometheus", registry=registry, default_tags={"reason": "bogus"})


def test_timer_records_also_on_error(m: Metrics, registry: CollectorRegistry):
    tags = {"service": "s", "method": "m"}
    with timer(m.request_latency_seconds, tags):
        pass
    with pytest.raises(RuntimeError), timer(m.request_latency_seconds, tags):
        raise RuntimeError("boom")
    assert _value(registry, "request_latency_seconds_count", **tags) == 2.0
    assert _value(registry, "request_latency_seconds_sum", **tags) >= 0.0


def test_timer_checks_tags_before_the_work(m: Metrics):
    ran = []
    with pytest.raises(MetricTagError), timer(m.request_latency_seconds, {"service": "s"}):
        ran.append(True)
    assert not ran
    with pytest.raises(TypeError, match="histogram"), timer(m.chunks_generated_total):  # type: ignore[arg-type]
        pass


def test_create_twice_on_one_registry_shares_collectors(m: Metrics, registry: CollectorRegistry):
    again = Metrics.create("prometheus", registry=registry)
    m.chunks_generated_total.inc()
    again.chunks_generated_total.inc()
    assert _value(registry, "chunks_generated_total") == 2.0


def test_unknown_metric_attribute_names_the_catalog(m: Metrics):
    with pytest.raises(AttributeError, match="chunks_generated_total"):
        _ = m.chunks_generated
    assert len(list(m)) == len(METRICS)


def test_backend_selection():
    assert not ray_is_active()
    assert Metrics.create("auto", registry=CollectorRegistry()).backend == "prometheus"
    with pytest.raises(RuntimeError, match="connected to Ray"):
        Metrics.create("ray")
    with pytest.raises(ValueError, match="backend"):
        Metrics.create("statsd")  # type: ignore[arg-type]


def test_http_server_serves_the_registry(m: Metrics, registry: CollectorRegistry):
    m.chunks_generated_total.inc(5)
    server = start_http_server(0, registry, addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert f"{PREFIX}chunks_generated_total 5.0" in body


# --- HealthState ------------------------------------------------------------------------


def test_health_starts_live_but_not_ready():
    health = HealthState("generator", clock=lambda: 100.0)
    assert health.healthy and not health.ready and not health.accepting
    assert health.liveness().status_code == 200
    readiness = health.readiness()
    assert readiness.status_code == 503
    assert readiness.body["status"] == "not_ready" and readiness.body["reason"] == "starting"
    with pytest.raises(NotReady, match="starting"):
        health.check_admission()
    health.check_health()


def test_health_ready_accepts_sessions():
    health = HealthState("generator")
    health.mark_ready()
    health.check_admission()
    probe = health.readiness()
    assert probe.ok and probe.body["status"] == "ready" and probe.body["component"] == "generator"
    json.dumps(probe.body)  # the body is what /readyz returns


def test_draining_refuses_new_sessions_but_stays_live():
    now = [100.0]
    health = HealthState("generator", clock=lambda: now[0])
    health.mark_ready()
    now[0] = 105.0
    health.start_draining("scale-down")
    now[0] = 110.0
    health.start_draining("again")  # idempotent: the first reason and time stay
    assert health.draining and health.healthy and health.ready and not health.accepting
    with pytest.raises(Draining, match="scale-down"):
        health.check_admission()
    health.check_health()  # live sessions keep being served; Serve must not restart us
    assert health.liveness().status_code == 200
    readiness = health.readiness()
    assert readiness.status_code == 503
    assert readiness.body == {
        "status": "draining",
        "component": "generator",
        "healthy": True,
        "ready": True,
        "draining": True,
        "reason": "scale-down",
        "since": 105.0,
    }


def test_unhealthy_fails_check_health_and_all_probes():
    health = HealthState("decoder")
    health.mark_ready()
    health.mark_unhealthy("CUDA error: device-side assert")
    with pytest.raises(Unhealthy, match="device-side assert"):
        health.check_health()
    with pytest.raises(Unhealthy):
        health.check_admission()
    assert health.liveness().status_code == 503 and health.liveness().body["status"] == "unhealthy"
    assert health.readiness().body["status"] == "unhealthy"
    health.mark_healthy()
    health.check_health()
    assert health.accepting


def test_not_ready_after_dependency_loss():
    health = HealthState("studio")
    health.mark_ready()
    health.mark_not_ready("redis unreachable")
    assert health.readiness().body["reason"] == "redis unreachable"
    assert health.liveness().ok
    with pytest.raises(NotReady, match="redis unreachable") as info:
        health.check_admission()
    assert not isinstance(info.value, Draining)
