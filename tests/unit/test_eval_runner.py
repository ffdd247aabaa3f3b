"""The runner with a stand-in backend (procedural videos, no model): bounded concurrency,
failures recorded and retried on resume, reports built from the per-sample files."""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.eval.backends import GenerationRecord
from services.eval.bench import ChunkPlan, load_benchmark
from services.eval.config import EvalConfig, MetricsConfig, RunnerConfig
from services.eval.report import build_report, to_markdown, write_reports
from services.eval.runner import Runner
from services.eval.scoring import Scorer
from shared.media.video import write_mp4

cv2 = pytest.importorskip("cv2")

_noise = np.random.default_rng(0).random((64, 400, 3)).astype(np.float32) * 255
TEXTURE = cv2.normalize(cv2.GaussianBlur(_noise, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


class FakeBackend:
    """Writes a 2-px pan over a texture as the sample's video; fails for ids in `fail`."""

    kind = "engine"

    def __init__(self, fail: set[str] = frozenset(), delay_s: float = 0.0):
        self.fail = set(fail)
        self.delay_s = delay_s
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def describe(self):
        return {"backend": "engine", "checkpoint_id": "fake"}

    def plan(self):
        return ChunkPlan()

    def generate(self, bench, sample, out: Path, frames: int, seed: int) -> GenerationRecord:
        with self._lock:
            self.calls.append(sample.id)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if sample.id in self.fail:
                raise RuntimeError("out of memory (simulated)")
            video = np.stack([TEXTURE[:, 2 * t : 2 * t + 80] for t in range(frames)])
            write_mp4(video, out, fps=24)
            starts = [0] + [ChunkPlan().first_frame_of(sw.chunk) for sw in sample.switches]
            refs = [sample.garment] + [sw.garment for sw in sample.switches]
            ends = starts[1:] + [frames]
            return GenerationRecord(
                sample_id=sample.id,
                backend="engine",
                frames=frames,
                chunks=ChunkPlan().chunks_for(frames),
                width=80,
                height=64,
                fps=24.0,
                seed=seed,
                segments=[{"start": a, "end": b, "garment": g, "chunk": 0} for a, b, g in zip(starts, ends, refs)],
                switches=[{"planned_chunk": sw.chunk, "effective_chunk": sw.chunk, "garment": sw.garment,
                           "latency_seconds": 0.01} for sw in sample.switches],
                time_to_first_chunk_seconds=0.1,
                total_seconds=0.5,
                generate_seconds=0.2 * frames / 9,
                decode_seconds=0.05,
            )  # fmt: skip
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.fixture()
def bench(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "r.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "g.png")
    lines = [
        f'{{"id": "s{i}", "reference": "r.png", "garment": "g.png", "prompt": "walks", "frames": 21}}' for i in range(4)
    ]
    lines.append('{"id": "sw", "reference": "r.png", "garment": "g.png", "prompt": "walks", "frames": 33, '
                 '"switches": [{"chunk": 2, "garment": "r.png"}]}')  # fmt: skip
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return load_benchmark(tmp_path / "manifest.jsonl")


def cfg(concurrency: int = 1) -> EvalConfig:
    return EvalConfig(
        runner=RunnerConfig(concurrency=concurrency),
        metrics=MetricsConfig(groups=("flow", "continuity", "weightfree_quality"), num_frames=4),
    )


def test_failures_are_recorded_reported_and_retried_on_resume(bench, tmp_path):
    c = cfg()
    backend = FakeBackend(fail={"s2"})
    progress = Runner(bench, backend, Scorer(c.metrics, c.judge), c, tmp_path / "run", show_progress=False).run()
    assert (progress.done, progress.failed, progress.scored) == (5, 1, 4)
    assert (tmp_path / "run" / "samples" / "s2" / "error.json").exists()
    report = build_report(tmp_path / "run", bench)
    assert report["benchmark"]["failed"] == 1 and report["benchmark"]["generated"] == 4
    failed = next(s for s in report["samples"] if s["id"] == "s2")
    assert failed["status"] == "failed" and "out of memory" in failed["error"]
    assert report["metrics"]["motion_amplitude"]["n"] == 4
    assert report["metrics"]["motion_amplitude"]["value"] == pytest.approx(2.0, rel=0.15)  # the 2-px pan
    assert report["metrics"]["backbone_fps"]["aggregate"] == "pooled"
    frames = 21 * 3 + 33  # pooled: all frames / all DiT seconds
    assert report["metrics"]["backbone_fps"]["value"] == pytest.approx(frames / (0.2 * frames / 9))
    assert report["metrics"]["switch_continuity"]["n"] == 1
    assert "**failed**" in to_markdown(report)

    again = FakeBackend()
    progress = Runner(bench, again, Scorer(c.metrics, c.judge), c, tmp_path / "run", show_progress=False).run()
    assert again.calls == ["s2"] and progress.failed == 0 and progress.scored == 1
    assert not (tmp_path / "run" / "samples" / "s2" / "error.json").exists()
    assert build_report(tmp_path / "run", bench)["benchmark"]["failed"] == 0


def test_concurrency_is_bounded(bench, tmp_path):
    c = cfg(concurrency=2)
    backend = FakeBackend(delay_s=0.05)
    Runner(bench, backend, Scorer(c.metrics, c.judge), c, tmp_path / "run", show_progress=False).run()
    assert backend.max_in_flight == 2 and sorted(backend.calls) == ["s0", "s1", "s2", "s3", "sw"]


def test_changed_metric_settings_rescore_without_regenerating(bench, tmp_path):
    c = cfg()
    backend = FakeBackend()
    Runner(bench, backend, Scorer(c.metrics, c.judge), c, tmp_path / "run", show_progress=False).run(max_samples=2)
    c2 = EvalConfig(metrics=MetricsConfig(groups=("flow",), num_frames=4))
    progress = Runner(bench, backend, Scorer(c2.metrics, c2.judge), c2, tmp_path / "run", show_progress=False).run(
        max_samples=2
    )
    assert backend.calls == ["s0", "s1"] and progress.scored == 2
    report = build_report(tmp_path / "run")  # without the manifest: samples found on disk
    assert [s["id"] for s in report["samples"]] == ["s0", "s1"]
    assert "visual_quality_weightfree" not in report["metrics"]


SWITCH_MARKER = re.compile(r"<button class=marker data-time='([\d.]+)' data-frame='(\d+)' style='left:([\d.]+)%'")


def test_html_report_embeds_each_video_with_a_marker_at_each_switch(bench, tmp_path):
    """Sample `sw` switches before chunk 2: its first new-garment frame is 9 + 12 = 21 of 33, at 24 fps."""
    c = cfg()
    Runner(bench, FakeBackend(), Scorer(c.metrics, c.judge), c, tmp_path / "run", show_progress=False).run()
    write_reports(tmp_path / "run", bench)
    page = (tmp_path / "run" / "report.html").read_text()
    sections = {
        m.group(1): m.group(2) for m in re.finditer(r"<div class=sample id='s-(\w+)'>(.*?)</div>\n", page, re.S)
    }
    assert set(sections) == {"s0", "s1", "s2", "s3", "sw"}
    for sid, body in sections.items():
        assert body.count("<video id='video-") == 1 and "data:video/mp4;base64," in body, sid
        markers = SWITCH_MARKER.findall(body)
        if sid != "sw":
            assert markers == [] and "no garment switch" in body
            continue
        frame = ChunkPlan().first_frame_of(2)
        assert frame == 21
        ((time_s, marker_frame, left),) = markers
        assert int(marker_frame) == frame
        assert float(time_s) == pytest.approx(frame / 24, abs=1e-3)  # 0.875 s
        assert float(left) == pytest.approx(100 * frame / 33, abs=0.01)  # along a bar as long as the video
        assert f"fcSeek('video-sw', {float(time_s):.3f})" in body  # click to seek there
        assert "data-duration='1.375'" in body  # 33 frames at 24 fps
    assert page.count("function fcSeek") == 1


def test_toy_bench_html_marks_the_switch_and_plots_the_garment_distance(tmp_path):
    from services.eval.toybench import _html

    (tmp_path / "clips").mkdir()
    write_mp4(np.zeros((45, 32, 16, 3), np.uint8), tmp_path / "clips" / "toy-0.mp4", fps=24)
    row = {
        "id": "toy-0", "prompt": "The person waves.", "frames": 45, "switch_chunk": 2, "switch_frame": 21,
        "garment_delta_e_per_frame": {"garment_1": [10.0] * 21 + [40.0] * 24, "garment_2": [50.0] * 21 + [12.0] * 24},
    }  # fmt: skip
    report = {"run_id": "r", "label": "default", "checkpoint_id": "toy", "benchmark": {"samples": 1}, "metrics": {}}
    page = _html(report, [row], {"toy-0": ""}, tmp_path, fps=24)
    ((time_s, frame, left),) = SWITCH_MARKER.findall(page)
    assert (float(time_s), int(frame), float(left)) == (0.875, 21, pytest.approx(100 * 21 / 45, abs=0.01))
    assert "fcSeek('clip-toy-0', 0.875)" in page
    if importlib.util.find_spec("matplotlib"):
        assert "alt='garment distance of toy-0' src='data:image/png;base64," in page
