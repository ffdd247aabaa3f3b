"""Typed configuration of the Redis session registry and message bus.

Built once at the edge (service settings, CLI, tests) and passed to constructors; nothing
in this package reads environment variables.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis


class RedisConfig(BaseModel):
    """Where Redis is and how sessions, leases and streams on it are bounded.

    Durations are in seconds, sizes in entries (chunks or commands).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = "redis://127.0.0.1:6379/0"
    # Prefix of every key; hash-tag braces are reserved for session ids (see keys.py).
    namespace: str = Field(default="fc", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")

    # A session with no activity (touch) for this long is reaped (ACTIVE -> EXPIRED).
    session_idle_ttl_s: float = Field(default=300.0, gt=0)
    # Ownership lease of the generator replica holding a session's KV cache.
    session_lease_s: float = Field(default=15.0, gt=0)
    # Grace period during which a finished session's keys stay readable (a client drains the
    # last chunks and the end marker; the replica reads the close command), then Redis drops them.
    terminal_retention_s: float = Field(default=60.0, gt=0)

    # Output stream: chunks kept per session for resuming clients (a chunk is ~0.5 s of video).
    output_backlog_max_chunks: int = Field(default=64, ge=1)
    # Chunks fetched per read; chunks are up to a few MB, so keep replies small.
    output_read_count: int = Field(default=8, ge=1)
    # Control stream: commands kept per session (approximate trimming).
    control_backlog_max_commands: int = Field(default=1000, ge=1)
    # Command results kept per session for wait_result wake-ups (approximate trimming).
    result_backlog_max: int = Field(default=1000, ge=1)

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


def connect(config: RedisConfig) -> Redis:
    """An asyncio client for `config`. Responses stay bytes: chunk payloads are binary."""
    return Redis.from_url(
        config.url,
        decode_responses=False,
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=config.socket_connect_timeout_s,
        health_check_interval=config.health_check_interval_s,
        max_connections=config.max_connections,
    )
