"""Nothing that can take milliseconds runs on a replica's event loop (issue item 11).

* Studio decodes and validates uploaded images (up to the 40 MP limit) on a bounded thread pool:
  a huge image in CreateSession / SwitchGarment / SubmitClips does not stall the other streams
  and calls the same replica serves; a ticker coroutine measures the loop's stall while the
  real handler runs.
* The generator runs every torch operation of a session (forwards, the `.cpu()` device->host
  copies, wire (de)serialisation of tensors) on worker threads: a TorchDispatchMode entered on
  the loop thread (torch modes are thread-local) records every kernel the loop thread runs while
  a real `GeneratorService` on the tiny preset opens a session, streams it, applies a garment
  switch with disentangle and a prompt update, and ends it. It must record none.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from fashionchameleon.v1 import common_pb2, decoder_pb2, encoder_pb2, generator_pb2, studio_pb2
from services.common.offload import BlockingPool
from services.common.tensors import tensor_to_proto
from services.launcher import start_redis_server
from shared.config import AppConfig, AuthConfig, GeneratorConfig, ModelConfig
from shared.models.presets import get_preset
from shared.sessionbus import CommandType, ControlCommand
from shared.sessionbus.config import RedisConfig
from shared.storage.config import StorageConfig

KEY = "key-acme-0123456789"
SIDE = 6300  # 39.7 MP: under the 40 MP limit, so it is decoded in full


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A 6300 x 6300 PNG: small on the wire (flat colour compresses), ~1 s of decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (120, 80, 200)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def _max_stall_while(coro) -> tuple[float, float]:
    """(longest stall of the event loop, seconds `coro` took) while `coro` runs."""
    done = asyncio.Event()
    stall = 0.0

    async def ticker():
        nonlocal stall
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            stall = max(stall, time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)  # the ticker is running
    started = time.perf_counter()
    try:
        await coro
    except Exception:  # noqa: BLE001 - the call may fail after the decode (no Redis, no generator)
        pass
    took = time.perf_counter() - started
    done.set()
    await tick
    return stall, took


@pytest.fixture()
def studio(tmp_path):
    from services.studio.service import StudioService

    config = AppConfig(
        auth=AuthConfig(api_keys={"acme": KEY}),
        storage=StorageConfig.from_url(str(tmp_path / "store")),
        redis=RedisConfig(url="redis://127.0.0.1:1/0", socket_connect_timeout_s=0.5),  # refused at once
    )
    return StudioService(config.for_deployment("studio").to_json(), None, None)


@pytest.mark.parametrize("rpc", ["CreateSession", "SwitchGarment", "SubmitClips"])
def test_a_huge_image_does_not_stall_the_replica_event_loop(studio, huge_png, rpc, monkeypatch):
    image = common_pb2.ImageInput(data=huge_png)
    if rpc == "CreateSession":
        request = studio_pb2.CreateSessionRequest(
            reference=image, garment=common_pb2.ImageInput(data=small_png()), prompt="a person walks"
        )
    elif rpc == "SwitchGarment":
        request = studio_pb2.SwitchGarmentRequest(session_id="ses_" + "a" * 26, garment=image)
    else:
        request = studio_pb2.SubmitClipsRequest(
            clips=[
                studio_pb2.ClipSpec(
                    reference=studio_pb2.ClipImage(image=image),
                    prompt="a person walks",
                    chunks=2,
                    idempotency_key="c1",
                    garments=[
                        studio_pb2.GarmentAt(
                            chunk_index=0, garment=studio_pb2.ClipImage(image=common_pb2.ImageInput(data=small_png()))
                        )
                    ],
                )
            ]
        )

    # Which threads decode pixels of the huge image: recorded where PIL decodes (ImageFile.load).
    from PIL import ImageFile

    decoded_on: list[str] = []
    original_load = ImageFile.ImageFile.load

    def recording_load(self):
        if self.size == (SIDE, SIDE):
            decoded_on.append(threading.current_thread().name)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)

    async def main():
        loop_thread = threading.current_thread().name
        call = getattr(studio, rpc)(request, None, [("x-api-key", KEY)])
        return loop_thread, await _max_stall_while(call)

    loop_thread, (stall, took) = asyncio.run(main())
    # The decode happened (the test measures something), and never on the loop's thread: the loop
    # keeps serving other streams meanwhile. (Stall and duration go in the message only: wall-clock
    # figures depend on the machine's load, the thread does not.)
    figures = f"loop stalled {stall:.3f} s during a {took:.3f} s {rpc}"
    assert decoded_on, f"the {SIDE}x{SIDE} image was never decoded: the test checks nothing ({figures})"
    assert loop_thread not in decoded_on, f"decoded on the event loop's thread: {decoded_on} ({figures})"


def test_blocking_pool_is_bounded_and_carries_context_variables():
    import contextvars

    var = contextvars.ContextVar("var", default="unset")
    pool = BlockingPool(2, "test")
    running, peak, lock = 0, 0, threading.Lock()

    def work():
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return var.get(), threading.current_thread().name

    async def main():
        var.set("set")
        return await asyncio.gather(*(pool.run(work) for _ in range(6)))

    try:
        results = asyncio.run(main())
    finally:
        pool.shutdown()
    assert peak == 2
    assert all(value == "set" and name.startswith("test") for value, name in results)


# ---- the generator ------------------------------------------------------------------------


class _LoopThreadKernels(TorchDispatchMode):
    """Records every torch kernel run on the thread that entered it (modes are thread-local)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return asyncio.ensure_future(self.fn(*args, **kwargs))  # awaitable, like a DeploymentResponse


class _Handle:
    def options(self, **_):
        return self


class _FakeDecoder(_Handle):
    """Answers without touching tensors (so whatever torch runs on the loop is the generator's)."""

    def __init__(self, frame_latent: common_pb2.Tensor):
        async def decode(req):
            n = 9 if req.chunk_index == 0 else 12
            return decoder_pb2.DecodeChunkResponse(
                session_id=req.session_id,
                chunk_index=req.chunk_index,
                fmp4=b"piece",
                num_frames=n,
                first_frame_index=req.first_frame_index,
                mime_type="video/mp4",
                fps=24.0,
                init_segment=b"init" if req.reset else b"",
            )

        async def last_frame(session_id, chunk_index=None):
            return frame_latent

        async def close(req, save_key=None):
            return decoder_pb2.DecoderCloseSessionResponse()

        self.DecodeChunk = _Method(decode)
        self.encode_last_frame = _Method(last_frame)
        self.CloseSession = _Method(close)


class _FakeEncoder(_Handle):
    def __init__(self, latent: common_pb2.Tensor, embedding: common_pb2.Tensor):
        async def image(req):
            return encoder_pb2.EncodeImageResponse(latent=latent)

        async def prompt(req):
            return encoder_pb2.EncodePromptResponse(embedding=embedding)

        self.EncodeImage = _Method(image)
        self.EncodePrompt = _Method(prompt)


@pytest.fixture(scope="module")
def redis_url():
    redis = start_redis_server()
    try:
        yield redis.url
    finally:
        redis.stop()


def test_generator_runs_no_torch_kernel_on_the_event_loop(redis_url):
    from services.generator.service import GeneratorService

    preset = get_preset("tiny")
    config = AppConfig(
        model=ModelConfig(preset="tiny"),
        redis=RedisConfig(url=redis_url, namespace="loop-test"),
        generator=GeneratorConfig(
            realtime=False, max_client_lag_chunks=100, reaper_interval_s=0.2, kv_cache_budget_bytes=2**30
        ),
    )
    lh, lw = preset.latent_hw()
    g = torch.Generator().manual_seed(0)
    latent = tensor_to_proto(torch.randn(1, preset.dit.in_channels, 1, lh, lw, generator=g))
    embedding = tensor_to_proto(torch.randn(1, 7, preset.dit.text_dim, generator=g))
    n_chunks = 5

    async def scenario():
        service = GeneratorService(
            config.for_deployment("generator").to_json(), _FakeDecoder(latent), _FakeEncoder(latent, embedding)
        )
        state = generator_pb2.SessionState(
            session_id="ses_" + "b" * 26,
            seed=3,
            reference_latent=latent,
            garment_latent=latent,
            garment_id="g1",
            prompt_embedding=embedding,
            prompt="a person walks",
        )
        kernels = _LoopThreadKernels()
        with kernels:  # from here on, any torch kernel on this (the loop's) thread is recorded
            await service.open_session(state, "acme", {"garment_id": "g1", "max_chunks": n_chunks})
            runner = service.runners[state.session_id]
            task = runner.task
            while runner.session.chunk_index < 2:  # switch with disentangle: after chunks went out
                await asyncio.sleep(0.01)
            control = service.registry.control(state.session_id)
            await control.send(
                ControlCommand(
                    type=CommandType.SWITCH_GARMENT, payload={"garment_key": "uploads/acme/x", "garment_id": "g2"}
                )
            )
            await control.send(
                ControlCommand(type=CommandType.UPDATE_PROMPT, payload={"prompt": "the person turns", "revision": 1})
            )
            await asyncio.wait_for(task, timeout=120)
        service._background.cancel()
        return kernels.ops, runner

    ops, runner = asyncio.run(scenario())
    assert runner.session.chunk_index == n_chunks and runner.garment_id == "g2" and runner.prompt_revision == 1
    assert not ops, f"torch kernels ran on the event loop thread: {sorted(set(ops))}"
