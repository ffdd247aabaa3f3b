"""Offline metrics on synthetic videos with known answers: static -> zero motion, a k-pixel pan
-> amplitude k, shuffled frames -> worse smoothness, the reference face -> higher identity than
another face, continuity at a switch, the weight-free quality proxy, and the aggregation of the
learned metrics (Q-Align, GME) with stub models. Metrics without weights say why."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from services.eval.config import JudgeConfig, MetricsConfig
from services.eval.metrics import flow, learned, quality
from services.eval.metrics.base import MetricResult, SampleVideo, Segment, sample_indices
from services.eval.scoring import Scorer

cv2 = pytest.importorskip("cv2")

H, W = 96, 128


def texture(h: int = 200, w: int = 480, seed: int = 0) -> np.ndarray:
    """A smooth random texture (uint8 RGB): trackable by optical flow everywhere."""
    rng = np.random.default_rng(seed)
    noise = rng.random((h, w, 3)).astype(np.float32) * 255
    blurred = cv2.GaussianBlur(noise, (0, 0), 3)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


BIG = texture()


def pan(k: int, frames: int = 12, jump_at: int | None = None, jump: int = 0) -> np.ndarray:
    """Frames [T, H, W, 3] of a camera moving k pixels right per frame (+`jump` px at `jump_at`)."""
    xs = [10 + k * t + (jump if jump_at is not None and t >= jump_at else 0) for t in range(frames)]
    return np.stack([BIG[40 : 40 + H, x : x + W] for x in xs])


def video(frames: np.ndarray, segments: list[tuple[int, int]] | None = None, reference=None) -> SampleVideo:
    g = Image.new("RGB", (32, 32), "white")
    segs = [Segment(a, b, g, f"g{i}.png") for i, (a, b) in enumerate(segments or [(0, len(frames))])]
    ref = reference if reference is not None else Image.fromarray(frames[0])
    return SampleVideo("s", frames, 24.0, ref, "a person walks", segs)


def by_key(results: list[MetricResult]) -> dict[str, MetricResult]:
    return {r.key: r for r in results}


# ---- motion amplitude -----------------------------------------------------------------------
def test_static_video_has_zero_amplitude_and_perfect_smoothness():
    frames = np.repeat(BIG[None, :H, :W], 10, axis=0)
    r = by_key(flow.flow_metrics(video(frames), None, 4, False))
    assert r["motion_amplitude"].value == pytest.approx(0.0, abs=0.01)  # Farneback noise: ~1e-3 px
    assert r["motion_amplitude_opens2v"].value == pytest.approx(0.0, abs=1e-3)
    assert r["temporal_smoothness_warp"].value == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_pixel_pan_has_amplitude_k(k):
    r = by_key(flow.flow_metrics(video(pan(k)), None, 4, False))
    assert r["motion_amplitude"].value == pytest.approx(k, rel=0.1)
    # OpenS2V's definition averages the signed x and y components: a horizontal pan reads k / 2.
    assert r["motion_amplitude_opens2v"].value == pytest.approx(k / 2, rel=0.1)


def test_amplitude_is_measured_in_full_resolution_pixels_when_flow_is_downscaled():
    r = by_key(flow.flow_metrics(video(pan(4)), 64, 4, False))
    assert r["motion_amplitude"].value == pytest.approx(4, rel=0.15)


# ---- smoothness -------------------------------------------------------------------------------
def test_shuffling_frames_worsens_smoothness():
    frames = pan(2, frames=16)
    shuffled = frames[np.random.default_rng(0).permutation(len(frames))]
    smooth = by_key(flow.flow_metrics(video(frames), None, 4, False))["temporal_smoothness_warp"]
    rough = by_key(flow.flow_metrics(video(shuffled), None, 4, False))["temporal_smoothness_warp"]
    assert smooth.value > 0.99
    assert rough.value < smooth.value - 0.02
    assert rough.details["mean_warp_error"] > 3 * smooth.details["mean_warp_error"]


def test_flicker_worsens_smoothness():
    frames = pan(1, frames=12).astype(np.int16)
    frames[1::2] = np.clip(frames[1::2] + 40, 0, 255)  # every other frame brighter
    smooth = by_key(flow.flow_metrics(video(pan(1, frames=12)), None, 4, False))["temporal_smoothness_warp"].value
    flicker = by_key(flow.flow_metrics(video(frames.astype(np.uint8)), None, 4, False))[
        "temporal_smoothness_warp"
    ].value
    assert flicker < smooth - 0.05


# ---- switch continuity ------------------------------------------------------------------------
def test_continuous_motion_across_a_switch_scores_one_and_a_jump_scores_low():
    segments = [(0, 9), (9, 21)]
    steady = by_key(flow.flow_metrics(video(pan(2, 21), segments), None, 4, True))["switch_continuity"]
    jumpy = by_key(flow.flow_metrics(video(pan(2, 21, jump_at=9, jump=8), segments), None, 4, True))[
        "switch_continuity"
    ]
    assert steady.value == pytest.approx(1.0, abs=0.05)
    assert jumpy.value < 0.4
    b = jumpy.details["boundaries"][0]
    assert (
        b["frame"] == 9
        and b["cross_flow_px"] == pytest.approx(10, rel=0.2)
        and b["local_flow_px"] == pytest.approx(2, rel=0.2)
    )


def test_continuity_needs_frames_on_both_sides():
    stats = flow.pair_stats(pan(1, 4))
    assert flow.boundary_continuity(stats, 0, 4) is None
    assert flow.boundary_continuity(stats, 4, 4) is None
    assert flow.continuity_result(stats, [0], 4).status == "missing"


# ---- face identity ----------------------------------------------------------------------------
def _face_scene(face: np.ndarray, frames: int = 6) -> np.ndarray:
    """The face image moving a little over `frames` frames (uint8 [T, H, W, 3])."""
    h, w = face.shape[:2]
    return np.stack(
        [
            cv2.warpAffine(face, np.float32([[1, 0, 2 * t], [0, 1, t]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
            for t in range(frames)
        ]
    )


def test_reference_face_scores_higher_identity_than_another_face():
    skdata = pytest.importorskip("skimage.data")
    astronaut = skdata.astronaut()  # [512, 512, 3]
    other = (skdata.lfw_subset()[0] * 255).astype(np.uint8)  # a different person, 25x25 grey
    other = cv2.resize(other, (200, 200), interpolation=cv2.INTER_CUBIC)
    other = cv2.copyMakeBorder(
        np.stack([other] * 3, -1), 156, 156, 156, 156, cv2.BORDER_CONSTANT, value=(128, 128, 128)
    )
    scorer = Scorer(MetricsConfig(groups=("identity",), num_frames=4), JudgeConfig())
    ref = Image.fromarray(astronaut)
    same = by_key(scorer.score(video(_face_scene(astronaut), reference=ref)))["face_similarity"]
    diff = by_key(scorer.score(video(_face_scene(other), reference=ref)))["face_similarity"]
    if same.status == "unavailable":  # no dlib / face_recognition_models on this machine
        assert diff.status == "unavailable" and same.reason and same.value is None
        assert "dlib" in same.reason or "face_recognition_models" in same.reason
        return
    assert same.status == diff.status == "ok"
    assert same.details["faces_detected"] == 4 and diff.details["faces_detected"] == 4
    assert same.value > 0.95
    assert same.value > diff.value + 0.05


def test_identity_without_a_face_in_the_reference_is_missing_with_reason():
    scorer = Scorer(MetricsConfig(groups=("identity",), num_frames=2), JudgeConfig())
    r = by_key(scorer.score(video(pan(1, 4))))["face_similarity"]
    if r.status == "unavailable":
        pytest.skip(f"identity unavailable here: {r.reason}")
    assert r.status == "missing" and r.value is None and "no face detected in the reference" in r.reason


def test_onnx_identity_without_the_file_is_unavailable(tmp_path):
    cfg = MetricsConfig(groups=("identity",), face_onnx=tmp_path / "arcface.onnx")
    r = by_key(Scorer(cfg, JudgeConfig()).score(video(pan(1, 3))))["face_similarity"]
    assert r.status == "unavailable" and r.value is None
    assert "arcface.onnx" in r.reason or "onnxruntime" in r.reason or "dlib" in r.reason


def test_onnx_identity_runs_a_local_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    skdata = pytest.importorskip("skimage.data")
    from onnx import TensorProto, helper, numpy_helper

    # A stand-in "face model": fixed random projection of the aligned 112x112 face to 64-d.
    w = np.random.default_rng(0).normal(size=(3 * 112 * 112, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["emb"])],
        "face",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "face.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    cfg = MetricsConfig(groups=("identity",), face_onnx=path, face_onnx_name="test-onnx", num_frames=3)
    astronaut = skdata.astronaut()
    r = by_key(Scorer(cfg, JudgeConfig()).score(video(_face_scene(astronaut, 3), reference=Image.fromarray(astronaut))))
    r = r["face_similarity"]
    if r.status == "unavailable" and "dlib" in r.reason:
        pytest.skip(f"identity unavailable here: {r.reason}")
    assert r.status == "ok" and r.model == "test-onnx" and r.details["faces_detected"] == 3
    assert r.value > 0.9  # the same face, aligned to the same template, projects to nearly the same vector


# ---- visual quality ---------------------------------------------------------------------------
def test_weightfree_quality_prefers_sharp_clean_frames():
    clean = pan(1, 4)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2) for f in clean])
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 20, clean.shape), 0, 255).astype(np.uint8)
    flat = np.full_like(clean, 128)
    s = {
        name: quality.weightfree_quality(video(v), 4).value
        for name, v in {"clean": clean, "blurred": blurred, "noisy": noisy, "flat": flat}.items()
    }
    assert s["clean"] > s["blurred"] and s["clean"] > s["noisy"] and s["clean"] > s["flat"]


# ---- learned metrics with stub models --------------------------------------------------------
def test_sliding_windows_repeat_edges_like_opens2v():
    assert learned.sliding_windows(4, 3) == [[0, 0, 0], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert learned.sliding_windows(3, 5) == [[0] * 5, [0] * 5, [0, 1, 2, 2, 2]]


class StubQAlign:
    name = "stub-qalign"

    def __init__(self, scores):
        self.scores = scores
        self.windows = None

    def score_windows(self, windows):
        self.windows = windows
        return self.scores


def test_qalign_smoothness_counts_artifact_frames():
    scores = [0.50, 0.51, 0.60, 0.60, 0.61, 0.61]  # one jump (frame 1 -> 2) over 0.025
    stub = StubQAlign(scores)
    r = learned.qalign_smoothness(stub, video(pan(1, 6)), window=3, threshold=0.025)
    assert r.value == pytest.approx(1 - 2 / 6) and r.details["artifact_frames"] == 2
    assert len(stub.windows) == 6 and all(len(w) == 3 for w in stub.windows)
    assert learned.qalign_smoothness(StubQAlign([0.7] * 6), video(pan(1, 6)), 3, 0.025).value == 1.0


class StubGme:
    name = "stub-gme"

    def embed_text(self, text, instruction):
        assert instruction
        return np.array([1.0, 0.0])

    def embed_images(self, images):
        return np.array([[np.cos(a), np.sin(a)] for a in np.linspace(0, np.pi / 3, len(images))])


def test_gme_alignment_is_mean_text_image_cosine():
    r = learned.gme_alignment(StubGme(), video(pan(1, 5)), num_frames=5, instruction="Find an image.")
    assert r.value == pytest.approx(np.mean(np.cos(np.linspace(0, np.pi / 3, 5)))) and r.details["frames"] == 5


# ---- honesty: unavailable, never skipped ------------------------------------------------------
def test_metrics_without_weights_or_endpoint_report_unavailable_with_reasons():
    results = by_key(Scorer(MetricsConfig(), JudgeConfig()).score(video(pan(1, 6))))
    expected = {"qalign": "temporal_smoothness_qalign", "musiq": "visual_quality_musiq", "gme": "text_alignment_gme"}
    for group, key in expected.items():
        assert results[key].status == "unavailable" and results[key].value is None
        assert group.replace("qalign", "Q-Align").replace("musiq", "MUSIQ").replace("gme", "GME") in results[key].reason
    for key in ("judge_hgc", "judge_lgc", "judge_ntp"):
        assert results[key].status == "unavailable" and "judge" in results[key].reason
    for key in ("motion_amplitude", "temporal_smoothness_warp", "visual_quality_weightfree"):
        assert results[key].status == "ok"
    assert "switch_continuity" not in results  # not interactive: does not apply
    assert "face_similarity" in results  # ok, missing or unavailable, but present


def test_a_metric_that_crashes_is_an_error_for_that_sample_only():
    broken = video(np.zeros((3, 8, 8, 3), np.uint8))
    broken.frames = np.zeros((3, 8, 8), np.uint8)  # wrong shape: flow raises
    results = by_key(Scorer(MetricsConfig(groups=("flow",)), JudgeConfig()).score(broken))
    assert results["motion_amplitude"].status == "error" and results["motion_amplitude"].reason


def test_results_validate_their_status():
    with pytest.raises(ValueError):
        MetricResult("x", None, "ok")
    with pytest.raises(ValueError):
        MetricResult("x", 0.0, "missing", "why")
    with pytest.raises(ValueError):
        MetricResult("x", None, "unavailable")


def test_sample_indices_spread_uniformly():
    assert list(sample_indices(5, 8)) == [0, 1, 2, 3, 4]
    assert list(sample_indices(81, 5)) == [0, 20, 40, 60, 80]


def test_without_opencv_the_weightfree_metrics_say_so(monkeypatch):
    import services.eval.scoring as scoring

    monkeypatch.setattr(scoring, "_opencv_missing", lambda: "OpenCV is not installed (pip install ...)")
    v = video(pan(1, 21), [(0, 9), (9, 21)])
    results = by_key(Scorer(MetricsConfig(groups=("flow", "continuity", "weightfree_quality")), JudgeConfig()).score(v))
    assert set(results) == {
        "motion_amplitude", "motion_amplitude_opens2v", "temporal_smoothness_warp", "switch_continuity",
        "visual_quality_weightfree",
    }  # fmt: skip
    assert all(r.status == "unavailable" and "OpenCV" in r.reason for r in results.values())
