"""Session registry on Redis: who owns a session, where it runs, what state it is in.

A session record is a hash on the session's hash slot (keys.py). Every change to it runs
as one Lua script over that slot, so state transitions, the close command they publish on
the control stream, the end marker on the output stream, the lease and the retention TTL
change together.

State machine (TRANSITIONS below is the one source; the Lua table is rendered from it):

    CREATING -> ACTIVE -> CLOSING -> CLOSED        any open state -> FAILED
    CREATING -> CLOSING                            ACTIVE -> EXPIRED (idle TTL passed)

- Leaving CREATING/ACTIVE publishes one `close` command on the control stream (the replica
  holding the session frees its KV cache) and sets `closing_at`; no more commands are
  accepted.
- Entering CLOSED/EXPIRED/FAILED writes the output end marker, drops the lease and gives
  every key of the session `terminal_retention_s` to live: clients drain the last chunks,
  then Redis deletes the data.

Global indexes (live sessions by idle deadline, by replica, by tenant) sit on other slots,
so they cannot be updated inside the per-session script. Entries are added before the
script and removed after it: a crash in between leaves a stale entry, never a missing one.
Readers verify entries against the records and drop stale ones, and the reaper revisits
every live entry once its deadline passes.

Time: idle deadlines use the injectable `clock` (unix seconds) of the registry; leases use
Redis key expiry (PX), i.e. the Redis server's clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from shared.redis_util import to_str, validate_id
from shared.sessionbus.config import RedisConfig
from shared.sessionbus.keys import KeySpace, SessionKeys
from shared.sessionbus.streams import (
    LUA_LIB,
    ControlStream,
    OutputStream,
    SessionBusError,
    SessionClosed,
    SessionNotFound,
)


class SessionState(StrEnum):
    CREATING = "creating"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"
    EXPIRED = "expired"
    FAILED = "failed"


# States that accept control commands; leaving them publishes the close command.
OPEN_STATES = frozenset({SessionState.CREATING, SessionState.ACTIVE})
TERMINAL_STATES = frozenset({SessionState.CLOSED, SessionState.EXPIRED, SessionState.FAILED})
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.CREATING: frozenset({SessionState.ACTIVE, SessionState.CLOSING, SessionState.FAILED}),
    SessionState.ACTIVE: frozenset({SessionState.CLOSING, SessionState.EXPIRED, SessionState.FAILED}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED, SessionState.FAILED}),
    SessionState.CLOSED: frozenset(),
    SessionState.EXPIRED: frozenset(),
    SessionState.FAILED: frozenset(),
}
# What the reaper does to a session whose idle deadline passed, by current state.
REAP_TARGETS = {
    SessionState.CREATING: SessionState.FAILED,
    SessionState.ACTIVE: SessionState.EXPIRED,
    SessionState.CLOSING: SessionState.CLOSED,
}
assert all(REAP_TARGETS[s] in TRANSITIONS[s] for s in REAP_TARGETS)
# close() goes OPEN -> CLOSING -> CLOSED in one step.
assert all(SessionState.CLOSING in TRANSITIONS[s] for s in OPEN_STATES)
assert SessionState.CLOSED in TRANSITIONS[SessionState.CLOSING]

IDLE_TIMEOUT_REASON = "idle_timeout"
_META_PREFIX = "m:"


# --------------------------------------------------------------------------- errors


class SessionExists(SessionBusError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} already exists")
        self.session_id = session_id


class InvalidTransition(SessionBusError):
    def __init__(self, session_id: str, current: SessionState, target: SessionState) -> None:
        super().__init__(f"session {session_id!r}: transition {current.value} -> {target.value} is not allowed")
        self.session_id = session_id
        self.current = current
        self.target = target


class LeaseHeld(SessionBusError):
    """Another replica holds a live lease on the session."""

    def __init__(self, session_id: str, owner: str) -> None:
        super().__init__(f"session {session_id!r} is leased by replica {owner!r}")
        self.session_id = session_id
        self.owner = owner


class LeaseLost(SessionBusError):
    """The caller's lease expired or was taken over: stop serving the session."""

    def __init__(self, session_id: str, replica: str) -> None:
        super().__init__(f"replica {replica!r} no longer holds the lease on session {session_id!r}")
        self.session_id = session_id
        self.replica = replica


# --------------------------------------------------------------------------- record


class SessionRecord(BaseModel):
    """A session as stored in Redis. Times are unix seconds."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # tolerate fields of newer writers

    session_id: str
    tenant: str
    replica: str  # generator replica holding the session's KV cache
    state: SessionState
    created_at: float
    updated_at: float  # last state/owner change
    last_activity_at: float  # last touch
    idle_ttl_s: float
    closing_at: float | None = None  # stopped accepting commands (close command published)
    closed_at: float | None = None  # reached a terminal state
    reason: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        """Idle deadline: the reaper finishes the session after this time."""
        return self.last_activity_at + self.idle_ttl_s

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_redis(cls, raw: Mapping[bytes, bytes] | list[bytes]) -> SessionRecord:
        """From HGETALL as a mapping, or the flat [field, value, ...] list a script returns."""
        if isinstance(raw, list):
            raw = dict(zip(raw[0::2], raw[1::2]))
        fields: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for key, value in raw.items():
            name, text = key.decode(), value.decode()
            if name.startswith(_META_PREFIX):
                meta[name[len(_META_PREFIX) :]] = json.loads(text)
            else:
                fields[name] = text
        return cls.model_validate({**fields, "meta": meta})


def _meta_args(meta: Mapping[str, Any]) -> list[str]:
    args: list[str] = []
    for key, value in meta.items():
        args += [_META_PREFIX + key, json.dumps(value, separators=(",", ":"))]
    return args


# --------------------------------------------------------------------------- Lua


def _lua_set(states: Iterable[SessionState]) -> str:
    return "{" + ", ".join(f"['{s.value}']=true" for s in sorted(states)) + "}"


_STATE_LUA = (
    LUA_LIB
    + f"local OPEN = {_lua_set(OPEN_STATES)}\n"
    + f"local TERMINAL = {_lua_set(TERMINAL_STATES)}\n"
    + "local ALLOWED_FROM = {"
    + ", ".join(
        f"['{target.value}']={_lua_set(s for s in SessionState if target in TRANSITIONS[s])}" for target in SessionState
    )
    + "}\n"
    + "local REAP_TARGET = {"
    + ", ".join(f"['{s.value}']='{t.value}'" for s, t in REAP_TARGETS.items())
    + "}\n"
    + f"local CLOSED = '{SessionState.CLOSED.value}'\n"
)

_CREATE_LUA = (
    _STATE_LUA
    + r"""
-- KEYS: record, lease, control, results, result_events, output
-- ARGV: session_id, tenant, replica, state, now, idle_ttl_s, lease_ms, meta field/value pairs...
if redis.call('EXISTS', KEYS[1]) == 1 then return {'EXISTS'} end
-- Leftovers of an earlier session with this id whose keys expired a moment apart.
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
local fields = {'session_id', ARGV[1], 'tenant', ARGV[2], 'replica', ARGV[3], 'state', ARGV[4],
                'created_at', ARGV[5], 'updated_at', ARGV[5], 'last_activity_at', ARGV[5],
                'idle_ttl_s', ARGV[6]}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[7])
return {'OK', redis.call('HGETALL', KEYS[1])}
"""
)

_TRANSITION_LUA = (
    _STATE_LUA
    + r"""
-- KEYS: record, lease, control, results, result_events, output
-- ARGV: mode (set|close|reap), target, now, reason, retention_ms, control_maxlen, output_maxlen,
--       meta field/value pairs...
local record = KEYS[1]
local mode, target, now, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', record) == 0 then return {'NOT_FOUND'} end
local state = redis.call('HGET', record, 'state')

if mode == 'close' then
  if TERMINAL[state] then return {'OK', state, redis.call('HGETALL', record)} end
  target = CLOSED  -- via CLOSING, a legal step from every open state
elseif mode == 'reap' then
  if TERMINAL[state] then return {'TERMINAL', state, redis.call('HGETALL', record)} end
  local deadline = tonumber(redis.call('HGET', record, 'last_activity_at'))
                 + tonumber(redis.call('HGET', record, 'idle_ttl_s'))
  if deadline > tonumber(now) then return {'ALIVE', tostring(deadline)} end
  target = REAP_TARGET[state]
else
  if state == target then
    if not TERMINAL[state] and #ARGV >= 8 then
      redis.call('HSET', record, unpack(ARGV, 8))
    end
    return {'OK', state, redis.call('HGETALL', record)}
  end
  if not ALLOWED_FROM[target][state] then return {'INVALID', state} end
end

if reason == '' then reason = target end
redis.call('HSET', record, 'state', target, 'updated_at', now, 'reason', reason)
if #ARGV >= 8 then redis.call('HSET', record, unpack(ARGV, 8)) end
if OPEN[state] and not OPEN[target] then
  redis.call('HSET', record, 'closing_at', now)
  publish(KEYS[3], ARGV[6], 'close', cjson.encode({reason = reason}), now)
end
if TERMINAL[target] then
  redis.call('HSET', record, 'closed_at', now)
  write_end(KEYS[6], reason, ARGV[7])
  redis.call('DEL', KEYS[2])
  for i = 1, #KEYS do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
  end
end
return {'OK', state, redis.call('HGETALL', record)}
"""
)

_TOUCH_LUA = (
    _STATE_LUA
    + r"""
-- KEYS: record   ARGV: now
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
if TERMINAL[redis.call('HGET', KEYS[1], 'state')] then return {'CLOSED'} end
redis.call('HSET', KEYS[1], 'last_activity_at', ARGV[1])
return {'OK', tostring(tonumber(ARGV[1]) + tonumber(redis.call('HGET', KEYS[1], 'idle_ttl_s')))}
"""
)

_CLAIM_LUA = (
    _STATE_LUA
    + r"""
-- KEYS: record, lease   ARGV: replica, lease_ms, now
if redis.call('EXISTS', KEYS[1]) == 0 then return {'NOT_FOUND'} end
if TERMINAL[redis.call('HGET', KEYS[1], 'state')] then return {'CLOSED'} end
local owner = redis.call('GET', KEYS[2])
if owner and owner ~= ARGV[1] then return {'HELD', owner} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local previous = redis.call('HGET', KEYS[1], 'replica')
if previous ~= ARGV[1] then redis.call('HSET', KEYS[1], 'replica', ARGV[1], 'updated_at', ARGV[3]) end
return {'OK', previous, redis.call('HGETALL', KEYS[1])}
"""
)

_RENEW_LUA = r"""
-- KEYS: lease   ARGV: replica, lease_ms
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE_LUA = r"""
-- KEYS: lease   ARGV: replica
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


_RESERVE_LUA = r"""
-- KEYS: tenant quota zset (member -> deadline of a pending reservation, +inf once the
--       session is registered)
-- ARGV: member, quota, now, deadline of the new reservation
-- The check and the reservation are one step: concurrent creates never exceed the quota.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
"""

_HOLD_LUA = r"""
-- KEYS: tenant quota zset   ARGV: reservation member, session id
-- The reservation becomes the session's entry (held until the session ends).
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], '+inf', ARGV[2])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


# --------------------------------------------------------------------------- registry


class SessionRegistry:
    """Async session registry. One instance per process is enough; it holds no session state."""

    def __init__(self, redis: Redis, config: RedisConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._redis = redis
        self._config = config
        self._keys = KeySpace(config.namespace)
        self._clock = clock
        self._create = redis.register_script(_CREATE_LUA)
        self._transition = redis.register_script(_TRANSITION_LUA)
        self._touch = redis.register_script(_TOUCH_LUA)
        self._claim = redis.register_script(_CLAIM_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._reserve = redis.register_script(_RESERVE_LUA)
        self._hold = redis.register_script(_HOLD_LUA)

    # ----------------------------------------------------------------- streams of a session

    def control(self, session_id: str, *, start_id: str = "0-0") -> ControlStream:
        return ControlStream(self._redis, self._config, session_id, start_id=start_id, clock=self._clock)

    def output(self, session_id: str) -> OutputStream:
        return OutputStream(self._redis, self._config, session_id)

    # ----------------------------------------------------------------- lifecycle

    async def create(
        self,
        session_id: str,
        tenant: str,
        replica: str,
        meta: Mapping[str, Any] | None = None,
        *,
        idle_ttl_s: float | None = None,
        lease_s: float | None = None,
    ) -> SessionRecord:
        """Register a new session in CREATING, leased to `replica`. Raises SessionExists."""
        validate_id(tenant, "tenant")
        validate_id(replica, "replica")
        keys = self._keys.session(session_id)
        now = self._clock()
        idle_ttl_s = self._config.session_idle_ttl_s if idle_ttl_s is None else idle_ttl_s
        if idle_ttl_s <= 0:
            raise ValueError(f"idle_ttl_s must be > 0, got {idle_ttl_s}")
        # Index first: a crash after the script must not leave a session the reaper cannot
        # find. Entries left by a failed create are dropped by the verifying readers/reaper.
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.live_index(), {session_id: now + idle_ttl_s}, nx=True)
            pipe.sadd(self._keys.replica_index(replica), session_id)
            pipe.sadd(self._keys.tenant_index(tenant), session_id)
            await pipe.execute()
        status, *rest = await self._create(
            keys=list(keys.all()),
            args=[
                session_id,
                tenant,
                replica,
                SessionState.CREATING.value,
                now,
                idle_ttl_s,
                _ms(self._config.session_lease_s if lease_s is None else lease_s),
                *_meta_args(meta or {}),
            ],
        )
        if to_str(status) == "EXISTS":
            raise SessionExists(session_id)
        record = SessionRecord.from_redis(rest[0])
        await self._redis.zadd(self._keys.live_index(), {session_id: record.expires_at})
        return record

    async def get(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.hgetall(self._keys.session(session_id).record)
        return SessionRecord.from_redis(raw) if raw else None

    async def get_for_tenant(self, session_id: str, tenant: str) -> SessionRecord:
        """The session if it belongs to `tenant`. Unknown and foreign sessions raise the same
        SessionNotFound, so a tenant cannot probe for other tenants' session ids."""
        try:
            record = await self.get(session_id)
        except ValueError:  # malformed id: as unknown as any other
            raise SessionNotFound(session_id) from None
        if record is None or record.tenant != tenant:
            raise SessionNotFound(session_id)
        return record

    async def touch(self, session_id: str) -> float:
        """Mark activity now; returns the new idle deadline. Raises SessionNotFound /
        SessionClosed (terminal sessions cannot be revived)."""
        now = self._clock()
        status, *rest = await self._touch(keys=[self._keys.session(session_id).record], args=[now])
        status = to_str(status)
        if status == "NOT_FOUND":
            raise SessionNotFound(session_id)
        if status == "CLOSED":
            raise SessionClosed(session_id)
        deadline = float(rest[0])
        await self._redis.zadd(self._keys.live_index(), {session_id: deadline})
        return deadline

    async def set_state(
        self, session_id: str, state: SessionState, *, reason: str | None = None, **fields: Any
    ) -> SessionRecord:
        """Move the session to `state` if TRANSITIONS allows it (checked atomically); `fields`
        are merged into the record's `meta`. Setting the current state again only merges
        `fields` (idempotent retries). Raises SessionNotFound / InvalidTransition."""
        state = SessionState(state)
        status, record = await self._run_transition(session_id, "set", state, reason or "", _meta_args(fields))
        if status == "INVALID":
            assert isinstance(record, SessionState)
            raise InvalidTransition(session_id, record, state)
        assert isinstance(record, SessionRecord)
        return record

    async def close(self, session_id: str, reason: str = "closed") -> SessionRecord:
        """Close the session (-> CLOSING -> CLOSED): publishes the close command, ends the
        output stream, starts the retention countdown. Closing a finished session changes
        nothing and returns its final record. Raises SessionNotFound."""
        _, record = await self._run_transition(session_id, "close", SessionState.CLOSED, reason, [])
        assert isinstance(record, SessionRecord)
        return record

    async def reap_expired(self, now: float | None = None, *, batch: int = 500) -> list[str]:
        """Finish every session whose idle deadline is <= `now` (default: the clock):
        ACTIVE -> EXPIRED, CREATING -> FAILED, CLOSING -> CLOSED, each publishing the close
        command and ending the output; their data is deleted after `terminal_retention_s`.
        Returns the reaped session ids. Safe to run from several processes at once."""
        now = self._clock() if now is None else now
        live = self._keys.live_index()
        reaped: list[str] = []
        seen: set[str] = set()
        while True:
            raw_ids = await self._redis.zrangebyscore(live, "-inf", now, start=0, num=batch)
            session_ids = [sid for sid in map(to_str, raw_ids) if sid not in seen]
            if not session_ids:
                return reaped
            for session_id in session_ids:
                seen.add(session_id)
                if await self._reap_one(session_id, now):
                    reaped.append(session_id)

    async def _reap_one(self, session_id: str, now: float) -> bool:
        live = self._keys.live_index()
        try:
            keys = self._keys.session(session_id)
        except ValueError:  # not one of ours
            await self._redis.zrem(live, session_id)
            return False
        reply = await self._transition(
            keys=list(keys.all()),
            args=["reap", "", now, IDLE_TIMEOUT_REASON, *self._transition_limits()],
        )
        status = to_str(reply[0])
        if status == "NOT_FOUND":
            await self._redis.zrem(live, session_id)
            return False
        if status == "ALIVE":  # touched since the index was written: fix its score
            await self._redis.zadd(live, {session_id: float(reply[1])}, xx=True)
            return False
        record = SessionRecord.from_redis(reply[2])
        await self._unindex(record)
        return status == "OK"

    # ----------------------------------------------------------------- queries

    async def list_by_replica(self, replica: str) -> list[SessionRecord]:
        """Unfinished sessions whose record names `replica`, oldest first."""
        index = self._keys.replica_index(replica)
        records = await self._indexed_records(index)
        keep = [r for r in records.values() if r is not None and r.replica == replica and not r.is_terminal]
        stale = [sid for sid, r in records.items() if r is None or r.replica != replica or r.is_terminal]
        if stale:
            await self._redis.srem(index, *stale)
        return sorted(keep, key=lambda r: (r.created_at, r.session_id))

    async def count_active(self, tenant: str | None = None) -> int:
        """Unfinished sessions (CREATING, ACTIVE, CLOSING), of one tenant or overall.

        The per-tenant count is exact (entries are checked against the records); the overall
        count is the live index size, which may include entries not yet repaired by the reaper.
        """
        if tenant is None:
            return int(await self._redis.zcard(self._keys.live_index()))
        index = self._keys.tenant_index(tenant)
        records = await self._indexed_records(index)
        stale = [sid for sid, r in records.items() if r is None or r.tenant != tenant or r.is_terminal]
        if stale:
            await self._redis.srem(index, *stale)
        return len(records) - len(stale)

    async def _indexed_records(self, index: str) -> dict[str, SessionRecord | None]:
        session_ids = sorted(to_str(m) for m in await self._redis.smembers(index))
        if not session_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in session_ids:
                pipe.hgetall(self._keys.session(session_id).record)
            raws = await pipe.execute()
        return {sid: (SessionRecord.from_redis(raw) if raw else None) for sid, raw in zip(session_ids, raws)}

    # ----------------------------------------------------------------- tenant quota

    async def reserve_quota(self, tenant: str, reservation: str, quota: int, *, pending_s: float = 300.0) -> bool:
        """Take one of `tenant`'s `quota` session slots for `reservation` (atomic check and
        reserve); False when all are taken. A reservation not turned into a session with
        `hold_quota` within `pending_s` lapses. Slots of sessions that ended without their
        entry being removed (a crash) are reclaimed here before refusing."""
        validate_id(reservation, "reservation")
        key = self._keys.tenant_quota(tenant)
        for attempt in range(2):
            now = self._clock()
            if await self._reserve(keys=[key], args=[reservation, int(quota), now, now + pending_s]):
                return True
            if attempt == 0 and not await self._repair_quota(tenant):
                return False
        return False

    async def hold_quota(self, tenant: str, reservation: str, session_id: str) -> None:
        """The reservation now belongs to the registered session `session_id`: it is held until
        the session reaches a final state."""
        key = self._keys.tenant_quota(tenant)
        await self._hold(keys=[key], args=[reservation, session_id])
        record = await self.get(session_id)
        if record is None or record.is_terminal:  # it already ended (and was unindexed)
            await self._redis.zrem(key, session_id)

    async def release_quota(self, tenant: str, reservation: str) -> None:
        """Give back a reservation that did not become a session."""
        await self._redis.zrem(self._keys.tenant_quota(tenant), reservation)

    async def _repair_quota(self, tenant: str) -> int:
        """Drop held entries of sessions that are final or gone; returns how many."""
        key = self._keys.tenant_quota(tenant)
        held = [to_str(m) for m in await self._redis.zrangebyscore(key, "+inf", "+inf")]
        stale = []
        for session_id in held:
            try:
                record = await self.get(session_id)
            except ValueError:
                record = None
            if record is None or record.is_terminal:
                stale.append(session_id)
        if stale:
            await self._redis.zrem(key, *stale)
        return len(stale)

    # ----------------------------------------------------------------- ownership leases

    async def claim(self, session_id: str, replica: str, lease_seconds: float | None = None) -> SessionRecord:
        """Take (or extend) the lease on an unfinished session for `replica` and record it as
        the session's replica. Raises LeaseHeld while another replica's lease is live,
        SessionNotFound, SessionClosed."""
        keys = self._keys.session(session_id)
        lease_ms = _ms(self._config.session_lease_s if lease_seconds is None else lease_seconds)
        # Index before, unindex after the script (a stale entry is dropped by list_by_replica).
        await self._redis.sadd(self._keys.replica_index(replica), session_id)
        status, *rest = await self._claim(keys=[keys.record, keys.lease], args=[replica, lease_ms, self._clock()])
        status = to_str(status)
        if status == "NOT_FOUND":
            raise SessionNotFound(session_id)
        if status == "CLOSED":
            raise SessionClosed(session_id)
        if status == "HELD":
            raise LeaseHeld(session_id, to_str(rest[0]))
        previous, record = to_str(rest[0]), SessionRecord.from_redis(rest[1])
        if previous != replica:
            await self._redis.srem(self._keys.replica_index(previous), session_id)
        return record

    async def renew(self, session_id: str, replica: str, lease_seconds: float | None = None) -> None:
        """Extend `replica`'s lease. Raises LeaseLost if it expired, was taken over, or the
        session finished: the replica must stop serving the session."""
        lease_ms = _ms(self._config.session_lease_s if lease_seconds is None else lease_seconds)
        if not await self._renew(keys=[self._keys.session(session_id).lease], args=[replica, lease_ms]):
            raise LeaseLost(session_id, replica)

    async def release(self, session_id: str, replica: str) -> bool:
        """Drop `replica`'s lease (no-op if it does not hold it); True if it was held."""
        return bool(await self._release(keys=[self._keys.session(session_id).lease], args=[replica]))

    async def heartbeat(self, replica: str, ttl_s: float | None = None) -> None:
        """Say that generator `replica` admits sessions for the next `ttl_s` (default: a lease)."""
        ttl = self._config.session_lease_s if ttl_s is None else ttl_s
        await self._redis.zadd(self._keys.generator_index(), {validate_id(replica, "replica"): self._clock() + ttl})

    async def retire(self, replica: str) -> None:
        """`replica` admits no more sessions (it drains or stops)."""
        await self._redis.zrem(self._keys.generator_index(), replica)

    async def live_generators(self) -> list[str] | None:
        """Generator replicas whose heartbeat has not lapsed; None if no replica ever sent one
        (a deployment starting, or one without heartbeats): nothing is known either way."""
        index, now = self._keys.generator_index(), self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:  # one round trip on the create path
            pipe.zremrangebyscore(index, "-inf", now - 3600.0)  # long-gone replicas
            pipe.exists(index)
            pipe.zrangebyscore(index, now, "+inf")
            _, known, live = await pipe.execute()
        return [to_str(m) for m in live] if known else None

    async def lease_owner(self, session_id: str) -> str | None:
        owner = await self._redis.get(self._keys.session(session_id).lease)
        return None if owner is None else to_str(owner)

    async def orphaned(self, *, batch: int = 500) -> list[str]:
        """Unfinished sessions whose lease has expired (their replica died or hung): candidates
        to `claim` and rebuild on another replica."""
        orphans: list[str] = []
        async for members in self._live_batches(batch):
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in members:
                    keys = self._keys.session(session_id)
                    pipe.exists(keys.lease)
                    pipe.hget(keys.record, "state")
                replies = await pipe.execute()
            for i, session_id in enumerate(members):
                has_lease, state = replies[2 * i], replies[2 * i + 1]
                if not has_lease and state is not None and SessionState(to_str(state)) not in TERMINAL_STATES:
                    orphans.append(session_id)
        return orphans

    async def _live_batches(self, batch: int) -> AsyncIterator[list[str]]:
        cursor = 0
        while True:
            cursor, members = await self._redis.zscan(self._keys.live_index(), cursor, count=batch)
            ids = [to_str(member) for member, _ in members]
            if ids:
                yield ids
            if cursor == 0:
                return

    # ----------------------------------------------------------------- internals

    def _transition_limits(self) -> list[int]:
        return [
            _ms(self._config.terminal_retention_s),
            self._config.control_backlog_max_commands,
            self._config.output_backlog_max_chunks,
        ]

    async def _run_transition(
        self, session_id: str, mode: str, target: SessionState, reason: str, meta_args: list[str]
    ) -> tuple[str, SessionRecord | SessionState]:
        keys: SessionKeys = self._keys.session(session_id)
        reply = await self._transition(
            keys=list(keys.all()),
            args=[mode, target.value, self._clock(), reason, *self._transition_limits(), *meta_args],
        )
        status = to_str(reply[0])
        if status == "NOT_FOUND":
            raise SessionNotFound(session_id)
        if status == "INVALID":
            return status, SessionState(to_str(reply[1]))
        record = SessionRecord.from_redis(reply[2])
        if record.is_terminal:
            await self._unindex(record)
        return status, record

    async def _unindex(self, record: SessionRecord) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._keys.live_index(), record.session_id)
            pipe.srem(self._keys.replica_index(record.replica), record.session_id)
            pipe.srem(self._keys.tenant_index(record.tenant), record.session_id)
            pipe.zrem(self._keys.tenant_quota(record.tenant), record.session_id)
            await pipe.execute()
