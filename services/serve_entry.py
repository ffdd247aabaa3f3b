"""The production Serve application, as KubeRay's serveConfigV2 imports it.

    applications:
      - name: fashionchameleon
        import_path: services.serve_entry:app

`app` is a Serve application builder: Serve imports this module and calls `app(args)` with
the application's `args` from the Serve config (the Helm chart passes none). Everything the
application needs comes from the pod environment, read once here at the edge:

- `FASHIONCHAMELEON_CONFIG`: the non-secret `AppConfig` (inline JSON, or a JSON file path);
  the Helm chart renders it from values into the Ray containers' environment, so a config
  change changes the RayService pod template and KubeRay rolls out a new cluster.
- `FASHIONCHAMELEON_API_KEYS`, `FASHIONCHAMELEON_REDIS_URL`: read by `AppConfig.from_env`.
- `FASHIONCHAMELEON_S3_ACCESS_KEY`, `FASHIONCHAMELEON_S3_SECRET_KEY`: the object store's
  credentials (env from a Kubernetes Secret), merged into `storage.s3` here. They never
  appear in Helm values, ConfigMaps or the Serve config.

The per-deployment options in serveConfigV2 (replicas, autoscaling, GPUs, graceful
shutdown) override what `build_app` declares; the chart renders both from the same values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from shared.config import AppConfig

CONFIG_ENV = "FASHIONCHAMELEON_CONFIG"
S3_ACCESS_KEY_ENV = "FASHIONCHAMELEON_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "FASHIONCHAMELEON_S3_SECRET_KEY"


def _raw_config(env: Mapping[str, str]) -> dict:
    """The JSON document of FASHIONCHAMELEON_CONFIG, read by the same rules as AppConfig.from_env."""
    raw = env.get(CONFIG_ENV, "{}")
    text = Path(raw).read_text() if raw and not raw.lstrip().startswith("{") else raw
    return json.loads(text or "{}")


def config_from_env(environ: Mapping[str, str] | None = None) -> AppConfig:
    """`AppConfig.from_env` plus the S3 credentials from the environment.

    The credentials only apply when the config's storage section has an `s3` section; both
    or neither must be set (the store refuses half a credential pair).
    """
    env = dict(os.environ if environ is None else environ)
    access, secret = env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV)
    if access is not None or secret is not None:
        if not (access and secret):
            raise ValueError(f"set both {S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV}, or neither")
        data = _raw_config(env)
        s3 = (data.get("storage") or {}).get("s3")
        if s3 is None:
            raise ValueError(f"{S3_ACCESS_KEY_ENV} is set but {CONFIG_ENV} has no storage.s3 section")
        s3["access_key"], s3["secret_key"] = access, secret
        env[CONFIG_ENV] = json.dumps(data)
    return AppConfig.from_env(env)


def app(args: dict):
    """Serve application builder: the whole suite, configured from the environment."""
    from services.app import build_app

    if args:
        raise ValueError(
            f"services.serve_entry:app takes no Serve args (got {sorted(args)}); "
            f"configure the application through {CONFIG_ENV}"
        )
    return build_app(config_from_env())
