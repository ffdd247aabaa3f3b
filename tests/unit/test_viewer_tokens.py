"""Viewer tokens (services/studio/viewer.py) against a throwaway redis-server, with a fake clock
and a stand-in session registry: scope to one session and tenant, expiry, revocation, actions,
what Redis holds (digests only), the dev launch tokens `fashionchameleon up` mints; plus the
pure pieces (ttl and action resolution, the WebSocket's message helpers, the player page as
package data). The same promises over gRPC and in a browser: tests/integration/test_viewer_player.py.
"""

from __future__ import annotations

import asyncio
import math
import tomllib
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from fashionchameleon.v1 import studio_pb2
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.studio import http as studio_http
from services.studio.viewer import (
    SWITCH_GARMENT,
    UPDATE_PROMPT,
    WATCH,
    ViewerTokens,
    actions_from_proto,
    actions_to_proto,
    normalize_actions,
    player_path,
    resolve_ttl,
    token_digest,
)
from shared.config import ViewerConfig
from shared.sessionbus import SessionState
from tests.fixtures.redis_server import RedisUnavailable, start_redis_server

ROOT = Path(__file__).resolve().parents[2]
SID, OTHER = "ses_" + "a" * 26, "ses_" + "b" * 26


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    try:
        url, stop = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as e:
        pytest.skip(str(e))
    yield url
    stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Registry:
    """What ViewerTokens reads of the session registry: `get(session_id)`."""

    def __init__(self) -> None:
        self.records: dict[str, SimpleNamespace] = {}

    def add(self, session_id: str, tenant: str = "acme", state: SessionState = SessionState.ACTIVE) -> None:
        self.records[session_id] = SimpleNamespace(session_id=session_id, tenant=tenant, state=state)

    async def get(self, session_id: str):
        return self.records.get(session_id)


def run(redis_url, body):
    """Run `body(tokens, registry, clock, redis)` on a fresh namespace."""
    from redis.asyncio import Redis

    async def main():
        redis = Redis.from_url(redis_url)
        try:
            await redis.flushdb()
            registry, clock = Registry(), Clock()
            registry.add(SID)
            registry.add(OTHER)
            tokens = ViewerTokens(redis, "fc", ViewerConfig(), registry, clock=clock)
            return await body(tokens, registry, clock, redis)
        finally:
            await redis.aclose()

    return asyncio.run(main())


def assert_invalid(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, Unauthenticated) and err.value.reason == "VIEWER_TOKEN_INVALID"
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


# ---- pure pieces -------------------------------------------------------------------------------


def test_ttl_defaults_and_bounds():
    config = ViewerConfig(default_ttl_s=900, max_ttl_s=3600)
    assert resolve_ttl(0, config) == 900 and resolve_ttl(60, config) == 60 and resolve_ttl(3600, config) == 3600
    with pytest.raises(InvalidArgument) as err:
        resolve_ttl(3601, config)
    assert err.value.reason == "FIELD_INVALID" and err.value.metadata == {"field": "ttl_seconds", "limit": "3600.0"}
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(InvalidArgument):
            resolve_ttl(bad, config)
    with pytest.raises(ValueError, match="exceeds"):
        ViewerConfig(default_ttl_s=100, max_ttl_s=10)
    assert ViewerConfig().default_ttl_s == 900 and ViewerConfig().max_ttl_s == 3600 and not ViewerConfig().dev_launch


def test_actions_always_watch_first_no_duplicates():
    assert actions_from_proto([]) == (WATCH,)
    both = [studio_pb2.VIEWER_ACTION_UPDATE_PROMPT, studio_pb2.VIEWER_ACTION_SWITCH_GARMENT]
    assert actions_from_proto(both * 2) == (WATCH, SWITCH_GARMENT, UPDATE_PROMPT)
    assert actions_to_proto((WATCH, SWITCH_GARMENT)) == [studio_pb2.VIEWER_ACTION_WATCH, both[1]]
    for bad in ([studio_pb2.VIEWER_ACTION_UNSPECIFIED], [99]):
        with pytest.raises(InvalidArgument) as err:
            actions_from_proto(bad)
        assert err.value.metadata["field"] == "actions[0]"
    with pytest.raises(ValueError):
        normalize_actions(["fly"])


def test_player_path_and_websocket_helpers():
    assert player_path(SID, "fcv_x-y") == f"/player?session={SID}&token=fcv_x-y"
    denied = PermissionDenied("no", reason="VIEWER_ACTION_DENIED", metadata={"action": "switch_garment"})
    assert studio_http.close_code(denied) == 4403 and studio_http.close_code(Unauthenticated("x")) == 4401
    assert studio_http.error_body(denied, "r1") == {
        "type": "error",
        "code": "PERMISSION_DENIED",
        "reason": "VIEWER_ACTION_DENIED",
        "message": "no",
        "metadata": {"action": "switch_garment"},
        "request_id": "r1",
    }
    assert studio_http._garment_input({"catalog_id": "red"}).catalog_id == "red"
    assert studio_http._garment_input({"image_b64": "iVBORw=="}).data == b"\x89PNG"
    for bad in (None, {}, {"catalog_id": "a", "image_b64": "b"}, {"image_b64": "%%%"}, {"catalog_id": 3}):
        with pytest.raises(InvalidArgument):
            studio_http._garment_input(bad)
    assert studio_http._from_chunk(None) == 0 and studio_http._from_chunk("12") == 12
    for bad in ("-1", "x", "1" * 30):
        with pytest.raises(InvalidArgument):
            studio_http._from_chunk(bad)


def test_chunk_event_mirrors_the_video_chunk():
    chunk = studio_pb2.VideoChunk(index=4, fmp4=b"abcd", garment_id="green", switch_applied=True, num_frames=12, fps=24)
    chunk.generated_at.FromSeconds(1700000000)
    event = studio_http.chunk_event(chunk)
    assert event["type"] == "chunk" and event["index"] == 4 and event["bytes"] == 4
    assert event["garment_id"] == "green" and event["switch_applied"] and event["generated_at"] == 1700000000.0


def test_player_page_is_package_data():
    html = studio_http.player_html()
    assert "MediaSource" in html and "new WebSocket" in html and "/v1/player/sessions" in html
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "player.html" in package_data["services.studio"]


# ---- tokens in Redis ---------------------------------------------------------------------------


def test_a_token_opens_its_session_only_and_redis_keeps_only_its_digest(redis_url):
    async def body(tokens, registry, clock, redis):
        token, grant = await tokens.mint("acme", SID, [SWITCH_GARMENT], 900)
        assert token.startswith("fcv_") and len(token) == 47 and grant.actions == (WATCH, SWITCH_GARMENT)
        assert grant.expires_at == clock.now + 900
        assert (await tokens.check(SID, token, SWITCH_GARMENT)) == grant
        assert (await tokens.check(SID, token)).tenant == "acme"
        keys = [k.decode() for k in await redis.keys("*")]
        assert sorted(keys) == sorted(
            [f"fc:session:{{{SID}}}:viewer:{token_digest(token)}", f"fc:session:{{{SID}}}:viewers"]
        )
        for key in keys:
            assert token.encode() not in (await redis.dump(key) or b"")
        # the token's key expires with it: 900 s from minting (wide lower bound: wall time passes
        # between the mint and this read, more on a loaded machine)
        assert 600_000 < await redis.pttl(keys[0] if "viewer:" in keys[0] else keys[1]) <= 900_000
        for session_id, presented in ((OTHER, token), (SID, token[:-1] + "A"), (SID, "nonsense"), ("bad id", token)):
            with pytest.raises(Unauthenticated) as err:
                await tokens.check(session_id, presented)
            assert_invalid(err)
            assert token not in str(err.value)
        with pytest.raises(PermissionDenied) as err:
            await tokens.check(SID, token, UPDATE_PROMPT)
        assert err.value.reason == "VIEWER_ACTION_DENIED" and err.value.metadata == {"action": "update_prompt"}

    run(redis_url, body)


def test_tokens_expire(redis_url):
    async def body(tokens, registry, clock, redis):
        token, _ = await tokens.mint("acme", SID, [], 60)
        clock.now += 59
        await tokens.check(SID, token)
        clock.now += 1
        with pytest.raises(Unauthenticated) as err:
            await tokens.check(SID, token)
        assert_invalid(err)
        short, _ = await tokens.mint("acme", SID, [], 0.2)  # Redis drops it on its own, too
        await asyncio.sleep(0.4)
        assert await redis.get(f"fc:session:{{{SID}}}:viewer:{token_digest(short)}") is None

    run(redis_url, body)


def test_a_session_that_ended_or_changed_tenant_refuses_its_tokens(redis_url):
    async def body(tokens, registry, clock, redis):
        token, _ = await tokens.mint("acme", SID, [], 900)
        registry.add(SID, tenant="globex")  # the record says another tenant: never honoured
        with pytest.raises(Unauthenticated):
            await tokens.check(SID, token)
        for state in (SessionState.CLOSED, SessionState.EXPIRED, SessionState.FAILED):
            registry.add(SID, state=SessionState.CLOSING)
            await tokens.check(SID, token)  # CLOSING: still watchable to the end
            registry.add(SID, state=state)
            with pytest.raises(Unauthenticated) as err:
                await tokens.check(SID, token)
            assert_invalid(err)
            assert await redis.exists(f"fc:session:{{{SID}}}:viewers") == 0, "an ended session's tokens are deleted"
            token, _ = await tokens.mint("acme", SID, [], 900)
        del registry.records[SID]  # the record is gone
        with pytest.raises(Unauthenticated):
            await tokens.check(SID, token)

    run(redis_url, body)


def test_revoking_a_session_deletes_all_its_tokens_and_no_others(redis_url):
    async def body(tokens, registry, clock, redis):
        mine = [(await tokens.mint("acme", SID, [], ttl))[0] for ttl in (100, 900, 300)]
        theirs, _ = await tokens.mint("acme", OTHER, [], 900)
        assert (
            600_000 < await redis.pttl(f"fc:session:{{{SID}}}:viewers") <= 900_000
        )  # the longest-lived one (900 s, not 300)
        assert await tokens.revoke_session(SID) == 3
        for token in mine:
            with pytest.raises(Unauthenticated):
                await tokens.check(SID, token)
        await tokens.check(OTHER, theirs)
        assert await redis.keys(f"fc:session:{{{SID}}}*") == []
        assert await tokens.revoke_session(SID) == 0

    run(redis_url, body)


def test_launch_tokens(redis_url):
    async def body(tokens, registry, clock, redis):
        launch, grant = await tokens.mint_launch(
            "dev", reference_key="uploads/dev/abc", garment_id="red", prompt="waves", ttl_s=100
        )
        assert launch.startswith("fcl_") and len(launch) == 47
        assert (await tokens.check_launch(launch)) == grant and grant.tenant == "dev" and grant.garment_id == "red"
        assert [k.decode() for k in await redis.keys("*")] == [f"fc:viewer-launch:{token_digest(launch)}"]
        with pytest.raises(Unauthenticated):
            await tokens.check(SID, launch)  # a launch token is no viewer token
        token, _ = await tokens.mint("acme", SID, [], 100)
        with pytest.raises(Unauthenticated):
            await tokens.check_launch(token)  # nor the other way round
        clock.now += 100
        with pytest.raises(Unauthenticated):
            await tokens.check_launch(launch)
        clock.now -= 100
        await tokens.revoke_launch(launch)
        with pytest.raises(Unauthenticated) as err:
            await tokens.check_launch(launch)
        assert_invalid(err)

    run(redis_url, body)
