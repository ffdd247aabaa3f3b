"""Watch it in a browser (issue 16): viewer tokens (Studio.CreateViewerToken), the Studio's
browser WebSocket and the reference player page, on the real suite (redis-server, SeaweedFS,
Ray Serve with the Studio's HTTP ingress beside its gRPC one, tiny preset, no pacing).

- the RPC over gRPC: scope (own session only; another tenant's or an unknown session is
  NOT_FOUND), ttl and action checks, expiry, revocation by CloseSession;
- the WebSocket with a Python client: the same fMP4 pieces as StreamSession (init first, exact
  resume with from_chunk), refusals with the gRPC reasons and 4000 + HTTP close codes, a
  watch-only token's switch refused while the stream goes on, an expiring token closes the
  socket, the probes still answer;
- the player page in headless Chromium (DevTools protocol): plays a session, a click on a
  catalog garment switches it and the page shows the acknowledged chunk, the buffered range
  grows, a dropped WebSocket resumes without a missing or repeated chunk, bad tokens are
  refused; the dev launch token of `fashionchameleon up` opens a session from the page.

Chromium is skipped where it is not installed, except in CI (CI=true), where it must be there.
FC_PLAYER_SCREENSHOT=path saves a screenshot of the playing page there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from fashionchameleon.v1 import studio_pb2, studio_pb2_grpc
from services.studio.client import StudioClient, StudioError
from tests.fixtures.chromium import Chromium, require_chromium
from tests.fixtures.ray_suite import ray_suite

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
KEYS = {"acme": "key-acme-0123456789", "globex": "key-globex-0123456789"}
PROMPT = "The person waves with the right hand steadily."
SWITCH = studio_pb2.VIEWER_ACTION_SWITCH_GARMENT
WATCH = studio_pb2.VIEWER_ACTION_WATCH
PROMPT_ACTION = studio_pb2.VIEWER_ACTION_UPDATE_PROMPT

suite = ray_suite(
    "viewer", keys=KEYS, sessions_per_replica=4, viewer={"dev_launch": True, "default_ttl_s": 300, "max_ttl_s": 600}
)


# ---- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(suite):
    """The example garments in acme's catalog as "red" and "green"."""
    from shared.storage import GarmentCatalog, open_store

    garments = GarmentCatalog(open_store(suite.config.storage))
    for gid in ("red", "green"):
        garments.add((EXAMPLES / f"garment-{gid}.png").read_bytes(), gid, tenant="acme", overwrite=True)
    return ("green", "red")


@pytest.fixture(scope="module")
def client(suite):
    with StudioClient(suite.target, KEYS["acme"]) as c:
        yield c


@pytest.fixture(scope="module")
def stub(suite):
    with grpc.insecure_channel(suite.target) as channel:
        yield studio_pb2_grpc.StudioStub(channel)


def http_base(suite) -> str:
    return f"http://127.0.0.1:{suite.config.serve.http_port}"


def ws_base(suite) -> str:
    return f"ws://127.0.0.1:{suite.config.serve.http_port}"


def open_session(client, max_chunks: int = 12, garment: str | bytes = "red") -> str:
    """A session wearing catalog garment `garment` (acme's catalog), or the image bytes given."""
    person = (EXAMPLES / "person.png").read_bytes()
    ref = garment if isinstance(garment, bytes) else f"catalog:{garment}"
    session = client.create_session(person, ref, PROMPT, seed=3, options={"max_chunks": max_chunks})
    return session.session_id


def mint(stub, session_id: str, *, key: str = KEYS["acme"], actions=(), ttl: float = 0.0):
    request = studio_pb2.CreateViewerTokenRequest(session_id=session_id, actions=list(actions), ttl_seconds=ttl)
    return stub.CreateViewerToken(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)


def rpc_error(call) -> StudioError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return StudioError.from_rpc_error(err.value)


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def ws_session(url: str, *, until_index: int | None = None, send: list[dict] | None = None, timeout_s=120):
    """Connect, optionally send control messages after the first chunk, and collect: (events,
    {index: fmp4 bytes}, close code). Stops after chunk `until_index` or when the server closes."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    events, media, pending = [], {}, None
    async with connect(url, max_size=None) as ws:
        try:
            async with asyncio.timeout(timeout_s):
                async for message in ws:
                    if isinstance(message, bytes):
                        assert pending is not None, "a binary message without its chunk event"
                        media[pending["index"]] = message
                        if len(media) == 1 and send:
                            for body in send:
                                await ws.send(json.dumps(body))
                        if until_index is not None and pending["index"] >= until_index:
                            break
                        pending = None
                        continue
                    event = json.loads(message)
                    events.append(event)
                    if event["type"] == "chunk":
                        pending = event
        except ConnectionClosed:
            pass
        code = ws.close_code
    return events, media, code


# ---- the RPC over gRPC -------------------------------------------------------------------------


def test_create_viewer_token_is_scoped_to_one_session_of_the_callers_tenant(suite, client, stub, catalog):
    session_id = open_session(client, max_chunks=4)
    started = time.time()
    response = mint(stub, session_id, actions=[SWITCH, SWITCH])
    assert response.token.startswith("fcv_") and len(response.token) <= 64
    assert list(response.actions) == [WATCH, SWITCH]  # watch always, first, no duplicates
    assert response.expires_at.ToSeconds() == pytest.approx(started + 300, abs=30)  # the configured default ttl
    assert response.player_path.startswith(f"/player?session={session_id}&token=")
    assert list(mint(stub, session_id).actions) == [WATCH]

    foreign = rpc_error(lambda: mint(stub, session_id, key=KEYS["globex"]))  # another tenant's session
    unknown = rpc_error(lambda: mint(stub, "ses_" + "a" * 26))
    for err in (foreign, unknown):
        assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    too_long = rpc_error(lambda: mint(stub, session_id, ttl=601))
    assert (too_long.code, too_long.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID")
    assert too_long.metadata.get("limit") == "600.0"
    unspecified = rpc_error(lambda: mint(stub, session_id, actions=[studio_pb2.VIEWER_ACTION_UNSPECIFIED]))
    assert (unspecified.code, unspecified.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID")
    no_key = rpc_error(
        lambda: stub.CreateViewerToken(studio_pb2.CreateViewerTokenRequest(session_id=session_id), timeout=30)
    )
    assert no_key.code == grpc.StatusCode.UNAUTHENTICATED

    # A token works for its own session only: another session (even of the same tenant) refuses it.
    other = open_session(client, max_chunks=4)
    events, media, code = asyncio.run(ws_session(f"{ws_base(suite)}/v1/sessions/{other}/ws?token={response.token}"))
    assert media == {} and code == 4401
    assert events[-1]["type"] == "error" and events[-1]["reason"] == "VIEWER_TOKEN_INVALID"
    assert events[-1]["code"] == "UNAUTHENTICATED"
    # ... and a token of another tenant's session does not open this one either.
    globex = StudioClient(suite.target, KEYS["globex"])
    try:
        globex_session = open_session(globex, max_chunks=2, garment=(EXAMPLES / "garment-red.png").read_bytes())
        globex_token = mint(stub, globex_session, key=KEYS["globex"]).token
        _, media, code = asyncio.run(ws_session(f"{ws_base(suite)}/v1/sessions/{session_id}/ws?token={globex_token}"))
        assert media == {} and code == 4401
        globex.close_session(globex_session)
    finally:
        globex.close()
    for sid in (session_id, other):
        client.close_session(sid)


def test_closing_the_session_revokes_its_tokens_and_expired_tokens_fail(suite, client, stub, catalog):
    session_id = open_session(client, max_chunks=40)
    token = mint(stub, session_id, actions=[SWITCH]).token
    short = mint(stub, session_id, ttl=1.0).token
    status, body = get_json(f"{http_base(suite)}/v1/sessions/{session_id}/catalog?token={token}")
    assert status == 200 and [g["catalog_id"] for g in body["garments"]][:2] == ["green", "red"]
    time.sleep(1.5)
    events, media, code = asyncio.run(ws_session(f"{ws_base(suite)}/v1/sessions/{session_id}/ws?token={short}"))
    assert media == {} and code == 4401 and events[-1]["reason"] == "VIEWER_TOKEN_INVALID"

    client.close_session(session_id)
    status, body = get_json(f"{http_base(suite)}/v1/sessions/{session_id}/catalog?token={token}")
    assert status == 401 and body["error"]["reason"] == "VIEWER_TOKEN_INVALID"
    events, media, code = asyncio.run(ws_session(f"{ws_base(suite)}/v1/sessions/{session_id}/ws?token={token}"))
    assert media == {} and code == 4401
    ended = rpc_error(lambda: mint(stub, session_id))
    assert (ended.code, ended.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_NOT_ACTIVE")


# ---- the WebSocket -----------------------------------------------------------------------------


def test_websocket_sends_streamsessions_pieces_and_resumes_exactly(suite, client, stub, catalog):
    session_id = open_session(client, max_chunks=4)
    url = f"{ws_base(suite)}/v1/sessions/{session_id}/ws?token={mint(stub, session_id).token}"
    events, media, code = asyncio.run(ws_session(url))
    assert code == 1000 and events[0]["type"] == "hello" and events[0]["actions"] == ["watch"]
    chunks = [e for e in events if e["type"] == "chunk"]
    assert [c["index"] for c in chunks] == list(range(4)) == sorted(media)
    assert events[-1] == {"type": "end", "index": 4, "state": "EXPIRED"}  # max_chunks reached
    assert chunks[0]["init_included"] and not any(c["init_included"] for c in chunks[1:])
    assert all(c["bytes"] == len(media[c["index"]]) and c["garment_id"] == "red" for c in chunks)
    assert media[0][4:8] == b"ftyp"  # the init segment first
    grpc_pieces = {c.index: c.fmp4 for c in client.stream(session_id) if not c.end_of_stream}
    assert media == grpc_pieces  # byte for byte what StreamSession sends

    live = open_session(client, max_chunks=400)
    url = f"{ws_base(suite)}/v1/sessions/{live}/ws?token={mint(stub, live).token}"
    _, first, _ = asyncio.run(ws_session(url, until_index=5))
    _, resumed, _ = asyncio.run(ws_session(url + "&from_chunk=3", until_index=5))
    assert sorted(first) == list(range(6)) and sorted(resumed) == [3, 4, 5]
    stream = client.stream(live, resume_from_index=3)
    assert resumed[3] == next(stream).fmp4  # init segment + chunk 3, as StreamSession resumes
    stream.close()
    assert resumed[3] != first[3] and resumed[3].endswith(first[3]) and resumed[4] == first[4]

    events, media, code = asyncio.run(ws_session(url + "&from_chunk=100000"))
    assert code == 4400 and events[-1]["reason"] == "RESUME_PAST_END" and media == {}
    client.close_session(live)
    status, body = get_json(f"{http_base(suite)}/healthz")
    assert status == 200 and body
    status, _ = get_json(f"{http_base(suite)}/readyz")
    assert status == 200


def test_websocket_controls_ack_with_the_effective_chunk_and_refuse_what_the_token_does_not_allow(
    suite, client, stub, catalog
):
    session_id = open_session(client, max_chunks=10)
    watch_only = mint(stub, session_id).token
    both = mint(stub, session_id, actions=[SWITCH, PROMPT_ACTION]).token
    base = f"{ws_base(suite)}/v1/sessions/{session_id}/ws"
    denied = {"type": "switch_garment", "garment": {"catalog_id": "green"}, "request_id": "sw-1"}
    events, media, _ = asyncio.run(ws_session(f"{base}?token={watch_only}", send=[denied], until_index=4))
    errors = [e for e in events if e["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "code": "PERMISSION_DENIED",
            "reason": "VIEWER_ACTION_DENIED",
            "message": errors[0]["message"],
            "metadata": {"action": "switch_garment"},
            "request_id": "sw-1",
        }
    ]
    assert sorted(media) == list(range(5)), "the stream goes on after a refused control"
    status, body = get_json(f"{http_base(suite)}/v1/sessions/{session_id}/catalog?token={watch_only}")
    assert status == 403 and body["error"]["reason"] == "VIEWER_ACTION_DENIED"

    upload = base64.b64encode((EXAMPLES / "garment-green.png").read_bytes()).decode()
    controls = [
        {"type": "switch_garment", "garment": {"image_b64": upload}, "request_id": "sw-2"},
        {"type": "update_prompt", "prompt": "The person walks to the left.", "request_id": "pr-1"},
        {"type": "switch_garment", "garment": {"catalog_id": "no-such"}, "request_id": "sw-3"},
    ]
    events, media, _ = asyncio.run(ws_session(f"{base}?token={both}&from_chunk=5", send=controls))
    acks = {e["request_id"]: e for e in events if e["type"] == "ack"}
    assert acks["sw-2"]["garment_id"].startswith("upload:") and acks["sw-2"]["effective_chunk_index"] > 5
    assert acks["pr-1"]["prompt_revision"] == 1
    missing = [e for e in events if e["type"] == "error"]
    assert [(e["request_id"], e["code"], e["reason"]) for e in missing] == [
        ("sw-3", "NOT_FOUND", "CATALOG_ITEM_NOT_FOUND")
    ]
    chunks = {e["index"]: e for e in events if e["type"] == "chunk"}
    effective = acks["sw-2"]["effective_chunk_index"]
    if effective in chunks:  # the session's last chunks may end before the switch applies
        assert chunks[effective]["switch_applied"] and chunks[effective]["garment_id"] == acks["sw-2"]["garment_id"]
    client.close_session(session_id)


def test_an_open_websocket_closes_when_its_token_expires(suite, client, stub, catalog):
    session_id = open_session(client, max_chunks=400)
    token = mint(stub, session_id, ttl=2.0).token
    started = time.monotonic()
    events, _, code = asyncio.run(ws_session(f"{ws_base(suite)}/v1/sessions/{session_id}/ws?token={token}"))
    assert code == 4401 and events[-1]["reason"] == "VIEWER_TOKEN_INVALID"
    assert time.monotonic() - started < 30
    client.close_session(session_id)


# ---- the player page in a real browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    binary = require_chromium()
    chrome = Chromium.start(binary)
    yield chrome
    chrome.close()


STATE = "window.fcPlayer && window.fcPlayer.state"


def test_player_plays_switches_on_click_and_resumes_a_dropped_socket_without_a_gap(
    suite, client, stub, catalog, browser
):
    session_id = open_session(client, max_chunks=60)
    response = mint(stub, session_id, actions=[SWITCH])
    browser.navigate(http_base(suite) + response.player_path)
    browser.wait_for(f"{STATE} && fcPlayer.state.chunks.length >= 3 && fcPlayer.state.buffered.length > 0")
    browser.wait_for("document.querySelectorAll('#garments button').length === 2")
    first_end = browser.evaluate("fcPlayer.bufferedRanges()[0][1]")

    browser.evaluate("document.getElementById('garment-green').click()")
    ack = browser.wait_for(f"{STATE}.acks[0]")
    assert ack["action"] == "switch_garment" and ack["garment_id"] == "green"
    effective = ack["effective_chunk_index"]
    browser.wait_for(f"document.getElementById('f-ack').textContent.startsWith('{effective} ')")
    switched = browser.wait_for(f"{STATE}.switches[0].latencyMs != null && fcPlayer.state.switches[0]")
    assert switched["chunk"] >= effective and switched["latencyMs"] > 0
    assert browser.evaluate("document.getElementById('f-switch').textContent").endswith("s (green)")
    assert browser.wait_for(f"{STATE}.garment === 'green'")

    grown = browser.wait_for(f"fcPlayer.bufferedRanges()[0][1] > {first_end} + 1 && fcPlayer.bufferedRanges()[0][1]")
    assert grown > first_end
    assert browser.evaluate("document.getElementById('video').currentTime") > 0  # it plays
    if os.environ.get("FC_PLAYER_SCREENSHOT"):
        browser.screenshot(os.environ["FC_PLAYER_SCREENSHOT"])

    before = browser.evaluate(f"{STATE}.chunks.length")
    browser.evaluate("fcPlayer.dropSocket()")
    browser.wait_for(f"{STATE}.reconnects >= 1 && fcPlayer.state.chunks.length > {before} + 3", timeout_s=120)
    client.close_session(session_id)
    final = browser.wait_for(f"{STATE}.ended && fcPlayer.state", timeout_s=60)
    assert final["chunks"] == list(range(len(final["chunks"]))), "no missing or repeated chunk across the drop"
    assert final["connects"] >= 2 and final["appendErrors"] == 0
    assert len(final["buffered"]) == 1, f"one buffered range, no hole: {final['buffered']}"
    assert final["buffered"][0][0] == pytest.approx(0.0, abs=0.05)


@pytest.mark.parametrize("which", ["wrong", "expired", "other-session"])
def test_player_refuses_a_bad_token(suite, client, stub, catalog, browser, which):
    session_id = open_session(client, max_chunks=4)
    if which == "wrong":
        token = "fcv_" + "A" * 43
    elif which == "expired":
        token = mint(stub, session_id, ttl=1.0).token
        time.sleep(1.5)
    else:
        other = open_session(client, max_chunks=2)
        token = mint(stub, other).token  # valid, for another session
    browser.navigate(f"{http_base(suite)}/player?session={session_id}&token={token}")
    refused = browser.wait_for(f"{STATE} && fcPlayer.state.refused && fcPlayer.state.errors[0]")
    assert (refused["code"], refused["reason"]) == ("UNAUTHENTICATED", "VIEWER_TOKEN_INVALID")
    assert browser.evaluate(f"{STATE}.chunks.length") == 0
    assert browser.evaluate("document.getElementById('status').className") == "bad"
    client.close_session(session_id)
    if which == "other-session":
        client.close_session(other)


def test_up_launch_token_opens_a_dev_session_from_the_page(suite, client, browser):
    from services.launcher import Embedded

    embedded = Embedded(suite.config, KEYS["acme"])
    url = embedded.dev_player_url(
        (EXAMPLES / "person.png").read_bytes(),
        {"red": (EXAMPLES / "garment-red.png").read_bytes(), "green": (EXAMPLES / "garment-green.png").read_bytes()},
        PROMPT,
    )
    assert url.startswith(http_base(suite) + "/player?launch=fcl_") and embedded.describe()["player"] == url
    browser.navigate(url)
    browser.wait_for(f"{STATE} && fcPlayer.state.chunks.length >= 2", timeout_s=120)
    session_id = browser.evaluate(f"{STATE}.session")
    assert browser.evaluate("location.search").startswith(f"?session={session_id}&token=fcv_")  # reload resumes
    assert browser.evaluate(f"{STATE}.garment") == "red"
    assert browser.wait_for(f"{STATE}.catalog")[:2] == ["green", "red"]
    assert client.get_session(session_id).tenant == "acme"
    client.close_session(session_id)
    for cleanup in embedded.cleanup:  # revokes the launch token
        cleanup()
    browser.navigate(url)
    refused = browser.wait_for(f"{STATE} && fcPlayer.state.refused")
    assert refused["reason"] == "VIEWER_TOKEN_INVALID"
