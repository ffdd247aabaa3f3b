"""Redis plumbing shared by the session bus (`shared.sessionbus`) and the job queue (`shared.jobs`).

- `RedisConnection` / `connect`: where Redis is and the asyncio client for it (the session bus's
  `RedisConfig` extends it with the bounds of sessions and streams).
- `validate_namespace`, `validate_id`: the checks every key name builder applies.
- `to_str`: a Redis reply (bytes: clients keep `decode_responses=False`, chunks are binary) as text.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

# Ids end up inside key names and hash tags: no braces, no whitespace, bounded length.
_ID_RE = re.compile(r"^[A-Za-z0-9_.:@/\-]{1,128}$")


class RedisConnection(BaseModel):
    """Where Redis is, the key namespace, and the client's socket bounds (seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every key; hash-tag braces are reserved for the keys' own hash tags (session ids in
    # shared/sessionbus/keys.py, `{jobs}` in shared/jobs/keys.py).
    namespace: str = Field(default="fc", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")

    socket_timeout_s: float | None = Field(default=10.0, gt=0)
    socket_connect_timeout_s: float = Field(default=5.0, gt=0)
    health_check_interval_s: float = Field(default=30.0, ge=0)
    max_connections: int | None = Field(default=None, ge=1)

    @property
    def max_block_ms(self) -> int | None:
        """Longest single blocking XREAD that cannot trip the socket timeout (None: unbounded).

        Longer waits are split into slices of this length.
        """
        if self.socket_timeout_s is None:
            return None
        return max(1, int(self.socket_timeout_s * 1000 / 2))


def connect(config: RedisConnection) -> Redis:
    """An asyncio client for `config`. Responses stay bytes: chunk payloads are binary."""
    return Redis.from_url(
        config.url,
        decode_responses=False,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.socket_connect_timeout_s,
        health_check_interval=config.health_check_interval_s,
        max_connections=config.max_connections,
    )


def validate_namespace(namespace: str) -> str:
    """Return `namespace` if it can prefix key names (not empty, no hash-tag braces)."""
    if not namespace or "{" in namespace or "}" in namespace:
        raise ValueError(f"invalid namespace {namespace!r}")
    return namespace


def validate_id(value: str, what: str) -> str:
    """Return `value` if it is usable as a session/tenant/replica/job id inside a key name."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(f"invalid {what} {value!r}: expected 1-128 chars of [A-Za-z0-9_.:@/-]")
    return value


def to_str(value: bytes | str) -> str:
    """A Redis reply value as text (UTF-8)."""
    return value.decode() if isinstance(value, bytes) else value
