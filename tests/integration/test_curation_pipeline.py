"""The whole curation pipeline on a small synthetic bucket on a local Ray instance
(ray.init(num_cpus=2)) against local stand-in endpoints; outputs load in the training
preprocessing; an interrupted run resumes without redoing finished work."""

from __future__ import annotations

import json

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from shared.storage.config import StorageConfig
from shared.storage.factory import open_store
from training.curation import fakes
from training.curation.config import (
    CurationConfig,
    EditConfig,
    MotionConfig,
    PersonConfig,
    QualityConfig,
    VLMConfig,
)
from training.curation.pipeline import export_folder, run

FPS = 8
BG = [(90, 140, 200), (120, 200, 120), (60, 60, 140), (150, 150, 220)]  # far from skin colour
VIDEOS = {
    "a.mp4": [fakes.ShotSpec(1.5, background=BG[0]), fakes.ShotSpec(4.0, background=BG[1])],  # too short + 1 clip
    "b.mp4": [
        fakes.ShotSpec(4.0, speed=0.0, background=BG[0]),  # static
        fakes.ShotSpec(4.0, people=2, background=BG[2]),  # two people
    ],
    "c.mp4": [fakes.ShotSpec(7.0, background=BG[3])],  # two 3.5 s clips
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def server():
    with fakes.FakeEndpoints() as srv:
        yield srv


def _config(server, out, person: PersonConfig, **inputs) -> CurationConfig:
    store = open_store(out)
    fakes.write_catalog(store)
    return CurationConfig(
        **inputs,
        output=out,
        person=person,
        motion=MotionConfig(min_magnitude=0.05),
        quality=QualityConfig(min_quality=0.1, min_aesthetic=0.1),
        vlm=VLMConfig(base_url=server.base_url, model="fake", timeout_s=10, backoff_s=0, requests_per_s=0, frames=2),
        try_off=EditConfig(base_url=server.base_url, backoff_s=0),
        try_on=EditConfig(base_url=server.base_url, backoff_s=0),
    )


def _write_videos(folder, names=VIDEOS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        fakes.write_raw_video(folder / name, VIDEOS[name], fps=FPS, seed=i)


def test_pipeline_end_to_end_loads_in_preprocessing(local_ray, server, tmp_path):
    from shared.models.checkpoint import build_random
    from shared.models.presets import get_preset
    from training.data.preprocess import preprocess, read_manifest

    _write_videos(tmp_path / "raw")
    bucket = StorageConfig.from_url(str(tmp_path / "bucket"))  # input through the object-store interface
    src = open_store(bucket)
    for name in VIDEOS:
        src.put_file(f"raw/{name}", tmp_path / "raw" / name)
    out = StorageConfig.from_url(str(tmp_path / "out"))
    cfg = _config(server, out, PersonConfig(backend="training.curation.fakes:SkinBlobDetector"),
                  input=bucket, input_prefix="raw/")  # fmt: skip
    server.script["caption"] = [fakes.Reply(refusal="cannot describe this video")]  # one clip is refused

    result = run(cfg)

    rep = result.report
    assert rep["videos"] == 3 and rep["clips"] == 6 and rep["kept"] == 2
    assert rep["dropped_by_reason"] == {
        "caption:vlm_refused": 1,
        "filter:low_motion": 1,
        "filter:multiple_people": 1,
        "segment:too_short": 1,
    }
    assert rep["stages"]["filter"]["in"] == 5 and rep["stages"]["caption"]["in"] == 3
    store = open_store(out)
    for key in ["report/report.json", "report/drops.jsonl", "report/sample_sheet.png", "report/hist_motion.png"]:
        assert store.exists(key), key
    drops = [json.loads(x) for x in store.get_bytes("report/drops.jsonl").decode().splitlines()]
    assert all(d["reason"] for d in drops) and len(drops) == 4

    manifest = export_folder(cfg, tmp_path / "export")
    samples = list(read_manifest(manifest))
    assert len(samples) == 2
    assert all(s.dynamic_caption and s.static_caption and len(s.video) >= 24 for s in samples)
    preset = get_preset("tiny")
    components = build_random(preset, seed=0, parts=frozenset({"vae", "text_encoder"}))
    index = preprocess(samples, components, tmp_path / "data", max_pixel_frames=9, samples_per_shard=2,
                       dtype="float32")  # fmt: skip
    assert [s.id for sh in index.shards for s in sh.samples] == [s.id for s in samples]


def _state(store) -> dict[str, tuple]:
    return {i.key: (i.etag, i.last_modified) for i in store.list("_state/")}


def test_interrupted_run_resumes_without_redoing_work(local_ray, server, tmp_path):
    _write_videos(tmp_path / "raw")
    marker = tmp_path / "crash-now"
    marker.write_text("x")
    out = StorageConfig.from_url(str(tmp_path / "out"))
    cfg = _config(server, out, PersonConfig(backend="training.curation.fakes:CrashingDetector", weights=marker),
                  input_folder=tmp_path / "raw")  # fmt: skip
    store = open_store(out)

    with pytest.raises(Exception, match="simulated crash"):
        run(cfg, fail_fast=True)  # dies on the two-person clip, half-way through
    before = _state(store)
    assert any(k.startswith("_state/videos/") for k in before)
    assert not store.exists("manifest.jsonl")
    asked_before = sum(server.counts.values())

    marker.unlink()
    result = run(cfg, fail_fast=True)

    after = _state(store)
    assert all(after[k] == v for k, v in before.items())  # nothing finished was rewritten
    assert max(server.answered.values()) == 1  # no VLM answer was paid for twice
    assert len(result.kept) == 3 and result.report["dropped_by_reason"]["filter:multiple_people"] == 1
    finished_clips = {k.split("/")[2] for k in before if k.startswith("_state/clips/") and k.endswith("/finalize.json")}
    # the resumed run asked only about clips that had not finished
    assert sum(server.counts.values()) - asked_before <= 9 * (3 - len(finished_clips))


def test_errored_clip_is_retried_by_the_next_run(local_ray, server, tmp_path):
    _write_videos(tmp_path / "raw", names=["a.mp4", "b.mp4"])
    marker = tmp_path / "crash-now"
    marker.write_text("x")
    out = StorageConfig.from_url(str(tmp_path / "out"))
    cfg = _config(server, out, PersonConfig(backend="training.curation.fakes:CrashingDetector", weights=marker),
                  input_folder=tmp_path / "raw")  # fmt: skip

    first = run(cfg)  # an unexpected error drops the clip (not persisted); the run finishes
    assert first.report["dropped_by_reason"].get("filter:error") == 1 and len(first.kept) == 1
    counts = dict(server.counts)

    marker.unlink()
    second = run(cfg)
    assert second.report["dropped_by_reason"].get("filter:multiple_people") == 1
    assert "filter:error" not in second.report["dropped_by_reason"]
    assert [r.clip_id for r in second.kept] == [r.clip_id for r in first.kept]
    assert dict(server.counts) == counts  # finished work came from the state: no request at all
