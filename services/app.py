"""The Ray Serve application: encoder, decoder, generator and the public Studio gateway.

`build_app(config)` is the one place deployments are declared; `DEPLOYMENTS` lists their
names (the Helm chart's serveConfigV2 is checked against it).
"""

from __future__ import annotations

from ray import serve
from ray.serve.config import RequestRouterConfig

from services.decoder.service import DecoderService
from services.encoder.service import EncoderService
from services.generator.service import GeneratorService
from services.jobs.worker import worker_deployment
from services.studio.service import StudioService
from shared.config import AppConfig

DEPLOYMENTS = ("encoder", "decoder", "generator", "studio", "jobs")
STUDIO_SERVICER = "fashionchameleon.v1.studio_pb2_grpc.add_StudioServicer_to_server"
EVAL_SERVICER = "fashionchameleon.v1.eval_pb2_grpc.add_EvalServicer_to_server"
EVAL_APP = "fashionchameleon-eval"
STICKY_ROUTER = "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter"


def sticky_router() -> RequestRouterConfig:
    """Consistent hashing on the handle's session_id: a session's calls reach one replica."""
    return RequestRouterConfig(request_router_class=STICKY_ROUTER, request_router_kwargs={"num_fallback_replicas": 0})


def build_app(config: AppConfig) -> serve.Application:
    cj = config.to_json()
    s = config.serve

    def opts(gpus: float, replicas: int) -> dict:
        return {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus}}

    encoder = serve.deployment(EncoderService, name="encoder", **opts(s.encoder_gpus, s.encoder_replicas)).bind(cj)
    decoder = serve.deployment(
        DecoderService, name="decoder", request_router_config=sticky_router(),
        **opts(s.decoder_gpus, s.decoder_replicas),
    ).bind(cj)
    generator = serve.deployment(
        GeneratorService, name="generator", request_router_config=sticky_router(), max_ongoing_requests=256,
        graceful_shutdown_timeout_s=60, **opts(s.generator_gpus, s.generator_replicas),
    ).bind(cj, decoder, encoder)
    jobs = worker_deployment(config, config.jobs)  # batch clips: same engine path, full speed
    return serve.deployment(
        StudioService, name="studio", max_ongoing_requests=1024, **opts(0.0, s.studio_replicas)
    ).bind(cj, generator, encoder, jobs)


def build_eval_app(config: AppConfig, gpus: float = 0.0) -> serve.Application:
    """The Eval service as its own Serve application (gRPC clients send `application:
    fashionchameleon-eval`): it loads a whole engine per replica, so it scales apart from the
    interactive suite and never competes with it for a generator's GPU."""
    from services.eval.service import EvalService

    return serve.deployment(
        EvalService, name="eval", num_replicas=1, ray_actor_options={"num_cpus": 0, "num_gpus": gpus}
    ).bind(config.to_json())
