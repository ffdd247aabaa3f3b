"""The generator's session loop (no Ray, no Redis): playback pacing, switch-option defaults, and
the loop itself over in-memory control/output streams and decoder: `_apply`, `_publish`, the end."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from unittest.mock import MagicMock

import numpy as np
import pytest
import torch
from PIL import Image

from fashionchameleon.v1 import common_pb2, decoder_pb2, generator_pb2
from services.common.tensors import tensor_from_proto, tensor_to_proto
from services.generator.batcher import ChunkBatcher
from services.generator.service import GeneratorService, SessionRunner, switch_options_from_proto
from shared.config import AppConfig, GeneratorConfig
from shared.models.attention import BACKENDS, AttentionBackend
from shared.models.presets import get_preset
from shared.runtime.config import EngineConfig
from shared.runtime.decode import StreamingDecoder, to_uint8_frames
from shared.runtime.kv_cache import KVCacheSpec
from shared.runtime.pipeline import Engine
from shared.runtime.scheduling import StepTimes
from shared.runtime.session import SwitchOptions
from shared.sessionbus import ChunkOutOfOrder, CommandType, ControlCommand, SessionState


def runner(realtime: bool, lead: float = 1.0) -> SessionRunner:
    service = SimpleNamespace(config=SimpleNamespace(generator=GeneratorConfig(realtime=realtime, lead_chunks=lead)))
    session = SimpleNamespace(preset=get_preset("tiny"))
    return SessionRunner(service, "ses_x", "t", session, "g", SwitchOptions(), max_chunks=10)


def test_chunks_are_ready_lead_chunks_before_their_playback_time():
    r = runner(realtime=True, lead=1.0)
    assert r._ready_time(0) is None  # the first chunk goes out at once
    assert r._ready_time(1) is None  # no playback clock before chunk 0 is out
    r.playback_start = 100.0
    # chunk k starts at pixel frame 9 + 12 (k - 1); a chunk is 12 frames = 0.5 s at 24 fps
    assert r._ready_time(1) == pytest.approx(100.0 + 9 / 24 - 0.5)
    assert r._ready_time(5) == pytest.approx(100.0 + 57 / 24 - 0.5)
    assert runner(realtime=True, lead=0.0)._ready_time(1) is None  # clock not started
    r0 = runner(realtime=True, lead=0.0)
    r0.playback_start = 0.0
    assert r0._ready_time(2) == pytest.approx(21 / 24)


def test_no_pacing_when_not_realtime():
    r = runner(realtime=False)
    r.playback_start = 100.0
    assert r._ready_time(3) is None


def test_unset_switch_options_mean_on_and_explicit_ones_win():
    assert switch_options_from_proto(common_pb2.SwitchOptions()) == SwitchOptions()
    opts = common_pb2.SwitchOptions(withdraw_history_kv=False)
    assert switch_options_from_proto(opts) == SwitchOptions(refresh=True, withdraw=False, disentangle=True)
    base = SwitchOptions(disentangle=False)
    assert switch_options_from_proto(common_pb2.SwitchOptions(), base) == base


# ---- the loop itself: control commands, generation, publishing (in-memory Redis and decoder) ----


class _Control:
    """A session's control stream: commands become readable at the chunk index they are queued for."""

    def __init__(self, chunk_index, queued: dict[int, list]):
        self.chunk_index = chunk_index  # () -> the session's next chunk index
        self.queued = {k: list(v) for k, v in queued.items()}
        self.acks: list[tuple[str, int]] = []
        self._n = 0

    async def read(self):
        out = []
        for cmd in self.queued.pop(self.chunk_index(), []):
            self._n += 1
            out.append((f"{self._n}-0", cmd))
        return out

    async def ack_result(self, command_id, chunk_index):
        self.acks.append((command_id, chunk_index))
        return chunk_index


class _Output:
    """A session's output stream: chunks must come in order, and nothing comes after the end."""

    def __init__(self):
        self.entries: list[tuple] = []  # ("chunk", index, payload, meta) | ("end", reason)

    async def append(self, index, payload, meta):
        assert not self.entries or self.entries[-1][0] != "end", "a chunk after the end marker"
        expected = sum(1 for e in self.entries if e[0] == "chunk")
        if index != expected:
            raise ChunkOutOfOrder(index, expected)
        self.entries.append(("chunk", index, payload, meta))

    def end(self, reason):
        self.entries.append(("end", reason))


class _Registry:
    """Session records in memory; a terminal state writes the output's end marker (as Redis does)."""

    def __init__(self, svc: GeneratorService):
        self.svc = svc  # the control stream follows the chunk index of the service's runner
        self.outputs: dict[str, _Output] = {}
        self.controls: dict[str, _Control] = {}
        self.states: list[tuple] = []
        self.queued: dict[int, list] = {}

    def control(self, sid, start_id="0-0"):
        if sid not in self.controls:
            self.controls[sid] = _Control(lambda: self.svc.runners[sid].session.chunk_index, self.queued)
        return self.controls[sid]

    def output(self, sid):
        return self.outputs.setdefault(sid, _Output())

    async def create(self, sid, tenant, replica, meta, idle_ttl_s=None):
        self.output(sid)

    async def get(self, sid):
        return SimpleNamespace(state=SessionState.ACTIVE, is_terminal=False, meta={"client_index": 10**6})

    async def set_state(self, sid, state, reason=None, **fields):
        self.states.append((sid, state, reason, fields))
        if state in (SessionState.EXPIRED, SessionState.FAILED, SessionState.CLOSED):
            self.output(sid).end(reason or str(state))

    async def close(self, sid, reason="closed"):
        await self.set_state(sid, SessionState.CLOSED, reason=reason)

    async def release(self, sid, replica):
        return True


def _remote(fn):
    """A Ray handle method: `.remote(...)` runs now and returns something to await."""

    async def done(value):
        return value

    return SimpleNamespace(remote=lambda *a, **k: done(fn(*a, **k)))


class _Decoder:
    """The decoder deployment in memory: a real streaming decode per session. A chunk is decoded
    when its response is awaited (as the loop publishes it), not when it is sent: like the real
    deployment, the last decoded frame is only certain once the response is in."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decoders: dict[str, StreamingDecoder] = {}
        self.last_frame: dict[str, torch.Tensor] = {}
        self.requests: list[decoder_pb2.DecodeChunkRequest] = []
        self.closed: list[str] = []
        self.DecodeChunk = SimpleNamespace(remote=self._decode_later)
        self.CloseSession = _remote(lambda req, save_key=None: self.closed.append(req.session_id))
        self.encode_last_frame = _remote(lambda sid: tensor_to_proto(self.engine.encode_frame(self.last_frame[sid])))

    def options(self, **kwargs):
        return self

    async def _decode_later(self, req):
        return self._decode(req)

    def _decode(self, req):
        self.requests.append(req)
        if req.reset or req.session_id not in self.decoders:
            self.decoders[req.session_id] = StreamingDecoder(self.engine.vae)
        pixels = self.decoders[req.session_id].decode_chunk(tensor_from_proto(req.latents))
        self.last_frame[req.session_id] = pixels[:, :, -1]
        frames = to_uint8_frames(pixels)
        return decoder_pb2.DecodeChunkResponse(
            fmp4=frames.numpy().tobytes(),
            num_frames=frames.shape[0],
            first_frame_index=req.first_frame_index,
            fps=24.0,
        )


def _images():
    rng = np.random.default_rng(0)
    return {f"img{i}": Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)) for i in range(4)}


class _Encoder:
    """The encoder deployment in memory, on the same engine (the same latents as the CLI's)."""

    def __init__(self, engine: Engine, images: dict):
        self.EncodeImage = _remote(
            lambda req: SimpleNamespace(latent=tensor_to_proto(engine.encode_garment(images[req.image.object_key])))
        )
        self.EncodePrompt = _remote(
            lambda req: SimpleNamespace(embedding=tensor_to_proto(engine.encode_prompt(req.prompt)))
        )


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny", EngineConfig(attention_backend="math"))


@pytest.fixture
def no_sdpa(monkeypatch):
    """The engine runs `math`: any call of the ambient default (sdpa on a CPU) is a bug."""

    def refuse(*args):
        raise AssertionError("the engine's attention backend was not applied")

    sdpa = BACKENDS["sdpa"]
    monkeypatch.setitem(BACKENDS, "sdpa", AttentionBackend("sdpa", refuse, sdpa.supports))


def _generator(engine: Engine, images: dict) -> GeneratorService:
    svc = object.__new__(GeneratorService)
    svc.config = AppConfig(generator=GeneratorConfig(recovery=False, realtime=False, save_clips=False))
    svc.engine = engine
    svc.decoder, svc.encoder = _Decoder(engine), _Encoder(engine, images)
    svc.spec = KVCacheSpec.from_preset(engine.preset, engine.dtype)
    svc.budget = 4 * svc.spec.bytes
    svc.runners, svc._admitting, svc._recovering = {}, set(), {}
    svc.redis, svc.registry = MagicMock(), _Registry(svc)
    svc._compute_lock = asyncio.Lock()
    svc._background = None
    svc.replica_id = "gen-test"
    svc.text_max_length = engine.preset.text_encoder.max_length
    svc.metrics = MagicMock()
    svc.health = SimpleNamespace(draining=False)
    svc.step_times = StepTimes(initial={1: 0.01, 2: 0.012, 4: 0.015})  # batching pays: due sessions step together
    svc._last_refusal = "capacity"
    svc.batcher = ChunkBatcher(svc.step_times, svc.compute, max_batch=4, wait_s=0.0)
    return svc


def _cmd(kind: CommandType, **payload) -> ControlCommand:
    return ControlCommand(type=kind, payload=payload)


async def _run_session(svc: GeneratorService, images: dict, queued: dict[int, list], max_chunks: int):
    """Open a session through the service (cond pass, runner) and run its loop to the end."""
    engine = svc.engine
    svc.registry.queued = queued
    state = generator_pb2.SessionState(
        session_id="ses_loop",
        seed=7,
        prompt="a person turns",
        garment_id="img1",
        reference_latent=tensor_to_proto(engine.encode_reference(images["img0"])),
        garment_latent=tensor_to_proto(engine.encode_garment(images["img1"])),
        prompt_embedding=tensor_to_proto(engine.encode_prompt("a person turns")),
    )
    await svc.open_session(state, "acme", {"max_chunks": max_chunks})
    runner = svc.runners["ses_loop"]
    await runner.task
    return runner


def test_the_loop_applies_commands_publishes_in_order_and_matches_the_cli(engine, no_sdpa):
    """A switch before chunk 0, a prompt update before chunk 2 and a full switch before chunk 3,
    from the control stream: acked at the chunk they take effect at, chunks published in order,
    then the end marker, and the very latents the CLI's path (`VideoSession`) generates."""
    images = _images()
    svc = _generator(engine, images)
    queued = {
        0: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2", garment_id="g2")],
        2: [_cmd(CommandType.UPDATE_PROMPT, prompt="a person waves", revision=1)],
        3: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img3", garment_id="g3")],
    }
    runner = asyncio.run(_run_session(svc, images, queued, max_chunks=4))

    assert runner.end_reason == "max_chunks"
    control = svc.registry.controls["ses_loop"]
    assert control.acks == [("1-0", 0), ("2-0", 2), ("3-0", 3)]
    entries = svc.registry.outputs["ses_loop"].entries
    assert [e[0] for e in entries] == ["chunk"] * 4 + ["end"] and entries[-1] == ("end", "max_chunks")
    chunks = [e for e in entries if e[0] == "chunk"]
    assert [e[1] for e in chunks] == [0, 1, 2, 3]
    meta = [e[3] for e in chunks]
    assert [m["switch_applied"] for m in meta] == [True, False, False, True]
    assert [m["prompt_update_applied"] for m in meta] == [False, False, True, False]
    assert [m["garment_id"] for m in meta] == ["g2", "g2", "g2", "g3"]
    assert [m["prompt_revision"] for m in meta] == [0, 0, 1, 1]
    assert [m["first_frame_index"] for m in meta] == [0, 9, 21, 33]
    applied = [f for sid, state, _, f in svc.registry.states if "garment_id" in f or "prompt" in f]
    assert applied == [{"garment_id": "g2"}, {"prompt": "a person waves", "prompt_revision": 1}, {"garment_id": "g3"}]
    assert svc.decoder.closed == ["ses_loop"] and "ses_loop" not in svc.runners
    assert [r.chunk_index for r in svc.decoder.requests] == [0, 1, 2, 3]
    assert [r.reset for r in svc.decoder.requests] == [True, False, False, False]

    # The CLI's path: the same orchestrator at its pixel level, on the same inputs.
    s = engine.session()
    s.open(images["img0"], images["img1"], "a person turns", seed=7)
    cli = []
    for k in range(4):
        if k == 0:
            s.switch_garment(images["img2"])
        if k == 2:
            s.update_prompt("a person waves")
        if k == 3:
            s.switch_garment(images["img3"])
        r = s.next_chunk()
        cli.append((r.latents, r.frames))
    s.close()
    for k, req in enumerate(svc.decoder.requests):
        assert torch.equal(tensor_from_proto(req.latents), cli[k][0]), f"chunk {k} differs from the CLI's"
        assert chunks[k][2] == cli[k][1].numpy().tobytes()  # the published piece is that chunk's frames


def test_a_close_command_ends_the_loop_after_publishing_what_was_generated(engine, no_sdpa):
    images = _images()
    svc = _generator(engine, images)
    queued = {
        2: [
            _cmd(CommandType.CLOSE, reason="client_left"),
            _cmd(CommandType.SWITCH_GARMENT, garment_key="img2", garment_id="g2"),
        ]
    }
    runner = asyncio.run(_run_session(svc, images, queued, max_chunks=10))

    assert runner.end_reason == "client_left"
    entries = svc.registry.outputs["ses_loop"].entries
    assert [e[:2] for e in entries] == [("chunk", 0), ("chunk", 1), ("end", "client_left")]
    assert svc.registry.controls["ses_loop"].acks == []  # nothing after the close is applied
    assert all(m[3]["garment_id"] == "img1" for m in entries[:2])
    assert [r.chunk_index for r in svc.decoder.requests] == [0, 1]
    assert svc.decoder.closed == ["ses_loop"]
