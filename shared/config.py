"""Typed configuration of the service suite, built once at the edge (CLI, Ray app builder).

Components take these objects in their constructors and never read environment variables
themselves. `AppConfig.from_env()` is the one place that does, for containers and Helm.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.jobs.config import JobsConfig
from shared.runtime.config import EngineConfig
from shared.sessionbus.config import RedisConfig
from shared.storage.catalog import DEFAULT_TENANT, validate_slug
from shared.storage.config import StorageConfig

S3_ACCESS_KEY_ENV = "FASHIONCHAMELEON_S3_ACCESS_KEY"
S3_SECRET_KEY_ENV = "FASHIONCHAMELEON_S3_SECRET_KEY"
API_KEYS_ENV = "FASHIONCHAMELEON_API_KEYS"
API_KEY_DIGESTS_ENV = "FASHIONCHAMELEON_API_KEY_DIGESTS"

# An API key is one token of printable ASCII without spaces (it travels in gRPC metadata), at
# least this long: a short key can be guessed. `secrets.token_urlsafe(32)` gives 43 characters.
MIN_API_KEY_CHARS = 16
MAX_API_KEY_CHARS = 512
_API_KEY = re.compile(r"^[\x21-\x7e]+$")
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Tenant names nobody may hold: the owner of the shared garment catalog, which every tenant reads.
RESERVED_TENANTS = frozenset({DEFAULT_TENANT})

# The deployments of the suite and the secrets each one needs (a view of the config per deployment,
# so a replica, and Ray's GCS that stores its constructor arguments, holds nothing else):
#   auth    the API-key digests (Studio authenticates every call)
#   storage the object store's credentials (whoever reads or writes objects)
#   redis   the Redis URL's credentials (whoever talks to Redis)
DEPLOYMENT_SECRETS: dict[str, frozenset[str]] = {
    "studio": frozenset({"auth", "storage", "redis"}),  # uploads, catalog; sessions, jobs
    "encoder": frozenset({"storage"}),  # reads uploaded images by object key
    "decoder": frozenset({"storage"}),  # stores finished clips (when generator.save_clips)
    "generator": frozenset({"redis"}),  # sessions, leases, streams; never touches objects
    "jobs": frozenset({"redis", "storage"}),  # job stream; reads inputs, stores results
    "eval": frozenset({"storage"}),  # benchmark inputs and reports
}


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
        return (
            f"checkpoint:{Path(self.checkpoint).name}"
            if self.checkpoint
            else f"random:{self.preset}:{self.weights_seed}"
        )


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
    # A create waits this long for a generator replica to take it (none may be up: one was killed
    # and Serve is replacing it), then answers UNAVAILABLE with RetryInfo instead of hanging.
    open_timeout_s: float = Field(default=10.0, gt=0)
    drain_timeout_s: float = Field(default=50.0, ge=0)  # keep below Serve's graceful_shutdown_timeout_s
    save_clips: bool = True  # store each finished session's MP4 at clips/{tenant}/{session_id}.mp4
    recovery: bool = True  # persist session state so another replica rebuilds a session whose replica died
    # A garment switch that withdraws the history takes effect at the first chunk the client has not
    # received: a chunk generated and decoded but not yet sent is dropped and generated again wearing
    # the new garment (paced sessions: only when that still makes its playback time).
    redo_undelivered_on_switch: bool = True
    redo_margin_s: float = Field(default=0.1, ge=0)  # what a redone chunk keeps to spare before its playback time
    recovery_attempts: int = Field(default=3, ge=1)  # rebuilds of an orphaned session before it ends FAILED
    # Batched stepping (shared.runtime.batch) and admission by compute (shared.runtime.scheduling).
    max_batch_size: int = Field(default=8, ge=1)  # sessions stepped in one DiT forward at most
    batch_wait_s: float = Field(default=0.005, ge=0)  # a due session waits this long for others to join its batch
    # Batch sizes timed when a replica starts (clipped to max_batch_size and the KV budget); later
    # steps keep the table current. The scheduler only picks sizes it has measured.
    warmup_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    # With `realtime`, admit a session only if every session then still gets its chunks at playback
    # speed with this much compute to spare: round time * (1 + headroom) <= one chunk's playback time.
    admit_by_compute: bool = True
    realtime_headroom: float = Field(default=0.2, ge=0)


def api_key_digest(api_key: str) -> str:
    """Lowercase hex SHA-256 of a key's UTF-8 bytes: what configs carry instead of the key."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _as_list(value):
    return [value] if isinstance(value, (str, SecretStr)) else value


class AuthConfig(_Frozen):
    """API keys -> tenants. Keys are secrets: give them by file or environment, never in values.

    A tenant has one or several keys (several while a key is rotated: add the new key, move the
    clients, remove the old one), given as plaintext `api_keys` or as `api_key_digests` (lowercase
    hex SHA-256 of the key, `api_key_digest(key)`), which a config may hold without holding a
    secret. Deployments only ever receive the digests (`hashed()`, `AppConfig.to_json`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)  # errors never echo a key

    api_keys: dict[str, tuple[SecretStr, ...]] = Field(default_factory=dict)  # tenant -> key(s)
    api_key_digests: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # tenant -> digest(s)

    @field_validator("api_keys", "api_key_digests", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return {tenant: _as_list(keys) for tenant, keys in value.items()} if isinstance(value, dict) else value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: dict[str, tuple[SecretStr, ...]]) -> dict[str, tuple[SecretStr, ...]]:
        for tenant, keys in value.items():
            _check_tenant(tenant)
            if not keys:
                raise ValueError(f"tenant {tenant!r} has an empty list of API keys")
            for i, key in enumerate(keys):
                secret = key.get_secret_value()  # never shown: only its position and length are
                if not _API_KEY.match(secret) or len(secret) > MAX_API_KEY_CHARS:
                    raise ValueError(
                        f"API key #{i} of tenant {tenant!r} must be printable ASCII without spaces, "
                        f"at most {MAX_API_KEY_CHARS} characters"
                    )
                if len(secret) < MIN_API_KEY_CHARS:
                    raise ValueError(
                        f"API key #{i} of tenant {tenant!r} is {len(secret)} characters long; API keys need at "
                        f"least {MIN_API_KEY_CHARS} (make one with: python -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))')"
                    )
        return value

    @field_validator("api_key_digests")
    @classmethod
    def _check_digests(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        out = {}
        for tenant, digests in value.items():
            _check_tenant(tenant)
            if not digests:
                raise ValueError(f"tenant {tenant!r} has an empty list of API key digests")
            lowered = tuple(d.lower() if isinstance(d, str) else d for d in digests)
            for i, digest in enumerate(lowered):
                if not isinstance(digest, str) or not _HEX_DIGEST.match(digest):
                    raise ValueError(f"API key digest #{i} of tenant {tenant!r} must be 64 hex characters (SHA-256)")
            out[tenant] = lowered
        return out

    @model_validator(mode="after")
    def _check_unique(self) -> AuthConfig:
        owners: dict[str, str] = {}
        for tenant, digest in self._pairs():
            if owners.setdefault(digest, tenant) != tenant:
                raise ValueError(f"one API key is configured for two tenants ({owners[digest]!r} and {tenant!r})")
        return self

    def _pairs(self) -> list[tuple[str, str]]:
        """(tenant, digest) of every configured key, plaintext or digest."""
        pairs = [(t, api_key_digest(k.get_secret_value())) for t, keys in self.api_keys.items() for k in keys]
        return pairs + [(t, d) for t, digests in self.api_key_digests.items() for d in digests]

    @property
    def tenants(self) -> list[str]:
        return list(dict.fromkeys([*self.api_keys, *self.api_key_digests]))

    def key_to_tenant(self) -> dict[str, str]:
        """Plaintext key -> tenant, for the keys given in plaintext (tools and tests)."""
        return {key.get_secret_value(): tenant for tenant, keys in self.api_keys.items() for key in keys}

    def digest_to_tenant(self) -> dict[str, str]:
        """Hex SHA-256 of every key -> its tenant (what `ApiKeyAuth.from_digests` takes)."""
        return {digest: tenant for tenant, digest in self._pairs()}

    def hashed(self) -> AuthConfig:
        """The same keys as digests only: no plaintext key leaves the process that read it."""
        by_tenant: dict[str, list[str]] = {}
        for tenant, digest in self._pairs():
            if digest not in by_tenant.setdefault(tenant, []):
                by_tenant[tenant].append(digest)
        return AuthConfig(api_key_digests={tenant: tuple(d) for tenant, d in by_tenant.items()})


def _check_tenant(tenant: str) -> None:
    validate_slug(tenant, "tenant")
    if tenant in RESERVED_TENANTS:
        raise ValueError(f"tenant name {tenant!r} is reserved (the shared garment catalog's owner); choose another")


def _without_url_credentials(url: str) -> str:
    """`url` minus user:password and any username/password query parameters."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode(
        [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in ("password", "username", "user")
        ]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class LimitsConfig(_Frozen):
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    min_image_side: int = 16
    max_prompt_chars: int = 2000
    max_sessions_per_tenant: int = 32
    switch_timeout_s: float = 10.0


class ViewerConfig(_Frozen):
    """Viewer tokens (Studio.CreateViewerToken): a browser's access to one session, in seconds."""

    default_ttl_s: float = Field(default=900.0, gt=0)  # ttl_seconds = 0
    max_ttl_s: float = Field(default=3600.0, gt=0)  # a longer ttl_seconds is INVALID_ARGUMENT
    # POST /v1/player/sessions: the player page opens a session itself with a launch token that
    # `fashionchameleon up` mints for its dev tenant. Off unless the embedded default turns it on.
    dev_launch: bool = False

    @model_validator(mode="after")
    def _check_ttls(self) -> ViewerConfig:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError(f"viewer.default_ttl_s ({self.default_ttl_s}) exceeds viewer.max_ttl_s ({self.max_ttl_s})")
        return self


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
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)  # it holds secrets

    model: ModelConfig = ModelConfig()
    redis: RedisConfig = RedisConfig()
    storage: StorageConfig = StorageConfig()
    generator: GeneratorConfig = GeneratorConfig()
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    serve: ServeConfig = ServeConfig()
    jobs: JobsConfig = JobsConfig()
    viewer: ViewerConfig = ViewerConfig()
    mode: Literal["dev", "production"] = "dev"

    def to_json(self) -> str:
        """Serialisable form for Ray replicas: object-store and Redis credentials revealed (it
        never leaves the cluster), API keys as digests only. A deployment gets
        `for_deployment(name).to_json()`, which holds only the secrets that deployment uses."""
        data = self.model_copy(update={"auth": self.auth.hashed()}).model_dump(mode="python")
        return json.dumps(_reveal(data), default=str)

    def for_deployment(self, name: str) -> AppConfig:
        """This config as deployment `name` (a key of `DEPLOYMENT_SECRETS`) needs it: the secrets
        it does not use are removed (API-key digests outside Studio, object-store credentials
        where no object is read or written, Redis URL credentials where Redis is not used).
        The non-secret sections stay whole."""
        if name not in DEPLOYMENT_SECRETS:
            raise ValueError(f"unknown deployment {name!r}; one of {sorted(DEPLOYMENT_SECRETS)}")
        needs = DEPLOYMENT_SECRETS[name]
        if name == "decoder" and not self.generator.save_clips:
            needs = needs - {"storage"}
        update: dict = {"auth": self.auth.hashed() if "auth" in needs else AuthConfig()}
        if "storage" not in needs and self.storage.s3 is not None:
            anonymous = self.storage.s3.model_copy(update={"access_key": None, "secret_key": None})
            update["storage"] = self.storage.model_copy(update={"s3": anonymous})
        if "redis" not in needs:
            update["redis"] = self.redis.model_copy(update={"url": _without_url_credentials(self.redis.url)})
        return self.model_copy(update=update)

    @classmethod
    def from_json(cls, text: str) -> AppConfig:
        return cls.model_validate_json(text)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> AppConfig:
        """The one place configuration is read from the environment (containers, Helm):
        `FASHIONCHAMELEON_CONFIG` (JSON file path or inline JSON, no secrets) plus secrets from
        Kubernetes Secrets: `FASHIONCHAMELEON_API_KEYS` (JSON tenant -> key, or a list of keys
        while one is rotated), `FASHIONCHAMELEON_API_KEY_DIGESTS` (JSON tenant -> hex SHA-256 of
        a key, or a list; no plaintext needed anywhere),
        `FASHIONCHAMELEON_REDIS_URL`, and `FASHIONCHAMELEON_S3_ACCESS_KEY` /
        `FASHIONCHAMELEON_S3_SECRET_KEY` (both or neither; merged into `storage.s3`)."""
        env = os.environ if environ is None else environ
        raw = env.get("FASHIONCHAMELEON_CONFIG", "{}")
        data = json.loads((Path(raw).read_text() if raw and not raw.lstrip().startswith("{") else raw) or "{}")
        if API_KEYS_ENV in env:
            data.setdefault("auth", {})["api_keys"] = json.loads(env[API_KEYS_ENV])
        if API_KEY_DIGESTS_ENV in env:
            data.setdefault("auth", {})["api_key_digests"] = json.loads(env[API_KEY_DIGESTS_ENV])
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
