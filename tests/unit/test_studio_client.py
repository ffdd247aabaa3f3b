"""StudioClient / AsyncStudioClient against a real in-process gRPC server with a fake Studio.

The fake streams real fragmented-MP4 chunks (shared.media.fmp4.FragmentedMp4Muxer fed with
small synthetic frames), checks the API key, speaks the common.proto error model (status code
+ ErrorInfo / RetryInfo in the grpc-status-details-bin trailer) and can drop streams mid-way.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from concurrent import futures
from contextlib import aclosing
from datetime import timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2

from fashionchameleon.v1 import common_pb2, studio_pb2, studio_pb2_grpc
from services.studio.client import (
    AsyncStudioClient,
    ChunkGapError,
    StudioClient,
    StudioError,
    image_input,
    session_options,
)
from shared.media.fmp4 import FragmentedMp4Muxer, split_init_segment
from shared.media.video import probe_video, read_frames

pytestmark = pytest.mark.timeout(120)

API_KEY = "test-key-0123"
WIDTH, HEIGHT, FPS = 64, 48, 24.0
CHUNK_FRAMES = [9, 4, 4, 4, 4, 4]
TOTAL_FRAMES = sum(CHUNK_FRAMES)
State = studio_pb2.Session.State

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 10}


# -- media ---------------------------------------------------------------------------------------


def _frames(start: int, count: int) -> np.ndarray:
    """Moving gradient frames [count, H, W, 3] uint8."""
    t = np.arange(start, start + count)[:, None, None]
    y = np.arange(HEIGHT)[None, :, None]
    x = np.arange(WIDTH)[None, None, :]
    r = (x * 4 + t * 8) % 256
    g = (y * 5 + t * 3) % 256
    b = ((x + y) * 2 + t * 5) % 256
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def media() -> tuple[bytes, list[bytes]]:
    """(init segment, media segment of each chunk)."""
    muxer = FragmentedMp4Muxer(WIDTH, HEIGHT, fps=FPS)
    pieces, start = [], 0
    for n in CHUNK_FRAMES:
        pieces.append(muxer.add_chunk(_frames(start, n)))
        start += n
    assert muxer.close() == b""
    init, first = split_init_segment(pieces[0])
    return init, [first, *pieces[1:]]


# -- fake server ---------------------------------------------------------------------------------


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    metadata: dict[str, str] | None = None,
    retry_after_s: float | None = None,
) -> None:
    status = status_pb2.Status(code=code.value[0], message=message)
    if reason is not None:
        info = error_details_pb2.ErrorInfo(reason=reason, domain="fashionchameleon.v1", metadata=metadata or {})
        status.details.add().Pack(info)
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromTimedelta(timedelta(seconds=retry_after_s))
        status.details.add().Pack(retry)
    context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.abort(code, message)


class FakeStudio(studio_pb2_grpc.StudioServicer):
    def __init__(self, init: bytes, segments: list[bytes]) -> None:
        self.init, self.segments = init, segments
        self.lock = threading.Lock()
        self.sessions: dict[str, studio_pb2.Session] = {}
        self.by_request_id: dict[str, object] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.metadata: list[dict[str, str]] = []
        self.requests: list[object] = []
        self.stream_starts: list[int] = []
        # behaviour knobs
        self.drop_plan: list[int] = []  # per StreamSession call: abort UNAVAILABLE after k chunks
        self.on_sent = None  # callable(call_no, chunks_sent_in_call) after each chunk
        self.exhausted_before_create = 0  # RESOURCE_EXHAUSTED + RetryInfo this many times
        self.quota_exceeded = False  # RESOURCE_EXHAUSTED without RetryInfo
        self.unavailable_before_get = 0
        self.skip_index: int | None = None
        self.resend_previous = False  # a resumed stream starts one chunk early
        self.end_with_marker = False
        self.chunk_interval_s = 0.002

    # helpers
    def _auth(self, name: str, request: object, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        with self.lock:
            self.calls[name] += 1
            self.metadata.append(md)
            self.requests.append(request)
        if md.get("x-api-key") != API_KEY:
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key")

    def _session(self, session_id: str, context: grpc.ServicerContext) -> studio_pb2.Session:
        session = self.sessions.get(session_id)
        if session is None:
            _abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"session {session_id} not found",
                "SESSION_NOT_FOUND",
                {"session_id": session_id},
            )
        return session

    # RPCs
    def CreateSession(self, request, context):
        self._auth("CreateSession", request, context)
        if self.quota_exceeded:
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", "QUOTA_EXCEEDED", {"quota": "sessions"})
        if self.exhausted_before_create > 0:
            self.exhausted_before_create -= 1
            _abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "no free session slot",
                "CAPACITY_EXHAUSTED",
                retry_after_s=0.02,
            )
        with self.lock:
            if request.request_id in self.by_request_id:
                return self.by_request_id[request.request_id]
            session = studio_pb2.Session(
                session_id=uuid.uuid4().hex[:16],
                tenant="acme",
                state=State.ACTIVE,
                width=WIDTH,
                height=HEIGHT,
                fps=FPS,
                preset="tiny",
                seed=request.options.seed if request.options.HasField("seed") else 7,
                prompt=request.prompt,
                garment_id=request.garment.catalog_id or "upload:abc",
                options=request.options,
            )
            self.sessions[session.session_id] = session
            self.by_request_id[request.request_id] = session
            return session

    def GetSession(self, request, context):
        self._auth("GetSession", request, context)
        if self.unavailable_before_get > 0:
            self.unavailable_before_get -= 1
            _abort(context, grpc.StatusCode.UNAVAILABLE, "replica draining")
        return self._session(request.session_id, context)

    def SwitchGarment(self, request, context):
        self._auth("SwitchGarment", request, context)
        session = self._session(request.session_id, context)
        session.garment_id = request.garment.catalog_id or "upload:def"
        return studio_pb2.SwitchGarmentResponse(effective_chunk_index=3, garment_id=session.garment_id)

    def UpdatePrompt(self, request, context):
        self._auth("UpdatePrompt", request, context)
        session = self._session(request.session_id, context)
        session.prompt = request.prompt
        session.prompt_revision += 1
        return studio_pb2.UpdatePromptResponse(effective_chunk_index=3, prompt_revision=session.prompt_revision)

    def CloseSession(self, request, context):
        self._auth("CloseSession", request, context)
        session = self._session(request.session_id, context)
        session.state = State.CLOSED
        return studio_pb2.CloseSessionResponse(state=State.CLOSED, chunks_generated=len(self.segments))

    def StreamSession(self, request, context):
        self._auth("StreamSession", request, context)
        self._session(request.session_id, context)
        with self.lock:
            self.stream_starts.append(request.resume_from_index)
            call_no = len(self.stream_starts)
            drop_after = self.drop_plan.pop(0) if self.drop_plan else None
        n = len(self.segments)
        if request.resume_from_index > n:
            _abort(context, grpc.StatusCode.OUT_OF_RANGE, "past the end", "CHUNK_NOT_RETAINED")
        start = request.resume_from_index
        if self.resend_previous and start > 0:
            start -= 1
        sent = 0
        for index in range(start, n):
            if drop_after is not None and sent >= drop_after:
                _abort(context, grpc.StatusCode.UNAVAILABLE, "connection dropped")
            if index == self.skip_index:
                continue
            first_frame = sum(CHUNK_FRAMES[:index])
            last = index == n - 1 and not self.end_with_marker
            yield studio_pb2.VideoChunk(
                session_id=request.session_id,
                index=index,
                fmp4=(self.init if sent == 0 else b"") + self.segments[index],
                is_init_segment_included=sent == 0,
                num_frames=CHUNK_FRAMES[index],
                first_frame_index=first_frame,
                start_seconds=first_frame / FPS,
                duration_seconds=CHUNK_FRAMES[index] / FPS,
                fps=FPS,
                width=WIDTH,
                height=HEIGHT,
                end_of_stream=last,
                end_state=State.CLOSED if last else State.STATE_UNSPECIFIED,
                mime_type='video/mp4; codecs="avc1.64000a"',
            )
            sent += 1
            if self.on_sent is not None:
                self.on_sent(call_no, sent)
            time.sleep(self.chunk_interval_s)
        if self.end_with_marker:
            yield studio_pb2.VideoChunk(
                session_id=request.session_id, index=n, end_of_stream=True, end_state=State.EXPIRED
            )


def _start_server(servicer: FakeStudio, address: str = "127.0.0.1:0") -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    studio_pb2_grpc.add_StudioServicer_to_server(servicer, server)
    port = server.add_insecure_port(address)
    assert port
    server.start()
    return server, port


@pytest.fixture
def fake(media):
    init, segments = media
    return FakeStudio(init, segments)


@pytest.fixture
def target(fake):
    server, port = _start_server(fake)
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()


@pytest.fixture
def client(target):
    with StudioClient(target, API_KEY, **FAST) as c:
        yield c


@pytest.fixture
def images(tmp_path) -> tuple[bytes, Path]:
    path = tmp_path / "garment.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n fake png")
    return b"\xff\xd8\xff fake jpeg", path


def _new_session(client: StudioClient, images) -> str:
    reference, _ = images
    return client.create_session(reference, "catalog:sku-1", "walks").session_id


def _check_playable(path: Path, frames: int) -> None:
    info = probe_video(path)
    assert info.num_frames == frames
    assert (info.width, info.height) == (WIDTH, HEIGHT)
    assert info.codec == "h264"
    assert info.fps == pytest.approx(FPS)
    decoded = read_frames(path)
    assert decoded.shape == (frames, HEIGHT, WIDTH, 3)


# -- request building --------------------------------------------------------------------------


def test_image_input_forms(tmp_path):
    p = tmp_path / "x.jpg"
    p.write_bytes(b"jpegbytes")
    assert image_input(b"abc").data == b"abc"
    assert image_input(p).data == b"jpegbytes"
    assert image_input(str(p)).data == b"jpegbytes"
    assert image_input("catalog:sku-9").catalog_id == "sku-9"
    assert image_input("object:uploads/acme/ff").object_key == "uploads/acme/ff"
    given = common_pb2.ImageInput(catalog_id="a")
    assert image_input(given) is given
    with pytest.raises(FileNotFoundError, match="catalog:"):
        image_input("sku-9")
    with pytest.raises(ValueError):
        image_input(b"")
    with pytest.raises(TypeError):
        image_input(123)  # type: ignore[arg-type]


def test_session_options_from_dict():
    opts = session_options({"max_chunks": 5, "width": 320, "switch_options": {"withdraw_history_kv": False}}, seed=0)
    assert opts.HasField("seed") and opts.seed == 0
    assert opts.max_chunks == 5 and opts.width == 320
    assert opts.switch_options.HasField("withdraw_history_kv")
    assert not opts.switch_options.HasField("refresh_garment_kv")
    assert session_options(None) is None
    with pytest.raises(ValueError, match="bogus"):
        session_options({"bogus": 1})


def test_api_key_never_in_repr(target):
    with StudioClient(target, API_KEY, application="studio") as c:
        assert API_KEY not in repr(c)


# -- unary calls ---------------------------------------------------------------------------------


def test_create_session_request_and_metadata(fake, target, images):
    reference, garment_path = images
    with StudioClient(target, API_KEY, application="fashionchameleon", **FAST) as c:
        session = c.create_session(reference, garment_path, "walks", seed=42, options={"max_chunks": 6})
    assert session.state == State.ACTIVE and session.seed == 42
    request = fake.requests[-1]
    assert request.reference.data == reference
    assert request.garment.data == garment_path.read_bytes()
    assert request.options.max_chunks == 6
    assert len(request.request_id) == 32  # generated idempotency key
    md = fake.metadata[-1]
    assert md["x-api-key"] == API_KEY
    assert md["authorization"] == f"Bearer {API_KEY}"
    assert md["application"] == "fashionchameleon"


def test_application_metadata_defaults_to_the_suite_and_can_be_turned_off(fake, target, client, images):
    _new_session(client, images)
    assert fake.metadata[-1]["application"] == "fashionchameleon"  # Ray Serve's proxy routes on it
    assert fake.requests[-1].garment.catalog_id == "sku-1"
    with StudioClient(target, API_KEY, application=None) as plain:
        _new_session(plain, images)
    assert "application" not in fake.metadata[-1]


def test_wrong_api_key_is_unauthenticated_and_not_retried(fake, target, images):
    with StudioClient(target, "wrong-key", **FAST) as c, pytest.raises(StudioError) as err:
        c.create_session(images[0], "catalog:sku-1", "walks")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "wrong-key" not in str(err.value)
    assert fake.calls["CreateSession"] == 1


def test_not_found_carries_reason_and_metadata(fake, client):
    with pytest.raises(StudioError) as err:
        client.get_session("nope")
    e = err.value
    assert e.code == grpc.StatusCode.NOT_FOUND
    assert e.reason == "SESSION_NOT_FOUND"
    assert e.domain == "fashionchameleon.v1"
    assert e.metadata == {"session_id": "nope"}
    assert e.retry_after_s is None
    assert fake.calls["GetSession"] == 1  # not retried
    for call in (
        lambda: client.switch_garment("nope", "catalog:x"),
        lambda: client.update_prompt("nope", "runs"),
        lambda: client.close_session("nope"),
        lambda: list(client.stream("nope")),
    ):
        with pytest.raises(StudioError) as err:
            call()
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
    assert fake.calls["StreamSession"] == 1  # NOT_FOUND is not a reason to reconnect


def test_resource_exhausted_with_retry_info_is_retried_with_same_request_id(fake, client, images):
    fake.exhausted_before_create = 2
    t0 = time.monotonic()
    session = client.create_session(images[0], "catalog:sku-1", "walks")
    assert session.state == State.ACTIVE
    assert time.monotonic() - t0 >= 2 * 0.02  # RetryInfo delay honoured
    assert fake.calls["CreateSession"] == 3
    ids = {r.request_id for r in fake.requests if isinstance(r, studio_pb2.CreateSessionRequest)}
    assert len(ids) == 1  # every attempt carries the same idempotency key


def test_resource_exhausted_retries_are_bounded(fake, client, images):
    fake.exhausted_before_create = 10
    with pytest.raises(StudioError) as err:
        client.create_session(images[0], "catalog:sku-1", "walks")
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.reason == "CAPACITY_EXHAUSTED"
    assert err.value.retry_after_s == pytest.approx(0.02)
    assert fake.calls["CreateSession"] == 4  # 1 + retries=3


def test_resource_exhausted_without_retry_info_is_not_retried(fake, client, images):
    fake.quota_exceeded = True
    with pytest.raises(StudioError) as err:
        client.create_session(images[0], "catalog:sku-1", "walks")
    assert (err.value.code, err.value.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    )
    assert err.value.metadata == {"quota": "sessions"}
    assert fake.calls["CreateSession"] == 1


def test_unavailable_is_retried(fake, client, images):
    session_id = _new_session(client, images)
    fake.unavailable_before_get = 2
    assert client.get_session(session_id).session_id == session_id
    assert fake.calls["GetSession"] == 3
    fake.unavailable_before_get = 10
    with pytest.raises(StudioError) as err:
        client.get_session(session_id)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert fake.calls["GetSession"] == 3 + 4


def test_control_calls(fake, client, images):
    session_id = _new_session(client, images)
    resp = client.switch_garment(session_id, "catalog:sku-2", options={"disentangle_reference_kv": False})
    assert (resp.effective_chunk_index, resp.garment_id) == (3, "sku-2")
    switch = fake.requests[-1]
    assert switch.options.HasField("disentangle_reference_kv")
    assert not switch.options.disentangle_reference_kv
    assert len(switch.request_id) == 32
    client.switch_garment(session_id, b"png", request_id="my-switch-1")
    assert fake.requests[-1].request_id == "my-switch-1"
    assert fake.requests[-1].garment.data == b"png"
    upd = client.update_prompt(session_id, "turns around")
    assert upd.prompt_revision == 1 and len(fake.requests[-1].request_id) == 32
    assert client.get_session(session_id).prompt == "turns around"
    closed = client.close_session(session_id)
    assert closed.state == State.CLOSED
    assert client.get_session(session_id).state == State.CLOSED


# -- streaming -----------------------------------------------------------------------------------


def _indexes(chunks) -> list[int]:
    return [c.index for c in chunks]


def test_stream_yields_all_chunks_in_order(client, images):
    session_id = _new_session(client, images)
    chunks = list(client.stream(session_id))
    assert _indexes(chunks) == list(range(len(CHUNK_FRAMES)))
    assert chunks[0].is_init_segment_included
    assert chunks[-1].end_of_stream and chunks[-1].end_state == State.CLOSED


def test_stream_auto_resume_yields_every_index_once(fake, client, images):
    session_id = _new_session(client, images)
    fake.drop_plan = [2, 0, 3]  # drop after 2 chunks, then at once, then after 3
    chunks = list(client.stream(session_id))
    assert _indexes(chunks) == list(range(len(CHUNK_FRAMES)))
    assert fake.stream_starts == [0, 2, 2, 5]
    # the first chunk of every call carried the init segment again
    assert [c.index for c in chunks if c.is_init_segment_included] == [0, 2, 5]


def test_stream_drops_resent_duplicates(fake, client, images):
    session_id = _new_session(client, images)
    fake.drop_plan = [3]
    fake.resend_previous = True
    assert _indexes(client.stream(session_id)) == list(range(len(CHUNK_FRAMES)))
    assert fake.stream_starts == [0, 3]


def test_stream_without_auto_resume_raises(fake, client, images):
    session_id = _new_session(client, images)
    fake.drop_plan = [2]
    got = []
    with pytest.raises(StudioError) as err:
        for chunk in client.stream(session_id, auto_resume=False):
            got.append(chunk.index)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert got == [0, 1]


def test_stream_gives_up_after_max_reconnects(fake, client, images):
    session_id = _new_session(client, images)
    fake.drop_plan = [1] + [0] * 10
    got = []
    with pytest.raises(StudioError) as err:
        for chunk in client.stream(session_id, max_reconnects=2):
            got.append(chunk.index)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert got == [0]
    assert fake.stream_starts == [0, 1, 1]


def test_stream_progress_resets_reconnect_budget(fake, client, images):
    session_id = _new_session(client, images)
    fake.drop_plan = [1, 1, 1, 1, 1]  # five drops, each after progress
    assert _indexes(client.stream(session_id, max_reconnects=1)) == list(range(len(CHUNK_FRAMES)))


def test_stream_raises_when_server_skips_an_index(fake, client, images):
    session_id = _new_session(client, images)
    fake.skip_index = 2
    got = []
    with pytest.raises(ChunkGapError) as err:
        for chunk in client.stream(session_id):
            got.append(chunk.index)
    assert got == [0, 1]
    assert (err.value.expected_index, err.value.received_index) == (2, 3)
    assert err.value.code == grpc.StatusCode.DATA_LOSS


def test_stream_end_marker(fake, client, images):
    session_id = _new_session(client, images)
    fake.end_with_marker = True
    chunks = list(client.stream(session_id))
    assert _indexes(chunks) == [*range(len(CHUNK_FRAMES)), len(CHUNK_FRAMES)]
    assert chunks[-1].end_of_stream and not chunks[-1].fmp4
    assert chunks[-1].end_state == State.EXPIRED


def test_stream_resume_from_index(fake, client, images):
    session_id = _new_session(client, images)
    assert _indexes(client.stream(session_id, resume_from_index=4)) == [4, 5]
    with pytest.raises(StudioError) as err:
        list(client.stream(session_id, resume_from_index=99))
    assert (err.value.code, err.value.reason) == (grpc.StatusCode.OUT_OF_RANGE, "CHUNK_NOT_RETAINED")


def test_stream_survives_server_restart(fake, images, media):
    """A real connection loss: the server stops mid-stream and a new one binds the same port."""
    server, port = _start_server(fake)
    state = {"server": server}

    def restart(call_no: int, sent: int) -> None:
        if call_no == 1 and sent == 3:

            def bounce() -> None:
                state["server"].stop(0).wait()
                state["server"], _ = _start_server(fake, f"127.0.0.1:{port}")

            threading.Thread(target=bounce).start()
            time.sleep(0.5)  # the stop cancels this handler

    fake.on_sent = restart
    try:
        with StudioClient(
            f"127.0.0.1:{port}",
            API_KEY,
            backoff_base_s=0.05,
            backoff_max_s=0.5,
            channel_options={
                "grpc.initial_reconnect_backoff_ms": 50,
                "grpc.min_reconnect_backoff_ms": 50,
                "grpc.max_reconnect_backoff_ms": 200,
            },
        ) as c:
            session_id = _new_session(c, images)
            chunks = list(c.stream(session_id, max_reconnects=10))
    finally:
        state["server"].stop(0).wait()
    assert _indexes(chunks) == list(range(len(CHUNK_FRAMES)))
    assert fake.stream_starts[0] == 0 and fake.stream_starts[-1] == 3


# -- save ----------------------------------------------------------------------------------------


def test_save_writes_playable_mp4_and_stats(fake, client, images, tmp_path):
    session_id = _new_session(client, images)
    seen = []
    out = tmp_path / "session.mp4"
    stats = client.save(session_id, out, on_chunk=lambda c: seen.append(c.index))
    assert seen == list(range(len(CHUNK_FRAMES)))
    _check_playable(out, TOTAL_FRAMES)
    assert stats["chunks"] == len(CHUNK_FRAMES) and stats["frames"] == TOTAL_FRAMES
    assert stats["bytes"] == out.stat().st_size
    assert stats["video_seconds"] == pytest.approx(TOTAL_FRAMES / FPS)
    assert stats["time_to_first_chunk_seconds"] > 0
    assert 0 <= stats["inter_chunk_p50_seconds"] <= stats["inter_chunk_p99_seconds"]
    assert stats["end_state"] == "CLOSED" and stats["end_of_stream"]
    assert stats["reconnects"] == 0


def test_save_across_reconnects_is_one_playable_file(fake, client, images, tmp_path, media):
    session_id = _new_session(client, images)
    fake.drop_plan = [2, 0, 1]
    out = tmp_path / "resumed.mp4"
    stats = client.save(session_id, out)
    assert stats["reconnects"] == 3 and stats["chunks"] == len(CHUNK_FRAMES)
    init, segments = media
    assert out.read_bytes() == init + b"".join(segments)  # repeated init segments dropped
    _check_playable(out, TOTAL_FRAMES)


def test_save_max_chunks_and_resume_from(fake, client, images, tmp_path):
    session_id = _new_session(client, images)
    out = tmp_path / "part.mp4"
    stats = client.save(session_id, out, max_chunks=2, resume_from_index=3)
    assert (stats["chunks"], stats["first_index"], stats["last_index"]) == (2, 3, 4)
    assert stats["end_state"] == "STATE_UNSPECIFIED" and not stats["end_of_stream"]
    _check_playable(out, CHUNK_FRAMES[3] + CHUNK_FRAMES[4])


def test_save_with_end_marker(fake, client, images, tmp_path):
    session_id = _new_session(client, images)
    fake.end_with_marker = True
    out = tmp_path / "marker.mp4"
    stats = client.save(session_id, out)
    assert stats["chunks"] == len(CHUNK_FRAMES) and stats["end_state"] == "EXPIRED"
    _check_playable(out, TOTAL_FRAMES)


# -- asyncio client ------------------------------------------------------------------------------


def test_async_client_end_to_end(fake, target, images, tmp_path, media):
    reference, garment_path = images

    async def main() -> None:
        async with AsyncStudioClient(target, API_KEY, application="app", **FAST) as c:
            fake.exhausted_before_create = 1
            session = await c.create_session(reference, garment_path, "walks", seed=3)
            assert session.seed == 3 and fake.calls["CreateSession"] == 2
            sid = session.session_id
            assert fake.metadata[-1]["application"] == "app"

            fake.unavailable_before_get = 1
            assert (await c.get_session(sid)).session_id == sid

            fake.drop_plan = [2, 0, 3]
            indexes = [chunk.index async for chunk in c.stream(sid)]
            assert indexes == list(range(len(CHUNK_FRAMES)))
            assert fake.stream_starts[-4:] == [0, 2, 2, 5]

            async with aclosing(c.stream(sid)) as chunks:
                async for chunk in chunks:
                    assert chunk.index == 0
                    break

            fake.drop_plan = [2]
            got = []
            with pytest.raises(StudioError) as err:
                async for chunk in c.stream(sid, auto_resume=False):
                    got.append(chunk.index)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and got == [0, 1]

            fake.skip_index = 1
            with pytest.raises(ChunkGapError):
                async for _ in c.stream(sid):
                    pass
            fake.skip_index = None

            fake.drop_plan = [1, 2]
            seen = []

            async def on_chunk(chunk):
                seen.append(chunk.index)

            out = tmp_path / "async.mp4"
            stats = await c.save(sid, out, on_chunk=on_chunk)
            assert seen == list(range(len(CHUNK_FRAMES)))
            assert stats["reconnects"] == 2 and stats["frames"] == TOTAL_FRAMES
            init, segments = media
            assert out.read_bytes() == init + b"".join(segments)

            switch = await c.switch_garment(sid, "catalog:sku-2")
            assert switch.garment_id == "sku-2" and len(fake.requests[-1].request_id) == 32
            upd = await c.update_prompt(sid, "turns")
            assert upd.prompt_revision == 1
            assert (await c.close_session(sid)).state == State.CLOSED

            with pytest.raises(StudioError) as err:
                await c.get_session("missing")
            assert (err.value.code, err.value.reason) == (
                grpc.StatusCode.NOT_FOUND,
                "SESSION_NOT_FOUND",
            )
            assert err.value.metadata == {"session_id": "missing"}

            fake.quota_exceeded = True
            with pytest.raises(StudioError) as err:
                await c.create_session(reference, "catalog:sku-1", "walks")
            assert err.value.reason == "QUOTA_EXCEEDED"

    asyncio.run(main())
    _check_playable(tmp_path / "async.mp4", TOTAL_FRAMES)


def test_async_wrong_key(fake, target, images):
    async def main() -> None:
        async with AsyncStudioClient(target, "nope", **FAST) as c:
            with pytest.raises(StudioError) as err:
                await c.get_session("x")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(main())
    assert fake.calls["GetSession"] == 1
