"""The generator's session loop (no Ray, no Redis): playback pacing, switch-option defaults, and
the loop itself over in-memory control/output streams and decoder: `_apply`, `_publish`, the end."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from unittest.mock import AsyncMock, MagicMock

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
from shared.runtime.scheduling import Recent, StepTimes
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
        self.last_frames: dict[str, dict[int, torch.Tensor]] = {}  # the last frame of each chunk decoded
        self.requests: list[decoder_pb2.DecodeChunkRequest] = []
        self.frames_asked: list[int | None] = []
        self.closed: list[str] = []
        self.DecodeChunk = SimpleNamespace(remote=self._decode_later)
        self.CloseSession = _remote(lambda req, save_key=None: self.closed.append(req.session_id))
        self.encode_last_frame = _remote(self._encode_last_frame)

    def _encode_last_frame(self, sid, chunk_index=None):
        self.frames_asked.append(chunk_index)
        frames = self.last_frames[sid]
        return tensor_to_proto(self.engine.encode_frame(frames[max(frames) if chunk_index is None else chunk_index]))

    def options(self, **kwargs):
        return self

    async def _decode_later(self, req):
        return self._decode(req)

    def _decode(self, req):
        self.requests.append(req)
        if req.reset or req.session_id not in self.decoders:
            self.decoders[req.session_id] = StreamingDecoder(self.engine.vae)
            if req.HasField("prime_latents"):  # as the deployment: decode the primer, drop its frames
                primed = self.decoders[req.session_id].decode_chunk(tensor_from_proto(req.prime_latents))
                self.last_frames.setdefault(req.session_id, {})[req.chunk_index - 1] = primed[:, :, -1]
        pixels = self.decoders[req.session_id].decode_chunk(tensor_from_proto(req.latents))
        self.last_frames.setdefault(req.session_id, {})[req.chunk_index] = pixels[:, :, -1]
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
    svc.switch_seconds, svc.redo_seconds = Recent(), Recent()
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


def _generator_with(engine, images, **generator) -> GeneratorService:
    svc = _generator(engine, images)
    svc.config = AppConfig(
        generator=GeneratorConfig(**{"recovery": False, "realtime": False, "save_clips": False, **generator})
    )
    return svc


def _cli_chunks(engine, images, steps: dict[int, list], chunks: int) -> list:
    """The CLI's path (`VideoSession` at its pixel level) on the same inputs: (latents, frames) per
    chunk, with `steps[k]` (("switch", image) | ("prompt", text)) applied before chunk k."""
    s = engine.session()
    s.open(images["img0"], images["img1"], "a person turns", seed=7)
    out = []
    for k in range(chunks):
        for kind, arg in steps.get(k, []):
            s.switch_garment(images[arg]) if kind == "switch" else s.update_prompt(arg)
        r = s.next_chunk()
        out.append((r.latents, r.frames))
    s.close()
    return out


def _published(svc: GeneratorService) -> tuple[list, list]:
    """(chunk entries of the output stream, the decode request of each published chunk: the last
    one sent for its index)."""
    chunks = [e for e in svc.registry.outputs["ses_loop"].entries if e[0] == "chunk"]
    last = {r.chunk_index: r for r in svc.decoder.requests}
    return chunks, [last[e[1]] for e in chunks]


@pytest.mark.parametrize("redo", [True, False], ids=["redo", "no-redo"])
def test_the_loop_applies_commands_publishes_in_order_and_matches_the_cli(engine, no_sdpa, redo):
    """A switch before chunk 0, a prompt update read before chunk 2 and a full switch read right
    after chunk 2 was generated (sent to the decoder, not yet to the client), from the control
    stream: acked at the chunk they take effect at, chunks published in order, then the end marker,
    and the very latents the CLI's path (`VideoSession`) generates. With redo (the default) the
    switch takes effect at chunk 2, the first chunk the client has not received: chunk 2 is
    dropped and generated again wearing it; without, at chunk 3."""
    images = _images()
    svc = _generator_with(engine, images, redo_undelivered_on_switch=redo)
    queued = {
        0: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2", garment_id="g2")],
        2: [_cmd(CommandType.UPDATE_PROMPT, prompt="a person waves", revision=1)],
        3: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img3", garment_id="g3")],
    }
    runner = asyncio.run(_run_session(svc, images, queued, max_chunks=4))

    at = 2 if redo else 3  # where the second switch takes effect
    assert runner.end_reason == "max_chunks"
    control = svc.registry.controls["ses_loop"]
    assert control.acks == [("1-0", 0), ("2-0", 2), ("3-0", at)]
    entries = svc.registry.outputs["ses_loop"].entries
    assert [e[0] for e in entries] == ["chunk"] * 4 + ["end"] and entries[-1] == ("end", "max_chunks")
    chunks, requests = _published(svc)
    assert [e[1] for e in chunks] == [0, 1, 2, 3]
    meta = [e[3] for e in chunks]
    assert [m["switch_applied"] for m in meta] == [k in (0, at) for k in range(4)]
    assert [m["prompt_update_applied"] for m in meta] == [False, False, True, False]  # a redo keeps it
    assert [m["garment_id"] for m in meta] == ["g2", "g2"] + ["g3" if k >= at else "g2" for k in (2, 3)]
    assert [m["prompt_revision"] for m in meta] == [0, 0, 1, 1]
    assert [m["first_frame_index"] for m in meta] == [0, 9, 21, 33]
    applied = [f for sid, state, _, f in svc.registry.states if "garment_id" in f or "prompt" in f]
    assert applied == [{"garment_id": "g2"}, {"prompt": "a person waves", "prompt_revision": 1}, {"garment_id": "g3"}]
    assert svc.decoder.closed == ["ses_loop"] and "ses_loop" not in svc.runners
    sent = [(r.chunk_index, r.reset) for r in svc.decoder.requests]
    if redo:  # chunk 2 decoded, dropped, decoded again on a new stream primed with chunk 1
        assert sent == [(0, True), (1, False), (2, False), (2, True), (3, False)]
        assert torch.equal(tensor_from_proto(requests[2].prime_latents), tensor_from_proto(requests[1].latents))
        svc.metrics.chunks_redone_total.inc.assert_called_once()
    else:
        assert sent == [(0, True), (1, False), (2, False), (3, False)]
        svc.metrics.chunks_redone_total.inc.assert_not_called()
    assert svc.decoder.frames_asked == [at - 1]  # the new reference: the last frame the client got

    steps = {0: [("switch", "img2")], 2: [("prompt", "a person waves")]}
    steps.setdefault(at, []).append(("switch", "img3"))
    cli = _cli_chunks(engine, images, steps, 4)
    for k, req in enumerate(requests):
        assert torch.equal(tensor_from_proto(req.latents), cli[k][0]), f"chunk {k} differs from the CLI's"
    # The published pieces: that chunk's frames. Continuous decode up to the redone chunk; from it
    # on, a decode stream primed with the chunk before it (the decoder's reset contract).
    dec = StreamingDecoder(engine.vae)
    for k, req in enumerate(requests):
        if req.reset and k > 0:
            dec = StreamingDecoder(engine.vae)
            dec.decode_chunk(tensor_from_proto(req.prime_latents))
        frames = to_uint8_frames(dec.decode_chunk(tensor_from_proto(req.latents)))
        assert chunks[k][2] == frames.numpy().tobytes(), f"chunk {k}'s piece"
        if k < at:
            assert chunks[k][2] == cli[k][1].numpy().tobytes()  # the CLI's frames, byte for byte


def test_a_switch_read_before_chunk_0_is_sent_redoes_chunk_0_with_the_new_garment(engine, no_sdpa):
    """Chunk 0 generated but not sent when the switch comes: it is generated again wearing the new
    garment (at chunk 0 a switch only refreshes the garment: nothing was shown to withdraw)."""
    images = _images()
    svc = _generator(engine, images)
    queued = {1: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2", garment_id="g2")]}
    asyncio.run(_run_session(svc, images, queued, max_chunks=3))

    assert svc.registry.controls["ses_loop"].acks == [("1-0", 0)]
    chunks, requests = _published(svc)
    assert [e[1] for e in chunks] == [0, 1, 2]
    assert [e[3]["garment_id"] for e in chunks] == ["g2"] * 3
    assert [e[3]["switch_applied"] for e in chunks] == [True, False, False]
    assert [(r.chunk_index, r.reset) for r in svc.decoder.requests] == [(0, True), (0, True), (1, False), (2, False)]
    assert not requests[0].HasField("prime_latents") and svc.decoder.frames_asked == []
    cli = _cli_chunks(engine, images, {0: [("switch", "img2")]}, 3)
    for k, req in enumerate(requests):
        assert torch.equal(tensor_from_proto(req.latents), cli[k][0])
        assert chunks[k][2] == cli[k][1].numpy().tobytes()


@pytest.mark.parametrize("same_codec", [True, False])
def test_a_redone_chunk_carries_an_init_segment_only_if_the_codec_configuration_changed(engine, no_sdpa, same_codec):
    """VideoChunk.is_init_segment_included: set on chunk 0 and when the codec configuration changes.
    A redo restarts the decode stream, whose first piece starts with its init segment; the same one
    as the stream's is cut off (the timeline goes on), a different one is kept and stored."""
    images = _images()
    svc = _generator(engine, images)
    svc.redis = AsyncMock()
    inits = iter([b"INIT-A", b"INIT-A" if same_codec else b"INIT-B"])
    decode = svc.decoder._decode

    def with_init(req):
        resp = decode(req)
        if req.reset:
            resp.init_segment = next(inits)
            resp.fmp4 = resp.init_segment + resp.fmp4
        return resp

    svc.decoder._decode = with_init
    queued = {2: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2")]}
    asyncio.run(_run_session(svc, images, queued, max_chunks=3))

    chunks, _ = _published(svc)
    assert [(r.chunk_index, r.reset) for r in svc.decoder.requests] == [(0, True), (1, False), (1, True), (2, False)]
    assert [e[3]["init_included"] for e in chunks] == [True, not same_codec, False]
    assert chunks[0][2].startswith(b"INIT-A") and not chunks[2][2].startswith(b"INIT")
    assert chunks[1][2].startswith(b"INIT-B") is (not same_codec)
    assert not chunks[1][2].startswith(b"INIT-A")
    stored = [c.args[1] for c in svc.redis.set.await_args_list if c.args[0] == svc.init_key("ses_loop")]
    assert stored == ([b"INIT-A"] if same_codec else [b"INIT-A", b"INIT-B"])


def test_a_switch_that_keeps_the_history_takes_effect_after_the_unsent_chunk(engine, no_sdpa):
    """withdraw off: the history of the chunk not yet sent stays in the cache, so that chunk cannot
    be taken back; the switch takes effect at the next one."""
    images = _images()
    svc = _generator(engine, images)
    no_withdraw = {"withdraw": False}
    queued = {2: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2", garment_id="g2", options=no_withdraw)]}
    asyncio.run(_run_session(svc, images, queued, max_chunks=3))

    assert svc.registry.controls["ses_loop"].acks == [("1-0", 2)]
    assert [r.chunk_index for r in svc.decoder.requests] == [0, 1, 2]
    svc.metrics.chunks_redone_total.inc.assert_not_called()


def test_switch_and_prompt_latency_end_at_the_first_chunk_wearing_them(engine, no_sdpa):
    """The metrics' promise: garment_switch_latency_seconds runs from the switch's issue to the
    first chunk wearing the new garment being sent (a redone chunk included), and
    prompt_update_latency_seconds to the first chunk generated under the new prompt."""
    images = _images()
    svc = _generator(engine, images)
    events: list[tuple] = []
    output = svc.registry.output("ses_loop")
    append = output.append

    async def recording_append(index, payload, meta):
        events.append(("sent", index, meta["switch_applied"]))
        await append(index, payload, meta)

    output.append = recording_append
    svc.metrics.garment_switch_latency_seconds.observe.side_effect = lambda v: events.append(("switch", v))
    svc.metrics.prompt_update_latency_seconds.observe.side_effect = lambda v: events.append(("prompt", v))
    issued = time.time() - 5.0  # issued 5 s ago
    queued = {
        1: [
            _cmd(CommandType.UPDATE_PROMPT, prompt="a person waves", revision=1).model_copy(
                update={"issued_at": issued}
            )
        ],
        2: [_cmd(CommandType.SWITCH_GARMENT, garment_key="img2").model_copy(update={"issued_at": issued})],
    }
    asyncio.run(_run_session(svc, images, queued, max_chunks=3))

    switch = [i for i, e in enumerate(events) if e[0] == "switch"]
    assert len(switch) == 1 and events[switch[0] - 1] == ("sent", 1, True)  # chunk 1 redone, wearing it
    assert events[switch[0]][1] >= 5.0
    prompt = [e for e in events if e[0] == "prompt"]
    assert len(prompt) == 1 and prompt[0][1] >= 5.0
    assert events.index(prompt[0]) < events.index(("sent", 1, True))  # generated before it is sent


@pytest.mark.parametrize(
    ("now", "margin", "redo"),
    [(99.9, 0.1, True), (100.0, 0.1, False), (100.05, 0.0, True), (100.1, 0.0, False)],
)
def test_a_paced_session_redoes_an_unsent_chunk_only_if_it_still_makes_its_playback_time(
    monkeypatch, now, margin, redo
):
    r = runner(realtime=True)
    r.service.config.generator = GeneratorConfig(realtime=True, redo_margin_s=margin)
    r.options = SwitchOptions()
    r.playback_start = 99.0
    r._generate_s, r._decode_s = 0.1, 0.05
    r.service.switch_seconds, r.service.redo_seconds = Recent(), Recent()
    r.service.switch_seconds.observe(0.1)  # a redo: switch + chunk + primer and chunk decode = 0.3 s
    spare = [True]
    r.service.has_spare_compute = lambda: spare[0]
    monkeypatch.setattr("services.generator.service.time.monotonic", lambda: now)
    pending = SimpleNamespace(index=3, meta={})  # chunk 3 plays from 99 + 33/24 = 100.375 s
    switch = ("1-0", _cmd(CommandType.SWITCH_GARMENT, garment_key="img2"))
    assert r._redo_wanted([switch], pending) is (now + 0.3 + margin <= 100.375) is redo
    # never with a close among the commands (what was generated is delivered), nor for a prompt
    assert not r._redo_wanted([switch, ("2-0", _cmd(CommandType.CLOSE))], pending)
    assert not r._redo_wanted([("1-0", _cmd(CommandType.UPDATE_PROMPT, prompt="p"))], pending)
    # redos timed here: the slowest of the last few bounds the next one when it is above the estimate
    r.service.redo_seconds.observe(0.2)
    assert r._redo_wanted([switch], pending) is redo
    r.service.redo_seconds.observe(0.5)
    assert not r._redo_wanted([switch], pending)  # now + 0.5 + margin > 100.375 for every case here
    r.service.redo_seconds = Recent()
    assert r._redo_wanted([switch], pending) is redo
    spare[0] = False  # a replica with no room for one more session: a redo would make the others late
    assert not r._redo_wanted([switch], pending)
    r.playback_start = None  # the clock starts with chunk 0: nothing plays yet, nothing can stall
    assert r._redo_wanted([switch], SimpleNamespace(index=0, meta={}))


def test_spare_compute_is_room_for_one_more_session_by_the_admission_rule(engine):
    svc = _generator_with(engine, _images(), realtime=True, realtime_headroom=0.2)
    svc.step_times = StepTimes(initial={1: 0.3})  # 0.3 s a chunk, one at a time; a chunk plays 0.5 s
    assert svc.has_spare_compute()  # one session: 0.36 s with headroom
    svc.runners["ses_a"] = object()
    assert not svc.has_spare_compute()  # two: 0.72 s
    svc.config = AppConfig(generator=GeneratorConfig(realtime=True, admit_by_compute=False))
    assert svc.has_spare_compute()  # not judged when admission by compute is off


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
