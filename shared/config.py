"""Typed configuration of the service suite, built once at the edge (CLI, Ray app builder).

Components take these objects in their constructors and never read environment variables
themselves. `AppConfig.from_env()` is the one place that does, for containers and Helm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from shared.jobs.config import JobsConfig
from shared.queue.config import RedisConfig
from shared.runtime.pipeline import EngineConfig
from shared.storage.config import StorageConfig


S3_ACCESS_KEY_ENV = "FASHIONCHAMELEON_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "FASHIONCHAMELEON_S3_SECRET_KEY"


def _reveal(value):
    """model_dump output with every SecretStr replaced by its value."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_reveal(v) for v in value]
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Frozen):
    """Which weights: a checkpoint folder, or random weights of a preset (dev and benchmarks)."""

    checkpoint: str | None = None
    preset: str = "tiny"
    weights_seed: int = 0
    engine: EngineConfig = EngineConfig()

    @property
    def model_id(self) -> str:
        return f"checkpoint:{Path(self.checkpoint).name}" if self.checkpoint else f"random:{self.preset}:{self.weights_seed}"


class GeneratorConfig(_Frozen):
    """Admission, pacing and lifetime of interactive sessions on one generator replica."""

    kv_cache_budget_bytes: int | None = None  # None: 90% of free GPU memory, or 4 GiB on CPU
    max_sessions: int = Field(default=64, ge=1)
    realtime: bool = True  # pace generation to playback speed
    lead_chunks: float = Field(default=1.0, ge=0)  # how far ahead of playback a chunk may be ready
    max_client_lag_chunks: int = Field(default=4, ge=1)  # pause when the client is this far behind
    max_chunks_per_session: int = Field(default=100_000, ge=1)
    control_poll_s: float = Field(default=0.05, gt=0)
    reaper_interval_s: float = Field(default=2.0, gt=0)
    open_attempts: int = Field(default=3, ge=1)  # studio re-hashes to another replica when one is full
    drain_timeout_s: float = Field(default=50.0, ge=0)  # keep below Serve's graceful_shutdown_timeout_s
    save_clips: bool = True
    recovery: bool = True  # persist session state so another replica rebuilds a session whose replica died  # store each finished session's MP4 at clips/{tenant}/{session_id}.mp4


class AuthConfig(_Frozen):
    """API keys -> tenants. Keys are secrets: give them by file or environment, never in values."""

    api_keys: dict[str, SecretStr] = Field(default_factory=dict)  # tenant -> key

    def key_to_tenant(self) -> dict[str, str]:
        return {key.get_secret_value(): tenant for tenant, key in self.api_keys.items()}


class LimitsConfig(_Frozen):
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16
    max_prompt_chars: int = 2000
    max_sessions_per_tenant: int = 32
    switch_timeout_s: float = 10.0


class ServeConfig(_Frozen):
    app_name: str = "fashionchameleon"
    grpc_port: int = 9000
    http_port: int = 8000
    generator_replicas: int = 1
    decoder_replicas: int = 1
    encoder_replicas: int = 1
    studio_replicas: int = 1
    generator_gpus: float = 0.0
    decoder_gpus: float = 0.0
    encoder_gpus: float = 0.0


class AppConfig(_Frozen):
    model: ModelConfig = ModelConfig()
    redis: RedisConfig = RedisConfig()
    storage: StorageConfig = StorageConfig()
    generator: GeneratorConfig = GeneratorConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    serve: ServeConfig = ServeConfig()
    jobs: JobsConfig = JobsConfig()
    mode: Literal["dev", "production"] = "dev"

    def to_json(self) -> str:
        """Serialisable form for Ray replicas, secrets revealed (it never leaves the cluster)."""
        return json.dumps(_reveal(self.model_dump(mode="python")), default=str)

    @classmethod
    def from_json(cls, text: str) -> "AppConfig":
        return cls.model_validate_json(text)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "AppConfig":
        """The one place configuration is read from the environment (containers, Helm):
        `FASHIONCHAMELEON_CONFIG` (JSON file path or inline JSON, no secrets) plus secrets from
        Kubernetes Secrets: `FASHIONCHAMELEON_API_KEYS` (JSON tenant -> key),
        `FASHIONCHAMELEON_REDIS_URL`, and `FASHIONCHAMELEON_S3_ACCESS_KEY` /
        `FASHIONCHAMELEON_S3_SECRET_KEY` (both or neither; merged into `storage.s3`)."""
        env = os.environ if environ is None else environ
        raw = env.get("FASHIONCHAMELEON_CONFIG", "{}")
        data = json.loads((Path(raw).read_text() if raw and not raw.lstrip().startswith("{") else raw) or "{}")
        if "FASHIONCHAMELEON_API_KEYS" in env:
            data.setdefault("auth", {})["api_keys"] = json.loads(env["FASHIONCHAMELEON_API_KEYS"])
        if "FASHIONCHAMELEON_REDIS_URL" in env:
            data.setdefault("redis", {})["url"] = env["FASHIONCHAMELEON_REDIS_URL"]
        access, secret = env.get(S3_ACCESS_KEY_ENV), env.get(S3_SECRET_KEY_ENV)
        if access is not None or secret is not None:
            if not (access and secret):
                raise ValueError(f"set both {S3_ACCESS_KEY_ENV} and {S3_SECRET_KEY_ENV}, or neither")
            s3 = (data.get("storage") or {}).get("s3")
            if s3 is None:
                raise ValueError(f"{S3_ACCESS_KEY_ENV} is set but FASHIONCHAMELEON_CONFIG has no storage.s3 section")
            s3["access_key"], s3["secret_key"] = access, secret
        return cls.model_validate(data)
