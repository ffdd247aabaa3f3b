"""Per-session Redis streams: control commands in, video chunks out.

`ControlStream`: gateway replicas `send` SwitchGarment / UpdatePrompt / Close commands; the
generator replica holding the session `read`s them in order, applies each at a chunk
boundary and `ack_result`s the chunk index where it takes effect; the gateway that accepted
the command `wait_result`s for that index to tell its client.

`OutputStream`: the replica `append`s chunk k with stream id `k+1-0`, so ids are the chunk
indices, a duplicate append is refused by Redis itself and a resume from index k is an exact
range read. Appends must be contiguous (0, 1, 2, ...), so a missing index below the oldest
kept entry can only mean it was trimmed (`ChunkExpired`). `end(reason)` writes one marker at
the next index; readers stop there (`StreamEnded`), appends after it are refused.

Every write runs as a Lua script that first checks the session record (same hash slot, see
keys.py): nothing is written for a session whose record is gone, and keys written after the
session finished inherit the record's remaining lifetime, so a session's keys expire together.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from enum import StrEnum
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from shared.redis_util import to_str
from shared.sessionbus.config import RedisConfig
from shared.sessionbus.keys import KeySpace, SessionKeys

# --------------------------------------------------------------------------- errors


class SessionBusError(Exception):
    """Base of every error raised by shared.sessionbus."""


class SessionNotFound(SessionBusError):
    """No such session (or, from `get_for_tenant`, not one of this tenant's sessions)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class SessionClosed(SessionBusError):
    """The session no longer accepts this operation (it is closing or finished)."""

    def __init__(self, session_id: str, detail: str = "") -> None:
        super().__init__(f"session {session_id!r} is closed" + (f": {detail}" if detail else ""))
        self.session_id = session_id


class ChunkOutOfOrder(SessionBusError):
    """An appended chunk index is not the next one (`expected`)."""

    def __init__(self, index: int, expected: int) -> None:
        super().__init__(f"chunk {index} appended out of order; next expected index is {expected}")
        self.index = index
        self.expected = expected


class DuplicateChunk(ChunkOutOfOrder):
    """The chunk index was already appended."""


class RequestReused(SessionBusError):
    """A request_id was already used on this session for a different request body."""

    def __init__(self, session_id: str, command_id: str) -> None:
        super().__init__(f"request_id already used on session {session_id!r} for a different request")
        self.session_id = session_id
        self.command_id = command_id


class ChunkExpired(SessionBusError):
    """The requested chunk was trimmed from the backlog; `oldest` is the oldest one kept."""

    def __init__(self, index: int, oldest: int) -> None:
        super().__init__(f"chunk {index} is no longer in the backlog (oldest kept chunk is {oldest})")
        self.index = index
        self.oldest = oldest


class StreamEnded(SessionBusError):
    """The output stream ended before the requested chunk; `end_index` is the marker's index."""

    def __init__(self, reason: str, end_index: int) -> None:
        super().__init__(f"output stream ended at chunk index {end_index}: {reason}")
        self.reason = reason
        self.end_index = end_index


# --------------------------------------------------------------------------- wire schema

# Control entry: t=<CommandType> p=<json payload> ts=<issued_at, unix s>
# Result event:  c=<command id> i=<effective chunk index>
# Output chunk:  i=<chunk index> p=<payload bytes> m=<json meta>;  id = "<i+1>-0"
# Output end:    i=<index of the marker> end=<reason>;              id = "<i+1>-0"
# Results hash:  <command id> -> <effective chunk index>, plus CURSOR -> highest acked id

RESULTS_CURSOR_FIELD = "cursor"

# Lua shared by the scripts here and in sessions.py. Record fields used: `closing_at` is set
# when the session stops accepting commands (the close command was published).
LUA_LIB = r"""
local function inherit_ttl(record, key)
  local ttl = redis.call('PTTL', record)
  if ttl > 0 and redis.call('EXISTS', key) == 1 then redis.call('PEXPIRE', key, ttl) end
end

local function id_ms(id)
  return tonumber(string.match(id, '^(%d+)-'))
end

local function id_less(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(a_seq) < tonumber(b_seq)
end

local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end

-- Next chunk index of an output stream and the end reason if it has ended.
local function output_tail(output)
  local last = redis.call('XREVRANGE', output, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0, nil end
  local ended = field(last[1][2], 'end')
  if ended then return id_ms(last[1][1]) - 1, ended end
  return id_ms(last[1][1]), nil
end

-- Write the end marker unless there is one; returns its index and reason.
local function write_end(output, reason, maxlen)
  local next_index, ended = output_tail(output)
  if ended then return next_index, ended end
  redis.call('XADD', output, 'MAXLEN', maxlen, string.format('%d-0', next_index + 1),
             'i', next_index, 'end', reason)
  return next_index, reason
end

local function publish(control, maxlen, ctype, payload, ts)
  return redis.call('XADD', control, 'MAXLEN', '~', maxlen, '*', 't', ctype, 'p', payload, 'ts', ts)
end
"""

_SEND_LUA = (
    LUA_LIB
    + r"""
-- KEYS: record, control, request record (idempotency), prompt revision counter
-- ARGV: maxlen, type, payload json, issued_at, request fingerprint ('' = no request_id),
--       request record ttl (s), assign a prompt revision ('1' / '0')
-- One step: the request_id check, the revision assignment and the XADD, so a retried request
-- never publishes twice and revisions are published in the order they are assigned.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
if ARGV[5] ~= '' then
  local prev = redis.call('HMGET', KEYS[3], 'fp', 'id', 'rev')
  if prev[2] then return {'DUPLICATE', prev[2], prev[3] or '', prev[1] or ''} end
end
if redis.call('HEXISTS', KEYS[1], 'closing_at') == 1 then return {'CLOSED'} end
local payload, rev = ARGV[3], ''
if ARGV[7] == '1' then
  local n = redis.call('INCR', KEYS[4])
  redis.call('EXPIRE', KEYS[4], ARGV[6])
  local p = cjson.decode(payload)
  p['revision'] = n
  payload = cjson.encode(p)
  rev = tostring(n)
end
local id = publish(KEYS[2], ARGV[1], ARGV[2], payload, ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[3], 'fp', ARGV[5], 'id', id, 'rev', rev)
  redis.call('EXPIRE', KEYS[3], ARGV[6])
end
inherit_ttl(KEYS[1], KEYS[3])
inherit_ttl(KEYS[1], KEYS[4])
return {'OK', id, rev}
"""
)

_ACK_LUA = (
    LUA_LIB
    + r"""
-- KEYS: record, results, result_events   ARGV: command id, chunk index, maxlen, cursor field
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
local prev = redis.call('HGET', KEYS[2], ARGV[1])
if prev then return {'OK', prev} end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local cursor = redis.call('HGET', KEYS[2], ARGV[4])
if (not cursor) or id_less(cursor, ARGV[1]) then redis.call('HSET', KEYS[2], ARGV[4], ARGV[1]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'c', ARGV[1], 'i', ARGV[2])
inherit_ttl(KEYS[1], KEYS[2])
inherit_ttl(KEYS[1], KEYS[3])
return {'OK', ARGV[2]}
"""
)

_APPEND_LUA = (
    LUA_LIB
    + r"""
-- KEYS: record, output   ARGV: chunk index, payload, meta json, maxlen
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
local next_index, ended = output_tail(KEYS[2])
if ended then return {'ENDED', ended, next_index} end
local index = tonumber(ARGV[1])
if index < next_index then return {'DUPLICATE', next_index} end
if index > next_index then return {'GAP', next_index} end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], string.format('%d-0', index + 1),
           'i', ARGV[1], 'p', ARGV[2], 'm', ARGV[3])
inherit_ttl(KEYS[1], KEYS[2])
return {'OK'}
"""
)

_END_LUA = (
    LUA_LIB
    + r"""
-- KEYS: record, output   ARGV: reason, maxlen
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
local index, reason = write_end(KEYS[2], ARGV[1], ARGV[2])
inherit_ttl(KEYS[1], KEYS[2])
return {'OK', index, reason}
"""
)


def _index_of(stream_id: bytes | str) -> int:
    """Chunk index of an output-stream entry id `<index+1>-0`."""
    return int(to_str(stream_id).split("-", 1)[0]) - 1


def _stream_entries(response: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of a single-stream XREAD reply, for RESP2 and RESP3 reply shapes."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3: {key: [[entries]]}
        (entries,) = response.values()
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        return list(entries)
    return list(response[0][1])  # RESP2: [[key, [entries]]]


class _StreamReader:
    """XREAD on one key with waits longer than the socket timeout split into slices."""

    def __init__(self, redis: Redis, config: RedisConfig) -> None:
        self._redis = redis
        self._max_block_ms = config.max_block_ms

    async def after(
        self, key: str, after_id: bytes | str, count: int | None, block_ms: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries with ids > `after_id`; waits up to `block_ms` for the first (None: no wait)."""
        if not block_ms or block_ms <= 0:
            return _stream_entries(await self._redis.xread({key: after_id}, count=count))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                return []
            slice_ms = remaining_ms if self._max_block_ms is None else min(remaining_ms, self._max_block_ms)
            response = await self._redis.xread({key: after_id}, count=count, block=max(1, slice_ms))
            entries = _stream_entries(response)
            if entries:
                return entries


# --------------------------------------------------------------------------- control stream


class CommandType(StrEnum):
    SWITCH_GARMENT = "switch_garment"
    UPDATE_PROMPT = "update_prompt"
    CLOSE = "close"


class ControlCommand(BaseModel):
    """One command for the replica holding a session. `payload` must be JSON-serializable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: CommandType
    payload: dict[str, Any] = Field(default_factory=dict)
    issued_at: float | None = None  # unix seconds, filled in by `ControlStream.send`


def encode_command_payload(payload: dict[str, Any]) -> str:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _decode_command(fields: dict[bytes, bytes]) -> ControlCommand:
    return ControlCommand(
        type=CommandType(to_str(fields[b"t"])),
        payload=json.loads(fields[b"p"]),
        issued_at=float(fields[b"ts"]),
    )


REQUEST_RECORD_TTL_S = 24 * 3600  # how long a control request_id is remembered (at most the session's life)


class SentCommand(NamedTuple):
    command_id: str
    revision: int | None  # prompt revision assigned with the command (assign_revision)
    duplicate: bool  # the request_id was seen before: nothing was published


class ControlStream:
    """Ordered commands for one session. Command ids are Redis stream ids (`<ms>-<seq>`).

    `last_id` is the reader's cursor: `read()` without an explicit id continues after the
    last command it returned. A replica that takes over a session starts from
    `last_acked_id()` so it neither skips nor re-applies commands.
    """

    def __init__(
        self,
        redis: Redis,
        config: RedisConfig,
        session_id: str,
        *,
        start_id: str = "0-0",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session_id = session_id
        self.last_id = start_id
        self._redis = redis
        self._config = config
        self._keys: SessionKeys = KeySpace(config.namespace).session(session_id)
        self._reader = _StreamReader(redis, config)
        self._clock = clock
        self._send = redis.register_script(_SEND_LUA)
        self._ack = redis.register_script(_ACK_LUA)

    async def send(self, command: ControlCommand) -> str:
        """Append `command`; returns its id. Raises SessionNotFound / SessionClosed."""
        return (await self.send_once(command)).command_id

    async def send_once(
        self,
        command: ControlCommand,
        *,
        request_id: str | None = None,
        fingerprint: str = "",
        assign_revision: bool = False,
    ) -> SentCommand:
        """Append `command` once per `request_id` (None: always), in one atomic step.

        A request_id seen before on this session returns the first command's id and revision
        (`duplicate=True`) without publishing, or raises RequestReused when `fingerprint` (a
        digest of the request body) differs. With `assign_revision` the next prompt revision is
        taken from the session's counter and written into the payload as "revision" in the
        same step, so commands reach the stream in revision order. Raises SessionNotFound /
        SessionClosed."""
        if request_id is not None and not fingerprint:
            fingerprint = "-"
        space = KeySpace(self._config.namespace)
        request_key = space.session_request(self.session_id, request_id or "-")
        status, *rest = await self._send(
            keys=[self._keys.record, self._keys.control, request_key, space.prompt_revision(self.session_id)],
            args=[
                self._config.control_backlog_max_commands,
                command.type.value,
                encode_command_payload(command.payload),
                self._clock(),
                fingerprint if request_id is not None else "",
                REQUEST_RECORD_TTL_S,
                "1" if assign_revision else "0",
            ],
        )
        status = to_str(status)
        if status == "NOT_FOUND":
            raise SessionNotFound(self.session_id)
        if status == "CLOSED":
            raise SessionClosed(self.session_id, "no longer accepts commands")
        command_id, revision = to_str(rest[0]), to_str(rest[1])
        if status == "DUPLICATE":
            if to_str(rest[2]) != fingerprint:
                raise RequestReused(self.session_id, command_id)
            return SentCommand(command_id, int(revision) if revision else None, True)
        return SentCommand(command_id, int(revision) if revision else None, False)

    async def read(
        self, last_id: str | None = None, block_ms: int | None = None, count: int | None = 100
    ) -> list[tuple[str, ControlCommand]]:
        """Commands after `last_id` (default: the cursor), oldest first; waits up to
        `block_ms` for the first one (None: return at once). Advances the cursor."""
        after = self.last_id if last_id is None else last_id
        entries = await self._reader.after(self._keys.control, after, count, block_ms)
        commands = [(to_str(entry_id), _decode_command(fields)) for entry_id, fields in entries]
        if commands:
            self.last_id = commands[-1][0]
        return commands

    async def ack_result(self, command_id: str, effective_chunk_index: int) -> int:
        """Record the chunk index at which `command_id` takes effect and wake waiters.

        The first ack wins: acking again returns the recorded index unchanged.
        """
        if effective_chunk_index < 0:
            raise ValueError(f"effective_chunk_index must be >= 0, got {effective_chunk_index}")
        _index_of(command_id)  # validates the id format
        status, *rest = await self._ack(
            keys=[self._keys.record, self._keys.results, self._keys.result_events],
            args=[command_id, effective_chunk_index, self._config.result_backlog_max, RESULTS_CURSOR_FIELD],
        )
        if to_str(status) == "NOT_FOUND":
            raise SessionNotFound(self.session_id)
        return int(rest[0])

    async def result(self, command_id: str) -> int | None:
        """The acked chunk index of `command_id`, or None if not acked (yet)."""
        value = await self._redis.hget(self._keys.results, command_id)
        return None if value is None else int(value)

    async def last_acked_id(self) -> str:
        """Highest acked command id ("0-0" if none): where a new owner resumes reading."""
        value = await self._redis.hget(self._keys.results, RESULTS_CURSOR_FIELD)
        return "0-0" if value is None else to_str(value)

    async def wait_result(self, command_id: str, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for `command_id` to be acked; its effective chunk index or None."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hget(self._keys.results, command_id)
            pipe.xrevrange(self._keys.result_events, count=1)
            value, top = await pipe.execute()
        if value is not None:
            return int(value)
        after: bytes | str = top[0][0] if top else "0-0"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        wanted = command_id.encode()
        while (remaining_ms := int((deadline - loop.time()) * 1000)) > 0:
            for entry_id, fields in await self._reader.after(self._keys.result_events, after, 100, remaining_ms):
                if fields[b"c"] == wanted:
                    return int(fields[b"i"])
                after = entry_id
        return None


# --------------------------------------------------------------------------- output stream


class Chunk(NamedTuple):
    # chunk index within the session's stream (0-based); shadows tuple.index, which nobody calls here
    index: int  # type: ignore[assignment]
    payload: bytes
    meta: dict[str, Any]


class OutputBounds(NamedTuple):
    oldest: int | None  # oldest chunk index still kept, None if no chunk is kept
    next_index: int  # index the next append must use (== end marker index once ended)
    end_reason: str | None


class OutputStream:
    """Video chunks of one session, resumable from any index still in the backlog."""

    def __init__(self, redis: Redis, config: RedisConfig, session_id: str) -> None:
        self.session_id = session_id
        self._redis = redis
        self._config = config
        self._keys: SessionKeys = KeySpace(config.namespace).session(session_id)
        self._reader = _StreamReader(redis, config)
        self._append = redis.register_script(_APPEND_LUA)
        self._end = redis.register_script(_END_LUA)

    async def append(self, chunk_index: int, payload: bytes, meta: dict[str, Any] | None = None) -> None:
        """Append chunk `chunk_index`, which must be the next index (0, 1, 2, ...).

        Raises DuplicateChunk (already appended), ChunkOutOfOrder (would leave a gap),
        StreamEnded (after `end`), SessionNotFound. Keeps the newest
        `output_backlog_max_chunks` entries.
        """
        if chunk_index < 0:
            raise ValueError(f"chunk_index must be >= 0, got {chunk_index}")
        status, *rest = await self._append(
            keys=[self._keys.record, self._keys.output],
            args=[
                chunk_index,
                bytes(payload),
                json.dumps(meta or {}, separators=(",", ":")),
                self._config.output_backlog_max_chunks,
            ],
        )
        status = to_str(status)
        if status == "OK":
            return
        if status == "NOT_FOUND":
            raise SessionNotFound(self.session_id)
        if status == "ENDED":
            raise StreamEnded(to_str(rest[0]), int(rest[1]))
        if status == "DUPLICATE":
            raise DuplicateChunk(chunk_index, int(rest[0]))
        if status == "GAP":
            raise ChunkOutOfOrder(chunk_index, int(rest[0]))
        raise SessionBusError(f"unexpected append status {status!r}")

    async def end(self, reason: str) -> int:
        """Write the end-of-stream marker (idempotent); returns its index (== chunks written)."""
        status, *rest = await self._end(
            keys=[self._keys.record, self._keys.output],
            args=[reason, self._config.output_backlog_max_chunks],
        )
        if to_str(status) == "NOT_FOUND":
            raise SessionNotFound(self.session_id)
        return int(rest[0])

    async def bounds(self) -> OutputBounds:
        """Oldest kept chunk, next index and end reason, e.g. to pick a resume point."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xrange(self._keys.output, count=1)
            pipe.xrevrange(self._keys.output, count=1)
            first, last = await pipe.execute()
        if not last:
            return OutputBounds(None, 0, None)
        first_id, first_fields = first[0]
        last_id, last_fields = last[0]
        oldest = None if b"end" in first_fields else _index_of(first_id)
        if b"end" in last_fields:
            return OutputBounds(oldest, _index_of(last_id), to_str(last_fields[b"end"]))
        return OutputBounds(oldest, _index_of(last_id) + 1, None)

    async def read_from(self, index: int, block_ms: int | None = None, count: int | None = None) -> list[Chunk]:
        """Chunks `index, index+1, ...` (at most `count`), waiting up to `block_ms` for the first.

        Returns [] if nothing arrived in time. Raises ChunkExpired if `index` was trimmed,
        StreamEnded if the stream ended at or before `index` (chunks before the end marker are
        returned first; the call after them raises), SessionNotFound if the session is gone.
        """
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        count = count or self._config.output_read_count
        after = f"{index}-0"  # ids > this start at chunk `index` (id `index+1-0`)
        entries = await self._reader.after(self._keys.output, after, count, None)
        if not entries:
            await self._check_waitable(index)
            if block_ms:
                entries = await self._reader.after(self._keys.output, after, count, block_ms)
        return self._decode(index, entries)

    async def iterate(
        self,
        from_index: int = 0,
        *,
        stop_event: asyncio.Event | None = None,
        block_ms: int = 1000,
        count: int | None = None,
    ) -> AsyncIterator[Chunk]:
        """Yield chunks from `from_index` in order, exactly once each, until the end marker
        or until `stop_event` is set (checked at least every `block_ms`). Raises ChunkExpired
        if the reader falls behind the backlog, SessionNotFound if the session disappears.
        Cancelling the consuming task mid-wait is safe."""
        next_index = from_index
        while stop_event is None or not stop_event.is_set():
            try:
                chunks = await self.read_from(next_index, block_ms=block_ms, count=count)
            except StreamEnded:
                return
            for chunk in chunks:
                yield chunk
                next_index = chunk.index + 1

    async def _check_waitable(self, index: int) -> None:
        """Raise instead of waiting for a chunk that can never come: the stream ended before
        `index`, or the session is gone (its data expired)."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(self._keys.record)
            pipe.xrevrange(self._keys.output, count=1)
            exists, last = await pipe.execute()
        if last and b"end" in last[0][1]:
            end_index = _index_of(last[0][0])
            if end_index < index:
                raise StreamEnded(to_str(last[0][1][b"end"]), end_index)
        if not exists:
            raise SessionNotFound(self.session_id)

    @staticmethod
    def _decode(index: int, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for entry_id, fields in entries:
            position = _index_of(entry_id)
            if position > index + len(chunks):
                # Appends are contiguous, so the only hole is the trimmed head of the stream.
                raise ChunkExpired(index, oldest=position)
            if b"end" in fields:
                if chunks:
                    break
                raise StreamEnded(to_str(fields[b"end"]), position)
            chunks.append(Chunk(position, fields[b"p"], json.loads(fields[b"m"])))
        return chunks
