"""A session's media timeline and end across decoder resets and failovers (issue 14, items 1-3),
without Ray: the muxer's continuing timeline, the decoder service's reset / prime / clip /
eviction / close, and the generator runner's playback clock, lease handling and finish."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from fashionchameleon.v1 import decoder_pb2
from services.common.tensors import tensor_from_proto, tensor_to_proto
from shared.config import AppConfig, ModelConfig
from shared.media.fmp4 import FragmentedMp4Muxer, iter_boxes, split_init_segment
from shared.models.presets import get_preset
from shared.runtime.decode import StreamingDecoder
from shared.sessionbus.sessions import LeaseHeld
from shared.sessionbus.streams import SessionClosed
from shared.storage.config import LocalStoreConfig, StorageConfig

FPS = 24


def tfdts(fmp4: bytes) -> list[int]:
    out = []
    for kind, off, size in iter_boxes(fmp4):
        if kind == "moof":
            for k2, o2, s2 in iter_boxes(fmp4, off + 8, off + size):
                if k2 == "traf":
                    for k3, o3, _ in iter_boxes(fmp4, o2 + 8, o2 + s2):
                        if k3 == "tfdt":
                            out.append(struct.unpack_from(">Q", fmp4, o3 + 12)[0])
    return out


def pts(path: Path) -> list[float]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [float(p.pts * s.time_base) for p in c.demux(s) if p.size]


# ---- muxer ----------------------------------------------------------------------------------


def test_a_muxer_taking_over_mid_stream_continues_the_timeline_with_the_same_init():
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 48, 3), dtype=np.uint8)
    first, second = (
        FragmentedMp4Muxer(48, 32, fps=FPS),
        FragmentedMp4Muxer(48, 32, fps=FPS, start_frame=21, start_sequence=2),
    )
    a = first.add_chunk(frames[:9]) + first.add_chunk(frames)
    b = second.add_chunk(frames)
    init_a, media_a = split_init_segment(a)
    init_b, media_b = split_init_segment(b)
    assert init_a == init_b  # same settings, same init segment: players need no re-init
    unit = first.sample_duration
    assert tfdts(media_a) == [0, 9 * unit] and tfdts(media_b) == [21 * unit]
    with pytest.raises(ValueError):
        FragmentedMp4Muxer(48, 32, start_frame=-1)


# ---- decoder service ------------------------------------------------------------------------


@pytest.fixture()
def decoder(tmp_path):
    from services.decoder.service import DecoderService

    config = AppConfig(
        model=ModelConfig(preset="tiny"),
        storage=StorageConfig(backend="local", local=LocalStoreConfig(root=tmp_path / "store")),
    )
    return DecoderService(config.to_json())


def latents(seed: int, frames: int = 3) -> torch.Tensor:
    p = get_preset("tiny")
    return torch.randn(1, p.vae.z_dim, frames, *p.latent_hw(), generator=torch.Generator().manual_seed(seed))


def request(k: int, lat: torch.Tensor, first: int, *, reset=False, prime=None, **kw):
    req = decoder_pb2.DecodeChunkRequest(
        session_id="ses_a", chunk_index=k, latents=tensor_to_proto(lat), reset=reset, first_frame_index=first, **kw
    )
    if prime is not None:
        req.prime_latents.CopyFrom(tensor_to_proto(prime))
    return req


def frames_before(k: int) -> int:
    return 0 if k == 0 else 1 + 4 * (3 * k - 1)


def decode(decoder, k, lat, **kw):
    return asyncio.run(decoder.DecodeChunk(request(k, lat, frames_before(k), **kw)))


def test_a_primed_reset_keeps_frame_counts_timeline_and_the_whole_clip(decoder, tmp_path):
    lats = [latents(i) for i in range(6)]
    resps = [decode(decoder, k, lats[k], reset=k == 0) for k in range(3)]
    old_muxer = decoder.sessions["ses_a"].muxer
    clip_path = decoder.sessions["ses_a"].clip.path
    # chunk 3 decoded by a generator that then died before publishing it ...
    decode(decoder, 3, lats[3])
    # ... so its successor re-sends chunk 3 (other latents) with reset, primed with what precedes
    resps.append(decode(decoder, 3, lats[4], reset=True, prime=lats[2]))
    resps.append(decode(decoder, 4, lats[5]))
    assert old_muxer._closed  # the replaced muxer was closed, not left to the GC
    assert [r.num_frames for r in resps] == [9, 12, 12, 12, 12]
    assert [r.first_frame_index for r in resps] == [0, 9, 21, 33, 45]
    unit = 1000  # 24 fps: timescale 24000, one frame = 1000
    assert [tfdts(split_init_segment(r.fmp4)[1] if r.init_segment else r.fmp4) for r in resps] == [
        [0],
        [9 * unit],
        [21 * unit],
        [33 * unit],
        [45 * unit],
    ]
    assert resps[3].init_segment == resps[0].init_segment  # the reset's piece carries the same init
    closed = asyncio.run(
        decoder.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"), save_key="clips/t/ses_a.mp4")
    )
    assert closed.freed_bytes > 0 and decoder.num_sessions() == 0
    assert not os.path.exists(clip_path)  # the temp file is gone
    saved = tmp_path / "saved.mp4"
    saved.write_bytes(decoder.store.get_bytes("clips/t/ses_a.mp4"))
    got = pts(saved)  # every chunk once (the superseded chunk 3 was cut), timeline strictly rising
    assert len(got) == 9 + 12 * 4
    assert np.allclose(np.diff(got), 1 / FPS)


def test_the_decoder_holds_the_last_frame_of_the_last_two_chunks_for_a_switch(decoder):
    """A switch's new reference is the last frame of the chunk before the one it takes effect at,
    which is the chunk before the last decoded one when the generator redoes an unsent chunk."""
    from services.common.errors import FailedPrecondition

    def encoded(resp):  # what encode_last_frame must give for that chunk: its last frame, encoded
        return decoder.engine.encode_frame(tensor_from_proto(resp.last_frame))

    def asked(chunk=None):
        return tensor_from_proto(asyncio.run(decoder.encode_last_frame("ses_a", chunk)))

    lats = [latents(i) for i in range(5)]
    resps = [decode(decoder, k, lats[k], reset=k == 0, return_last_frame_tensor=True) for k in range(3)]
    assert torch.equal(asked(), encoded(resps[2])) and torch.equal(asked(2), encoded(resps[2]))
    assert torch.equal(asked(1), encoded(resps[1]))
    with pytest.raises(FailedPrecondition) as err:  # older ones are let go
        asked(0)
    assert err.value.reason == "CHUNK_OUT_OF_ORDER" and err.value.metadata["held"] == "1,2"
    # chunk 2 dropped and redone: a new stream primed with chunk 1; the primer's last frame is chunk 1's
    redone = decode(decoder, 2, lats[3], reset=True, prime=lats[1], return_last_frame_tensor=True)
    fresh = StreamingDecoder(decoder.engine.vae).decode_chunk(lats[1])  # the primer, decoded on its own
    assert torch.equal(asked(1), decoder.engine.encode_frame(fresh[:, :, -1]))
    assert torch.equal(asked(2), encoded(redone))


def test_a_reset_without_a_primer_restarts_the_decode_state(decoder):
    decode(decoder, 0, latents(0), reset=True)
    resp = decode(decoder, 1, latents(1), reset=True)
    assert resp.num_frames == 9 and resp.first_frame_index == 9  # the timeline still goes on


def test_close_streams_the_clip_from_disk_and_frees_everything(decoder, monkeypatch):
    decode(decoder, 0, latents(0), reset=True)
    decode(decoder, 1, latents(1))
    calls = []
    real = decoder.store.put_file
    monkeypatch.setattr(decoder.store, "put_bytes", lambda *a, **k: pytest.fail("clip read into memory"))
    monkeypatch.setattr(
        decoder.store, "put_file", lambda key, path, *a, **k: calls.append(key) or real(key, path, *a, **k)
    )
    asyncio.run(
        decoder.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"), save_key="clips/t/x.mp4")
    )
    assert calls == ["clips/t/x.mp4"] and decoder.store.exists("clips/t/x.mp4")
    assert (
        asyncio.run(decoder.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"))).freed_bytes == 0
    )


def test_state_of_a_session_whose_generator_vanished_is_evicted(decoder):
    import time

    decode(decoder, 0, latents(0), reset=True, idle_timeout_seconds=30)
    path = decoder.sessions["ses_a"].clip.path
    assert decoder.evict_idle() == []
    assert decoder.evict_idle(time.monotonic() + 31) == ["ses_a"]
    assert decoder.num_sessions() == 0 and not os.path.exists(path)
    decode(decoder, 0, latents(0), reset=True)
    assert decoder.sessions["ses_a"].idle_timeout_s == decoder.default_idle_timeout_s > 300


def _two_replicas(tmp_path):
    from services.decoder.service import DecoderService

    config = AppConfig(
        model=ModelConfig(preset="tiny"),
        storage=StorageConfig(backend="local", local=LocalStoreConfig(root=tmp_path / "store")),
    )
    return DecoderService(config.to_json()), DecoderService(config.to_json())


def _move_to(replica, k, lat, prime):
    """What the generator does when the ring sends chunk k to a replica without the session."""
    from services.common.errors import Aborted

    with pytest.raises(Aborted) as err:
        decode(replica, k, lat)
    assert err.value.reason == "SESSION_NOT_ON_REPLICA"
    return decode(replica, k, lat, reset=True, prime=prime)


def _saved_pts(store, tmp_path, key="clips/t/ses_a.mp4"):
    saved = tmp_path / "saved.mp4"
    saved.write_bytes(store.get_bytes(key))
    return pts(saved)


@pytest.mark.parametrize("order", ["close-then-evict", "evict-then-close"])
def test_a_ring_change_keeps_the_whole_clip(tmp_path, order):
    """Chunks 0-2 decoded on replica A, 3-5 on B (the ring changed): the saved clip holds all six."""
    a, b = _two_replicas(tmp_path)
    lats = [latents(i) for i in range(6)]
    for k in range(3):
        decode(a, k, lats[k], reset=k == 0)
    _move_to(b, 3, lats[3], prime=lats[2])
    for k in (4, 5):
        decode(b, k, lats[k])
    close = lambda: asyncio.run(
        b.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"), save_key="clips/t/ses_a.mp4")
    )
    evict = lambda: a.evict_idle(time.monotonic() + 10**6)
    if order == "close-then-evict":
        close()
        assert not a.store.exists("clips/t/ses_a.mp4")  # A still holds chunks 0-2
        assert evict() == ["ses_a"]
    else:
        assert evict() == ["ses_a"]
        close()
    got = _saved_pts(a.store, tmp_path)
    assert len(got) == 9 + 12 * 5  # every chunk once
    assert np.allclose(np.diff(got), 1 / FPS)  # one timeline, strictly rising
    assert list(a.store.list("clip-parts/")) == []  # the parts are gone once assembled
    assert a.num_sessions() == b.num_sessions() == 0


def test_a_session_that_comes_back_after_a_gap_keeps_both_runs(tmp_path):
    """A decodes 0-1, B 2-3, A again 4-5 (the ring changed twice): A's first run is not extended
    across the gap, and the clip still holds every chunk."""
    a, b = _two_replicas(tmp_path)
    lats = [latents(i) for i in range(6)]
    decode(a, 0, lats[0], reset=True)
    decode(a, 1, lats[1])
    _move_to(b, 2, lats[2], prime=lats[1])
    decode(b, 3, lats[3])
    decode(a, 4, lats[4], reset=True, prime=lats[3])  # A still holds the session, at chunk 2
    decode(a, 5, lats[5])
    assert a.sessions["ses_a"].clip.first_chunk == 4
    asyncio.run(
        a.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"), save_key="clips/t/ses_a.mp4")
    )
    assert b.evict_idle(time.monotonic() + 10**6) == ["ses_a"]
    got = _saved_pts(a.store, tmp_path)
    assert len(got) == 9 + 12 * 5 and np.allclose(np.diff(got), 1 / FPS)


def test_a_replica_that_shuts_down_hands_its_run_over(tmp_path):
    a, b = _two_replicas(tmp_path)
    lats = [latents(i) for i in range(4)]
    decode(a, 0, lats[0], reset=True)
    decode(a, 1, lats[1])
    a.shutdown()  # scaled down: its sessions go on elsewhere
    assert a.num_sessions() == 0 and [i.key for i in a.store.list("clip-parts/")] == [
        "clip-parts/ses_a/00000000-00000002.mp4"
    ]
    _move_to(b, 2, lats[2], prime=lats[1])
    decode(b, 3, lats[3])
    asyncio.run(
        b.CloseSession(decoder_pb2.DecoderCloseSessionRequest(session_id="ses_a"), save_key="clips/t/ses_a.mp4")
    )
    assert len(_saved_pts(b.store, tmp_path)) == 9 + 12 * 3


# ---- generator runner -----------------------------------------------------------------------


def runner(realtime=True, registry=None):
    from services.generator.service import SessionRunner
    from shared.config import GeneratorConfig
    from shared.runtime.session import SwitchOptions
    from shared.sessionbus.config import RedisConfig

    config = SimpleNamespace(generator=GeneratorConfig(realtime=realtime), redis=RedisConfig())
    service = SimpleNamespace(config=config, registry=registry, replica_id="gen-1-a")
    session = SimpleNamespace(preset=get_preset("tiny"))
    return SessionRunner(service, "ses_x", "t", session, "g", SwitchOptions(), max_chunks=10)


def test_frame_numbers_follow_the_chunk_index():
    r = runner()
    assert [r._frames_before(k) for k in range(4)] == [0, 9, 21, 33]


def test_a_late_chunk_moves_the_playback_clock_to_when_it_really_plays(monkeypatch):
    import services.generator.service as gen

    r = runner()
    now = [1000.0]
    monkeypatch.setattr(gen.time, "monotonic", lambda: now[0])
    r._advance_playback_clock(0)
    assert r.playback_start == 1000.0
    now[0] = 1000.2  # chunk 1 on time (plays at 9/24 s): the clock stays
    r._advance_playback_clock(1)
    assert r.playback_start == 1000.0
    now[0] = 1010.0  # chunk 5 after a 9 s failover: it plays now, later chunks are paced from here
    r._advance_playback_clock(5)
    assert r.playback_start == pytest.approx(1010.0 - 57 / 24)
    assert r._ready_time(6) == pytest.approx(1010.0 + 12 / 24 - 0.5)
    fresh = runner()  # a rebuilt runner without a saved clock starts it at the chunk it resumes at
    fresh._advance_playback_clock(5)
    assert fresh.playback_start == pytest.approx(1010.0 - 57 / 24)


class _Registry:
    def __init__(self, outcome):
        self.outcome = outcome

    async def claim(self, session_id, replica):
        if self.outcome is not None:
            raise self.outcome


@pytest.mark.parametrize(
    "outcome, stopped, lease_lost",
    [
        (None, False, False),  # lapsed, nobody took it: keep serving
        (LeaseHeld("ses_x", "gen-2-b"), True, True),  # taken over: stop, leave records and decoder alone
        (SessionClosed("ses_x"), True, False),
    ],  # ended: stop and finish it here (decoder close, clip)
)
def test_a_lost_lease_stops_the_runner_only_as_far_as_needed(outcome, stopped, lease_lost):
    from services.generator.service import GeneratorService

    r = runner(registry=_Registry(outcome))

    async def go():
        r.task = asyncio.create_task(asyncio.sleep(10))
        await GeneratorService._lease_lost(r.service, "ses_x", r)
        await asyncio.sleep(0)
        return r.task.cancelled()

    assert asyncio.run(go()) is stopped
    assert r.lease_lost is lease_lost


def test_stop_during_finish_does_not_cut_the_decoder_close():
    """The maintenance loop may stop a runner again while it finishes; finish still completes."""
    r = runner()
    steps = []

    async def finish(runner_):
        steps.append("finish")
        await asyncio.sleep(0.05)
        steps.append("decoder closed")

    class Control:
        async def read(self):
            raise asyncio.CancelledError  # the first stop() lands while waiting for commands

    r.service.finish = finish
    r.service.registry = SimpleNamespace(control=lambda *a, **k: Control())

    async def go():
        r.task = asyncio.create_task(r.run())
        await asyncio.sleep(0.01)
        r.stop()  # a second stop during finish is ignored
        await asyncio.gather(r.task, return_exceptions=True)
        await asyncio.sleep(0.1)

    asyncio.run(go())
    assert steps == ["finish", "decoder closed"]
    assert r.end_reason == "closed"
