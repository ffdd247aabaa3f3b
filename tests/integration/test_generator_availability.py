"""A create during a generator outage answers at once instead of hanging (issue 14, item 3).

Generator replicas send a heartbeat to Redis while they admit sessions; the gateway reads it. Once
every replica's heartbeat has lapsed (the only replica was killed, Serve is replacing it), a
CreateSession answers UNAVAILABLE with RetryInfo without calling the generator; a create that
reaches no replica within `generator.open_timeout_s` answers the same instead of waiting for the
replacement. Real redis-server; the encoder and generator handles are stand-ins (no model)."""

from __future__ import annotations

import asyncio
import io
import time
from types import SimpleNamespace

import grpc
import pytest
import redis.asyncio as aioredis
from PIL import Image

from fashionchameleon.v1 import common_pb2, encoder_pb2, studio_pb2
from services.common.errors import ServiceError
from services.common.tensors import tensor_to_proto
from shared.config import AppConfig, AuthConfig, GeneratorConfig
from shared.sessionbus import SessionRegistry
from shared.sessionbus.config import RedisConfig
from shared.storage.config import StorageConfig
from tests.fixtures.redis_server import RedisUnavailable, start_redis_server

KEY = "key-acme-0123456789"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    try:
        url, stop = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisUnavailable as e:
        pytest.fail(f"redis-server is required: {e}")
    yield url
    stop()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


class _Generator:
    """A Serve handle whose open_session never completes (no replica) or opens at once."""

    def __init__(self, hang: bool):
        self.hang, self.calls, self.cancelled = hang, 0, 0
        self.registry = None  # set: an open registers the session, as a replica does

    def options(self, **_):
        return self

    @property
    def open_session(self):
        return self

    def remote(self, state, tenant, meta):
        self.calls += 1
        gen = self

        class Call:
            def __await__(self):
                return self._run().__await__()

            async def _run(self):
                if gen.hang:
                    await asyncio.sleep(3600)
                await gen.registry.create(state.session_id, tenant, "gen-new", meta)
                return SimpleNamespace(session_id=state.session_id)

            def cancel(self):
                gen.cancelled += 1

        return Call()


def _studio(tmp_path, redis_url, namespace, generator, open_timeout_s=10.0):
    from services.studio.service import StudioService

    config = AppConfig(
        auth=AuthConfig(api_keys={"acme": KEY}),
        storage=StorageConfig.from_url(str(tmp_path / "store")),
        redis=RedisConfig(url=redis_url, namespace=namespace, session_lease_s=2.0),
        generator=GeneratorConfig(open_timeout_s=open_timeout_s),
    )
    latent = tensor_to_proto(__import__("torch").zeros(1, 4, 1, 2, 2))

    async def encode_image(key, kind):
        return latent

    async def encode_prompt(req: encoder_pb2.EncodePromptRequest):
        return SimpleNamespace(embedding=latent)

    studio = StudioService(
        config.for_deployment("studio").to_json(),
        generator,
        SimpleNamespace(EncodePrompt=SimpleNamespace(remote=encode_prompt)),
    )
    studio._encode_image = encode_image
    return studio, config


def _create(studio):
    request = studio_pb2.CreateSessionRequest(
        reference=common_pb2.ImageInput(data=_png()),
        garment=common_pb2.ImageInput(data=_png()),
        prompt="a person walks",
    )
    return studio.CreateSession(request, None, [("x-api-key", KEY)])


def test_heartbeats_tell_live_lapsed_and_unknown(redis_url):
    async def main():
        r = aioredis.Redis.from_url(redis_url)
        now = [1000.0]
        reg = SessionRegistry(
            r, RedisConfig(url=redis_url, namespace="hb-unit", session_lease_s=5.0), clock=lambda: now[0]
        )
        assert await reg.live_generators() is None  # no replica ever said anything
        await reg.heartbeat("gen-a")
        await reg.heartbeat("gen-b", ttl_s=1.0)
        assert sorted(await reg.live_generators()) == ["gen-a", "gen-b"]
        now[0] += 2.0
        assert await reg.live_generators() == ["gen-a"]  # gen-b's heartbeat lapsed
        await reg.retire("gen-a")
        assert await reg.live_generators() == []  # known replicas, none up
        await r.aclose()

    asyncio.run(main())


def test_a_create_with_every_generator_heartbeat_lapsed_answers_unavailable_at_once(tmp_path, redis_url):
    generator = _Generator(hang=True)
    studio, config = _studio(tmp_path, redis_url, "hb-lapsed", generator)

    async def main():
        r = aioredis.Redis.from_url(redis_url)
        reg = SessionRegistry(r, config.redis)
        await reg.heartbeat("gen-dead", ttl_s=0.2)  # the only replica, killed: no more heartbeats
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(ServiceError) as err:
            await _create(studio)
        took = time.monotonic() - started
        await reg.heartbeat("gen-new")  # the replacement is up: creates reach it again
        generator.hang, generator.registry = False, reg
        session = await _create(studio)
        await r.aclose()
        return err.value, took, session

    err, took, session = asyncio.run(main())
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "GENERATOR_UNAVAILABLE"
    assert err.retry_after_s == 2.0  # one lease: by then a replacement may be up
    assert generator.calls == 1, "the gateway called a generator while none was up"
    assert took < 5.0, f"the refused create took {took:.1f} s"
    assert session.session_id.startswith("ses_")


def test_a_create_no_replica_takes_answers_unavailable_after_the_open_timeout(tmp_path, redis_url):
    generator = _Generator(hang=True)
    studio, _ = _studio(tmp_path, redis_url, "hb-timeout", generator, open_timeout_s=1.0)

    async def main():
        started = time.monotonic()
        with pytest.raises(ServiceError) as err:
            await _create(studio)
        return err.value, time.monotonic() - started

    err, took = asyncio.run(main())
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "GENERATOR_UNAVAILABLE"
    assert err.retry_after_s == 2.0
    assert generator.cancelled == 1  # the queued open was withdrawn, not left to land later
    assert 1.0 <= took < 10.0
