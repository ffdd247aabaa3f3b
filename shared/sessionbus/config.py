"""Typed configuration of the Redis session registry and message bus.

Built once at the edge (service settings, CLI, tests) and passed to constructors; nothing
in this package reads environment variables.
"""

from __future__ import annotations

from pydantic import Field

from shared.redis_util import RedisConnection


class RedisConfig(RedisConnection):
    """Where Redis is (`RedisConnection`) and how sessions, leases and streams on it are bounded.

    Durations are in seconds, sizes in entries (chunks or commands).
    """

    # A session with no activity (touch) for this long is reaped (ACTIVE -> EXPIRED).
    session_idle_ttl_s: float = Field(default=300.0, gt=0)
    # Ownership lease of the generator replica holding a session's KV cache.
    # Renewed every lease / 3; a killed replica's sessions are rebuilt elsewhere once it lapses,
    # so it bounds a failover's freeze (with one chunk's time), and new sessions skip a dead replica.
    session_lease_s: float = Field(default=5.0, gt=0)
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
