"""Generator service contracts without Ray or Redis (issue 14, items 5, 9 and 10): admission is
one atomic step, options are honoured, max_chunks ends EXPIRED, and a close that races a
publish ends the session CLOSED without a "session failed" log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch

from fashionchameleon.v1 import decoder_pb2, generator_pb2
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.tensors import tensor_to_proto
from services.generator import service as gen
from services.generator.batcher import ChunkBatcher
from services.generator.service import GeneratorService, SessionRunner
from shared.config import AppConfig, GeneratorConfig
from shared.models.presets import get_preset
from shared.runtime.scheduling import StepTimes
from shared.runtime.session import SwitchOptions
from shared.sessionbus import SessionState, StreamEnded
from shared.sessionbus.sessions import InvalidTransition

TINY = get_preset("tiny")
SESSION_BYTES = 1000


class _FakeStreamingSession:
    def __init__(self, *args, **kwargs):
        self.preset = TINY
        self.chunk_index = 0

    def open_latents(self, *args):
        pass

    def close(self):
        pass


class _Registry:
    def __init__(self, create_delay: float = 0.0):
        self.create_delay = create_delay
        self.created: list[str] = []
        self.metas: dict[str, dict] = {}
        self.states: list[tuple] = []
        self.closed: list[tuple] = []

    async def create(self, sid, tenant, replica, meta, idle_ttl_s=None):
        await asyncio.sleep(self.create_delay)  # the await that used to sit between check and register
        self.created.append(sid)
        self.metas[sid] = dict(meta)

    async def set_state(self, sid, state, reason=None, **fields):
        self.states.append((sid, state, reason, fields))

    async def close(self, sid, reason="closed"):
        self.closed.append((sid, reason))


def _service(
    monkeypatch, registry: _Registry, max_sessions: int = 4, step_times: StepTimes | None = None
) -> GeneratorService:
    async def parked(self):  # the session loop is not under test here
        await asyncio.sleep(3600)

    monkeypatch.setattr(SessionRunner, "run", parked)
    svc = object.__new__(GeneratorService)
    svc.config = AppConfig(generator=GeneratorConfig(recovery=False, max_sessions=max_sessions))
    svc.engine = SimpleNamespace(
        preset=TINY, dit=None, device=torch.device("cpu"), dtype=torch.float32, rope=None, session=_FakeStreamingSession
    )
    svc.spec = SimpleNamespace(bytes=SESSION_BYTES)
    svc.budget = 100 * SESSION_BYTES
    svc.runners, svc._admitting = {}, set()
    svc.redis, svc.registry = MagicMock(), registry
    svc._compute_lock = asyncio.Lock()
    svc._background = None
    svc.replica_id = "gen-test"
    svc.text_max_length = TINY.text_encoder.max_length
    svc.metrics = MagicMock()
    svc.health = SimpleNamespace(draining=False)
    svc.step_times = step_times or StepTimes()  # nothing measured: admission by memory only
    svc._last_refusal = "capacity"
    return svc


def _state(sid: str, **fields) -> generator_pb2.SessionState:
    shape = (1, TINY.dit.in_channels, 1, *TINY.latent_hw())
    latent = tensor_to_proto(torch.zeros(shape))
    text = tensor_to_proto(torch.zeros(1, 4, 16))  # pad_text_embedding is stubbed below
    return generator_pb2.SessionState(
        session_id=sid,
        seed=1,
        reference_latent=latent,
        garment_latent=latent,
        prompt_embedding=text,
        prompt="p",
        **fields,
    )


def _open(svc, sid, meta=None, **fields):
    return svc.open_session(_state(sid, **fields), "acme", {"max_chunks": 10, **(meta or {})})


@pytest.fixture(autouse=True)
def _text_embedding(monkeypatch):
    monkeypatch.setattr(gen, "pad_text_embedding", lambda t, n: t)


def test_concurrent_opens_never_admit_more_than_fit(monkeypatch):
    async def scenario():
        svc = _service(monkeypatch, _Registry(create_delay=0.05), max_sessions=4)
        results = await asyncio.gather(*(_open(svc, f"ses_{i}") for i in range(10)), return_exceptions=True)
        admitted = [r for r in results if isinstance(r, generator_pb2.GeneratorOpenSessionResponse)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(admitted) == 4 and len(refused) == 6, results
        assert all(r.reason == "CAPACITY_EXHAUSTED" for r in refused)
        assert len(svc.runners) == 4 and not svc._admitting and svc.capacity().active_sessions == 4
        for runner in svc.runners.values():
            runner.task.cancel()

    asyncio.run(scenario())


def test_concurrent_opens_never_admit_more_than_playback_speed_allows(monkeypatch):
    """Admission by compute: memory would take 10 sessions, the measured step times hold playback
    speed (0.5 s chunks, 20% headroom) for 4: stepping 4 takes 0.36 s, 5 would take 0.48 s."""
    times = StepTimes(initial={1: 0.12, 2: 0.2, 4: 0.36})

    async def scenario():
        svc = _service(monkeypatch, _Registry(create_delay=0.05), max_sessions=10, step_times=times)
        assert svc.realtime_capacity() == 4 and svc.capacity().realtime_sessions == 4
        results = await asyncio.gather(*(_open(svc, f"ses_{i}") for i in range(10)), return_exceptions=True)
        admitted = [r for r in results if isinstance(r, generator_pb2.GeneratorOpenSessionResponse)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(admitted) == 4 and len(refused) == 6, results
        assert all(r.reason == "CAPACITY_EXHAUSTED" and r.metadata["limit"] == "compute" for r in refused)
        assert all(r.retry_after_s == 0.5 and "0.480 s of compute per 0.50 s chunk" in r.message for r in refused)
        assert all(r.metadata["replica_id"] == "gen-test" for r in refused)
        cap = svc.capacity()
        assert cap.active_sessions == 4 and abs(cap.realtime_headroom - (0.5 / 0.36 - 1)) < 1e-9
        stats = svc.record_routing_stats()
        assert stats["free_sessions"] == 0 and stats["replica_id"] == "gen-test"

        for runner in svc.runners.values():
            runner.task.cancel()

    asyncio.run(scenario())


def test_without_realtime_pacing_admission_is_by_memory_only(monkeypatch):
    times = StepTimes(initial={1: 10.0})  # far slower than playback

    async def scenario():
        svc = _service(monkeypatch, _Registry(), max_sessions=3, step_times=times)
        svc.config = AppConfig(generator=GeneratorConfig(recovery=False, max_sessions=3, realtime=False))
        # the gateway's routing hint (replicas that refused this open) is not stored as session data
        hint = {"exclude_replicas": ["gen-other"]}
        results = await asyncio.gather(*(_open(svc, f"ses_{i}", hint) for i in range(4)), return_exceptions=True)
        assert svc.registry.metas and all("exclude_replicas" not in m for m in svc.registry.metas.values())
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(svc.runners) == 3 and len(refused) == 1 and refused[0].metadata["limit"] == "capacity"
        for runner in svc.runners.values():
            runner.task.cancel()

    asyncio.run(scenario())


def test_a_failed_open_gives_its_slot_back(monkeypatch):
    async def scenario():
        svc = _service(monkeypatch, _Registry(), max_sessions=1)

        def boom(self, *args):
            raise RuntimeError("cond forward failed")

        monkeypatch.setattr(_FakeStreamingSession, "open_latents", boom)
        with pytest.raises(RuntimeError):
            await _open(svc, "ses_a")
        assert not svc._admitting and svc.capacity().active_sessions == 0

    asyncio.run(scenario())


def test_preset_size_and_duration_options(monkeypatch):
    async def scenario():
        registry = _Registry()
        svc = _service(monkeypatch, registry, max_sessions=8)
        st = TINY.streaming
        with pytest.raises(InvalidArgument) as err:
            await _open(svc, "ses_p", {"requested_preset": "wan9000"})
        assert err.value.reason == "PRESET_UNAVAILABLE" and err.value.metadata == {
            "preset": "wan9000",
            "served": TINY.name,
        }
        await _open(svc, "ses_t", {"requested_preset": TINY.name})
        await _open(svc, "ses_w", width=st.width)  # one side alone: the other takes the default
        await _open(svc, "ses_h", height=st.height)
        with pytest.raises(InvalidArgument) as err:
            await _open(svc, "ses_x", width=st.width + 32)
        assert err.value.reason == "RESOLUTION_UNSUPPORTED"
        await _open(svc, "ses_d", {"max_duration_seconds": 0.01})
        assert svc.runners["ses_d"].max_chunks == 1
        await _open(svc, "ses_e", {"max_duration_seconds": 1.0, "max_chunks": 100})
        assert svc.runners["ses_e"].max_chunks == 3  # 9 + 12 + 12 frames = 1.375 s >= 1 s; 21 frames < 1 s
        active = {sid: fields for sid, state, _, fields in registry.states if state == SessionState.ACTIVE}
        assert active["ses_d"]["max_chunks"] == 1
        for runner in svc.runners.values():
            runner.task.cancel()

    asyncio.run(scenario())


def test_chunks_for_duration_is_the_first_boundary_at_or_past_it(monkeypatch):
    svc = _service(monkeypatch, _Registry())
    fps = TINY.streaming.fps
    assert svc.chunks_for_duration(1e-6) == 1
    assert svc.chunks_for_duration(9 / fps) == 1
    assert svc.chunks_for_duration(9 / fps + 1e-6) == 2
    assert svc.chunks_for_duration(21 / fps) == 2
    assert svc.chunks_for_duration(10.0) == 21  # 9 + 12 * 20 = 249 frames >= 240


def test_max_chunks_ends_expired_and_a_racing_close_wins(monkeypatch):
    async def scenario():
        registry = _Registry()
        svc = _service(monkeypatch, registry)
        runner = SimpleNamespace(session_id="ses_m", end_reason="max_chunks")
        await svc._end_record(runner)
        assert registry.states[-1][:3] == ("ses_m", SessionState.EXPIRED, "max_chunks") and not registry.closed

        async def refuse(sid, state, reason=None, **fields):
            raise InvalidTransition(sid, SessionState.CLOSING, state)

        registry.set_state = refuse
        await svc._end_record(runner)
        assert registry.closed == [("ses_m", "max_chunks")]
        await svc._end_record(SimpleNamespace(session_id="ses_c", end_reason="closed"))
        assert registry.closed[-1] == ("ses_c", "closed")

    asyncio.run(scenario())


# ---- a close racing a publish --------------------------------------------------------------------


class _LoopSession:
    def __init__(self):
        self.preset = TINY
        self.chunk_index = 0
        self.is_open = True

    def generate(self):
        self.chunk_index += 1
        return SimpleNamespace(
            latents=torch.zeros(1, 2, 3, 2, 2), switched=False, prompt_updated=False, generate_seconds=0.0
        )

    def close(self):
        pass


def test_a_close_racing_a_publish_is_not_a_failure(caplog):
    async def scenario():
        states = iter([SessionState.ACTIVE, SessionState.ACTIVE])
        set_states: list = []
        finished: list = []

        async def get(sid):
            state = next(states, SessionState.CLOSED)  # the close lands while chunk 0 is published
            return SimpleNamespace(state=state, is_terminal=state == SessionState.CLOSED, meta={"client_index": -1})

        async def append(*args):
            raise StreamEnded("closed", 1)

        async def set_state(sid, state, reason=None, **fields):
            set_states.append(state)

        async def read():
            return []

        async def decoded():
            return decoder_pb2.DecodeChunkResponse(num_frames=9, fps=24.0)

        class _Decoder:
            def options(self, **kwargs):
                return self

            @property
            def DecodeChunk(self):
                return SimpleNamespace(remote=lambda request: decoded())

        async def finish(runner):
            finished.append(runner.end_reason)

        @contextlib.asynccontextmanager
        async def compute():
            yield

        registry = SimpleNamespace(
            get=get,
            set_state=set_state,
            control=lambda *a, **k: SimpleNamespace(read=read),
            output=lambda sid: SimpleNamespace(append=append),
        )
        svc = SimpleNamespace(
            config=AppConfig(generator=GeneratorConfig(realtime=False, recovery=False)),
            registry=registry,
            metrics=MagicMock(),
            decoder=_Decoder(),
            compute=compute,
            batcher=ChunkBatcher(StepTimes(), compute, max_batch=1, wait_s=0.0),
            finish=finish,
            redis=MagicMock(),
        )
        runner = SessionRunner(svc, "ses_r", "acme", _LoopSession(), "g", SwitchOptions(), max_chunks=10)
        with caplog.at_level(logging.INFO, logger="services.generator.service"):
            await runner.run()
        assert finished == ["closed"]
        assert SessionState.FAILED not in set_states
        assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text

    asyncio.run(scenario())
