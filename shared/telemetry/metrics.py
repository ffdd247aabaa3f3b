"""The metric catalog of every FashionChameleon service and one small interface over two backends.

`METRICS` declares each metric once (name, kind, unit, tag keys, buckets). `Metrics.create`
builds instruments for all of them on one backend:

- "ray": `ray.serve.metrics` Counter/Gauge/Histogram. Inside a Serve replica these add the
  `deployment`, `replica` and `application` tags themselves; the Ray core worker also adds
  `Component`, `NodeAddress`, `SessionName`, `Version` and `WorkerId`. Each node's metrics
  agent exports them on the node's metrics export port with a `ray_` name prefix
  (`ray_fashionchameleon_chunks_generated_total`). Build `Metrics` in the deployment's
  `__init__`, not at import time: the serve tags are attached when an instrument is created
  inside the replica.
- "prometheus": `prometheus_client` collectors in a `CollectorRegistry`, for processes
  outside Ray (CLI, unit tests, a plain gRPC server); expose them with `start_http_server`
  or `render_prometheus`.

Both backends get the same calls (`inc`, `set`, `dec`, `observe`, `timer`) and the same tag
checks: a missing or unknown tag key, or a value outside a tag's declared set, raises
`MetricTagError`. Tags stay low-cardinality; session ids are never tags.

Units are base units and part of the name: `_seconds`, `_bytes`, counters end in `_total`.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry

PREFIX = "fashionchameleon_"

# Ray Serve adds these itself inside a replica and refuses metrics that declare them.
RESERVED_TAG_KEYS = frozenset({"deployment", "replica", "application", "route"})

# Seconds; spans a fast RPC (5 ms) to a cold session start (60 s), finest around the
# 0.1-2 s range where per-chunk budgets of real-time streaming sit.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0,
)  # fmt: skip
# Seconds from job submission to a finished clip (batch path).
JOB_BUCKETS_SECONDS: tuple[float, ...] = (
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
# Chunks a client is behind the generator; 0.5 separates "no lag" (Ray needs bounds > 0).
LAG_BUCKETS_CHUNKS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
BATCH_BUCKETS_SESSIONS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)

# Closed value sets of enumerated tags.
CLOSE_REASONS = ("closed", "expired", "failed", "evicted")
REJECT_REASONS = ("capacity", "compute", "session_limit", "quota", "rate_limited", "auth", "invalid", "draining")
ENCODE_KINDS = ("reference", "garment", "frame", "prompt")
QUEUE_STATES = ("waiting", "in_flight")

_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_SUFFIX_UNITS = ("seconds", "bytes")  # a name ends in `_<unit>` exactly when its unit is one of these


class MetricKind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class MetricTagError(ValueError):
    """Tags of a recording do not match the metric's declared tag keys or values."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric of the catalog.

    `name` is the full name with `PREFIX`; `unit` is the base unit of recorded values
    (seconds, bytes, chunks...); `tag_values` optionally closes a tag to a fixed set of
    values, so typos fail loudly and cardinality stays bounded.
    """

    name: str
    kind: MetricKind
    description: str
    unit: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    tag_values: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        problems = _spec_problems(self)
        if problems:
            raise ValueError(f"invalid metric spec {self.name!r}: {'; '.join(problems)}")

    @property
    def short_name(self) -> str:
        """Name without `PREFIX`: the attribute name on `Metrics`."""
        return self.name.removeprefix(PREFIX)


def _spec_problems(spec: MetricSpec) -> list[str]:
    problems = []
    if not spec.name.startswith(PREFIX) or not _NAME_RE.match(spec.name):
        problems.append(f"name must match {PREFIX}[a-z0-9_]+")
    if spec.kind is MetricKind.COUNTER and not spec.name.endswith("_total"):
        problems.append("counter names end in _total")
    if spec.kind is not MetricKind.COUNTER and spec.name.endswith("_total"):
        problems.append("only counters end in _total")
    base = spec.name.removesuffix("_total")
    for unit in _SUFFIX_UNITS:
        if base.endswith(f"_{unit}") != (spec.unit == unit):
            problems.append(f"names end in _{unit} exactly when the unit is {unit}")
    if (spec.kind is MetricKind.HISTOGRAM) != (spec.buckets is not None):
        problems.append("histograms, and only histograms, have buckets")
    if spec.buckets is not None and (
        not spec.buckets or spec.buckets[0] <= 0 or list(spec.buckets) != sorted(set(spec.buckets))
    ):
        problems.append("buckets must be positive and strictly increasing")
    if len(set(spec.tag_keys)) != len(spec.tag_keys):
        problems.append("duplicate tag keys")
    if RESERVED_TAG_KEYS & set(spec.tag_keys):
        problems.append(f"tag keys {sorted(RESERVED_TAG_KEYS)} are added by Ray Serve")
    if not set(spec.tag_values) <= set(spec.tag_keys):
        problems.append("tag_values names a key that is not in tag_keys")
    return problems


def _counter(
    name: str, unit: str, description: str, tag_keys: tuple[str, ...] = (), **tag_values: tuple[str, ...]
) -> MetricSpec:
    return MetricSpec(PREFIX + name, MetricKind.COUNTER, description, unit, tag_keys, None, tag_values)


def _gauge(
    name: str, unit: str, description: str, tag_keys: tuple[str, ...] = (), **tag_values: tuple[str, ...]
) -> MetricSpec:
    return MetricSpec(PREFIX + name, MetricKind.GAUGE, description, unit, tag_keys, None, tag_values)


def _histogram(
    name: str, unit: str, buckets: tuple[float, ...], description: str, tag_keys: tuple[str, ...] = ()
) -> MetricSpec:
    return MetricSpec(PREFIX + name, MetricKind.HISTOGRAM, description, unit, tag_keys, buckets)


_CATALOG: tuple[MetricSpec, ...] = (
    # Interactive path: latency as the shopper sees it.
    _histogram("time_to_first_chunk_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "Session creation accepted to first video chunk ready for the client."),
    _histogram("inter_chunk_latency_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "Gap between consecutive video chunks of one session."),
    _histogram("chunk_generation_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "DiT time to generate one latent chunk (all denoising steps)."),
    _histogram("chunk_decode_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "VAE decode plus video encoding of one chunk."),
    _histogram("garment_switch_latency_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "Garment switch accepted to first chunk wearing the new garment."),
    _histogram("prompt_update_latency_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "Prompt update accepted to first chunk generated with the new prompt."),
    _histogram("client_lag_chunks", "chunks", LAG_BUCKETS_CHUNKS,
               "Chunks the client is behind the generator, observed at each chunk sent."),
    # Batched stepping and compute capacity (generator replicas).
    _histogram("batch_step_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "Wall time of one batched step (one chunk for each session of the batch), by batch size.",
               ("batch_size",)),
    _histogram("batch_size", "sessions", BATCH_BUCKETS_SESSIONS, "Sessions stepped together in one DiT forward."),
    _gauge("realtime_headroom", "ratio",
           "Spare compute at playback speed: chunk playback time / time to step every open session once, "
           "minus 1 (below 0: sessions fall behind; capped at 100 when idle)."),
    _gauge("realtime_session_capacity", "sessions",
           "Sessions this replica can serve at playback speed with its configured headroom (measured step times)."),
    # Sessions and capacity.
    _gauge("active_sessions", "sessions", "Sessions currently open on this process."),
    _gauge("kv_cache_bytes", "bytes", "KV-cache memory allocated to sessions."),
    _gauge("kv_cache_budget_bytes", "bytes", "KV-cache memory budget of admission control."),
    _counter("sessions_opened_total", "sessions", "Sessions opened."),
    _counter("sessions_closed_total", "sessions", "Sessions ended, by reason.",
             ("reason",), reason=CLOSE_REASONS),
    _counter("session_paused_total", "pauses", "Times generation paused because the client fell behind."),
    _counter("chunks_generated_total", "chunks", "Video chunks generated."),
    _counter("chunks_redone_total", "chunks",
             "Chunks generated but not yet sent that a garment switch replaced (generated again wearing it)."),
    _counter("frames_generated_total", "frames", "Pixel frames generated."),
    # RPC surface.
    _counter("requests_total", "requests", "RPCs handled, by gRPC service, method and status code name.",
             ("service", "method", "code")),
    _histogram("request_latency_seconds", "seconds", LATENCY_BUCKETS_SECONDS,
               "RPC handling time.", ("service", "method")),
    _counter("rejections_total", "requests", "Requests refused before any work, by reason.",
             ("reason",), reason=REJECT_REASONS),
    _counter("encoder_cache_hits_total", "lookups", "Encoder content-hash cache hits.",
             ("kind",), kind=ENCODE_KINDS),
    _counter("encoder_cache_misses_total", "lookups", "Encoder content-hash cache misses.",
             ("kind",), kind=ENCODE_KINDS),
    # Batch jobs.
    _gauge("job_queue_depth", "jobs", "Jobs in the batch stream: waiting for a worker, or claimed and in flight.",
           ("state",), state=QUEUE_STATES),
    _histogram("job_latency_seconds", "seconds", JOB_BUCKETS_SECONDS, "Job submission to finished clip."),
    _counter("job_retries_total", "retries", "Job attempts retried after a failure."),
    _counter("jobs_completed_total", "jobs", "Jobs finished successfully."),
    _counter("jobs_dead_lettered_total", "jobs",
             "Jobs moved to the dead-letter stream after their last attempt failed."),
)  # fmt: skip

METRICS: Mapping[str, MetricSpec] = MappingProxyType({spec.short_name: spec for spec in _CATALOG})
if len(METRICS) != len(_CATALOG):
    raise ValueError("duplicate metric names in the catalog")

Tags = Mapping[str, Any]
Backend = Literal["prometheus", "ray", "auto"]


# --- instruments: the one interface callers see ------------------------------------------


class _Sink(Protocol):
    """Backend side of one metric; `tags` arrive complete and validated."""

    def add(self, value: float, tags: dict[str, str]) -> None: ...
    def set(self, value: float, tags: dict[str, str]) -> None: ...
    def observe(self, value: float, tags: dict[str, str]) -> None: ...


class _Instrument:
    def __init__(self, spec: MetricSpec, sink: _Sink, default_tags: Mapping[str, str]) -> None:
        self.spec = spec
        self._sink = sink
        self._default_tags = {k: v for k, v in default_tags.items() if k in spec.tag_keys}
        for key, value in self._default_tags.items():
            allowed = spec.tag_values.get(key)
            if allowed is not None and value not in allowed:
                raise MetricTagError(f"{spec.name}: default tag {key}={value!r} is not one of {allowed}")

    def _tags(self, tags: Tags | None) -> dict[str, str]:
        merged = {**self._default_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        unknown = sorted(set(merged) - set(self.spec.tag_keys))
        missing = [k for k in self.spec.tag_keys if k not in merged]
        if unknown or missing:
            raise MetricTagError(
                f"{self.spec.name}: tag keys are {self.spec.tag_keys}; unknown {unknown}, missing {missing}"
            )
        for key, allowed in self.spec.tag_values.items():
            if merged[key] not in allowed:
                raise MetricTagError(f"{self.spec.name}: tag {key}={merged[key]!r} is not one of {allowed}")
        return merged

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name})"


class Counter(_Instrument):
    def inc(self, value: float = 1.0, tags: Tags | None = None) -> None:
        if value < 0:
            raise ValueError(f"{self.spec.name}: counters only go up, got {value}")
        self._sink.add(float(value), self._tags(tags))


class Gauge(_Instrument):
    def set(self, value: float, tags: Tags | None = None) -> None:
        self._sink.set(float(value), self._tags(tags))

    def inc(self, value: float = 1.0, tags: Tags | None = None) -> None:
        self._sink.add(float(value), self._tags(tags))

    def dec(self, value: float = 1.0, tags: Tags | None = None) -> None:
        self._sink.add(-float(value), self._tags(tags))


class Histogram(_Instrument):
    def observe(self, value: float, tags: Tags | None = None) -> None:
        self._sink.observe(float(value), self._tags(tags))


_INSTRUMENTS: dict[MetricKind, type[_Instrument]] = {
    MetricKind.COUNTER: Counter,
    MetricKind.GAUGE: Gauge,
    MetricKind.HISTOGRAM: Histogram,
}


@contextmanager
def timer(metric: Histogram, tags: Tags | None = None) -> Iterator[None]:
    """Observe the seconds the block took into `metric`, also when it raises."""
    if not isinstance(metric, Histogram):
        raise TypeError(f"timer needs a histogram, got {metric!r}")
    metric._tags(tags)  # fail on bad tags before the work, not after it
    start = time.perf_counter()
    try:
        yield
    finally:
        metric.observe(time.perf_counter() - start, tags)


# --- prometheus_client backend ------------------------------------------------------------

_PROM_TYPES = {
    MetricKind.COUNTER: prometheus_client.Counter,
    MetricKind.GAUGE: prometheus_client.Gauge,
    MetricKind.HISTOGRAM: prometheus_client.Histogram,
}
# Collectors already registered per registry, so building Metrics twice on one registry
# shares them instead of failing with "Duplicated timeseries".
_PROM_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = weakref.WeakKeyDictionary()
_PROM_LOCK = threading.Lock()


class _PrometheusSink:
    def __init__(self, collector: Any, labelled: bool) -> None:
        self._collector = collector
        self._labelled = labelled

    def _child(self, tags: dict[str, str]) -> Any:
        return self._collector.labels(**tags) if self._labelled else self._collector

    def add(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).inc(value)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).set(value)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).observe(value)


def _prometheus_sink(spec: MetricSpec, registry: CollectorRegistry) -> _PrometheusSink:
    with _PROM_LOCK:
        collectors = _PROM_COLLECTORS.setdefault(registry, {})
        collector = collectors.get(spec.name)
        if collector is None:
            kwargs: dict[str, Any] = {"labelnames": spec.tag_keys, "registry": registry}
            if spec.name.removesuffix("_total").endswith(f"_{spec.unit}"):
                kwargs["unit"] = spec.unit  # OpenMetrics: a declared unit is the name's suffix
            if spec.buckets is not None:
                kwargs["buckets"] = spec.buckets
            collector = _PROM_TYPES[spec.kind](spec.name, spec.description, **kwargs)
            collectors[spec.name] = collector
    return _PrometheusSink(collector, labelled=bool(spec.tag_keys))


# --- Ray backend --------------------------------------------------------------------------


class _RaySink:
    def __init__(self, spec: MetricSpec) -> None:
        from ray.serve import metrics as ray_metrics

        self._kind = spec.kind
        if spec.kind is MetricKind.COUNTER:
            self._metric = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind is MetricKind.GAUGE:
            self._metric = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tag_keys)
        elif spec.kind is MetricKind.HISTOGRAM:
            assert spec.buckets is not None
            self._metric = ray_metrics.Histogram(
                spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tag_keys
            )
        else:
            raise ValueError(f"unknown metric kind {spec.kind!r}")
        # Ray gauges only support set(); inc/dec keep the value per tag set here.
        self._gauge_values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def add(self, value: float, tags: dict[str, str]) -> None:
        if self._kind is MetricKind.COUNTER:
            if value > 0:  # Ray refuses inc(0)
                self._metric.inc(value, tags=tags)
            return
        with self._lock:
            key = tuple(sorted(tags.items()))
            current = self._gauge_values.get(key, 0.0) + value
            self._gauge_values[key] = current
            self._metric.set(current, tags=tags)

    def set(self, value: float, tags: dict[str, str]) -> None:
        with self._lock:
            self._gauge_values[tuple(sorted(tags.items()))] = value
            self._metric.set(value, tags=tags)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._metric.observe(value, tags=tags)


def ray_is_active() -> bool:
    """True in a process connected to Ray (replica, actor, task or driver after ray.init).

    Never imports ray: a process that has not imported it is not connected.
    """
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# --- the catalog, built -------------------------------------------------------------------


class Metrics:
    """Instruments for every catalog metric, as attributes named without the prefix.

    >>> m = Metrics.create("prometheus", registry=CollectorRegistry())
    >>> m.chunks_generated_total.inc()
    >>> m.sessions_closed_total.inc(tags={"reason": "expired"})
    """

    time_to_first_chunk_seconds: Histogram
    inter_chunk_latency_seconds: Histogram
    chunk_generation_seconds: Histogram
    chunk_decode_seconds: Histogram
    garment_switch_latency_seconds: Histogram
    prompt_update_latency_seconds: Histogram
    client_lag_chunks: Histogram
    batch_step_seconds: Histogram
    batch_size: Histogram
    realtime_headroom: Gauge
    realtime_session_capacity: Gauge
    active_sessions: Gauge
    kv_cache_bytes: Gauge
    kv_cache_budget_bytes: Gauge
    sessions_opened_total: Counter
    sessions_closed_total: Counter
    session_paused_total: Counter
    chunks_generated_total: Counter
    chunks_redone_total: Counter
    frames_generated_total: Counter
    requests_total: Counter
    request_latency_seconds: Histogram
    rejections_total: Counter
    encoder_cache_hits_total: Counter
    encoder_cache_misses_total: Counter
    job_queue_depth: Gauge
    job_latency_seconds: Histogram
    job_retries_total: Counter
    jobs_completed_total: Counter
    jobs_dead_lettered_total: Counter

    def __init__(
        self, backend: str, instruments: Mapping[str, _Instrument], registry: CollectorRegistry | None
    ) -> None:
        self.backend = backend
        self.registry = registry  # the prometheus registry; None on the ray backend
        self._instruments = dict(instruments)
        for name, instrument in instruments.items():
            setattr(self, name, instrument)

    @classmethod
    def create(
        cls,
        backend: Backend = "auto",
        registry: CollectorRegistry | None = None,
        default_tags: Mapping[str, Any] | None = None,
        catalog: Mapping[str, MetricSpec] = METRICS,
    ) -> Metrics:
        """Build every metric of `catalog` on `backend`.

        backend: "prometheus", "ray", or "auto" (ray when this process is connected to Ray,
            see `ray_is_active`, else prometheus).
        registry: prometheus registry; default `prometheus_client.REGISTRY`. Must be None
            on the ray backend.
        default_tags: tag values applied to every metric that declares the key (call-site
            tags override them); a key no metric declares raises `MetricTagError`.
        """
        if backend == "auto":
            backend = "ray" if ray_is_active() else "prometheus"
        defaults = {k: str(v) for k, v in (default_tags or {}).items()}
        declared = {key for spec in catalog.values() for key in spec.tag_keys}
        if not set(defaults) <= declared:
            raise MetricTagError(f"default tags {sorted(set(defaults) - declared)} are not declared by any metric")

        sinks: dict[str, _Sink]
        if backend == "prometheus":
            registry = prometheus_client.REGISTRY if registry is None else registry
            sinks = {name: _prometheus_sink(spec, registry) for name, spec in catalog.items()}
        elif backend == "ray":
            if registry is not None:
                raise ValueError("the ray backend exports through Ray's metrics agent, not a registry")
            if not ray_is_active():
                raise RuntimeError("the ray backend needs a process connected to Ray (ray.init or a Ray worker)")
            sinks = {name: _RaySink(spec) for name, spec in catalog.items()}
        else:
            raise ValueError(f"backend must be 'prometheus', 'ray' or 'auto', got {backend!r}")

        instruments = {name: _INSTRUMENTS[spec.kind](spec, sinks[name], defaults) for name, spec in catalog.items()}
        return cls(backend, instruments, registry)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a metric name that is not in the catalog.
        raise AttributeError(f"no metric {name!r}; the catalog has {sorted(self.__dict__.get('_instruments', {}))}")

    def __iter__(self) -> Iterator[_Instrument]:
        return iter(self._instruments.values())


# --- exposition for processes outside Ray -------------------------------------------------

PROMETHEUS_CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def render_prometheus(registry: CollectorRegistry | None = None) -> bytes:
    """Text exposition format (0.0.4) of `registry` (default `prometheus_client.REGISTRY`)."""
    return prometheus_client.generate_latest(prometheus_client.REGISTRY if registry is None else registry)


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint; `port` is the bound port (useful with port 0)."""

    port: int
    _server: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_http_server(port: int, registry: CollectorRegistry | None = None, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; port 0 picks a free one."""
    server, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=prometheus_client.REGISTRY if registry is None else registry
    )
    return MetricsServer(port=server.server_port, _server=server, _thread=thread)
