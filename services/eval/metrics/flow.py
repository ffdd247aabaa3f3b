"""Optical-flow metrics (OpenCV Farneback), computed in one pass over neighbouring frames.

- motion_amplitude (paper App. F): forward and backward flow between adjacent frames, flow
  magnitude averaged over all pixels and frame pairs; pixels per frame at the video's size.
  A k-pixel pan scores ~k; a static video scores 0.
- motion_amplitude_opens2v (OpenS2V-Eval's `motion_fb`): forward flow maps downscaled to 16
  pixels wide (area interpolation), averaged over pairs, then the mean over pixels *and both
  components* of the signed flow, absolute value. Opposite motions cancel and a pure
  horizontal k-pixel pan gives k/2 -- that is the published definition, kept for comparison.
  One deviation: frames go to grey with RGB weights (OpenS2V feeds RGB frames to a BGR
  conversion); the flow difference is negligible.
- temporal_smoothness_warp: frame t warped onto frame t+1 with the backward flow; the mean
  absolute error over in-bounds pixels (0..1 intensity) is the warping error; the score is
  1 - mean error. Shuffled or flickering frames warp badly and score lower.
- switch_continuity (interactive runs): at each garment switch, the flow magnitude of the
  pair that crosses the boundary is compared with the median magnitude of up to `window`
  pairs on each side: continuity = min(1, median_local / max(cross, eps)), where the local
  median is floored at 0.5 px so a still video with a small twitch is not punished.
  1 means the boundary step is no larger than the motion around it; 0.25 means a jump four
  times the surrounding motion. Appearance changes of the garment itself add some apparent
  flow at the boundary, so a perfect switch scores slightly below 1.

Farneback parameters are OpenS2V's: pyr_scale 0.5, levels 3, winsize 15, iterations 3,
poly_n 5, poly_sigma 1.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import MetricResult, SampleVideo

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
OPENS2V_WIDTH = 16
CONTINUITY_FLOOR_PX = 0.5
MODEL = "opencv-farneback"


def _cv2():
    import cv2  # the eval extra's opencv-python-headless

    return cv2


@dataclass
class PairStats:
    """Per adjacent pair (t, t+1), in full-resolution pixels."""

    mag_fwd: np.ndarray  # [T-1] mean |flow t->t+1|
    mag_bwd: np.ndarray  # [T-1] mean |flow t+1->t|
    warp_error: np.ndarray  # [T-1] mean |warp(frame t) - frame t+1| in [0, 1]
    opens2v_fwd: np.ndarray  # [T-1, h16, 16, 2] downscaled forward flow

    @property
    def mag(self) -> np.ndarray:
        return (self.mag_fwd + self.mag_bwd) / 2


def _gray(cv2, frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _resize(cv2, frames: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    h, w = frames.shape[1:3]
    if max_side is None or max(h, w) <= max_side:
        return frames, 1.0
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]), s


def warp_error(cv2, prev: np.ndarray, nxt: np.ndarray, flow_bwd: np.ndarray) -> float:
    """Mean |prev warped by the backward flow - next| over in-bounds pixels, in [0, 1]."""
    h, w = nxt.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + flow_bwd[..., 0], gy + flow_bwd[..., 1]
    warped = cv2.remap(prev, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    valid = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    if not valid.any():
        return 1.0
    diff = np.abs(warped.astype(np.float32) - nxt.astype(np.float32)).mean(axis=-1)  # [H, W]
    return float(diff[valid].mean() / 255.0)


def pair_stats(frames: np.ndarray, max_side: int | None = None) -> PairStats:
    """Flow statistics of every adjacent pair of `frames` (uint8 [T, H, W, 3], T >= 2)."""
    cv2 = _cv2()
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"need at least 2 frames [T, H, W, 3], got {frames.shape}")
    small, s = _resize(cv2, frames, max_side)
    n = small.shape[0] - 1
    mag_f, mag_b, err = np.zeros(n), np.zeros(n), np.zeros(n)
    os2v = []
    grays = [_gray(cv2, f) for f in small]
    h, w = grays[0].shape
    os_size = (OPENS2V_WIDTH, max(1, int(h * (OPENS2V_WIDTH / w))))
    for t in range(n):
        fwd = cv2.calcOpticalFlowFarneback(grays[t], grays[t + 1], None, **FARNEBACK)  # [H, W, 2]
        bwd = cv2.calcOpticalFlowFarneback(grays[t + 1], grays[t], None, **FARNEBACK)
        mag_f[t] = np.linalg.norm(fwd, axis=-1).mean() / s
        mag_b[t] = np.linalg.norm(bwd, axis=-1).mean() / s
        err[t] = warp_error(cv2, small[t], small[t + 1], bwd)
        os2v.append(cv2.resize(fwd, os_size, interpolation=cv2.INTER_AREA) / s)
    return PairStats(mag_f, mag_b, err, np.stack(os2v))


def amplitude(stats: PairStats) -> float:
    return float(stats.mag.mean())


def amplitude_opens2v(stats: PairStats) -> float:
    return float(abs(stats.opens2v_fwd.mean(axis=0).mean()))


def smoothness_warp(stats: PairStats) -> float:
    return float(1.0 - stats.warp_error.mean())


def boundary_continuity(stats: PairStats, switch_frame: int, window: int) -> dict | None:
    """Continuity at a switch whose first new frame is `switch_frame`; None if not measurable."""
    n = len(stats.mag)
    cross = switch_frame - 1  # the pair (switch_frame - 1, switch_frame)
    if not 0 <= cross < n:
        return None
    before = range(max(0, cross - window), cross)
    after = range(cross + 1, min(n, cross + 1 + window))
    local = [stats.mag[i] for i in (*before, *after)]
    if not local:
        return None
    m_cross = float(stats.mag[cross])
    m_local = float(np.median(local))
    floor = max(m_local, CONTINUITY_FLOOR_PX)
    return {
        "frame": switch_frame,
        "cross_flow_px": m_cross,
        "local_flow_px": m_local,
        "continuity": float(min(1.0, floor / max(m_cross, 1e-9))),
    }


def flow_metrics(video: SampleVideo, max_side: int | None, window: int, with_continuity: bool) -> list[MetricResult]:
    keys = ["motion_amplitude", "motion_amplitude_opens2v", "temporal_smoothness_warp"]
    if video.frames.shape[0] < 2:
        out = [MetricResult.missing(k, "fewer than 2 frames", MODEL) for k in keys]
        if with_continuity and video.switch_frames:
            out.append(MetricResult.missing("switch_continuity", "fewer than 2 frames", MODEL))
        return out
    stats = pair_stats(video.frames, max_side)
    out = [
        MetricResult.ok("motion_amplitude", amplitude(stats), MODEL, pairs=len(stats.mag)),
        MetricResult.ok("motion_amplitude_opens2v", amplitude_opens2v(stats), "opens2v-farneback"),
        MetricResult.ok(
            "temporal_smoothness_warp",
            smoothness_warp(stats),
            MODEL,
            mean_warp_error=float(stats.warp_error.mean()),
            max_warp_error=float(stats.warp_error.max()),
        ),
    ]
    if with_continuity and video.switch_frames:
        out.append(continuity_result(stats, video.switch_frames, window))
    return out


def continuity_result(stats: PairStats, switch_frames: list[int], window: int) -> MetricResult:
    boundaries = [boundary_continuity(stats, f, window) for f in switch_frames]
    measured = [b for b in boundaries if b is not None]
    if not measured:
        return MetricResult.missing("switch_continuity", "no switch boundary with frames on both sides", MODEL)
    return MetricResult.ok(
        "switch_continuity",
        float(np.mean([b["continuity"] for b in measured])),
        MODEL,
        boundaries=measured,
    )
