"""Metrics and health of every service.

- `METRICS` / `MetricSpec` (metrics.py): the one catalog of metric names, units and tags.
- `Metrics.create(backend)` (metrics.py): instruments for the catalog on Ray's metrics
  export (Serve replicas, actors) or on `prometheus_client` (processes outside Ray), with
  `render_prometheus` / `start_http_server` for the latter.
- `HealthState` (health.py): healthy / ready / draining flags for `check_health`, admission
  and `/healthz` / `/readyz`.
"""

from shared.telemetry.health import (
    Draining,
    HealthError,
    HealthSnapshot,
    HealthState,
    NotReady,
    Probe,
    Unhealthy,
)
from shared.telemetry.metrics import (
    CLOSE_REASONS,
    ENCODE_KINDS,
    JOB_BUCKETS_SECONDS,
    LAG_BUCKETS_CHUNKS,
    LATENCY_BUCKETS_SECONDS,
    METRICS,
    PREFIX,
    PROMETHEUS_CONTENT_TYPE,
    QUEUE_STATES,
    REJECT_REASONS,
    Counter,
    Gauge,
    Histogram,
    MetricKind,
    Metrics,
    MetricSpec,
    MetricsServer,
    MetricTagError,
    ray_is_active,
    render_prometheus,
    start_http_server,
    timer,
)

__all__ = [
    "CLOSE_REASONS",
    "ENCODE_KINDS",
    "JOB_BUCKETS_SECONDS",
    "LAG_BUCKETS_CHUNKS",
    "LATENCY_BUCKETS_SECONDS",
    "METRICS",
    "PREFIX",
    "PROMETHEUS_CONTENT_TYPE",
    "QUEUE_STATES",
    "REJECT_REASONS",
    "Counter",
    "Draining",
    "Gauge",
    "HealthError",
    "HealthSnapshot",
    "HealthState",
    "Histogram",
    "MetricKind",
    "MetricSpec",
    "MetricTagError",
    "Metrics",
    "MetricsServer",
    "NotReady",
    "Probe",
    "Unhealthy",
    "ray_is_active",
    "render_prometheus",
    "start_http_server",
    "timer",
]
