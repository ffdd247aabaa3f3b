"""What the protos promise, end to end: real redis-server, real S3 (SeaweedFS), real Ray Serve,
gRPC over loopback, the tiny preset (issue 14, items 4-10).

- a retried SwitchGarment / UpdatePrompt / CreateSession (same request_id) acts once; the same
  request_id with another body is ALREADY_EXISTS / IDEMPOTENCY_KEY_REUSED (item 4);
- concurrent creates never exceed the tenant quota nor a generator replica's capacity (item 5);
- a failing rebuild of an orphaned session ends FAILED with a reason the client sees (item 7);
- resume past the end is OUT_OF_RANGE at once, live or ended (item 8);
- max_duration_seconds, preset, width/height alone, max_chunks -> EXPIRED (item 9);
- garbage request bytes, ErrorInfo reasons, chunk size, Session.options / frames (item 10).

One application serves the module; sessions run without playback pacing.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from fashionchameleon.v1 import studio_pb2
from services.studio.client import StudioClient, StudioError
from shared.models.presets import get_preset
from tests.fixtures.ray_suite import ray_suite

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEYS = {"acme": "key-acme-0123456789", "tight": "key-tight-0123456789"}
MAX_SESSIONS = 4  # per generator replica (one replica)
TIGHT_QUOTA = 2  # sessions of tenant "tight" at once
REBUILD_ATTEMPTS = 2


def png(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wait_for(predicate, timeout_s=30.0, interval=0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


suite = ray_suite(
    "contracts",
    keys=KEYS,
    sessions_per_replica=MAX_SESSIONS,
    generator={"open_attempts": 1, "recovery_attempts": REBUILD_ATTEMPTS},
)


@pytest.fixture()
def client(suite):
    _, target = suite
    with StudioClient(target, KEYS["acme"]) as c:
        yield c


def sync_redis(suite):
    import redis as redis_sync

    return redis_sync.Redis.from_url(suite[0].redis.url)


def generator_capacity(suite):
    config, _ = suite
    return serve.get_deployment_handle("generator", config.serve.app_name).get_capacity.remote().result()


def idle(suite) -> bool:
    return wait_for(lambda: generator_capacity(suite).active_sessions == 0, timeout_s=60)


def media(chunks):
    return [c for c in chunks if not c.end_of_stream]


# ---- item 4: exactly-once controls ---------------------------------------------------------------


def test_retried_switch_and_prompt_act_once(client):
    s = client.create_session(png(1), png(2), "a person walks", seed=3, options={"max_chunks": 12})
    chunks, switches, prompts = [], [], []
    for chunk in client.stream(s.session_id):
        chunks.append(chunk)
        if chunk.end_of_stream:
            break
        if chunk.index == 1:
            switches = [client.switch_garment(s.session_id, png(4), request_id="switch-0001") for _ in range(2)]
            prompts = [
                client.update_prompt(s.session_id, "the person turns", request_id="prompt-0001") for _ in range(2)
            ]
            with pytest.raises(StudioError) as err:  # the same request_id for another request
                client.update_prompt(s.session_id, "the person sits down", request_id="prompt-0001")
            assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
            assert err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert switches[0].effective_chunk_index == switches[1].effective_chunk_index
    assert switches[0].garment_id == switches[1].garment_id
    assert prompts[0].effective_chunk_index == prompts[1].effective_chunk_index
    assert prompts[0].prompt_revision == prompts[1].prompt_revision == 1
    got = media(chunks)
    assert [c.index for c in got] == list(range(12))
    assert sum(c.switch_applied for c in got) == 1 and sum(c.prompt_update_applied for c in got) == 1
    assert got[-1].prompt_revision == 1
    session = client.get_session(s.session_id)
    assert session.prompt_revision == 1 and session.prompt == "the person turns"
    assert session.garment_id == switches[0].garment_id


def test_create_request_id_reused_with_another_body_is_already_exists(client):
    a = client.create_session(png(5), png(6), "a person", request_id="create-0001", options={"max_chunks": 2})
    b = client.create_session(png(5), png(6), "a person", request_id="create-0001", options={"max_chunks": 2})
    assert a.session_id == b.session_id
    with pytest.raises(StudioError) as err:
        client.create_session(png(5), png(7), "a person", request_id="create-0001", options={"max_chunks": 2})
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS and err.value.reason == "IDEMPOTENCY_KEY_REUSED"
    client.close_session(a.session_id)


# ---- item 5: atomic quota and admission ----------------------------------------------------------


def _concurrent_creates(target, key, n, seed0):
    ok, errors = [], []
    barrier = threading.Barrier(n)

    def run(i):
        with StudioClient(target, key, retries=0) as c:
            barrier.wait()
            try:
                ok.append(c.create_session(png(seed0 + i), png(99), "a person", options={"max_chunks": 500}))
            except StudioError as e:
                errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    return ok, errors


def test_concurrent_creates_never_exceed_the_generator_capacity(suite):
    _, target = suite
    assert idle(suite)
    ok, errors = _concurrent_creates(target, KEYS["acme"], 2 * MAX_SESSIONS, 100)
    try:
        assert len(ok) <= MAX_SESSIONS, f"{len(ok)} sessions admitted on a replica with room for {MAX_SESSIONS}"
        assert generator_capacity(suite).active_sessions <= MAX_SESSIONS
        assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), errors
        assert len(ok) + len(errors) == 2 * MAX_SESSIONS
    finally:
        with StudioClient(target, KEYS["acme"]) as c:
            for s in ok:
                c.close_session(s.session_id)
    assert idle(suite)


def test_tenant_quota_holds_under_concurrent_creates(suite):
    """The module's quota is 50 sessions per tenant: all but TIGHT_QUOTA slots of tenant
    "tight" are taken (reservations of creates in flight), then 2 * MAX_SESSIONS creates race
    for the rest. The check and the reservation are one step, so at most TIGHT_QUOTA succeed
    (the generator would have room for MAX_SESSIONS)."""
    import asyncio

    from shared.redis_util import connect
    from shared.sessionbus import SessionRegistry

    async def fill():
        redis = connect(config.redis)
        try:
            registry = SessionRegistry(redis, config.redis)
            for i in range(config.limits.max_sessions_per_tenant - TIGHT_QUOTA):
                assert await registry.reserve_quota("tight", f"r-fill-{i}", config.limits.max_sessions_per_tenant)
        finally:
            await redis.aclose()

    config, target = suite
    assert idle(suite)
    asyncio.run(fill())
    ok, errors = _concurrent_creates(target, KEYS["tight"], 2 * MAX_SESSIONS, 200)
    try:
        assert len(ok) <= TIGHT_QUOTA, f"{len(ok)} sessions against a remaining quota of {TIGHT_QUOTA}"
        assert any(e.reason == "QUOTA_EXCEEDED" for e in errors), errors
        assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors), errors
    finally:
        with StudioClient(target, KEYS["tight"]) as c:
            for s in ok:
                c.close_session(s.session_id)
        r = sync_redis(suite)
        r.delete(f"{config.redis.namespace}:quota:tenant:tight")
    assert idle(suite)


# ---- item 8: resume past the end ---------------------------------------------------------------------


def test_resume_past_the_end_is_out_of_range_live_and_ended(client):
    s = client.create_session(png(12), png(13), "a person", options={"max_chunks": 3})
    started = time.monotonic()
    with pytest.raises(StudioError) as err:
        list(client.stream(s.session_id, resume_from_index=50, auto_resume=False))
    # Ray's gRPC proxy drops a streaming call's trailer (ErrorInfo) when it fails before its first
    # message; code and details survive, so the reason is checked where it arrives (unary RPCs).
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE and err.value.reason in ("RESUME_PAST_END", "")
    assert "past the end" in err.value.details
    assert time.monotonic() - started < 5.0
    got = list(client.stream(s.session_id))
    assert [c.index for c in media(got)] == [0, 1, 2] and got[-1].end_of_stream
    assert got[-1].index == 3
    with pytest.raises(StudioError) as err:
        list(client.stream(s.session_id, resume_from_index=4, auto_resume=False))
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert err.value.metadata.get("next_index", "3") == "3" and "(next index 3)" in err.value.details
    [marker] = list(client.stream(s.session_id, resume_from_index=3, auto_resume=False))
    assert marker.end_of_stream and marker.index == 3


# ---- item 9: options that were ignored ---------------------------------------------------------------


def test_max_duration_and_max_chunks_end_expired(client):
    s = client.create_session(png(14), png(15), "a person", options={"max_duration_seconds": 0.01})
    got = list(client.stream(s.session_id))
    assert [c.index for c in media(got)] == [0]  # the limit applies at the first chunk boundary
    assert got[-1].end_state == studio_pb2.Session.EXPIRED
    # 0.5 s at 24 fps: 9 frames (0.375 s) are not enough, 21 are
    s = client.create_session(png(14), png(15), "a person", options={"max_duration_seconds": 0.5})
    assert [c.index for c in media(client.stream(s.session_id))] == [0, 1]
    s = client.create_session(png(16), png(17), "a person", options={"max_chunks": 2})
    got = list(client.stream(s.session_id))
    assert got[-1].end_state == studio_pb2.Session.EXPIRED
    assert wait_for(lambda: client.get_session(s.session_id).state == s.EXPIRED)
    assert client.close_session(s.session_id).state == studio_pb2.Session.EXPIRED


def test_unknown_preset_and_one_sided_size(client):
    with pytest.raises(StudioError) as err:
        client.create_session(png(18), png(19), "a person", options={"preset": "wan9000"})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "PRESET_UNAVAILABLE"
    tiny = get_preset("tiny").streaming
    for options in ({"width": tiny.width}, {"height": tiny.height}, {"preset": "tiny"}):
        s = client.create_session(png(18), png(19), "a person", options={**options, "max_chunks": 1})
        assert (s.width, s.height) == (tiny.width, tiny.height)
        client.close_session(s.session_id)
    with pytest.raises(StudioError) as err:
        client.create_session(png(18), png(19), "a person", options={"width": tiny.width + 32})
    assert err.value.reason == "RESOLUTION_UNSUPPORTED"


# ---- item 10: the wire, reasons and filled fields -------------------------------------------------


def _raw_call(suite, method, payload, key, streaming=False):
    config, target = suite
    metadata = [("application", config.serve.app_name)]
    if key:
        metadata.append(("authorization", f"Bearer {key}"))
    with grpc.insecure_channel(target) as channel:
        path = f"/fashionchameleon.v1.Studio/{method}"
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            path, request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            result = call(payload, metadata=metadata, timeout=30)
            if streaming:
                list(result)
        return err.value


def _reason(rpc_error) -> str:
    for key, value in rpc_error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


@pytest.mark.parametrize(
    "method, streaming", [("CreateSession", False), ("StreamSession", True), ("GetSession", False)]
)
def test_garbage_request_bytes_are_invalid_argument(suite, method, streaming):
    garbage = b"\xff\xff\xff\xff\x0f garbage"
    err = _raw_call(suite, method, garbage, KEYS["acme"], streaming)
    # A streaming call's trailer (ErrorInfo) is dropped by Ray's gRPC proxy when the call fails
    # before its first message; code and details survive.
    reasons = ("REQUEST_MALFORMED", "") if streaming else ("REQUEST_MALFORMED",)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert _reason(err) in reasons
    assert "Error" not in err.details() and "Traceback" not in err.details() and "Wire format" not in err.details()
    err = _raw_call(suite, method, garbage, None, streaming)  # authentication still comes first
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(err) in (("API_KEY_INVALID", "") if streaming else ("API_KEY_INVALID",))


def test_error_reasons_are_set(suite, client):
    _, target = suite
    with StudioClient(target, "wrong-key-0123456789") as anon, pytest.raises(StudioError) as err:
        anon.get_session("ses_" + "a" * 26)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.reason == "API_KEY_INVALID"
    with pytest.raises(StudioError) as err:
        client.get_session("not-a-session-id")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.reason == "FIELD_INVALID"


def test_chunks_and_sessions_carry_size_options_and_frames(client):
    tiny = get_preset("tiny").streaming
    s = client.create_session(
        png(20),
        png(21),
        "a person",
        seed=9,
        options={"max_chunks": 2, "switch_options": {"withdraw_history_kv": False}},
    )
    assert s.options.max_chunks == 2 and s.options.seed == 9
    assert (s.options.width, s.options.height, s.options.preset) == (tiny.width, tiny.height, "tiny")
    assert s.options.switch_options.withdraw_history_kv is False
    assert s.options.switch_options.refresh_garment_kv is True
    assert s.options.idle_timeout_seconds > 0
    got = media(client.stream(s.session_id))
    assert [(c.width, c.height) for c in got] == [(tiny.width, tiny.height)] * 2
    assert wait_for(lambda: client.get_session(s.session_id).frames_generated == 9 + 12)


# ---- item 7: a rebuild that keeps failing ends the session FAILED (last: kills the generator) ----


def test_failing_rebuild_gives_up_and_the_session_ends_failed(suite, client):
    """Runs last: it kills the module's generator replica."""
    from shared.sessionbus.keys import KeySpace

    config, _ = suite
    assert idle(suite)
    s = client.create_session(png(10), png(11), "a person", options={"max_chunks": 500})
    stream = client.stream(s.session_id, auto_resume=False)
    assert next(stream).index == 0
    r = sync_redis(suite)
    keys = KeySpace(config.redis.namespace).session(s.session_id)
    r.set(f"{keys.record}:recovery:state", b"not a saved session state")  # the rebuild cannot load it
    # Its replica dies: the session is orphaned and the replica Serve starts instead tries to rebuild it.
    (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "generator" in a["name"]]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    assert wait_for(lambda: client.get_session(s.session_id).state == s.FAILED, timeout_s=120)
    failed = client.get_session(s.session_id)
    assert "rebuilding it failed" in failed.error_message and str(REBUILD_ATTEMPTS) in failed.error_message
    rest = list(stream)
    assert rest and rest[-1].end_of_stream and rest[-1].end_state == studio_pb2.Session.FAILED
    stream.close()
