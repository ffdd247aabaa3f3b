"""shared.sessionbus against a real redis-server started for this module.

Tests are plain functions that run one asyncio scenario each (`_run`); every scenario gets
its own namespace, so scenarios never see each other's keys.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from shared.redis_util import connect
from shared.sessionbus import (
    ChunkExpired,
    ChunkOutOfOrder,
    CommandType,
    ControlCommand,
    DuplicateChunk,
    InvalidTransition,
    KeySpace,
    LeaseHeld,
    LeaseLost,
    RedisConfig,
    SessionClosed,
    SessionExists,
    SessionNotFound,
    SessionRegistry,
    SessionState,
    StreamEnded,
)
from tests.fixtures.redis_server import RedisUnavailable, start_redis_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory):
    try:
        url, stop = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    yield url
    stop()


class FakeClock:
    """Registry clock (unix seconds) that tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Scenario = Callable[[Redis, RedisConfig], Awaitable[Any]]


def _run(redis_url: str, scenario: Scenario, **config: Any) -> Any:
    async def main() -> Any:
        cfg = RedisConfig(url=redis_url, namespace=f"t{uuid.uuid4().hex[:10]}", **config)
        redis = connect(cfg)
        try:
            return await scenario(redis, cfg)
        finally:
            await redis.aclose()

    return asyncio.run(main())


async def _session_keys_exist(redis: Redis, cfg: RedisConfig, session_id: str) -> int:
    return int(await redis.exists(*KeySpace(cfg.namespace).session(session_id).all()))


# --------------------------------------------------------------------------- registry


def test_create_get_and_tenant_isolation(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        record = await registry.create("s1", "acme", "gen-0", {"garment": "g1", "seed": 7})
        assert record.state is SessionState.CREATING
        assert (record.tenant, record.replica, record.meta) == ("acme", "gen-0", {"garment": "g1", "seed": 7})
        assert record.idle_ttl_s == cfg.session_idle_ttl_s
        assert await registry.get("s1") == record
        assert await registry.get("nope") is None
        assert await registry.get_for_tenant("s1", "acme") == record
        assert await registry.lease_owner("s1") == "gen-0"

        with pytest.raises(SessionExists):
            await registry.create("s1", "other", "gen-1")
        with pytest.raises(SessionNotFound) as foreign:
            await registry.get_for_tenant("s1", "globex")
        with pytest.raises(SessionNotFound) as unknown:
            await registry.get_for_tenant("s2", "globex")
        with pytest.raises(SessionNotFound):
            await registry.get_for_tenant("bad{id}", "globex")
        # A foreign session reads exactly like an unknown one.
        assert type(foreign.value) is type(unknown.value)
        assert str(foreign.value).replace("s1", "X") == str(unknown.value).replace("s2", "X")

        await registry.create("s2", "acme", "gen-1")
        await registry.create("s3", "globex", "gen-0")
        assert await registry.count_active() == 3
        assert await registry.count_active("acme") == 2
        assert await registry.count_active("globex") == 1
        assert [r.session_id for r in await registry.list_by_replica("gen-0")] == ["s1", "s3"]

    _run(redis_url, scenario)


def test_state_transitions(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        with pytest.raises(InvalidTransition):
            await registry.set_state("s", SessionState.CLOSED)
        with pytest.raises(InvalidTransition):
            await registry.set_state("s", SessionState.EXPIRED)

        record = await registry.set_state("s", SessionState.ACTIVE, first_chunk_index=0)
        assert record.state is SessionState.ACTIVE and record.meta == {"first_chunk_index": 0}
        # Same state again is an idempotent retry that only merges fields.
        record = await registry.set_state("s", SessionState.ACTIVE, chunks=3)
        assert record.meta == {"first_chunk_index": 0, "chunks": 3}
        with pytest.raises(InvalidTransition) as err:
            await registry.set_state("s", SessionState.CREATING)
        assert (err.value.current, err.value.target) == (SessionState.ACTIVE, SessionState.CREATING)

        control, output = registry.control("s"), registry.output("s")
        await output.append(0, b"chunk0")
        record = await registry.set_state("s", SessionState.CLOSING)
        assert record.closing_at is not None and record.closed_at is None
        ((_, close_cmd),) = await control.read()
        assert close_cmd.type is CommandType.CLOSE
        with pytest.raises(SessionClosed):  # no commands once closing
            await control.send(ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": "x"}))
        await output.append(1, b"chunk1")  # the replica flushes its last chunk
        record = await registry.set_state("s", SessionState.CLOSED, reason="client_closed")
        assert record.state is SessionState.CLOSED and record.reason == "client_closed"
        assert [c.index for c in await output.read_from(0, count=10)] == [0, 1]
        with pytest.raises(StreamEnded) as ended:
            await output.read_from(2)
        assert (ended.value.reason, ended.value.end_index) == ("client_closed", 2)
        for target in (SessionState.ACTIVE, SessionState.FAILED, SessionState.CLOSING):
            with pytest.raises(InvalidTransition):
                await registry.set_state("s", target)

        await registry.create("f", "acme", "gen-0")
        await registry.set_state("f", SessionState.ACTIVE)
        failed = await registry.set_state("f", SessionState.FAILED, reason="oom")
        assert failed.state is SessionState.FAILED and failed.closed_at is not None
        assert [cmd.type for _, cmd in await registry.control("f").read()] == [CommandType.CLOSE]
        assert await registry.count_active() == 0
        with pytest.raises(SessionNotFound):
            await registry.set_state("missing", SessionState.ACTIVE)

    _run(redis_url, scenario)


def test_close_twice_is_harmless(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        await registry.set_state("s", SessionState.ACTIVE)
        first = await registry.close("s")
        second = await registry.close("s", reason="again")
        assert first.state is SessionState.CLOSED and first.closed_at is not None
        assert second == first
        assert [cmd.type for _, cmd in await registry.control("s").read()] == [CommandType.CLOSE]
        assert await registry.output("s").end("late") == 0  # the end marker is already there
        with pytest.raises(StreamEnded):
            await registry.output("s").append(0, b"x")
        with pytest.raises(SessionClosed):
            await registry.touch("s")
        with pytest.raises(SessionClosed):
            await registry.claim("s", "gen-1")
        assert await registry.lease_owner("s") is None
        assert await registry.count_active("acme") == 0
        assert await registry.list_by_replica("gen-0") == []
        # Every key of the session is now on the retention clock.
        for key in KeySpace(cfg.namespace).session("s").all():
            if await redis.exists(key):
                assert 0 < await redis.pttl(key) <= cfg.terminal_retention_s * 1000

        await registry.create("c", "acme", "gen-0")  # closing straight from CREATING
        assert (await registry.close("c")).state is SessionState.CLOSED
        with pytest.raises(SessionNotFound):
            await registry.close("missing")

    _run(redis_url, scenario)


def test_idle_expiry_reaping(redis_url: str) -> None:
    clock = FakeClock()

    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg, clock=clock)
        for sid in ("idle", "busy"):
            await registry.create(sid, "acme", "gen-0")
            await registry.set_state(sid, SessionState.ACTIVE)
        await registry.create("stuck", "acme", "gen-1")  # never became ACTIVE
        await registry.output("idle").append(0, b"c0")

        clock.advance(20)
        assert await registry.reap_expired() == []
        await registry.touch("busy")
        clock.advance(15)  # idle/stuck: 35 s without activity, busy: 15 s
        assert sorted(await registry.reap_expired()) == ["idle", "stuck"]
        assert await registry.reap_expired() == []

        idle = await registry.get("idle")
        assert idle is not None and idle.state is SessionState.EXPIRED and idle.reason == "idle_timeout"
        assert (await registry.get("stuck")).state is SessionState.FAILED
        assert (await registry.get("busy")).state is SessionState.ACTIVE
        ((_, cmd),) = await registry.control("idle").read()
        assert cmd.type is CommandType.CLOSE and cmd.payload == {"reason": "idle_timeout"}
        chunks = [c async for c in registry.output("idle").iterate(0, block_ms=100)]
        assert [c.index for c in chunks] == [0]  # then the end marker stopped the iteration
        assert await registry.count_active() == 1
        assert await registry.count_active("acme") == 1

        clock.advance(30)
        assert await registry.reap_expired(clock.now) == ["busy"]
        # Data is deleted after the grace period.
        await asyncio.sleep(cfg.terminal_retention_s + 0.3)
        for sid in ("idle", "stuck", "busy"):
            assert await registry.get(sid) is None
            assert await _session_keys_exist(redis, cfg, sid) == 0
        with pytest.raises(SessionNotFound):  # a late reader is told, not left waiting
            await registry.output("idle").read_from(1, block_ms=5000)
        assert await registry.count_active() == 0

    _run(redis_url, scenario, session_idle_ttl_s=30, terminal_retention_s=0.3)


def test_lease_claim_renew_expire(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-a", lease_s=0.4)
        await registry.set_state("s", SessionState.ACTIVE)
        with pytest.raises(LeaseHeld) as held:
            await registry.claim("s", "gen-b")
        assert held.value.owner == "gen-a"
        await registry.renew("s", "gen-a", lease_seconds=0.4)
        with pytest.raises(LeaseLost):
            await registry.renew("s", "gen-b")
        assert await registry.orphaned() == []

        await asyncio.sleep(0.6)  # gen-a died: its lease runs out
        assert await registry.lease_owner("s") is None
        assert await registry.orphaned() == ["s"]
        with pytest.raises(LeaseLost):
            await registry.renew("s", "gen-a")

        record = await registry.claim("s", "gen-b", lease_seconds=5)
        assert record.replica == "gen-b" and record.state is SessionState.ACTIVE
        assert await registry.orphaned() == []
        assert await registry.list_by_replica("gen-a") == []
        assert [r.session_id for r in await registry.list_by_replica("gen-b")] == ["s"]
        assert await registry.claim("s", "gen-b", lease_seconds=5) == record  # re-claim extends
        assert await registry.release("s", "gen-a") is False
        assert await registry.release("s", "gen-b") is True
        assert await registry.lease_owner("s") is None
        with pytest.raises(SessionNotFound):
            await registry.claim("missing", "gen-b")

    _run(redis_url, scenario)


# --------------------------------------------------------------------------- control stream


def test_control_stream_order_and_results(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        await registry.set_state("s", SessionState.ACTIVE)
        commands = [
            ControlCommand(type=CommandType.SWITCH_GARMENT, payload={"garment": "g2"}),
            ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": "walks left"}),
            ControlCommand(type=CommandType.SWITCH_GARMENT, payload={"garment": "g3"}),
        ]

        async def early_reader() -> list[tuple[str, ControlCommand]]:
            stream, seen = registry.control("s"), []
            while len(seen) < len(commands):
                seen += await stream.read(block_ms=2000)
            return seen

        reader = asyncio.create_task(early_reader())
        await asyncio.sleep(0.05)  # the reader is blocked in XREAD before anything is sent
        gateway = registry.control("s")
        ids = []
        for cmd in commands:
            ids.append(await gateway.send(cmd))
        got = await reader
        assert [cid for cid, _ in got] == ids
        assert [(c.type, c.payload) for _, c in got] == [(c.type, c.payload) for c in commands]
        assert all(c.issued_at is not None for _, c in got)

        late = registry.control("s")  # started after the sends
        assert await late.read(block_ms=100) == got
        assert late.last_id == ids[-1]
        assert await late.read(block_ms=50) == []

        # Results: a waiter started before the ack, one after, and a timeout.
        waiter = asyncio.create_task(gateway.wait_result(ids[0], timeout_s=5))
        await asyncio.sleep(0.05)
        assert await late.ack_result(ids[0], 12) == 12
        assert await waiter == 12
        assert await gateway.wait_result(ids[0], timeout_s=0) == 12
        assert await late.ack_result(ids[0], 99) == 12  # first ack wins
        assert await gateway.wait_result(ids[1], timeout_s=0.2) is None
        await late.ack_result(ids[2], 14)
        await late.ack_result(ids[1], 13)
        assert await gateway.wait_result(ids[1], timeout_s=1) == 13
        assert await late.last_acked_id() == ids[2]
        # A replica taking over resumes after the last acked command.
        assert await registry.control("s", start_id=await late.last_acked_id()).read() == []

        with pytest.raises(SessionNotFound):
            await registry.control("missing").send(commands[0])

    _run(redis_url, scenario)


def test_blocking_reads_longer_than_socket_timeout(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await registry.output("s").read_from(0, block_ms=1200) == []
        assert await registry.control("s").read(block_ms=600) == []
        assert await registry.control("s").wait_result("1-0", timeout_s=0.6) is None
        assert loop.time() - start >= 2.3

    _run(redis_url, scenario, socket_timeout_s=0.5)


# --------------------------------------------------------------------------- output stream


def _payload(index: int, size: int = 1024) -> bytes:
    return bytes([index % 256, 0, 255]) + random.Random(index).randbytes(size)


def test_output_resume_exactly_once(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        output = registry.output("s")
        for i in range(10):
            await output.append(i, _payload(i), {"frames": 12, "pts": i * 0.5})
        await output.end("done")

        received = []
        async for chunk in output.iterate(0):  # a client that disconnects after 4 chunks
            received.append(chunk)
            if len(received) == 4:
                break
        resumed = registry.output("s")  # reconnects through another gateway replica
        received += [c async for c in resumed.iterate(4)]
        assert [c.index for c in received] == list(range(10))
        assert all(c.payload == _payload(c.index) for c in received)
        assert received[5].meta == {"frames": 12, "pts": 2.5}
        assert [c.index for c in await output.read_from(4, count=3)] == [4, 5, 6]
        assert (await output.bounds()) == (0, 10, "done")

    _run(redis_url, scenario)


def test_large_chunks(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        output = registry.output("s")
        blobs = [os.urandom(3 * 1024 * 1024) for _ in range(3)]
        for i, blob in enumerate(blobs):
            await output.append(i, blob)
        assert [c.payload for c in await output.read_from(0, count=3)] == blobs

    _run(redis_url, scenario)


def test_duplicate_and_out_of_order_appends_rejected(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        output = registry.output("s")
        with pytest.raises(ChunkOutOfOrder):
            await output.append(1, b"x")  # must start at 0
        await output.append(0, b"a")
        await output.append(1, b"b")
        with pytest.raises(DuplicateChunk) as dup:
            await output.append(1, b"B")
        assert dup.value.expected == 2
        with pytest.raises(DuplicateChunk):
            await output.append(0, b"A")
        with pytest.raises(ChunkOutOfOrder) as gap:
            await output.append(3, b"d")
        assert not isinstance(gap.value, DuplicateChunk) and gap.value.expected == 2
        assert [(c.index, c.payload) for c in await output.read_from(0)] == [(0, b"a"), (1, b"b")]
        with pytest.raises(SessionNotFound):
            await registry.output("missing").append(0, b"x")
        assert await _session_keys_exist(redis, cfg, "missing") == 0

    _run(redis_url, scenario)


def test_trimmed_resume_raises_chunk_expired(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        output = registry.output("s")
        for i in range(12):
            await output.append(i, _payload(i, 16))
        assert (await output.bounds()) == (7, 12, None)
        with pytest.raises(ChunkExpired) as err:
            await output.read_from(2)
        assert (err.value.index, err.value.oldest) == (2, 7)
        with pytest.raises(ChunkExpired):
            async for _ in output.iterate(6):
                pass
        assert [c.index for c in await output.read_from(7, count=10)] == [7, 8, 9, 10, 11]

    _run(redis_url, scenario, output_backlog_max_chunks=5)


def test_end_marker_stops_live_iteration(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        await registry.create("s", "acme", "gen-0")
        output = registry.output("s")

        async def reader() -> list[int]:
            return [c.index async for c in registry.output("s").iterate(0, block_ms=5000)]

        task = asyncio.create_task(reader())
        for i in range(3):
            await asyncio.sleep(0.02)
            await output.append(i, _payload(i, 8))
        assert await output.end("finished") == 3
        assert await asyncio.wait_for(task, 5) == [0, 1, 2]
        assert await output.end("again") == 3  # idempotent
        with pytest.raises(StreamEnded) as ended:
            await output.read_from(3)
        assert ended.value.reason == "finished"
        with pytest.raises(StreamEnded):
            await output.read_from(10, block_ms=5000)  # past the end: no wait
        with pytest.raises(StreamEnded):
            await output.append(3, b"late")

        # A reader cancelled mid-wait (client gone) leaves the connection pool usable.
        await registry.create("c", "acme", "gen-0")
        waiting = asyncio.create_task(registry.output("c").read_from(0, block_ms=5000))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await registry.output("c").append(0, b"after-cancel")
        assert [c.payload for c in await registry.output("c").read_from(0)] == [b"after-cancel"]
        with pytest.raises(SessionNotFound):
            async for _ in registry.output("missing").iterate(0):
                pass

        # Without an end marker, a stop event ends the iteration.
        await registry.create("t", "acme", "gen-0")
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        assert [c async for c in registry.output("t").iterate(0, stop_event=stop, block_ms=50)] == []

    _run(redis_url, scenario)


def test_concurrent_sessions(redis_url: str) -> None:
    n_sessions, n_chunks, n_commands = 4, 25, 10  # commands per session, from two gateways

    async def scenario(redis: Redis, cfg: RedisConfig) -> None:
        registry = SessionRegistry(redis, cfg)
        sids = [f"s{i}" for i in range(n_sessions)]
        for sid in sids:
            await registry.create(sid, "acme", f"gen-{sid}")
            await registry.set_state(sid, SessionState.ACTIVE)

        async def replica(sid: str) -> tuple[int, list[tuple[str, ControlCommand]]]:
            """Generates chunks, applies commands at chunk boundaries, acks them; stops once
            it made `n_chunks` chunks and applied every gateway's commands."""
            control, output, applied, i = registry.control(sid), registry.output(sid), [], 0
            while i < n_chunks or len(applied) < n_commands:
                for cid, cmd in await control.read():
                    applied.append((cid, cmd))
                    await control.ack_result(cid, i)
                await output.append(i, f"{sid}:{i}".encode(), {"i": i})
                await asyncio.sleep(random.uniform(0, 0.005))
                i += 1
            await registry.close(sid)
            return i, applied

        async def gateway(sid: str, name: str) -> list[tuple[str, int | None]]:
            control, sent = registry.control(sid), []
            for k in range(n_commands // 2):
                cid = await control.send(
                    ControlCommand(type=CommandType.SWITCH_GARMENT, payload={"from": name, "k": k})
                )
                sent.append((cid, await control.wait_result(cid, timeout_s=5)))
            return sent

        async def client(sid: str, start: int) -> list[bytes]:
            await asyncio.sleep(random.uniform(0, 0.05))
            return [c.payload async for c in registry.output(sid).iterate(start, block_ms=2000)]

        tasks = {}
        for sid in sids:
            tasks[sid, "replica"] = asyncio.create_task(replica(sid))
            for name in ("gw-a", "gw-b"):
                tasks[sid, name] = asyncio.create_task(gateway(sid, name))
            for start in (0, 10):
                tasks[sid, start] = asyncio.create_task(client(sid, start))
        results = dict(zip(tasks, await asyncio.wait_for(asyncio.gather(*tasks.values()), 30)))

        for sid in sids:
            total, applied = results[sid, "replica"]
            for start in (0, 10):
                assert results[sid, start] == [f"{sid}:{i}".encode() for i in range(start, total)]
            applied_ids = [cid for cid, _ in applied]
            assert applied_ids == sorted(applied_ids, key=lambda c: tuple(map(int, c.split("-"))))
            for name in ("gw-a", "gw-b"):
                sent = results[sid, name]
                assert all(idx is not None for _, idx in sent)
                # Each gateway's commands arrive in its own send order, effective indices ascend.
                mine = [cmd.payload["k"] for _, cmd in applied if cmd.payload["from"] == name]
                assert mine == list(range(n_commands // 2))
                assert [idx for _, idx in sent] == sorted(idx for _, idx in sent)
        assert await registry.count_active() == 0

    _run(redis_url, scenario)
