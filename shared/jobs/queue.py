"""The batch job queue on Redis Streams: submit, claim, heartbeat, complete, retry, dead-letter,
cancel. Keys: keys.py. Record schema and states: spec.py.

Delivery (at least once, never lost):
- A queued job has one entry in the job stream (`j`=job id, `t`=tenant); the record's `entry`
  names it. Workers read it with XREADGROUP (consumer group `JobsConfig.group`) and `start` it:
  the attempt counter goes up and the record names the worker. The entry stays in the
  worker's pending list until the attempt ends, and is then acked and deleted, so the stream
  only holds queued and running deliveries (never trimmed).
- A running worker heartbeats (XCLAIM JUSTID resets the entry's idle time). An entry idle for
  `claim_idle_s` belongs to a dead worker: the next worker takes it over with XAUTOCLAIM and
  starts it again as a new attempt. A worker that lost its entry learns it on its next
  heartbeat / complete (`LOST`) and drops its work.
- A failed attempt waits `backoff` in the delayed zset (not in the stream, so it delays no
  other job), then is re-queued as a new entry. After `max_attempts` (lost attempts count) the
  job is FAILED and written to the dead-letter stream with the reason.
- Cancel: queued / retrying jobs end at once; a running job is flagged (CANCELLING), the
  worker sees it on its next heartbeat and stops at a chunk boundary.

Every transition is one Lua script over the `{jobs}` slot: the record, the stream entry, the
delayed zset, the dead-letter stream and the tenant's event stream change together, and a
transition only applies for the worker that still holds the delivery (record and pending
list agree). Times come from the Redis server clock (`TIME`), so workers on other machines
agree on backoff deadlines.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.jobs.config import JobsConfig
from shared.jobs.keys import JobKeys
from shared.jobs.spec import ClipSpec, JobRecord, JobResult, JobState, job_id_for
from shared.redis_util import to_str


class JobQueueError(Exception):
    """Base of the errors raised by the job queue."""


class JobNotFound(JobQueueError):
    """No such job (or, with a tenant, not one of this tenant's jobs)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class IdempotencyConflict(JobQueueError):
    """An idempotency key was already used by this tenant for a different clip spec."""

    def __init__(self, index: int, idempotency_key: str, job_id: str) -> None:
        super().__init__(f"clip {index}: idempotency key already used for a different clip spec (job {job_id})")
        self.index = index
        self.idempotency_key = idempotency_key
        self.job_id = job_id


@dataclass(frozen=True)
class Submitted:
    record: JobRecord
    created: bool  # False: the idempotency key matched an existing job


@dataclass(frozen=True)
class Claim:
    """One attempt of one job, held by `consumer` through stream entry `entry`."""

    job_id: str
    tenant: str
    entry: str
    consumer: str
    spec: ClipSpec
    spec_hash: str
    attempt: int  # 1-based
    created_ms: int
    reclaimed: bool  # the previous attempt was lost with its worker


@dataclass(frozen=True)
class QueueDepth:
    waiting: int  # in the stream, not yet delivered, plus waiting out a retry backoff
    in_flight: int  # delivered to a worker and not finished
    retrying: int  # the part of `waiting` that waits out a backoff

    @property
    def total(self) -> int:
        return self.waiting + self.in_flight


@dataclass(frozen=True)
class JobEvent:
    event_id: str
    job_id: str
    state: JobState
    chunks_done: int
    attempts: int


@dataclass(frozen=True)
class DeadLetter:
    entry: str
    job_id: str
    tenant: str
    reason: str
    attempts: int


# --------------------------------------------------------------------------- Lua

_LIB = r"""
local TERMINAL = {succeeded=true, failed=true, cancelled=true}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function emit(events, maxlen, job_id, rec)
  local f = redis.call('HMGET', rec, 'state', 'chunks_done', 'attempts')
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*',
             'j', job_id, 's', f[1], 'c', f[2] or '0', 'a', f[3] or '0')
end

local function drop_entry(stream, group, entry)
  if entry and entry ~= '' then
    redis.call('XACK', stream, group, entry)
    redis.call('XDEL', stream, entry)
  end
end

local function finish(rec, state, now, retention_ms)
  redis.call('HSET', rec, 'state', state, 'updated_ms', now, 'finished_ms', now, 'entry', '', 'worker', '')
  redis.call('HDEL', rec, 'next_attempt_ms')
  redis.call('PEXPIRE', rec, retention_ms)
end

local function dead_letter(dead, maxlen, rec, job_id, tenant, reason)
  redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'j', job_id, 't', tenant, 'reason', reason,
             'a', redis.call('HGET', rec, 'attempts'))
end

-- The caller still holds the delivery: the record points at the entry and names the caller,
-- and the entry is in the caller's pending list (not taken over by XAUTOCLAIM).
local function owns(rec, stream, group, entry, consumer)
  local f = redis.call('HMGET', rec, 'entry', 'worker', 'state')
  if f[1] ~= entry or f[2] ~= consumer then return false end
  if f[3] ~= 'running' and f[3] ~= 'cancelling' then return false end
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)
  return #p == 1 and p[1][2] == consumer
end
"""

_SUBMIT = (
    _LIB
    + r"""
-- KEYS: stream, tenant_index, events, record_1 .. record_n
-- ARGV: tenant, events_max, n, then per job: job_id, spec_hash, spec_json, max_attempts, chunks
local tenant, events_max, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
for i = 1, n do
  local rec = KEYS[3 + i]
  local hash = ARGV[3 + (i - 1) * 5 + 2]
  local existing = redis.call('HGET', rec, 'spec_hash')
  if existing and existing ~= hash then return {'CONFLICT', i - 1} end
end
local now = now_ms()
local created = {}
for i = 1, n do
  local rec = KEYS[3 + i]
  local o = 3 + (i - 1) * 5
  local job_id = ARGV[o + 1]
  if redis.call('EXISTS', rec) == 1 then
    created[i] = 0
  else
    redis.call('HSET', rec, 'job_id', job_id, 'tenant', tenant, 'state', 'queued', 'spec', ARGV[o + 3],
               'spec_hash', ARGV[o + 2], 'attempts', 0, 'max_attempts', ARGV[o + 4], 'chunks_total', ARGV[o + 5],
               'chunks_done', 0, 'created_ms', now, 'updated_ms', now, 'error', '', 'worker', '')
    local entry = redis.call('XADD', KEYS[1], '*', 'j', job_id, 't', tenant)
    redis.call('HSET', rec, 'entry', entry)
    redis.call('ZADD', KEYS[2], 0, string.format('%015d:%s', now, job_id))
    emit(KEYS[3], events_max, job_id, rec)
    created[i] = 1
  end
end
return {'OK', created}
"""
)

_START = (
    _LIB
    + r"""
-- KEYS: record, stream, dead, events
-- ARGV: job_id, entry, consumer, group, events_max, dead_max, retention_ms, tenant
local rec, stream, group, entry = KEYS[1], KEYS[2], ARGV[4], ARGV[2]
if redis.call('EXISTS', rec) == 0 then drop_entry(stream, group, entry) return {'GONE'} end
local f = redis.call('HMGET', rec, 'state', 'entry', 'attempts', 'max_attempts', 'worker', 'cancel')
local state = f[1]
if f[2] ~= entry then drop_entry(stream, group, entry) return {'STALE'} end
local now = now_ms()
if TERMINAL[state] then drop_entry(stream, group, entry) return {'DONE', state} end
if state == 'cancelling' or f[6] == '1' then
  finish(rec, 'cancelled', now, ARGV[7])
  drop_entry(stream, group, entry)
  emit(KEYS[4], ARGV[5], ARGV[1], rec)
  return {'CANCELLED'}
end
local attempts, max_attempts = tonumber(f[3]), tonumber(f[4])
local reclaimed = 0
if state == 'running' then
  reclaimed = 1
  redis.call('HSET', rec, 'error', string.format('attempt %d lost: worker %s stopped heartbeating', attempts, f[5]))
end
if attempts >= max_attempts then
  local reason = redis.call('HGET', rec, 'error')
  if (not reason) or reason == '' then reason = 'no attempts left' end
  finish(rec, 'failed', now, ARGV[7])
  dead_letter(KEYS[3], ARGV[6], rec, ARGV[1], ARGV[8], reason)
  drop_entry(stream, group, entry)
  emit(KEYS[4], ARGV[5], ARGV[1], rec)
  return {'DEAD', reason}
end
redis.call('HSET', rec, 'state', 'running', 'attempts', attempts + 1, 'worker', ARGV[3], 'started_ms', now,
           'updated_ms', now, 'chunks_done', 0)
redis.call('HDEL', rec, 'next_attempt_ms')
emit(KEYS[4], ARGV[5], ARGV[1], rec)
return {'OK', redis.call('HGET', rec, 'spec'), redis.call('HGET', rec, 'spec_hash'), attempts + 1,
        redis.call('HGET', rec, 'created_ms'), reclaimed}
"""
)

_HEARTBEAT = (
    _LIB
    + r"""
-- KEYS: record, stream, events   ARGV: job_id, entry, consumer, group, chunks_done, events_max
local rec = KEYS[1]
if not owns(rec, KEYS[2], ARGV[4], ARGV[2], ARGV[3]) then return {'LOST'} end
redis.call('XCLAIM', KEYS[2], ARGV[4], ARGV[3], 0, ARGV[2], 'JUSTID')
local done = tonumber(ARGV[5])
if done > tonumber(redis.call('HGET', rec, 'chunks_done') or '0') then
  redis.call('HSET', rec, 'chunks_done', done, 'updated_ms', now_ms())
  emit(KEYS[3], ARGV[6], ARGV[1], rec)
end
return {string.upper(redis.call('HGET', rec, 'state'))}
"""
)

_COMPLETE = (
    _LIB
    + r"""
-- KEYS: record, stream, events   ARGV: job_id, entry, consumer, group, result_json, events_max, retention_ms
local rec = KEYS[1]
if not owns(rec, KEYS[2], ARGV[4], ARGV[2], ARGV[3]) then return {'LOST'} end
local now = now_ms()
finish(rec, 'succeeded', now, ARGV[7])
redis.call('HSET', rec, 'result', ARGV[5], 'error', '', 'chunks_done', redis.call('HGET', rec, 'chunks_total'))
drop_entry(KEYS[2], ARGV[4], ARGV[2])
emit(KEYS[3], ARGV[6], ARGV[1], rec)
return {'OK', now}
"""
)

_FAIL = (
    _LIB
    + r"""
-- KEYS: record, stream, delayed, dead, events
-- ARGV: job_id, entry, consumer, group, reason, retryable (0/1), backoff_ms, events_max, dead_max,
--       retention_ms, tenant
local rec, stream, group, entry = KEYS[1], KEYS[2], ARGV[4], ARGV[2]
if not owns(rec, stream, group, entry, ARGV[3]) then return {'LOST'} end
local now = now_ms()
redis.call('HSET', rec, 'error', ARGV[5])
if redis.call('HGET', rec, 'state') == 'cancelling' then
  finish(rec, 'cancelled', now, ARGV[10])
  drop_entry(stream, group, entry)
  emit(KEYS[5], ARGV[8], ARGV[1], rec)
  return {'CANCELLED'}
end
local f = redis.call('HMGET', rec, 'attempts', 'max_attempts')
if ARGV[6] == '0' or tonumber(f[1]) >= tonumber(f[2]) then
  finish(rec, 'failed', now, ARGV[10])
  dead_letter(KEYS[4], ARGV[9], rec, ARGV[1], ARGV[11], ARGV[5])
  drop_entry(stream, group, entry)
  emit(KEYS[5], ARGV[8], ARGV[1], rec)
  return {'DEAD'}
end
local due = now + tonumber(ARGV[7])
redis.call('HSET', rec, 'state', 'retrying', 'next_attempt_ms', due, 'updated_ms', now, 'entry', '', 'worker', '')
redis.call('ZADD', KEYS[3], due, ARGV[1])
drop_entry(stream, group, entry)
emit(KEYS[5], ARGV[8], ARGV[1], rec)
return {'RETRY', due}
"""
)

_CANCELLED = (
    _LIB
    + r"""
-- KEYS: record, stream, events   ARGV: job_id, entry, consumer, group, events_max, retention_ms
local rec = KEYS[1]
if not owns(rec, KEYS[2], ARGV[4], ARGV[2], ARGV[3]) then return {'LOST'} end
finish(rec, 'cancelled', now_ms(), ARGV[6])
drop_entry(KEYS[2], ARGV[4], ARGV[2])
emit(KEYS[3], ARGV[5], ARGV[1], rec)
return {'OK'}
"""
)

_RELEASE = (
    _LIB
    + r"""
-- KEYS: record, stream, events   ARGV: job_id, entry, consumer, group, events_max, retention_ms, tenant
local rec, stream = KEYS[1], KEYS[2]
if not owns(rec, stream, ARGV[4], ARGV[2], ARGV[3]) then return {'LOST'} end
local now = now_ms()
drop_entry(stream, ARGV[4], ARGV[2])
if redis.call('HGET', rec, 'state') == 'cancelling' then
  finish(rec, 'cancelled', now, ARGV[6])
  emit(KEYS[3], ARGV[5], ARGV[1], rec)
  return {'CANCELLED'}
end
local entry = redis.call('XADD', stream, '*', 'j', ARGV[1], 't', ARGV[7])
redis.call('HSET', rec, 'state', 'queued', 'entry', entry, 'worker', '', 'chunks_done', 0, 'updated_ms', now,
           'attempts', tonumber(redis.call('HGET', rec, 'attempts')) - 1)
emit(KEYS[3], ARGV[5], ARGV[1], rec)
return {'OK'}
"""
)

_PROMOTE = (
    _LIB
    + r"""
-- KEYS: record, delayed, stream, events   ARGV: job_id, tenant, events_max
local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not due then return {'NONE'} end
local now = now_ms()
if tonumber(due) > now then return {'NOT_DUE'} end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'state') ~= 'retrying' then return {'SKIP'} end
local entry = redis.call('XADD', KEYS[3], '*', 'j', ARGV[1], 't', ARGV[2])
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry', entry, 'updated_ms', now)
redis.call('HDEL', KEYS[1], 'next_attempt_ms')
emit(KEYS[4], ARGV[3], ARGV[1], KEYS[1])
return {'OK'}
"""
)

_CANCEL = (
    _LIB
    + r"""
-- KEYS: record, stream, delayed, events   ARGV: job_id, tenant, events_max, retention_ms
local rec = KEYS[1]
if redis.call('HGET', rec, 'tenant') ~= ARGV[2] then return {'NOT_FOUND'} end
local state = redis.call('HGET', rec, 'state')
local now = now_ms()
if state == 'queued' then
  local entry = redis.call('HGET', rec, 'entry')
  if entry and entry ~= '' then redis.call('XDEL', KEYS[2], entry) end
  finish(rec, 'cancelled', now, ARGV[4])
  emit(KEYS[4], ARGV[3], ARGV[1], rec)
elseif state == 'retrying' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  finish(rec, 'cancelled', now, ARGV[4])
  emit(KEYS[4], ARGV[3], ARGV[1], rec)
elseif state == 'running' then
  redis.call('HSET', rec, 'state', 'cancelling', 'cancel', 1, 'updated_ms', now)
  emit(KEYS[4], ARGV[3], ARGV[1], rec)
end
return {'OK'}
"""
)


_MEMBER = re.compile(r"^[0-9]{15}:job_[a-z2-7]{26}$")


def encode_page_token(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    """The tenant-index member a page token stands for; ValueError if it is not one."""
    try:
        member = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed page token") from None
    if not _MEMBER.match(member):
        raise ValueError("malformed page token")
    return member


class JobQueue:
    """Client of one namespace's job queue; see the module docstring for the semantics.

    `metrics` (a shared.telemetry Metrics) counts retries and dead letters where they happen.
    """

    def __init__(self, redis: Redis, config: JobsConfig, namespace: str, *, metrics: Any = None) -> None:
        self.redis = redis
        self.config = config
        self.keys = JobKeys(namespace)
        self.metrics = metrics
        self._group_ready = False
        self._autoclaim_cursor = "0-0"
        s = redis.register_script
        self._submit, self._start, self._heartbeat = s(_SUBMIT), s(_START), s(_HEARTBEAT)
        self._complete, self._fail, self._cancelled = s(_COMPLETE), s(_FAIL), s(_CANCELLED)
        self._release, self._promote, self._cancel = s(_RELEASE), s(_PROMOTE), s(_CANCEL)

    @property
    def _retention_ms(self) -> int:
        return int(self.config.retention_s * 1000)

    async def ensure_group(self) -> None:
        """Create the stream and the workers' consumer group (idempotent)."""
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.keys.stream, self.config.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_ready = True

    # ---- gateway side --------------------------------------------------------------------
    async def submit(self, tenant: str, specs: Sequence[ClipSpec]) -> list[Submitted]:
        """Queue `specs` all or nothing. A key already used with the same spec returns the
        existing job; with another spec raises IdempotencyConflict and queues nothing.
        Repeated keys inside `specs` must carry the same spec (one job) or conflict too."""
        await self.ensure_group()
        first: dict[str, int] = {}
        unique: list[ClipSpec] = []
        for i, spec in enumerate(specs):
            seen = first.get(spec.idempotency_key)
            if seen is None:
                first[spec.idempotency_key] = len(unique)
                unique.append(spec)
            elif unique[seen].spec_hash != spec.spec_hash:
                raise IdempotencyConflict(i, spec.idempotency_key, job_id_for(tenant, spec.idempotency_key))
        job_ids = [job_id_for(tenant, s.idempotency_key) for s in unique]
        args: list[Any] = [tenant, self.config.events_max, len(unique)]
        for job_id, spec in zip(job_ids, unique):
            args += [job_id, spec.spec_hash, spec.model_dump_json(), self.config.max_attempts, spec.chunks]
        keys = [self.keys.stream, self.keys.tenant_index(tenant), self.keys.events(tenant)]
        keys += [self.keys.record(j) for j in job_ids]
        status, payload = await self._submit(keys=keys, args=args)
        if to_str(status) == "CONFLICT":
            spec = unique[int(payload)]
            index = next(i for i, s in enumerate(specs) if s.idempotency_key == spec.idempotency_key)
            raise IdempotencyConflict(index, spec.idempotency_key, job_ids[int(payload)])
        records = await self._records(job_ids)
        by_key = {
            spec.idempotency_key: Submitted(record, bool(int(flag)))
            for spec, record, flag in zip(unique, records, payload)
        }
        out: list[Submitted] = []
        for spec in specs:
            sub = by_key[spec.idempotency_key]
            out.append(sub)
            by_key[spec.idempotency_key] = Submitted(sub.record, False)  # a repeat in the batch did not create
        return out

    async def _records(self, job_ids: Sequence[str]) -> list[JobRecord]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.record(job_id))
            raws = await pipe.execute()
        return [JobRecord.from_redis(raw) for raw in raws]

    async def get(self, job_id: str) -> JobRecord | None:
        raw = await self.redis.hgetall(self.keys.record(job_id))
        return JobRecord.from_redis(raw) if raw else None

    async def get_for_tenant(self, job_id: str, tenant: str) -> JobRecord:
        """The job if it belongs to `tenant`; JobNotFound otherwise (existence does not leak)."""
        record = await self.get(job_id)
        if record is None or record.tenant != tenant:
            raise JobNotFound(job_id)
        return record

    async def list(
        self, tenant: str, page_size: int, page_token: str = "", states: frozenset[JobState] | None = None
    ) -> tuple[list[JobRecord], str]:
        """A page of the tenant's jobs, newest first, and the next page token ("" at the end).
        Index entries of expired records are dropped on the way."""
        index = self.keys.tenant_index(tenant)
        start = f"({decode_page_token(page_token)}" if page_token else "+"
        out: list[JobRecord] = []
        last = ""
        while len(out) < page_size:
            want = page_size - len(out)
            members = [
                to_str(m) for m in await self.redis.zrange(index, start, "-", desc=True, bylex=True, offset=0, num=want)
            ]
            if not members:
                return out, ""
            records = await self._maybe_records([m.split(":", 1)[1] for m in members])
            stale = [m for m, r in zip(members, records) if r is None]
            if stale:
                await self.redis.zrem(index, *stale)
            for member, record in zip(members, records):
                last = member
                if record is not None and (not states or record.state in states):
                    out.append(record)
                    if len(out) == page_size:
                        break
            start = f"({last}"
            if len(members) < want:
                return out, ""
        more = await self.redis.zrange(index, start, "-", desc=True, bylex=True, offset=0, num=1)
        return out, encode_page_token(last) if more else ""

    async def _maybe_records(self, job_ids: Sequence[str]) -> builtins.list[JobRecord | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.record(job_id))
            raws = await pipe.execute()
        return [JobRecord.from_redis(raw) if raw else None for raw in raws]

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Cancel (see the module docstring); returns the job after the call. Idempotent."""
        status, *_ = await self._cancel(
            keys=[self.keys.record(job_id), self.keys.stream, self.keys.delayed, self.keys.events(tenant)],
            args=[job_id, tenant, self.config.events_max, self._retention_ms],
        )
        if to_str(status) == "NOT_FOUND":
            raise JobNotFound(job_id)
        return await self.get_for_tenant(job_id, tenant)

    async def depth(self) -> QueueDepth:
        await self.ensure_group()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.stream)
            pipe.xpending(self.keys.stream, self.config.group)
            pipe.zcard(self.keys.delayed)
            length, pending, delayed = await pipe.execute()
        in_flight = int(pending["pending"] if isinstance(pending, dict) else pending[0])
        return QueueDepth(
            waiting=max(0, int(length) - in_flight) + int(delayed), in_flight=in_flight, retrying=int(delayed)
        )

    async def dead_letters(self, count: int = 100) -> builtins.list[DeadLetter]:
        """The newest `count` dead letters, newest first."""
        entries = await self.redis.xrevrange(self.keys.dead, count=count)
        return [
            DeadLetter(to_str(entry), to_str(f[b"j"]), to_str(f[b"t"]), to_str(f[b"reason"]), int(f[b"a"]))
            for entry, f in entries
        ]

    async def last_event_id(self, tenant: str) -> str:
        top = await self.redis.xrevrange(self.keys.events(tenant), count=1)
        return to_str(top[0][0]) if top else "0-0"

    async def events(
        self, tenant: str, after_id: str, block_ms: int | None, count: int = 100
    ) -> builtins.list[JobEvent]:
        """Events of `tenant` after `after_id`, waiting up to `block_ms` for the first."""
        response = await self.redis.xread({self.keys.events(tenant): after_id}, count=count, block=block_ms)
        if not response:
            return []
        entries = response[0][1] if isinstance(response, list) else next(iter(response.values()))[0]
        return [
            JobEvent(to_str(eid), to_str(f[b"j"]), JobState(to_str(f[b"s"])), int(f[b"c"]), int(f[b"a"]))
            for eid, f in entries
        ]

    # ---- worker side ---------------------------------------------------------------------
    async def claim(self, consumer: str, block_ms: int | None = None) -> Claim | None:
        """The next attempt for `consumer`: due retries are queued first, a dead worker's
        delivery is taken over before new ones are read. None if nothing came in `block_ms`."""
        await self.ensure_group()
        await self.promote_due()
        for _ in range(8):  # each round starts at most one entry; finished/cancelled ones are skipped
            entries = await self._reclaim(consumer)
            if not entries:
                response = await self.redis.xreadgroup(
                    self.config.group, consumer, {self.keys.stream: ">"}, count=1, block=block_ms
                )
                if not response:
                    return None
                entries = response[0][1] if isinstance(response, list) else next(iter(response.values()))[0]
                block_ms = None  # later rounds of this call do not wait
            for entry, fields in entries:
                claim = await self._start_entry(consumer, to_str(entry), fields)
                if claim is not None:
                    return claim
        return None

    async def _reclaim(self, consumer: str) -> builtins.list:
        idle_ms = int(self.config.claim_idle_s * 1000)
        response = await self.redis.xautoclaim(
            self.keys.stream, self.config.group, consumer, idle_ms, start_id=self._autoclaim_cursor, count=1
        )
        self._autoclaim_cursor = to_str(response[0])
        return [(e, f) for e, f in response[1] if f]  # deleted entries come back without fields

    async def _start_entry(self, consumer: str, entry: str, fields: dict) -> Claim | None:
        job_id, tenant = to_str(fields[b"j"]), to_str(fields[b"t"])
        status, *rest = await self._start(
            keys=[self.keys.record(job_id), self.keys.stream, self.keys.dead, self.keys.events(tenant)],
            args=[
                job_id,
                entry,
                consumer,
                self.config.group,
                self.config.events_max,
                self.config.dead_letters_max,
                self._retention_ms,
                tenant,
            ],
        )
        status = to_str(status)
        if status == "DEAD" and self.metrics is not None:
            self.metrics.jobs_dead_lettered_total.inc()
        if status != "OK":
            return None
        spec_json, spec_hash, attempt, created_ms, reclaimed = rest
        if int(reclaimed) and self.metrics is not None:
            self.metrics.job_retries_total.inc()
        return Claim(
            job_id,
            tenant,
            entry,
            consumer,
            ClipSpec.model_validate_json(spec_json),
            to_str(spec_hash),
            int(attempt),
            int(created_ms),
            bool(int(reclaimed)),
        )

    async def promote_due(self, limit: int = 100) -> int:
        """Queue the retries whose backoff is over; returns how many."""
        seconds, micros = await self.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        due = [to_str(j) for j in await self.redis.zrangebyscore(self.keys.delayed, "-inf", now_ms, start=0, num=limit)]
        promoted = 0
        for job_id in due:
            tenant = await self.redis.hget(self.keys.record(job_id), "tenant")
            if tenant is None:
                await self.redis.zrem(self.keys.delayed, job_id)
                continue
            status, *_ = await self._promote(
                keys=[self.keys.record(job_id), self.keys.delayed, self.keys.stream, self.keys.events(to_str(tenant))],
                args=[job_id, to_str(tenant), self.config.events_max],
            )
            promoted += to_str(status) == "OK"
        return promoted

    def _owner_args(self, claim: Claim) -> builtins.list[Any]:
        return [claim.job_id, claim.entry, claim.consumer, self.config.group]

    async def heartbeat(self, claim: Claim, chunks_done: int) -> str:
        """Keep the delivery and report progress: "RUNNING", "CANCELLING" (stop at the next
        chunk boundary) or "LOST" (another worker took the job over: drop the work)."""
        (status,) = await self._heartbeat(
            keys=[self.keys.record(claim.job_id), self.keys.stream, self.keys.events(claim.tenant)],
            args=[*self._owner_args(claim), chunks_done, self.config.events_max],
        )
        return to_str(status)

    async def complete(self, claim: Claim, result: JobResult) -> int | None:
        """Mark the job SUCCEEDED; returns the finish time (ms), or None if the delivery was lost."""
        status, *rest = await self._complete(
            keys=[self.keys.record(claim.job_id), self.keys.stream, self.keys.events(claim.tenant)],
            args=[*self._owner_args(claim), result.model_dump_json(), self.config.events_max, self._retention_ms],
        )
        if to_str(status) != "OK":
            return None
        if self.metrics is not None:
            self.metrics.jobs_completed_total.inc()
        return int(rest[0])

    async def fail(self, claim: Claim, reason: str, *, retryable: bool = True) -> str:
        """End a failed attempt: "RETRY" (after a backoff), "DEAD" (dead-lettered with `reason`),
        "CANCELLED" (a cancel was pending) or "LOST"."""
        base = self.config.backoff_s(claim.attempt)
        backoff_ms = int(1000 * (base + random.uniform(0, self.config.backoff_jitter * base)))
        status, *_ = await self._fail(
            keys=[
                self.keys.record(claim.job_id),
                self.keys.stream,
                self.keys.delayed,
                self.keys.dead,
                self.keys.events(claim.tenant),
            ],
            args=[
                *self._owner_args(claim),
                reason[:2000],
                int(retryable),
                backoff_ms,
                self.config.events_max,
                self.config.dead_letters_max,
                self._retention_ms,
                claim.tenant,
            ],
        )
        status = to_str(status)
        if self.metrics is not None:
            if status == "RETRY":
                self.metrics.job_retries_total.inc()
            elif status == "DEAD":
                self.metrics.jobs_dead_lettered_total.inc()
        return status

    async def cancelled(self, claim: Claim) -> bool:
        """The worker stopped a job on its cancel request; False if the delivery was lost."""
        (status,) = await self._cancelled(
            keys=[self.keys.record(claim.job_id), self.keys.stream, self.keys.events(claim.tenant)],
            args=[*self._owner_args(claim), self.config.events_max, self._retention_ms],
        )
        return to_str(status) == "OK"

    async def release(self, claim: Claim) -> str:
        """Give an unfinished attempt back (worker shutting down): the job is queued again and
        the attempt is not counted. "OK", "CANCELLED" or "LOST"."""
        (status,) = await self._release(
            keys=[self.keys.record(claim.job_id), self.keys.stream, self.keys.events(claim.tenant)],
            args=[*self._owner_args(claim), self.config.events_max, self._retention_ms, claim.tenant],
        )
        return to_str(status)

    async def wait_for(
        self, job_ids: Sequence[str], tenant: str, timeout_s: float, poll_s: float = 0.2
    ) -> builtins.list[JobRecord]:
        """Poll until every job is final (tests and tools); TimeoutError otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            records = [await self.get_for_tenant(j, tenant) for j in job_ids]
            if all(r.is_terminal for r in records):
                return records
            if loop.time() > deadline:
                pending = {r.job_id: r.state.value for r in records if not r.is_terminal}
                raise TimeoutError(f"jobs not finished after {timeout_s} s: {pending}")
            await asyncio.sleep(poll_s)
