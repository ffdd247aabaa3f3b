"""Exactly-once control commands, prompt revisions in order and the tenant quota reservation,
against a real redis-server (issue 14, items 4, 5 and 6). Same harness as test_redis_queue.py.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from shared.sessionbus import (
    CommandType,
    ControlCommand,
    RedisConfig,
    RequestReused,
    SessionRegistry,
    SessionState,
)
from tests.integration import test_redis_queue
from tests.integration.test_redis_queue import _run

redis_url = test_redis_queue.redis_url  # that module's redis-server fixture, shared here

pytestmark = pytest.mark.timeout(60)


async def _session(redis: Redis, cfg: RedisConfig, session_id: str = "ses_ctl", tenant: str = "acme"):
    registry = SessionRegistry(redis, cfg)
    await registry.create(session_id, tenant, "gen-1")
    return registry


def test_a_request_id_publishes_once_and_returns_the_first_command(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig):
        registry = await _session(redis, cfg)
        control = registry.control("ses_ctl")
        switch = ControlCommand(type=CommandType.SWITCH_GARMENT, payload={"garment_key": "k1"})
        sent = await asyncio.gather(
            *(control.send_once(switch, request_id="req-1", fingerprint="fp-a") for _ in range(10))
        )
        assert len({s.command_id for s in sent}) == 1 and sum(not s.duplicate for s in sent) == 1
        entries = await control.read()
        assert [cmd.type for _, cmd in entries] == [CommandType.SWITCH_GARMENT]
        await control.ack_result(sent[0].command_id, 4)
        again = await control.send_once(switch, request_id="req-1", fingerprint="fp-a")
        assert again.duplicate and await control.wait_result(again.command_id, 1.0) == 4
        with pytest.raises(RequestReused):
            await control.send_once(switch, request_id="req-1", fingerprint="fp-b")
        other = await control.send_once(switch, request_id="req-2", fingerprint="fp-a")
        assert not other.duplicate and other.command_id != sent[0].command_id
        plain = [await control.send(switch) for _ in range(2)]  # without a request_id: every call publishes
        assert len(set(plain)) == 2
        assert len(await control.read()) == 3

    _run(redis_url, scenario)


def test_prompt_revisions_are_assigned_in_stream_order(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig):
        registry = await _session(redis, cfg)
        control = registry.control("ses_ctl")

        async def update(i: int):
            await asyncio.sleep(0.001 * (i % 3))
            cmd = ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": f"prompt {i} / ünï"})
            return await control.send_once(cmd, request_id=f"p-{i}", fingerprint=str(i), assign_revision=True)

        sent = await asyncio.gather(*(update(i) for i in range(40)))
        assert sorted(s.revision for s in sent) == list(range(1, 41))
        entries = await control.read(count=100)
        revisions = [cmd.payload["revision"] for _, cmd in entries]
        assert revisions == list(range(1, 41))  # stream order is revision order
        by_id = {cid: cmd for cid, cmd in entries}
        for s in sent:  # each caller learns the revision its own command carries
            assert by_id[s.command_id].payload["revision"] == s.revision
        assert {cmd.payload["prompt"] for _, cmd in entries} == {f"prompt {i} / ünï" for i in range(40)}
        retry = await control.send_once(
            ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": "prompt 3 / ünï"}),
            request_id="p-3",
            fingerprint="3",
            assign_revision=True,
        )
        assert retry.duplicate and retry.revision == sent[3].revision  # a retry takes no new revision

    _run(redis_url, scenario)


def test_tenant_quota_reservations_are_atomic(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig):
        registry = SessionRegistry(redis, cfg)
        for i in range(16):  # 16 sessions held
            await registry.create(f"ses_held{i}", "acme", "gen-1")
            assert await registry.reserve_quota("acme", f"r-held{i}", 32)
            await registry.hold_quota("acme", f"r-held{i}", f"ses_held{i}")
        granted = await asyncio.gather(*(registry.reserve_quota("acme", f"r-new{i}", 32) for i in range(24)))
        assert sum(granted) == 16  # 16 + 24 concurrent creates against 32: never more than 32
        assert not await registry.reserve_quota("acme", "r-late", 32)
        assert await registry.reserve_quota("globex", "r-other", 32)  # quotas are per tenant
        # a failed create gives its reservation back; an ended session frees its slot
        await registry.release_quota("acme", "r-new0")
        assert await registry.reserve_quota("acme", "r-retry", 32)
        await registry.close("ses_held0")
        assert await registry.reserve_quota("acme", "r-after-close", 32)
        # a session that ended without its slot being given back (a crash) is reclaimed
        await registry.set_state("ses_held1", SessionState.FAILED, reason="x")
        await redis.zadd(f"{cfg.namespace}:quota:tenant:acme", {"ses_held1": float("inf")})
        assert await registry.reserve_quota("acme", "r-reclaimed", 32)
        assert not await registry.reserve_quota("acme", "r-full-again", 32)

    _run(redis_url, scenario)


def test_pending_reservations_lapse(redis_url: str) -> None:
    async def scenario(redis: Redis, cfg: RedisConfig):
        registry = SessionRegistry(redis, cfg)
        assert await registry.reserve_quota("acme", "r-1", 1, pending_s=0.2)
        assert not await registry.reserve_quota("acme", "r-2", 1, pending_s=0.2)
        await asyncio.sleep(0.3)  # the first create never finished: its reservation lapsed
        assert await registry.reserve_quota("acme", "r-2", 1, pending_s=0.2)

    _run(redis_url, scenario)
