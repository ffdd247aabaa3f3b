"""Curation stage 1 on synthetic videos the test renders: shots, sub-clips, person, motion."""

from __future__ import annotations

import pytest

from shared.media.video import read_frames
from shared.storage.config import StorageConfig
from training.curation import fakes, filters, shots
from training.curation.config import (
    CurationConfig,
    MotionConfig,
    PersonConfig,
    QualityConfig,
    ShotConfig,
)
from training.curation.records import ClipRecord
from training.curation.stages import Context, filter_clip, segment_video

FPS = 8
BG = [(90, 140, 200), (120, 200, 120), (60, 60, 140), (150, 150, 220)]  # far from skin colour


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Shots of 2 s, 4 s and 7 s: hard cuts at frames 16 and 48 (104 frames at 8 fps)."""
    folder = tmp_path_factory.mktemp("raw")
    specs = [fakes.ShotSpec(2.0, background=BG[0]), fakes.ShotSpec(4.0, background=BG[1]),
             fakes.ShotSpec(7.0, background=BG[2])]  # fmt: skip
    cuts = fakes.write_raw_video(folder / "v.mp4", specs, fps=FPS)
    return folder, cuts


DETECTORS = ["histogram"] + (["pyscenedetect"] if shots.scenedetect_available() else [])


@pytest.mark.parametrize("detector", DETECTORS)
def test_hard_cuts_are_found(raw, detector):
    folder, cuts = raw
    assert cuts == [16, 48]
    frames = read_frames(folder / "v.mp4")
    found = shots.detect_shots(frames, FPS, ShotConfig(detector=detector), folder / "v.mp4")
    assert found == [(0, 16), (16, 48), (48, 104)]


def test_subclips_outside_3_to_5_s_are_dropped():
    cfg = ShotConfig(min_clip_s=3, max_clip_s=5, boundary_margin_frames=0)
    seconds = [2.0, 4.0, 7.0, 11.0, 5.5]
    bounds, start = [], 0
    for s in seconds:
        bounds.append((start, start + int(s * FPS)))
        start += int(s * FPS)
    pieces = shots.cut_subclips(bounds, FPS, cfg)
    kept = [p for p in pieces if p.reason is None]
    dropped = [p for p in pieces if p.reason is not None]
    assert all(3 * FPS <= p.end - p.start <= 5 * FPS for p in kept)
    assert all(p.reason == "too_short" and p.end - p.start < 3 * FPS for p in dropped)
    per_shot = [sum(p.shot == i for p in kept) for i in range(len(seconds))]
    assert per_shot == [0, 1, 2, 3, 1]  # 2 s dropped; 7 s -> 2 x 3.5 s; 11 s -> 3 x 3.67 s; 5.5 s -> 5 s + tail
    assert [(p.shot, p.end - p.start) for p in dropped] == [(0, 16), (4, 4)]


def _cfg(tmp_path, folder, **kw) -> CurationConfig:
    return CurationConfig(input_folder=folder, output=StorageConfig.from_url(str(tmp_path / "out")),
                          motion=MotionConfig(min_magnitude=0.05), **kw)  # fmt: skip


def test_segment_video_writes_clips_and_drops_short_shots(raw, tmp_path):
    folder, _ = raw
    ctx = Context(_cfg(tmp_path, folder))
    recs = segment_video(ctx, "v.mp4")
    kept = [r for r in recs if r.pending]
    assert [r.reason_kind for r in recs if not r.pending] == ["segment:too_short"]
    assert len(kept) == 3  # 4 s shot, 7 s shot in two
    for r in kept:
        assert 3.0 <= r.seconds <= 5.0
        assert len(read_frames(ctx.clip_bytes(r))) == r.end_frame - r.start_frame


def _clip(tmp_path, spec: fakes.ShotSpec, **kw) -> tuple[Context, ClipRecord]:
    folder = tmp_path / "in"
    folder.mkdir()
    fakes.write_raw_video(folder / "one.mp4", [spec], fps=FPS)
    ctx = Context(_cfg(tmp_path, folder, **kw))
    (rec,) = segment_video(ctx, "one.mp4")
    return ctx, rec


def test_motion_separates_static_from_moving(tmp_path):
    moving = fakes.render_shot(fakes.ShotSpec(4.0, speed=1.5, background=BG[1]), FPS, 64, 96)
    static = fakes.render_shot(fakes.ShotSpec(4.0, speed=0.0, background=BG[1]), FPS, 64, 96)
    cfg = MotionConfig()
    m_moving, m_static = filters.motion_magnitude(moving, cfg), filters.motion_magnitude(static, cfg)
    assert m_static < 0.02
    assert m_moving > 0.1
    # through the stage (decoded H.264 clip): the static clip is dropped with its score
    ctx, rec = _clip(tmp_path, fakes.ShotSpec(4.0, speed=0.0, background=BG[1]),
                     quality=QualityConfig(min_quality=0, min_aesthetic=0))  # fmt: skip
    out = filter_clip(ctx, rec)
    assert out.reason_kind == "filter:low_motion" and out.scores["motion"] < 0.05
    assert any("person check skipped" in n for n in out.notes)  # default backend: unavailable stub


def test_single_person_rule():
    cfg = PersonConfig(min_main_area=0.05, max_secondary_ratio=0.25)
    assert filters.single_person([[0.3], [0.3, 0.02]], cfg)[:2] == (True, "")  # small background figure
    assert filters.single_person([[0.3, 0.2]], cfg)[:2] == (False, "multiple_people")
    assert filters.single_person([[0.01]], cfg)[:2] == (False, "no_person")
    assert filters.single_person([[]], cfg)[:2] == (False, "no_person")


def test_person_filter_drops_two_people_and_unavailable_policy(tmp_path):
    person = PersonConfig(backend="training.curation.fakes:SkinBlobDetector")
    ctx, rec = _clip(tmp_path, fakes.ShotSpec(4.0, people=2, background=BG[2]), person=person)
    fresh = ClipRecord.from_json(rec.to_json())
    assert filter_clip(ctx, rec).reason_kind == "filter:multiple_people"
    ctx2 = Context(ctx.cfg.model_copy(update={"person": PersonConfig(on_unavailable="drop")}))
    assert filter_clip(ctx2, fresh).reason_kind == "filter:person_check_unavailable"
    assert not filters.build_person_detector(PersonConfig(backend="ultralytics", weights=tmp_path / "no.pt")).available
