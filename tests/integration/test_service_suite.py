"""The service suite end to end: real redis-server, real S3 (SeaweedFS), real Ray Serve, gRPC
over loopback, the tiny preset.

One application serves the whole module (Ray start-up dominates the cost). Sessions run
without playback pacing so the tests stay fast; pacing is unit-tested on the runner.
"""

from __future__ import annotations

import io
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from fashionchameleon.v1 import studio_pb2, studio_pb2_grpc
from services.studio.client import StudioClient, StudioError
from shared.media.video import probe_video
from tests.fixtures.ray_suite import ray_suite

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
MAX_SESSIONS = 5


def png(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


suite = ray_suite(
    "suite",
    keys=KEYS,
    sessions_per_replica=MAX_SESSIONS,
    metrics_report_interval_ms=500,
)


@pytest.fixture()
def client(suite):
    _, target = suite
    with StudioClient(target, KEYS["acme"]) as c:
        yield c


def generator_capacity(suite):
    config, _ = suite
    handle = serve.get_deployment_handle("generator", config.serve.app_name)
    return handle.get_capacity.remote().result()


def wait_for(predicate, timeout_s=30.0, interval=0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def test_create_stream_switch_update_close(suite, client, tmp_path):
    n = 10  # without pacing the generator runs up to max_client_lag_chunks ahead of the client
    session = client.create_session(
        png(1), png(2), "a person walks toward the camera", seed=5, options={"max_chunks": n}
    )
    assert session.state == session.ACTIVE and session.tenant == "acme"
    chunks, switch, prompt = [], None, None
    for chunk in client.stream(session.session_id):
        if chunk.end_of_stream:
            break
        chunks.append(chunk)
        if chunk.index == 1:
            switch = client.switch_garment(session.session_id, png(3))
        if chunk.index == 2:
            prompt = client.update_prompt(session.session_id, "the person turns left")
    assert [c.index for c in chunks] == list(range(n))
    assert [c.num_frames for c in chunks] == [9] + [12] * (n - 1)
    assert 2 <= switch.effective_chunk_index < prompt.effective_chunk_index < n
    switched = chunks[switch.effective_chunk_index]
    assert switched.switch_applied and switched.garment_id == switch.garment_id
    assert chunks[prompt.effective_chunk_index].prompt_update_applied
    assert chunks[-1].prompt_revision == prompt.prompt_revision == 1
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"".join(c.fmp4 for c in chunks))
    assert probe_video(out).num_frames == 9 + 12 * (n - 1)
    assert client.get_session(session.session_id).chunks_generated == n
    closed = client.close_session(session.session_id)
    again = client.close_session(session.session_id)  # closing twice is harmless
    assert closed.state == again.state
    # the finished session's clip lands in the object store (S3 here)
    from shared.storage import open_store

    store = open_store(suite[0].storage)
    key = f"clips/acme/{session.session_id}.mp4"
    assert wait_for(lambda: store.exists(key))
    saved = tmp_path / "saved.mp4"
    saved.write_bytes(store.get_bytes(key))
    assert probe_video(saved).num_frames == 9 + 12 * (n - 1)


def test_disconnect_and_resume_without_gaps_or_duplicates(client, tmp_path):
    session = client.create_session(png(4), png(5), "a person waves", seed=1, options={"max_chunks": 6})
    first = []
    for chunk in client.stream(session.session_id, auto_resume=False):
        first.append(chunk)
        if len(first) == 3:
            break  # the client goes away mid-stream
    rest = [c for c in client.stream(session.session_id, resume_from_index=3) if not c.end_of_stream]
    assert [c.index for c in first + rest] == list(range(6))
    assert rest[0].is_init_segment_included  # a resumed stream starts playable
    resumed_only = tmp_path / "resumed.mp4"
    resumed_only.write_bytes(b"".join(c.fmp4 for c in rest))
    assert probe_video(resumed_only).num_frames == 12 * 3
    client.close_session(session.session_id)


@pytest.mark.parametrize(
    "case, code",
    [
        ("corrupt_image", grpc.StatusCode.INVALID_ARGUMENT),
        ("oversized_upload", grpc.StatusCode.INVALID_ARGUMENT),
        ("not_an_image", grpc.StatusCode.INVALID_ARGUMENT),
        ("empty_prompt", grpc.StatusCode.INVALID_ARGUMENT),
        ("overlong_prompt", grpc.StatusCode.INVALID_ARGUMENT),
        ("unknown_session", grpc.StatusCode.NOT_FOUND),
        ("unknown_catalog_garment", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_input_gets_its_own_status(client, case, code):
    reference, garment, prompt = png(6), png(7), "a person"
    with pytest.raises(StudioError) as err:
        if case == "corrupt_image":
            client.create_session(png(6)[:200], garment, prompt)
        elif case == "oversized_upload":
            client.create_session(b"\x89PNG" + b"\0" * (3 * 2**20), garment, prompt)
        elif case == "not_an_image":
            client.create_session(b"hello, I am text", garment, prompt)
        elif case == "empty_prompt":
            client.create_session(reference, garment, "   ")
        elif case == "overlong_prompt":
            client.create_session(reference, garment, "x" * 5000)
        elif case == "unknown_session":
            client.get_session("ses_" + "a" * 26)
        elif case == "unknown_catalog_garment":
            client.create_session(reference, "catalog:no-such-garment", prompt)
    assert err.value.code == code, err.value
    assert err.value.details


def test_auth_and_tenant_isolation(suite, client):
    config, target = suite
    session = client.create_session(png(8), png(9), "a person", options={"max_chunks": 3})
    with StudioClient(target, KEYS["globex"]) as other:
        for call in (other.get_session, other.close_session):
            with pytest.raises(StudioError) as err:
                call(session.session_id)
            assert err.value.code == grpc.StatusCode.NOT_FOUND  # existence does not leak
        with pytest.raises(StudioError) as err:
            other.switch_garment(session.session_id, png(10))
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with StudioClient(target, "wrong-key") as anon, pytest.raises(StudioError) as err:
        anon.get_session(session.session_id)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(target) as channel:  # no API key at all
        stub = studio_pb2_grpc.StudioStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.GetSession(
                studio_pb2.GetSessionRequest(session_id=session.session_id),
                metadata=(("application", config.serve.app_name),),
            )
        assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert client.get_session(session.session_id).session_id == session.session_id
    client.close_session(session.session_id)


def test_capacity_full_is_resource_exhausted_and_server_keeps_serving(suite, client):
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0)
    opened = [
        client.create_session(png(20 + i), png(30), "a person", options={"max_chunks": 50}) for i in range(MAX_SESSIONS)
    ]
    with pytest.raises(StudioError) as err:
        client.create_session(png(40), png(30), "a person")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    for s in opened:
        client.close_session(s.session_id)
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0)
    s = client.create_session(png(41), png(30), "a person", options={"max_chunks": 2})
    assert [c.index for c in client.stream(s.session_id) if not c.end_of_stream] == [0, 1]


def test_idle_sessions_expire_and_free_their_cache(suite, client):
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0)
    s = client.create_session(png(50), png(51), "a person", options={"idle_timeout_seconds": 2, "max_chunks": 500})
    assert generator_capacity(suite).active_sessions == 1
    assert wait_for(lambda: client.get_session(s.session_id).state == s.EXPIRED, timeout_s=20)
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0, timeout_s=20)
    client.close_session(s.session_id)  # harmless after expiry


def test_several_concurrent_sessions_none_starved(suite):
    _, target = suite
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with StudioClient(target, KEYS["acme"]) as c:
                s = c.create_session(png(60 + i), png(70 + i), f"person {i}", seed=i, options={"max_chunks": 4})
                results[i] = [ch.index for ch in c.stream(s.session_id) if not ch.end_of_stream]
                c.close_session(s.session_id)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert results == {i: [0, 1, 2, 3] for i in range(4)}
    assert wait_for(lambda: generator_capacity(suite).active_sessions == 0)
    assert generator_capacity(suite).kv_cache_bytes == 0


def test_client_that_stops_reading_pauses_generation(suite, client):
    config, _ = suite
    s = client.create_session(png(80), png(81), "a person", options={"max_chunks": 100})
    import redis as redis_sync

    from shared.sessionbus.keys import KeySpace

    r = redis_sync.Redis.from_url(config.redis.url)
    out_key = KeySpace(config.redis.namespace).session(s.session_id).output
    assert wait_for(lambda: r.xlen(out_key) > 0)
    time.sleep(3.0)  # plenty of time to run far ahead if nothing held it back
    lag = config.generator.max_client_lag_chunks
    assert r.xlen(out_key) <= lag + 2, "generation must stop when the client falls behind"
    got = [c.index for c in client.stream(s.session_id)]  # reading resumes generation
    assert got[:6] == list(range(6))
    client.close_session(s.session_id)


def test_create_is_idempotent_per_request_id(client):
    a = client.create_session(png(82), png(83), "a person", request_id="req-0001", options={"max_chunks": 2})
    b = client.create_session(png(82), png(83), "a person", request_id="req-0001", options={"max_chunks": 2})
    assert a.session_id == b.session_id
    client.close_session(a.session_id)


def test_request_over_the_proxy_limit_is_resource_exhausted(client):
    with pytest.raises(StudioError) as err:
        client.create_session(b"\x89PNG" + b"\0" * (6 * 2**20), png(2), "a person")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    s = client.create_session(png(84), png(85), "a person", options={"max_chunks": 1})  # still serving
    client.close_session(s.session_id)


def test_health_probes_and_metrics_export(suite, client):
    import json
    import urllib.request

    config, _ = suite
    with urllib.request.urlopen(f"http://127.0.0.1:{config.serve.http_port}/healthz", timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["status"]
    s = client.create_session(png(86), png(87), "a person", options={"max_chunks": 2})
    list(client.stream(s.session_id))

    def scraped() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{suite.metrics_port}/metrics", timeout=10) as resp:
            return resp.read().decode()

    names = (
        "fashionchameleon_time_to_first_chunk_seconds",
        "fashionchameleon_chunks_generated_total",
        "fashionchameleon_requests_total",
        "fashionchameleon_kv_cache_budget_bytes",
    )
    ok = wait_for(lambda: all(n in scraped() for n in names), timeout_s=30, interval=1.0)
    assert ok, f"missing from Ray's metrics export: {[n for n in names if n not in scraped()]}"


def test_demo_command_against_the_running_suite(suite, tmp_path, capsys):
    import json

    from services.cli.main import main

    _, target = suite
    out = tmp_path / "demo.mp4"
    rc = main(["demo", "--target", target, "--api-key", KEYS["acme"], "--chunks", "6", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["chunks"] == 6 and summary["mp4_frames"] == 9 + 12 * 5
    first, second = summary["switches"]  # the second once the first shows, not before chunk 3
    assert first["after_chunk"] == 1 and second["after_chunk"] >= max(3, first["effective_chunk"])
    assert first["effective_chunk"] < second["effective_chunk"] < 6
    assert summary["time_to_first_chunk_seconds"] > 0


def test_session_survives_a_killed_generator_replica(suite, client):
    """Kill the generator replica mid-stream: Serve starts a new one, which claims the orphaned
    session (its lease expired), rebuilds it from the saved state and the last published frame,
    and the client's stream goes on with the next chunk index: no gap, no duplicate. Runs last:
    it kills the module's generator."""
    s = client.create_session(png(90), png(91), "a person", options={"max_chunks": 10})
    got, killed = [], False
    for chunk in client.stream(s.session_id):
        if chunk.end_of_stream:
            break
        got.append(chunk.index)
        if chunk.index == 1 and not killed:
            (replica,) = [a for a in ray.util.list_named_actors(all_namespaces=True) if "generator" in a["name"]]
            ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
            killed = True
    assert got == list(range(10))
    assert client.get_session(s.session_id).chunks_generated == 10
