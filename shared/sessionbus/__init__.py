"""Redis as session registry and message bus of interactive sessions.

- `SessionRegistry` (sessions.py): session records, state machine, idle-TTL reaping,
  replica ownership leases.
- `ControlStream` / `OutputStream` (streams.py): per-session commands in, video chunks out.
- `RedisConfig` (config.py), `KeySpace` (keys.py): configuration and key names. The Redis
  client (`connect`) and helpers shared with the job queue (shared.jobs) are in shared.redis_util.
"""

from shared.sessionbus.config import RedisConfig
from shared.sessionbus.keys import KeySpace, SessionKeys
from shared.sessionbus.sessions import (
    OPEN_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    LeaseHeld,
    LeaseLost,
    SessionExists,
    SessionRecord,
    SessionRegistry,
    SessionState,
)
from shared.sessionbus.streams import (
    Chunk,
    ChunkExpired,
    ChunkOutOfOrder,
    CommandType,
    ControlCommand,
    ControlStream,
    DuplicateChunk,
    OutputBounds,
    OutputStream,
    RequestReused,
    SentCommand,
    SessionBusError,
    SessionClosed,
    SessionNotFound,
    StreamEnded,
)

__all__ = [
    "OPEN_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "Chunk",
    "ChunkExpired",
    "ChunkOutOfOrder",
    "CommandType",
    "ControlCommand",
    "ControlStream",
    "DuplicateChunk",
    "InvalidTransition",
    "KeySpace",
    "LeaseHeld",
    "LeaseLost",
    "OutputBounds",
    "OutputStream",
    "RedisConfig",
    "RequestReused",
    "SentCommand",
    "SessionBusError",
    "SessionClosed",
    "SessionExists",
    "SessionKeys",
    "SessionNotFound",
    "SessionRecord",
    "SessionRegistry",
    "SessionState",
    "StreamEnded",
]
