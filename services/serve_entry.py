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
  credentials (env from a Kubernetes Secret), merged into `storage.s3` by `AppConfig.from_env`.
  They never appear in Helm values, ConfigMaps or the Serve config.

The per-deployment options in serveConfigV2 (replicas, autoscaling, GPUs, graceful
shutdown) override what `build_app` declares; the chart renders both from the same values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from shared.config import AppConfig

CONFIG_ENV = "FASHIONCHAMELEON_CONFIG"


def config_from_env(environ: Mapping[str, str] | None = None) -> AppConfig:
    """The application's config from the pod environment (`AppConfig.from_env`, which also
    merges the S3 credentials from their Secret-backed variables)."""
    return AppConfig.from_env(dict(os.environ if environ is None else environ))


def app(args: dict):
    """Serve application builder: the whole suite, configured from the environment."""
    from services.app import build_app

    if args:
        raise ValueError(
            f"services.serve_entry:app takes no Serve args (got {sorted(args)}); "
            f"configure the application through {CONFIG_ENV}"
        )
    return build_app(config_from_env())
