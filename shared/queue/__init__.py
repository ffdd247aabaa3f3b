"""Redis as session registry and message bus of interactive sessions.

- `SessionRegistry` (sessions.py): session records, state machine, idle-TTL reaping,
  replica ownership leases.
- `ControlStream` / `OutputStream` (streams.py): per-session commands in, video chunks out.
- `RedisConfig` / `connect` (config.py), `KeySpace` (keys.py): configuration and key names.
"""

from shared.queue.config import RedisConfig, connect
from shared.queue.keys import KeySpace, SessionKeys
from shared.queue.sessions import (
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
from shared.queue.streams import (
    Chunk,
    ChunkExpired,
    ChunkOutOfOrder,
    CommandType,
    ControlCommand,
    ControlStream,
    DuplicateChunk,
    OutputBounds,
    OutputStream,
    QueueError,
    RequestReused,
    SentCommand,
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
    "QueueError",
    "RequestReused",
    "SentCommand",
    "RedisConfig",
    "SessionClosed",
    "SessionExists",
    "SessionKeys",
    "SessionNotFound",
    "SessionRecord",
    "SessionRegistry",
    "SessionState",
    "StreamEnded",
    "connect",
]
