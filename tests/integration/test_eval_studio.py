"""The runner's Studio backend against an in-process Studio double on 127.0.0.1: the public
`fashionchameleon.v1.Studio` API served by a tiny-preset engine (fMP4 chunks, garment switch at
the next chunk boundary). Checks what the eval records over the API: the video, its segments,
switch latency and the timings that are (and are not) observable there."""

from __future__ import annotations

import io
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from PIL import Image

from fashionchameleon.v1 import studio_pb2, studio_pb2_grpc
from services.eval.backends import StudioBackend
from services.eval.bench import load_benchmark
from services.eval.config import EvalConfig, MetricsConfig
from services.eval.report import build_report
from services.eval.runner import Runner
from services.eval.scoring import Scorer
from services.eval.smoke import SMOKE_NAME, write_smoke_bench
from services.studio.client import StudioClient
from shared.media.fmp4 import FragmentedMp4Muxer
from shared.runtime.pipeline import Engine

pytest.importorskip("cv2")


class StudioDouble(studio_pb2_grpc.StudioServicer):
    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions: dict[str, dict] = {}

    def CreateSession(self, request, context):
        sid = uuid.uuid4().hex[:12]
        ref = Image.open(io.BytesIO(request.reference.data)).convert("RGB")
        garment = Image.open(io.BytesIO(request.garment.data)).convert("RGB")
        session = self.engine.session()
        seed = request.options.seed if request.options.HasField("seed") else 7
        session.open(ref, garment, request.prompt, seed=seed)
        st = self.engine.preset.streaming
        self.sessions[sid] = {
            "session": session,
            "max_chunks": request.options.max_chunks or 4,
            "pending": None,
            "lock": threading.Lock(),
        }
        return studio_pb2.Session(
            session_id=sid,
            state=studio_pb2.Session.ACTIVE,
            width=st.width,
            height=st.height,
            fps=st.fps,
            preset=self.engine.preset.name,
            seed=seed,
        )

    def StreamSession(self, request, context):
        s = self.sessions[request.session_id]
        st = self.engine.preset.streaming
        mux = FragmentedMp4Muxer(st.width, st.height, st.fps)
        for k in range(s["max_chunks"]):
            with s["lock"]:
                if s["pending"] is not None:
                    s["session"].switch_garment(s["pending"])
                    s["pending"] = None
                r = s["session"].next_chunk()
            data = mux.add_chunk(r.frames.numpy())
            yield studio_pb2.VideoChunk(
                index=k,
                fmp4=data,
                num_frames=int(r.frames.shape[0]),
                first_frame_index=r.first_frame,
                fps=st.fps,
                width=st.width,
                height=st.height,
                switch_applied=r.switched,
                is_init_segment_included=(k == 0),
                generation_latency_seconds=r.generate_seconds + r.decode_seconds,
                session_id=request.session_id,
                end_of_stream=(k == s["max_chunks"] - 1),
                end_state=studio_pb2.Session.EXPIRED if k == s["max_chunks"] - 1 else 0,
            )
            time.sleep(0.05)  # a little playback pacing so a switch can land on the next boundary

    def SwitchGarment(self, request, context):
        s = self.sessions[request.session_id]
        with s["lock"]:
            s["pending"] = Image.open(io.BytesIO(request.garment.data)).convert("RGB")
            nxt = s["session"].chunk_index
        return studio_pb2.SwitchGarmentResponse(effective_chunk_index=nxt, garment_id="upload:x")

    def CloseSession(self, request, context):
        self.sessions.pop(request.session_id, None)
        return studio_pb2.CloseSessionResponse()


@pytest.fixture(scope="module")
def studio():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    studio_pb2_grpc.add_StudioServicer_to_server(StudioDouble(Engine.from_preset("tiny")), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_studio_backend_runs_the_smoke_bench(studio, tmp_path):
    bench = load_benchmark(write_smoke_bench(tmp_path / "bench"), name=SMOKE_NAME)
    cfg = EvalConfig(metrics=MetricsConfig(groups=("flow", "continuity")))
    with StudioClient(studio, "test-key", application=None) as client:
        backend = StudioBackend(client, studio)
        runner = Runner(
            bench, backend, Scorer(cfg.metrics, cfg.judge), cfg, tmp_path / "studio-run", show_progress=False
        )
        progress = runner.run()
    assert progress.done == 4 and progress.failed == 0
    report = build_report(tmp_path / "studio-run", bench)
    m = report["metrics"]
    assert m["backbone_fps"]["status"] == "unavailable" and "DiT seconds" in next(iter(m["backbone_fps"]["reasons"]))
    assert m["end_to_end_fps"]["n"] == 4 and m["time_to_first_chunk_seconds"]["n"] == 4
    assert m["motion_amplitude"]["n"] == 4
    assert {s["id"]: s["frames"] for s in report["samples"]} == {s.id: s.frames for s in bench.samples}
    inter = next(s for s in report["samples"] if s["id"] == "smoke-interactive")
    (sw,) = inter["switches"]
    assert sw["planned_chunk"] == 2 and sw["effective_chunk"] >= 2 and sw["latency_seconds"] > 0
    boundary = 9 + 12 * (sw["effective_chunk"] - 1)
    if sw["effective_chunk"] < 3:  # the switch landed inside the video
        assert [(g["start_frame"], g["end_frame"]) for g in inter["segments"]] == [(0, boundary), (boundary, 33)]
        assert m["switch_continuity"]["n"] == 1 and m["switch_latency_seconds"]["n"] == 1
    assert report["backend"]["backend"] == "studio" and report["timing_definitions"]["backbone_fps"].startswith(
        "unavailable"
    )
