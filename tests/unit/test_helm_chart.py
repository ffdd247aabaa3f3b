"""The Helm chart (helm/fashionchameleon) rendered by the real Helm engine, offline.

`helm-python-sdk` binds Helm's Go SDK (v4) through a bundled shared library: lint, schema
validation and rendering here are exactly what `helm lint` / `helm install` do, without a
cluster. Rendered manifests are checked against the Kubernetes schemas bundled in
`kubernetes-validate` (strict: unknown fields fail) and, for custom resources, the minimal
CRD schemas vendored in helm/schemas/. The embedded serveConfigV2 must parse as Ray Serve's
`ServeDeploySchema` and name exactly `services.app.DEPLOYMENTS`.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip(
    "helm_python", reason="helm-python-sdk (Helm's Go SDK for Python) is not installed: pip install helm-python-sdk"
)
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate (bundled Kubernetes JSON schemas) is not installed"
)
import jsonschema
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    gRPCOptionsSchema,
)

from services.app import DEPLOYMENTS, HEALTH_SERVICER, STUDIO_SERVICER
from services.serve_entry import config_from_env
from shared.telemetry.metrics import METRICS, MetricKind

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fashionchameleon"
CRD_SCHEMAS = ROOT / "helm" / "schemas"
KUBE_VERSION = "1.30.0"
SCENARIOS = ["default"] + sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
NAMESPACE = "serving"

# Secrets as the pods would see them (env from secretKeyRef), for config checks.
FAKE_SECRET_ENV = {
    "FASHIONCHAMELEON_API_KEYS": json.dumps({"acme": "key-acme-0123456789"}),
    "FASHIONCHAMELEON_REDIS_URL": "redis://:pw@redis:6379/0",
    "FASHIONCHAMELEON_S3_ACCESS_KEY": "AK",
    "FASHIONCHAMELEON_S3_SECRET_KEY": "SK",
}


# --- rendering ----------------------------------------------------------------------------


def scenario_values(scenario: str) -> dict:
    if scenario == "default":
        return {}
    return yaml.safe_load((CHART / "ci" / f"{scenario}.yaml").read_text()) or {}


@functools.cache
def _chart():
    return helm.Chart.load(str(CHART))


def render(values: dict | None = None, *, name: str = "fc") -> dict[str, str]:
    return _chart().render(values or {}, name=name, namespace=NAMESPACE, is_install=True)


@functools.cache
def _rendered(scenario: str) -> tuple[dict, ...]:
    docs = []
    for template, text in render(scenario_values(scenario)).items():
        if not template.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append({"template": template, "doc": doc})
    return tuple(docs)


def manifests(scenario: str, kind: str | None = None) -> list[dict]:
    return [d["doc"] for d in _rendered(scenario) if kind is None or d["doc"]["kind"] == kind]


def rayservices(scenario: str) -> list[dict]:
    return manifests(scenario, "RayService")


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def pod_templates(rs: dict) -> list[tuple[str, dict]]:
    cluster = rs["spec"]["rayClusterConfig"]
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    return out


def containers(template: dict, *, init: bool = True) -> list[dict]:
    spec = template["spec"]
    return (spec.get("initContainers", []) if init else []) + spec["containers"]


def env_of(container: dict) -> dict:
    """Plain env values, and a marker for secret-sourced ones."""
    out = {}
    for e in container.get("env", []):
        out[e["name"]] = (
            e["value"] if "value" in e else ("<secret>" if "secretKeyRef" in e.get("valueFrom", {}) else "<ref>")
        )
    return out


def schema_error(values: dict) -> str:
    with pytest.raises(helm.HelmValuesError) as excinfo:
        render(values)
    return str(excinfo.value)


# --- lint and render ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints(scenario):
    report = helm.lint(str(CHART), scenario_values(scenario), namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


def test_chart_metadata():
    chart = _chart()
    assert chart.name == "fashionchameleon"
    assert chart.schema is not None, "values.schema.json must ship with the chart"
    assert chart.crds == [], "KubeRay is a prerequisite: the chart ships no CRDs"
    assert chart.dependencies == [], "bundled Redis/S3 are templates, not subcharts"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_renders_expected_kinds(scenario):
    kinds = {d["kind"] for d in manifests(scenario)}
    assert {"RayService", "ConfigMap"} <= kinds
    values = _chart().merge_values(scenario_values(scenario))
    assert ("StatefulSet" in kinds) == (
        values["redis"]["bundled"]["enabled"] or values["objectStore"]["bundled"]["enabled"]
    )
    assert ("PodMonitor" in kinds) == values["monitoring"]["podMonitor"]["enabled"]
    assert ("PrometheusRule" in kinds) == values["monitoring"]["prometheusRule"]["enabled"]
    assert ("NetworkPolicy" in kinds) == values["networkPolicy"]["enabled"]
    assert ("PodDisruptionBudget" in kinds) == values["podDisruptionBudget"]["enabled"]
    assert ("Ingress" in kinds) == values["ingress"]["enabled"]
    assert ("GRPCRoute" in kinds) == values["gateway"]["enabled"]
    assert len(rayservices(scenario)) == (2 if values["canary"]["enabled"] else 1)


# --- Kubernetes and CRD schemas -----------------------------------------------------------


@functools.cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    group = api_version.split("/")[0].split(".")[0]
    version = api_version.split("/")[-1]
    path = CRD_SCHEMAS / f"{kind.lower()}-{group}-{version}.json"
    assert path.is_file(), f"no vendored schema for {kind} {api_version} (expected {path.name})"
    schema = json.loads(path.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _validate_builtin(doc: dict) -> None:
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        raise AssertionError(
            f"{doc['kind']}/{doc['metadata'].get('name')}: {'/'.join(map(str, e.path))}: {e.message}"
        ) from e


def _validate_pod_template(name: str, template: dict) -> None:
    _validate_builtin({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_manifests_validate_against_kubernetes_schemas(scenario):
    for doc in manifests(scenario):
        kind, api = doc["kind"], doc["apiVersion"]
        if "." in api.split("/")[0] and not api.startswith(("networking.k8s.io", "policy", "apps", "batch")):
            errors = sorted(_crd_validator(api, kind).iter_errors(doc), key=lambda e: list(e.path))
            assert not errors, f"{kind}/{doc['metadata']['name']}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
            )
        else:
            _validate_builtin(doc)
        if kind == "RayService":
            for group, template in pod_templates(doc):
                _validate_pod_template(f"{doc['metadata']['name']}-{group}", template)
            svc = doc["spec"]["serveService"]
            _validate_builtin({"apiVersion": "v1", "kind": "Service", **svc})


def test_vendored_crd_schemas_catch_mistakes():
    rs = json.loads(json.dumps(rayservices("default")[0]))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 4  # must be a string
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True  # typo
    errors = list(_crd_validator("ray.io/v1", "RayService").iter_errors(rs))
    assert len(errors) == 2, [e.message for e in errors]


# --- serveConfigV2 against Ray Serve and services.app -------------------------------------


def _unknown_keys(data: dict, model, where: str) -> list[str]:
    """Keys Serve's schemas would silently ignore (they do not forbid extras)."""
    return [f"{where}.{k}" for k in data if k not in model.model_fields]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_is_a_valid_serve_deploy_schema(scenario):
    for rs in rayservices(scenario):
        cfg = serve_config(rs)
        parsed = ServeDeploySchema.model_validate(cfg)
        unknown = _unknown_keys(cfg, ServeDeploySchema, "serveConfigV2")
        unknown += _unknown_keys(cfg["grpc_options"], gRPCOptionsSchema, "grpc_options")
        (app,) = cfg["applications"]
        unknown += _unknown_keys(app, ServeApplicationSchema, "application")
        for dep in app["deployments"]:
            unknown += _unknown_keys(dep, DeploymentSchema, dep["name"])
            unknown += _unknown_keys(
                dep["ray_actor_options"], RayActorOptionsSchema, f"{dep['name']}.ray_actor_options"
            )
            if "autoscaling_config" in dep:
                unknown += _unknown_keys(
                    dep["autoscaling_config"], AutoscalingConfig, f"{dep['name']}.autoscaling_config"
                )
        assert not unknown, f"keys Ray Serve would ignore: {unknown}"
        # grpc.health.v1.Health is routed to the Studio ingress; reflection lists both services
        assert parsed.grpc_options.grpc_servicer_functions == [STUDIO_SERVICER, HEALTH_SERVICER]
        assert cfg["grpc_options"]["enable_reflection"] is True
        assert parsed.grpc_options.port == _chart().merge_values(scenario_values(scenario))["serve"]["grpcPort"]
        (application,) = parsed.applications
        assert application.import_path == "services.serve_entry:app"
        assert not application.args, "services.serve_entry:app takes its config from the environment"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_config_names_exactly_the_code_deployments(scenario):
    for rs in rayservices(scenario):
        (app,) = serve_config(rs)["applications"]
        names = [d["name"] for d in app["deployments"]]
        assert len(names) == len(set(names))
        assert set(names) == set(DEPLOYMENTS), (
            f"serveConfigV2 deployments {sorted(names)} != services.app.DEPLOYMENTS {sorted(DEPLOYMENTS)}: "
            "add/remove the deployment in values.yaml serve.deployments and values.schema.json"
        )


def test_values_schema_lists_exactly_the_code_deployments():
    deployments = _chart().schema["properties"]["serve"]["properties"]["deployments"]
    assert set(deployments["properties"]) == set(DEPLOYMENTS)
    assert set(deployments["required"]) == set(DEPLOYMENTS)
    assert set(_chart().values["serve"]["deployments"]) == set(DEPLOYMENTS)


def test_serve_entry_import_path_resolves_to_an_app_builder():
    import importlib
    import inspect

    module, attr = ["services.serve_entry", "app"]
    builder = getattr(importlib.import_module(module), attr)
    assert inspect.isfunction(builder) and len(inspect.signature(builder).parameters) == 1
    with pytest.raises(ValueError, match="takes no Serve args"):
        builder({"checkpoint": "x"})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_serve_options_follow_values(scenario):
    values = _chart().merge_values(scenario_values(scenario))
    (app,) = serve_config(rayservices(scenario)[0])["applications"]
    for dep in app["deployments"]:
        v = values["serve"]["deployments"][dep["name"]]
        assert dep["ray_actor_options"]["num_gpus"] == v["numGpus"]
        assert dep["max_ongoing_requests"] == v["maxOngoingRequests"]
        assert dep["graceful_shutdown_timeout_s"] == v["gracefulShutdownTimeoutS"]
        if v["autoscaling"]["enabled"]:
            # "auto" (not an int) is what lets the config's autoscaling replace build_app's num_replicas.
            assert dep["num_replicas"] == "auto"
            a = dep["autoscaling_config"]
            assert (a["min_replicas"], a["max_replicas"]) == (
                v["autoscaling"]["minReplicas"],
                v["autoscaling"]["maxReplicas"],
            )
            if dep["name"] == "generator":  # sessions are loops, not requests: real-time capacity
                assert a["policy"] == {
                    "policy_function": "services.generator.scaling:RealtimeCapacityPolicy",
                    "policy_kwargs": {"target_utilisation": v["autoscaling"]["targetUtilisation"]},
                }
                assert "target_ongoing_requests" not in a
            else:
                assert a["target_ongoing_requests"] == v["autoscaling"]["targetOngoingRequests"]
        elif v.get("replicas") is None:  # the code's own replicas/autoscaling stay in force
            assert "num_replicas" not in dep and "autoscaling_config" not in dep
        else:
            assert dep["num_replicas"] == v["replicas"] and "autoscaling_config" not in dep


# --- the application config the pods get ------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pods_get_a_valid_app_config_and_secrets_only_by_reference(scenario):
    values = _chart().merge_values(scenario_values(scenario))
    for rs in rayservices(scenario):
        (app,) = serve_config(rs)["applications"]
        gpus = {d["name"]: d["ray_actor_options"]["num_gpus"] for d in app["deployments"]}
        checkpoint_id = rs["metadata"]["annotations"]["fashionchameleon.io/checkpoint-id"]
        for group, template in pod_templates(rs):
            for c in containers(template):
                env = env_of(c)
                if "FASHIONCHAMELEON_CONFIG" not in env:
                    continue
                # No secret is ever inlined: they all come from secretKeyRef.
                for secret in (
                    "FASHIONCHAMELEON_API_KEYS",
                    "FASHIONCHAMELEON_S3_ACCESS_KEY",
                    "FASHIONCHAMELEON_S3_SECRET_KEY",
                ):
                    assert env.get(secret, "<secret>") == "<secret>", f"{group}/{c['name']}: {secret} inlined"
                if env.get("FASHIONCHAMELEON_REDIS_URL", "<secret>") != "<secret>":
                    assert "@" not in env["FASHIONCHAMELEON_REDIS_URL"], (
                        "a Redis URL with credentials must come from a Secret"
                    )
                raw = json.loads(env["FASHIONCHAMELEON_CONFIG"])
                assert "auth" not in raw and "access_key" not in raw["storage"]["s3"]
                config = config_from_env({**FAKE_SECRET_ENV, "FASHIONCHAMELEON_CONFIG": env["FASHIONCHAMELEON_CONFIG"]})
                assert config.storage.backend == "s3" and config.storage.s3.access_key.get_secret_value() == "AK"
                assert config.auth.key_to_tenant() == {"key-acme-0123456789": "acme"}
                assert config.serve.grpc_port == values["serve"]["grpcPort"]
                for name in ("generator", "decoder", "encoder"):
                    assert getattr(config.serve, f"{name}_gpus") == gpus[name], (
                        "code and serveConfigV2 disagree on GPUs"
                    )
                if checkpoint_id == "none":
                    assert config.model.checkpoint is None
                else:
                    assert config.model.checkpoint.endswith(f"/{checkpoint_id}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_checkpoint_is_synced_before_replicas_start(scenario):
    groups = {g["name"]: g for g in _chart().merge_values(scenario_values(scenario))["rayCluster"]["workerGroups"]}
    for rs in rayservices(scenario):
        checkpoint_id = rs["metadata"]["annotations"]["fashionchameleon.io/checkpoint-id"]
        for group, template in pod_templates(rs)[1:]:  # workers
            inits = {c["name"]: c for c in template["spec"].get("initContainers", [])}
            if checkpoint_id == "none" or groups[group].get("checkpointCache") is False:
                assert "checkpoint-sync" not in inits
                continue
            sync = inits["checkpoint-sync"]
            assert sync["command"][:3] == ["python", "-m", "services.checkpoint_sync"]
            args = sync["command"]
            assert args[args.index("--checkpoint-id") + 1] == checkpoint_id
            cache = args[args.index("--dest") + 1]
            (ray,) = template["spec"]["containers"]
            mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
            assert mounts[cache].get("readOnly") is True, "replicas read the cache, only the init container writes"
            config = json.loads(env_of(ray)["FASHIONCHAMELEON_CONFIG"])
            assert config["model"]["checkpoint"] == f"{cache}/{checkpoint_id}"


def test_checkpoint_change_rolls_out_a_new_cluster():
    a = render({"checkpoint": {"id": "ckpt-a"}})
    b = render({"checkpoint": {"id": "ckpt-b"}})
    rs_a = yaml.safe_load(a["fashionchameleon/templates/rayservice.yaml"].split("---", 1)[1])
    rs_b = yaml.safe_load(b["fashionchameleon/templates/rayservice.yaml"].split("---", 1)[1])
    # KubeRay upgrades with a new RayCluster when rayClusterConfig changes (zero downtime);
    # the Serve config itself is the same.
    assert rs_a["spec"]["rayClusterConfig"] != rs_b["spec"]["rayClusterConfig"]
    assert rs_a["spec"]["serveConfigV2"] == rs_b["spec"]["serveConfigV2"]
    for rs, ckpt in ((rs_a, "ckpt-a"), (rs_b, "ckpt-b")):
        for _, template in pod_templates(rs):
            assert template["metadata"]["annotations"]["fashionchameleon.io/checkpoint-id"] == ckpt


def test_canary_is_a_second_rayservice_with_a_weighted_grpc_route():
    docs = manifests("autoscaled-multi-gpu-values")
    stable, canary = sorted(rayservices("autoscaled-multi-gpu-values"), key=lambda r: r["metadata"]["name"])
    assert canary["metadata"]["name"] == stable["metadata"]["name"] + "-canary"
    assert stable["metadata"]["annotations"]["fashionchameleon.io/checkpoint-id"] == "fc-2026-09-01"
    assert canary["metadata"]["annotations"]["fashionchameleon.io/checkpoint-id"] == "fc-2026-10-01"
    gpu = {g["groupName"]: g for g in canary["spec"]["rayClusterConfig"]["workerGroupSpecs"]}["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 3)
    # Both share Redis (sessions, control streams) so per-call routing may mix them.
    assert (
        json.loads(env_of(pod_templates(stable)[0][1]["spec"]["containers"][0])["FASHIONCHAMELEON_CONFIG"])["redis"]
        == json.loads(env_of(pod_templates(canary)[0][1]["spec"]["containers"][0])["FASHIONCHAMELEON_CONFIG"])["redis"]
    )
    (route,) = [d for d in docs if d["kind"] == "GRPCRoute"]
    refs = {r["name"]: r for r in route["spec"]["rules"][0]["backendRefs"]}
    assert refs == {
        stable["spec"]["serveService"]["metadata"]["name"]: {
            **refs[stable["spec"]["serveService"]["metadata"]["name"]],
            "weight": 90,
        },
        canary["spec"]["serveService"]["metadata"]["name"]: {
            **refs[canary["spec"]["serveService"]["metadata"]["name"]],
            "weight": 10,
        },
    }


def test_canary_through_ingress_nginx():
    out = render(
        {"ingress": {"enabled": True}, "canary": {"enabled": True, "weight": 25, "checkpoint": {"id": "next"}}}
    )
    ingresses = [d for d in yaml.safe_load_all(out["fashionchameleon/templates/ingress.yaml"]) if d]
    by_variant = {i["metadata"]["labels"]["fashionchameleon.io/variant"]: i for i in ingresses}
    assert by_variant["stable"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert "nginx.ingress.kubernetes.io/canary" not in by_variant["stable"]["metadata"]["annotations"]
    assert by_variant["canary"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/canary-weight"] == "25"


# --- the gRPC entry -----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_grpc_entry_is_the_kuberay_serve_service_on_the_studio_port(scenario):
    values = _chart().merge_values(scenario_values(scenario))
    for rs in rayservices(scenario):
        (port,) = rs["spec"]["serveService"]["spec"]["ports"]
        # KubeRay keeps only the port named "serve" on its serve Service.
        assert port["name"] == "serve" and port["port"] == values["serve"]["grpcPort"]
        for _, template in pod_templates(rs):
            (ray,) = template["spec"]["containers"]
            names = {p["name"]: p["containerPort"] for p in ray["ports"]}
            # A container port named "serve" would move KubeRay's HTTP proxy health check to it.
            assert "serve" not in names
            assert names["grpc"] == values["serve"]["grpcPort"] and names["http"] == values["serve"]["httpPort"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_workers_are_ready_by_grpc_health_on_the_studio_port(scenario):
    """Probes of the gRPC port use the standard gRPC health protocol (kubelet's `grpc:` probe)
    for the Studio service; the head keeps KubeRay's own probes (KubeRay deploys the Serve app
    only once the head is ready, so a probe on the app there would never pass)."""
    values = _chart().merge_values(scenario_values(scenario))
    for rs in rayservices(scenario):
        for group, template in pod_templates(rs):
            (ray,) = template["spec"]["containers"]
            if group == "head":
                assert "readinessProbe" not in ray and "livenessProbe" not in ray
                continue
            probe = ray["readinessProbe"]
            assert probe["grpc"] == {"port": values["serve"]["grpcPort"], "service": "fashionchameleon.v1.Studio"}
            timing = {"initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold"}
            assert set(probe) - {"grpc"} <= timing
            assert probe["timeoutSeconds"] < probe["periodSeconds"]
            # liveness stays KubeRay's (raylet health): a Studio outage must not restart pods
            assert "livenessProbe" not in ray
        for doc in manifests(scenario):
            for c in _all_containers(doc):
                for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                    p = c.get(kind) or {}
                    port = (p.get("tcpSocket") or p.get("httpGet") or {}).get("port")
                    assert port not in (values["serve"]["grpcPort"], "grpc"), (
                        f"{c['name']} {kind} probes the gRPC port without gRPC health"
                    )


def _all_containers(doc: dict) -> list[dict]:
    """Every container of a rendered manifest (Deployments, StatefulSets, RayService pods)."""
    if doc.get("kind") == "RayService":
        return [c for _, t in pod_templates(doc) for c in containers(t)]
    template = (doc.get("spec") or {}).get("template")
    return containers(template) if template and "spec" in template else []


# --- observability ------------------------------------------------------------------------

_METRIC_REF = re.compile(r"\bray_(fashionchameleon_[a-z0-9_]+)")


def _catalog_name(name: str) -> str:
    for spec in METRICS.values():
        if name == spec.name:
            return name
        if spec.kind is MetricKind.HISTOGRAM and name in (
            f"{spec.name}_bucket",
            f"{spec.name}_sum",
            f"{spec.name}_count",
        ):
            return spec.name
    raise AssertionError(f"ray_{name} is not in shared/telemetry/metrics.py")


def test_alerts_and_dashboard_use_real_metric_names():
    (rule,) = manifests("default", "PrometheusRule")
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dashboard = json.loads((CHART / "dashboards" / "fashionchameleon.json").read_text())
    panel_exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {_catalog_name(m) for e in exprs + panel_exprs for m in _METRIC_REF.findall(e)}
    for wanted in (
        "time_to_first_chunk_seconds",
        "garment_switch_latency_seconds",
        "rejections_total",
        "job_queue_depth",
        "job_latency_seconds",
        "jobs_dead_lettered_total",
    ):
        assert METRICS[wanted].name in used, wanted
    for expr in exprs + panel_exprs:
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert "fashionchameleon_" not in _METRIC_REF.sub("", expr).replace("fashionchameleon:", ""), (
            f"a fashionchameleon_ metric without Ray's ray_ prefix: {expr}"
        )


def test_alerts_cover_the_sre_signals():
    (rule,) = manifests("default", "PrometheusRule")
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    for alert in (
        "TimeToFirstChunkP99High",
        "GarmentSwitchLatencyP99High",
        "CapacityRejections",
        "RealtimeHeadroomExhausted",
        "RealtimeHeadroomLow",
        "JobQueueAgeHigh",
        "JobQueueStalled",
        "JobsDeadLettered",
        "ReplicaRestarts",
    ):
        rule_ = alerts[f"FashionChameleon{alert}"]
        assert rule_["labels"]["severity"] in ("page", "warning")
        anchor = rule_["annotations"]["runbook_url"].split("#")[1]
        assert anchor.startswith("alert-")
    # capacity alerts read headroom and compute refusals, not request counts
    assert "realtime_headroom" in alerts["FashionChameleonRealtimeHeadroomExhausted"]["expr"]
    assert "compute" in alerts["FashionChameleonCapacityRejections"]["expr"]
    runbook = (ROOT / "helm" / "README.md").read_text()
    for r in alerts.values():
        title = r["annotations"]["runbook_url"].split("#")[1]
        assert title in _markdown_anchors(runbook), f"helm/README.md has no section for #{title}"


def _markdown_anchors(text: str) -> set[str]:
    anchors = set()
    for line in text.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


def test_pod_monitor_scrapes_the_ray_metrics_port():
    (pm,) = manifests("default", "PodMonitor")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    for _, template in pod_templates(rayservices("default")[0]):
        (ray,) = template["spec"]["containers"]
        assert "metrics" in {p["name"] for p in ray["ports"]}
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())


def test_grafana_dashboard_configmap():
    (cm,) = [d for d in manifests("default", "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(cm["data"]["fashionchameleon.json"])
    assert dashboard["uid"] == "fashionchameleon" and len(dashboard["panels"]) >= 10
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


# --- safety -------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_everything_runs_non_root_with_resource_requests(scenario):
    for doc in manifests(scenario):
        if doc["kind"] == "RayService":
            templates = [t for _, t in pod_templates(doc)]
        elif doc["kind"] in ("StatefulSet", "Job"):
            templates = [doc["spec"]["template"]]
        else:
            continue
        for template in templates:
            pod_sc = template["spec"]["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc.get("runAsUser", 1) != 0
            for c in containers(template):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert c["resources"].get("requests"), f"{doc['metadata']['name']}/{c['name']} has no requests"
                if sc.get("runAsUser") == 0:  # the optional hostPath chown: root with CAP_CHOWN only
                    assert c["name"] == "cache-permissions" and sc["capabilities"]["add"] == ["CHOWN"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gpu_groups_request_gpus_and_cpu_groups_do_not(scenario):
    values = _chart().merge_values(scenario_values(scenario))
    groups = {g["name"]: g for g in values["rayCluster"]["workerGroups"]}
    for rs in rayservices(scenario):
        for spec in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            (ray,) = spec["template"]["spec"]["containers"]
            limit = ray["resources"].get("limits", {}).get("nvidia.com/gpu")
            if groups[spec["groupName"]]["type"] == "gpu":
                assert (
                    limit == groups[spec["groupName"]]["gpus"]
                    and ray["resources"]["requests"]["nvidia.com/gpu"] == limit
                )
            else:
                assert limit is None


def test_graceful_drain_outlasts_the_generator_shutdown():
    rs = rayservices("default")[0]
    generator = {d["name"]: d for d in serve_config(rs)["applications"][0]["deployments"]}["generator"]
    for _, template in pod_templates(rs)[1:]:
        (ray,) = template["spec"]["containers"]
        assert ray["lifecycle"]["preStop"]["exec"]["command"] == ["/bin/bash", "/etc/fashionchameleon/drain.sh"]
        deadline = float(env_of(ray)["FC_DRAIN_DEADLINE_S"])
        assert deadline >= generator["graceful_shutdown_timeout_s"]
        assert template["spec"]["terminationGracePeriodSeconds"] > deadline
    subprocess.run(["bash", "-n", str(CHART / "files" / "drain.sh")], check=True)


def test_network_policies_expose_only_grpc_and_metrics():
    docs = manifests("cpu-dev-values")  # bundled Redis and S3
    policies = {p["metadata"]["name"]: p for p in docs if p["kind"] == "NetworkPolicy"}
    ray = policies["fc-fashionchameleon-ray"]
    external_ports = set()
    for rule in ray["spec"]["ingress"]:
        sources = rule.get("from")
        same_release = sources and all("podSelector" in s and "namespaceSelector" not in s for s in sources)
        operator = sources and all(
            s.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") == "kuberay-operator"
            for s in sources
        )
        if not same_release and not operator:
            external_ports |= {p["port"] for p in rule["ports"]}
    assert external_ports == {9000, 8080}
    for name, port in (("fc-fashionchameleon-redis", 6379), ("fc-fashionchameleon-object-store", 8333)):
        (rule,) = policies[name]["spec"]["ingress"]
        assert [p["port"] for p in rule["ports"]] == [port]
        (source,) = rule["from"]
        assert (
            "namespaceSelector" not in source
            and source["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "fc"
        )


def test_pod_disruption_budgets_cover_each_worker_group():
    docs = manifests("autoscaled-multi-gpu-values")
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == 4  # (gpu, gateway) x (stable, canary)
    for pdb in pdbs:
        assert pdb["spec"]["maxUnavailable"] == 1
        assert "fashionchameleon.io/worker-group" in pdb["spec"]["selector"]["matchLabels"]


def test_bundled_dependencies_generate_their_secrets():
    docs = manifests("cpu-dev-values")
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    redis = secrets["fc-fashionchameleon-redis"]["stringData"]
    assert (
        redis["url"] == f"redis://:{redis['password']}@fc-fashionchameleon-redis:6379/0"
        and len(redis["password"]) == 32
    )
    s3 = secrets["fc-fashionchameleon-s3"]["stringData"]
    ident = json.loads(s3["s3.json"])["identities"][0]["credentials"][0]
    assert ident == {"accessKey": s3["access-key"], "secretKey": s3["secret-key"]}
    (ray,) = pod_templates(rayservices("cpu-dev-values")[0])[0][1]["spec"]["containers"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in ray["env"] if "valueFrom" in e}
    assert refs["FASHIONCHAMELEON_REDIS_URL"] == "fc-fashionchameleon-redis"
    assert refs["FASHIONCHAMELEON_S3_ACCESS_KEY"] == "fc-fashionchameleon-s3"


# --- values.schema.json rejects bad values with a readable message ------------------------


def test_schema_rejects_negative_replicas():
    msg = schema_error({"serve": {"deployments": {"generator": {"replicas": -1}}}})
    assert "/serve/deployments/generator/replicas" in msg and "minimum" in msg
    msg = schema_error(
        {
            "rayCluster": {
                "workerGroups": [
                    {"name": "gpu", "type": "gpu", "gpus": 1, "replicas": -2, "minReplicas": 0, "maxReplicas": 2}
                ]
            }
        }
    )
    assert "/rayCluster/workerGroups/0/replicas" in msg


def test_schema_rejects_a_missing_redis_url():
    msg = schema_error({"redis": {"url": "", "urlSecret": {"name": ""}, "bundled": {"enabled": False}}})
    assert "/redis/url" in msg and "/redis/urlSecret/name" in msg
    # Each of the three ways is enough.
    render({"redis": {"url": "redis://redis.internal:6379/0", "urlSecret": {"name": ""}}})
    render({"redis": {"urlSecret": {"name": ""}, "bundled": {"enabled": True}}})


def test_schema_rejects_credentials_in_values():
    assert "/redis/url" in schema_error({"redis": {"url": "redis://:hunter2@redis:6379/0"}})
    assert "/appConfig/auth" in schema_error({"appConfig": {"auth": {"api_keys": {"acme": "k"}}}})
    assert "/appConfig/storage" in schema_error({"appConfig": {"storage": {"s3": {"secret_key": "x"}}}})


def test_schema_rejects_gpus_on_a_cpu_group():
    group = {"name": "cpu", "type": "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1}
    msg = schema_error({"rayCluster": {"workerGroups": [{**group, "gpus": 1}]}})
    assert "/rayCluster/workerGroups/0/gpus" in msg and "must be 0" in msg
    msg = schema_error(
        {"rayCluster": {"workerGroups": [{**group, "gpus": 0, "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}
    )
    assert "/rayCluster/workerGroups/0/resources/limits" in msg
    assert "/rayCluster/workerGroups/0/gpus" in schema_error(
        {"rayCluster": {"workerGroups": [{**group, "type": "gpu", "gpus": 0}]}}
    )


def test_schema_rejects_unknown_keys_and_bad_types():
    assert "additional properties 'replicaCount' not allowed" in schema_error({"replicaCount": 3})
    assert "/serve/deployments/generator" in schema_error({"serve": {"deployments": {"generator": {"numGPUs": 1}}}})
    assert "/checkpoint/id" in schema_error({"checkpoint": {"id": "../etc"}})
    assert "/canary/weight" in schema_error({"canary": {"weight": 150}})


def test_templates_reject_inconsistent_values_with_a_readable_message():
    cpu_only = {
        "rayCluster": {
            "workerGroups": [
                {"name": "cpu", "type": "cpu", "gpus": 0, "replicas": 1, "minReplicas": 1, "maxReplicas": 1}
            ]
        }
    }
    with pytest.raises(
        helm.HelmError, match=r"serve\.deployments\.\w+\.numGpus is .* no rayCluster\.workerGroups entry has gpus > 0"
    ):
        render(cpu_only)
    with pytest.raises(helm.HelmError, match=r"minReplicas 3 > maxReplicas 2"):
        render(
            {
                "serve": {
                    "deployments": {"generator": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}}
                }
            }
        )
    with pytest.raises(helm.HelmError, match=r"canary\.enabled needs ingress\.enabled or gateway\.enabled"):
        render({"canary": {"enabled": True}})
    with pytest.raises(
        helm.HelmError, match=r"workerGroups\[0\] \(gpu\): terminationGracePeriodSeconds 660 .* at least 960"
    ):
        render({"serve": {"deployments": {"generator": {"gracefulShutdownTimeoutS": 900}}}})
    # KubeRay's proxy health checks probe 8000: the HTTP port is fixed.
    assert "/serve/httpPort" in schema_error({"serve": {"httpPort": 8080}})


# --- the image recipe ---------------------------------------------------------------------


def test_dockerfile_matches_the_chart_and_the_project():
    import tomllib

    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    values = _chart().values
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    (extras,) = re.findall(r'pip install --no-build-isolation "\.\[([a-z,]+)\]"', dockerfile)
    assert set(extras.split(",")) == {"serve", "gpu"}
    assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert int(user[0]) == values["podSecurityContext"]["runAsUser"] != 0
    assert int(user[1]) == values["podSecurityContext"]["runAsGroup"]
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_RUNTIME_TAG\} AS runtime$", dockerfile, re.M)
    assert "wget" in dockerfile and "bash" in dockerfile, "KubeRay's probes need wget and bash in the image"
    (ray_pin,) = [d for d in pyproject["project"]["optional-dependencies"]["serve"] if d.startswith("ray[")]
    major_minor = re.search(r"==(\d+\.\d+)", ray_pin).group(1)
    assert values["rayVersion"].startswith(major_minor + "."), f"chart rayVersion {values['rayVersion']} vs {ray_pin}"


def test_replicas_null_keeps_the_code_scaling():
    out = render({"serve": {"deployments": {"encoder": {"replicas": None}}}})
    rs = yaml.safe_load(out["fashionchameleon/templates/rayservice.yaml"].split("---", 1)[1])
    (app,) = serve_config(rs)["applications"]
    encoder = {d["name"]: d for d in app["deployments"]}["encoder"]
    assert "num_replicas" not in encoder and "autoscaling_config" not in encoder
    DeploymentSchema.model_validate(encoder)
