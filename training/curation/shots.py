"""Shot segmentation and 3-5 s sub-clip cutting (paper App. A, stage 1, first step).

Detectors return shots as half-open pixel-frame ranges [start, end) covering the video:
- "pyscenedetect": PySceneDetect's ContentDetector (HSV content change, the paper's tool);
- "histogram": OpenCV fallback when `scenedetect` is not installed: a cut between frames t-1
  and t where the Bhattacharyya distance of their 2-D hue/saturation histograms exceeds
  `hist_threshold`. Catches hard cuts; slow dissolves are not detected by either default.

Cutting a shot of n frames into sub-clips with L = max_clip_s * fps, l = min_clip_s * fps:
k = ceil(n / L) equal pieces when n / k >= l; otherwise k - 1 pieces of exactly L frames (the
tail is dropped); a shot shorter than l is dropped whole ("too_short"). So every kept
sub-clip lasts between min_clip_s and max_clip_s. Frames within `boundary_margin_frames` of
a cut are left out (blur/fades across the boundary) before cutting.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ShotConfig

Range = tuple[int, int]  # [start, end) pixel frames


def scenedetect_available() -> bool:
    try:
        import scenedetect  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_detector(cfg: ShotConfig) -> str:
    if cfg.detector == "auto":
        return "pyscenedetect" if scenedetect_available() else "histogram"
    if cfg.detector == "pyscenedetect" and not scenedetect_available():
        raise RuntimeError("shots.detector = pyscenedetect but the scenedetect package is not installed")
    return cfg.detector


def _cuts_to_shots(cuts: list[int], num_frames: int) -> list[Range]:
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < num_frames) + [num_frames]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def histogram_cuts(frames: np.ndarray, threshold: float, max_side: int = 128) -> list[int]:
    """Frame indices t where a hard cut lies between t-1 and t. frames: uint8 [T, H, W, 3] RGB."""
    import cv2

    cuts, prev = [], None
    for t, frame in enumerate(frames):
        h, w = frame.shape[:2]
        s = min(1.0, max_side / max(h, w))
        small = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 16], [0, 180, 0, 256])  # [16, 16]
        cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
        if prev is not None and cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA) > threshold:
            cuts.append(t)
        prev = hist
    return cuts


def pyscenedetect_cuts(path: str | Path, threshold: float, min_scene_frames: int) -> list[int]:
    from scenedetect import ContentDetector, detect

    scenes = detect(str(path), ContentDetector(threshold=threshold, min_scene_len=max(1, min_scene_frames)))
    # 0.7 has `frame_num`; 0.6 only `get_frames()` (deprecated in 0.7)
    return [int(getattr(start, "frame_num", None) or start.get_frames()) for start, _ in scenes[1:]]


def detect_shots(frames: np.ndarray, fps: float, cfg: ShotConfig, path: str | Path | None = None) -> list[Range]:
    """Shots of a decoded video (`path` is the same video on disk, which PySceneDetect reads)."""
    n = len(frames)
    if resolve_detector(cfg) == "pyscenedetect" and path is not None:
        min_len = max(1, int(0.5 * fps))  # shorter "shots" are flashes, not cuts
        cuts = pyscenedetect_cuts(path, cfg.content_threshold, min_len)
    else:
        cuts = histogram_cuts(frames, cfg.hist_threshold)
    return _cuts_to_shots(cuts, n)


@dataclass(frozen=True)
class SubClip:
    start: int
    end: int  # exclusive
    shot: int  # index of the shot it came from
    piece: int
    reason: str | None = None  # None: kept; else why it was dropped ("too_short")


def cut_subclips(shots: list[Range], fps: float, cfg: ShotConfig, num_frames: int | None = None) -> list[SubClip]:
    """Sub-clips of every shot (dropped pieces included, with their reason)."""
    total = num_frames if num_frames is not None else (shots[-1][1] if shots else 0)
    lo, hi = cfg.min_clip_s * fps, cfg.max_clip_s * fps  # frames
    max_len = math.floor(hi + 1e-6)
    out: list[SubClip] = []
    for i, (a, b) in enumerate(shots):
        if a > 0:
            a += cfg.boundary_margin_frames
        if b < total:
            b -= cfg.boundary_margin_frames
        n = b - a
        if n < lo - 1e-6:
            out.append(SubClip(a, max(a, b), i, 0, "too_short"))
            continue
        k = max(1, math.ceil(n / max_len))
        if n / k >= lo - 1e-6:
            edges = [a + round(j * n / k) for j in range(k + 1)]
        else:  # equal pieces would be too short: k-1 full-length pieces, tail dropped
            edges = [a + j * max_len for j in range(k)]
        for j, (s, e) in enumerate(itertools.pairwise(edges)):
            out.append(SubClip(s, e, i, j))
        if edges[-1] < b:
            out.append(SubClip(edges[-1], b, i, len(edges) - 1, "too_short"))
    return out
