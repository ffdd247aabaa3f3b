"""The Ray Serve application: encoder, decoder, generator and the public Studio gateway.

`build_app(config)` is the one place deployments are declared; `DEPLOYMENTS` lists their
names (the Helm chart's serveConfigV2 is checked against it).
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from services.decoder.service import DecoderService
from services.encoder.service import EncoderService
from services.generator.routing import ROUTER as HEADROOM_ROUTER
from services.generator.service import GeneratorService
from services.jobs.worker import worker_deployment
from services.studio.service import StudioService
from shared.config import AppConfig

DEPLOYMENTS = ("encoder", "decoder", "generator", "studio", "jobs")
STUDIO_SERVICER = "services.studio.wire.add_StudioServicer_to_server"  # parse-safe: bad bytes are INVALID_ARGUMENT
EVAL_SERVICER = "fashionchameleon.v1.eval_pb2_grpc.add_EvalServicer_to_server"
# grpc.health.v1.Health: the proxy routes Check/Watch/List to the Studio ingress (services/studio/health.py)
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


# How often Serve's controller checks a generator replica: it notices a dead one (and starts
# its replacement, and tells the routers) within this, and a fresh replica's maintenance loop
# (leases, orphan rebuilds) starts at its first check.
GENERATOR_HEALTH_CHECK_PERIOD_S = 2.0


def sticky_router(fallback_replicas: int = 0) -> RequestRouterConfig:
    """Consistent hashing on the handle's session_id: a session's calls reach one replica.
    `fallback_replicas`: successors on the ring tried when that replica is gone or full (0:
    strict affinity, for the decoder whose replicas hold per-session state)."""
    return RequestRouterConfig(
        request_router_class=STICKY_ROUTER, request_router_kwargs={"num_fallback_replicas": fallback_replicas}
    )


# How often each generator replica's room (`GeneratorService.record_routing_stats`) reaches the
# routers: a burst of opens between two reports is kept honest by admission on the replica and
# the gateway's retry on the next-ranked replica.
GENERATOR_ROUTING_STATS_PERIOD_S = 1.0


def headroom_router() -> RequestRouterConfig:
    """Opens go to the generator replica with the most room (`services.generator.routing`)."""
    return RequestRouterConfig(
        request_router_class=HEADROOM_ROUTER,
        request_routing_stats_period_s=GENERATOR_ROUTING_STATS_PERIOD_S,
        request_routing_stats_timeout_s=GENERATOR_ROUTING_STATS_PERIOD_S * 3,
    )


def build_app(config: AppConfig) -> serve.Application:
    """Each deployment is bound to its own view of `config` (`AppConfig.for_deployment`): Ray
    keeps constructor arguments in its GCS, so a replica gets only the secrets it uses."""
    s = config.serve

    def cj(name: str) -> str:
        return config.for_deployment(name).to_json()

    def opts(gpus: float, replicas: int) -> dict:
        return {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus}}

    encoder = serve.deployment(EncoderService, name="encoder", **opts(s.encoder_gpus, s.encoder_replicas)).bind(
        cj("encoder")
    )
    decoder = serve.deployment(
        DecoderService,
        name="decoder",
        request_router_config=sticky_router(),
        **opts(s.decoder_gpus, s.decoder_replicas),
    ).bind(cj("decoder"))
    generator = serve.deployment(
        # Only open_session goes through this handle (later calls go through Redis), so opens are
        # routed by room, not by session id: the replica with the most free sessions and compute
        # headroom first, the rest after it (a dead or full one falls through to the next rank).
        GeneratorService,
        name="generator",
        request_router_config=headroom_router(),
        max_ongoing_requests=256,
        graceful_shutdown_timeout_s=60,
        health_check_period_s=GENERATOR_HEALTH_CHECK_PERIOD_S,
        **opts(s.generator_gpus, s.generator_replicas),
    ).bind(cj("generator"), decoder, encoder)
    jobs = worker_deployment(config.for_deployment("jobs"), config.jobs)  # batch clips: same engine path, full speed
    # HTTP (probes, the player page, the browser WebSocket: services/studio/http.py) goes to the
    # ASGI app the replica builds around itself; gRPC methods are called by name as before.
    return serve.deployment(
        serve.ingress()(StudioService), name="studio", max_ongoing_requests=1024, **opts(0.0, s.studio_replicas)
    ).bind(cj("studio"), generator, encoder, jobs)


def build_eval_app(config: AppConfig, gpus: float = 0.0) -> serve.Application:
    """The Eval service as its own Serve application (gRPC clients send `application:
    fashionchameleon-eval`): it loads a whole engine per replica, so it scales apart from the
    interactive suite and never competes with it for a generator's GPU."""
    from services.eval.service import EvalService

    return serve.deployment(
        EvalService, name="eval", num_replicas=1, ray_actor_options={"num_cpus": 0, "num_gpus": gpus}
    ).bind(config.for_deployment("eval").to_json())
