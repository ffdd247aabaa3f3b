"""Fine filters of stage 1: single person, motion magnitude, quality and aesthetics.

Each filter is a small component built from its config; `plugin(spec)` resolves
"package.module:factory" strings so a team can plug its own model without touching this file.

Person detection (paper: YOLOv8-Seg). `PersonDetector.detect(frame)` returns the mask areas
of the people in a frame (fractions of the frame). A clip is single-person when in every
checked frame the largest person covers >= `min_main_area` and every other person is below
`max_secondary_ratio` of it (small background figures are allowed, as in the paper).
Backends: "ultralytics" (a YOLO segmentation model from a local weights file; the package is
optional and not installed by default because it pulls CUDA torch), "none" (`Unavailable`:
the check is skipped and the record notes it, or the clip is dropped with
`on_unavailable="drop"`), or a plugin.

Motion (paper: UniMatch flow): OpenCV DIS optical flow (no weights) on grey frames downscaled
to `max_side`, mean flow magnitude over pixels and `pairs` adjacent pairs, in px per frame at
that size. UniMatch's and DIS's magnitudes differ; thresholds are per backend.

Quality / aesthetics (paper: FAST-VQA-M / Q-Align): weight-free defaults, both in [0, 1]:
quality is the eval service's `visual_quality_weightfree` frame score (sharpness, noise,
contrast); aesthetics is the DMD reward's image-statistics proxy (sharpness, contrast,
colourfulness, exposure). They are stand-ins, not the paper's models: plug learned scorers
with `quality.quality_backend = "package.module:factory"`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .config import MotionConfig, PersonConfig, QualityConfig


def plugin(spec: str) -> Callable[..., Any]:
    """ "package.module:attr" -> the attribute (a factory)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"plugin spec must be 'package.module:factory', got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def sample_indices(n: int, k: int) -> np.ndarray:
    """`k` indices spread uniformly over [0, n) (all when n <= k)."""
    if n <= k:
        return np.arange(n)
    return np.linspace(0, n - 1, k).round().astype(int)


# ---- single person ---------------------------------------------------------------------
class PersonDetector(Protocol):
    available: bool
    why_unavailable: str

    def detect(self, frame: np.ndarray) -> list[float]:
        """Mask areas (fraction of the frame, 0..1) of every person in uint8 [H, W, 3] RGB."""


class Unavailable:
    """The documented stub: no detector configured or its package/weights are missing."""

    available = False

    def __init__(self, why: str):
        self.why_unavailable = why

    def detect(self, frame: np.ndarray) -> list[float]:
        raise RuntimeError(self.why_unavailable)


class UltralyticsPersonDetector:
    """YOLO segmentation (e.g. yolov8x-seg.pt) from a local file; class 0 is "person"."""

    available = True
    why_unavailable = ""

    def __init__(self, cfg: PersonConfig):
        from ultralytics import YOLO  # optional; not part of the curate extra

        self.model = YOLO(str(cfg.weights))
        self.cfg = cfg

    def detect(self, frame: np.ndarray) -> list[float]:
        result = self.model.predict(frame[..., ::-1], conf=self.cfg.confidence, classes=[0],
                                    device=self.cfg.device, verbose=False)[0]  # fmt: skip
        if result.masks is None:
            return []
        masks = result.masks.data.cpu().numpy()  # [N, h, w] in {0, 1}
        return [float(m.mean()) for m in masks]


def build_person_detector(cfg: PersonConfig) -> PersonDetector:
    if cfg.backend == "none":
        return Unavailable("no person detector configured (person.backend = none)")
    if cfg.backend == "ultralytics":
        if cfg.weights is None or not cfg.weights.is_file():
            return Unavailable(f"person.weights {cfg.weights} is not a local file")
        try:
            return UltralyticsPersonDetector(cfg)
        except ImportError:
            return Unavailable("the ultralytics package is not installed")
    return plugin(cfg.backend)(cfg)


def single_person(areas_per_frame: list[list[float]], cfg: PersonConfig) -> tuple[bool, str, float]:
    """(ok, failure kind, main person's mean area) over the checked frames."""
    mains = []
    for areas in areas_per_frame:
        ranked = sorted(areas, reverse=True)
        if not ranked or ranked[0] < cfg.min_main_area:
            return False, "no_person", float(np.mean(mains)) if mains else 0.0
        if len(ranked) > 1 and ranked[1] > cfg.max_secondary_ratio * ranked[0]:
            return False, "multiple_people", ranked[0]
        mains.append(ranked[0])
    return True, "", float(np.mean(mains)) if mains else 0.0


# ---- motion ----------------------------------------------------------------------------
def motion_magnitude(frames: np.ndarray, cfg: MotionConfig) -> float:
    """Mean DIS flow magnitude (px per frame at `max_side`) of uint8 [T, H, W, 3] frames."""
    import cv2

    if len(frames) < 2:
        return 0.0
    h, w = frames.shape[1:3]
    s = min(1.0, cfg.max_side / max(h, w))
    size = (max(8, round(w * s)), max(8, round(h * s)))
    starts = sample_indices(len(frames) - 1, cfg.pairs)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

    def grey(i: int) -> np.ndarray:
        return cv2.cvtColor(cv2.resize(frames[i], size, interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY)

    mags = [float(np.linalg.norm(dis.calc(grey(t), grey(t + 1), None), axis=-1).mean()) for t in starts]
    return float(np.mean(mags))


# ---- quality / aesthetics --------------------------------------------------------------
class FrameScorer(Protocol):
    name: str

    def score(self, frames: np.ndarray) -> float:
        """Score in [0, 1] of uint8 [K, H, W, 3] frames (higher is better)."""


class WeightFreeQuality:
    name = "weightfree-quality (sharpness+noise+contrast)"

    def score(self, frames: np.ndarray) -> float:
        from shared.media.quality import frame_quality

        return float(np.mean([frame_quality(f)["score"] for f in frames]))


class WeightFreeAesthetic:
    name = "weightfree-aesthetic (sharpness+contrast+colour+exposure)"

    def score(self, frames: np.ndarray) -> float:
        import torch

        from training.rewards import AestheticProxyReward

        pixels = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(3, 0, 1, 2)[None]  # [1, 3, K, H, W]
        return float(AestheticProxyReward.score_pixels(pixels).mean())


def build_scorer(cfg: QualityConfig, which: str) -> FrameScorer:
    backend = cfg.quality_backend if which == "quality" else cfg.aesthetic_backend
    if backend == "weightfree":
        return WeightFreeQuality() if which == "quality" else WeightFreeAesthetic()
    return plugin(backend)(cfg, which)
