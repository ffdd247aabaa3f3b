"""The chart's serveConfigV2 applied to the application the code really builds.

Serve merges each serveConfigV2 deployment entry over the options `services.app.build_app`
declares (`override_deployment_info`, what the Serve controller runs when KubeRay submits the
config). This builds the real application from the environment a rendered Ray pod gets
(`services.serve_entry:app`, no Ray cluster needed) and applies every scenario's config, so
a chart/code mismatch (an unknown deployment, replicas and autoscaling both fixed, a wrong
router) fails here rather than in the cluster.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.test_helm_chart import FAKE_SECRET_ENV, SCENARIOS, env_of, pod_templates, rayservices

try:  # Ray internals: the controller's own merge logic (checked against ray[serve]==2.60.*).
    from ray.serve._private.application_state import override_deployment_info
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve._private.config import ReplicaConfig
    from ray.serve._private.deployment_info import DeploymentInfo
except ImportError as e:  # pragma: no cover - a Ray upgrade moved them
    pytest.skip(f"Ray Serve internals moved ({e}); update this test to the new controller API", allow_module_level=True)

from ray.serve.schema import ServeApplicationSchema

from services.app import GENERATOR_ROUTING_STATS_PERIOD_S, HEADROOM_ROUTER, STICKY_ROUTER
from services.serve_entry import app as app_builder


def _code_deployment_infos(monkeypatch, env: dict) -> dict[str, DeploymentInfo]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    built = build_serve_app(app_builder({}), name="fashionchameleon")
    infos = {}
    for d in built.deployments:
        replica = ReplicaConfig.from_proto_bytes(
            d._replica_config.to_proto_bytes(), d._deployment_config.needs_pickle()
        )
        infos[d.name] = DeploymentInfo(
            deployment_config=d._deployment_config,
            replica_config=replica,
            start_time_ms=0,
            deployer_job_id="chart-test",
        )
    return infos


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_overrides_apply_to_the_built_application(scenario, monkeypatch):
    for rs in rayservices(scenario):
        (head,) = pod_templates(rs)[0][1]["spec"]["containers"]
        env = {**FAKE_SECRET_ENV, "FASHIONCHAMELEON_CONFIG": env_of(head)["FASHIONCHAMELEON_CONFIG"]}
        infos = _code_deployment_infos(monkeypatch, env)
        (app_cfg,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
        merged = override_deployment_info(infos, ServeApplicationSchema.model_validate(app_cfg))
        for dep in app_cfg["deployments"]:
            info = merged[dep["name"]]
            cfg = info.deployment_config
            assert info.replica_config.ray_actor_options["num_gpus"] == dep["ray_actor_options"]["num_gpus"]
            assert cfg.max_ongoing_requests == dep["max_ongoing_requests"]
            assert cfg.graceful_shutdown_timeout_s == dep["graceful_shutdown_timeout_s"]
            if dep.get("num_replicas") == "auto":
                assert cfg.num_replicas is None
                assert cfg.autoscaling_config.min_replicas == dep["autoscaling_config"]["min_replicas"]
                assert cfg.autoscaling_config.max_replicas == dep["autoscaling_config"]["max_replicas"]
            elif "num_replicas" in dep:
                assert cfg.num_replicas == dep["num_replicas"] and cfg.autoscaling_config is None
            else:  # no count in the chart: the code's own policy (the jobs workers scale on queue depth)
                assert cfg.autoscaling_config is not None
        # What the chart does not override keeps the code's value: decode sessions stay sticky,
        # opens go to the generator with the most room.
        routers = {n: merged[n].deployment_config.request_router_config for n in ("generator", "decoder")}
        assert routers["decoder"].request_router_class == STICKY_ROUTER
        assert routers["generator"].request_router_class == HEADROOM_ROUTER
        assert routers["generator"].request_routing_stats_period_s == GENERATOR_ROUTING_STATS_PERIOD_S
        config = json.loads(env["FASHIONCHAMELEON_CONFIG"])
        assert merged["generator"].replica_config.ray_actor_options["num_gpus"] == config["serve"]["generator_gpus"]
