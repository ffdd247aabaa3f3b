"""What every metric returns and what it is given.

A metric result is one of:
- ok:          `value` is a measurement;
- missing:     the metric ran on this sample but produced no valid value (e.g. every judge
               repeat failed); `value` is None and `reason` says why. Never counted as 0;
- unavailable: the metric cannot run here (no local weights, no endpoint, package absent);
- error:       the metric crashed on this sample (the exception text is the reason).
Reports aggregate over `ok` values only and show the counts and reasons of the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

Status = Literal["ok", "missing", "unavailable", "error"]


@dataclass(frozen=True)
class MetricInfo:
    """Static facts about a metric key shown in reports."""

    key: str
    title: str
    higher_is_better: bool | None  # None: no preferred direction (e.g. motion amplitude)
    unit: str = ""


METRIC_INFO: dict[str, MetricInfo] = {
    m.key: m
    for m in (
        MetricInfo("face_similarity", "Face identity (cosine, reference vs frames)", True),
        MetricInfo("motion_amplitude", "Motion amplitude (mean fwd+bwd flow)", None, "px/frame"),
        MetricInfo("motion_amplitude_opens2v", "Motion amplitude (OpenS2V Farneback)", None, "px/frame"),
        MetricInfo("temporal_smoothness_warp", "Smoothness (1 - flow-warp error)", True),
        MetricInfo("temporal_smoothness_qalign", "Smoothness (Q-Align artifacts)", True),
        MetricInfo("visual_quality_musiq", "Visual quality (MUSIQ / 100)", True),
        MetricInfo("visual_quality_weightfree", "Visual quality (weight-free proxy)", True),
        MetricInfo("text_alignment_gme", "Text alignment (GME)", True),
        MetricInfo("judge_hgc", "High-level garment consistency (VLM, 1-5)", True),
        MetricInfo("judge_lgc", "Low-level garment consistency (VLM, 1-5)", True),
        MetricInfo("judge_ntp", "Non-target garment preservation (VLM, 1-5)", True),
        MetricInfo("switch_continuity", "Motion continuity at switches", True),
        MetricInfo("backbone_fps", "Backbone FPS (frames / DiT s)", True, "frames/s"),
        MetricInfo("end_to_end_fps", "End-to-end FPS (frames / (DiT + decode) s)", True, "frames/s"),
        MetricInfo("time_to_first_chunk_seconds", "Time to first chunk", False, "s"),
        MetricInfo("switch_latency_seconds", "Garment switch latency", False, "s"),
    )
}


@dataclass
class MetricResult:
    key: str
    value: float | None
    status: Status = "ok"
    reason: str | None = None
    model: str | None = None  # the model / definition that produced the value
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status == "ok" and (self.value is None or not np.isfinite(self.value)):
            raise ValueError(f"{self.key}: an ok result needs a finite value, got {self.value!r}")
        if self.status != "ok" and self.value is not None:
            raise ValueError(f"{self.key}: a {self.status} result carries no value")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"{self.key}: a {self.status} result needs a reason")

    @classmethod
    def ok(cls, key: str, value: float, model: str | None = None, **details: Any) -> MetricResult:
        return cls(key, float(value), "ok", None, model, details)

    @classmethod
    def unavailable(cls, key: str, reason: str, model: str | None = None) -> MetricResult:
        return cls(key, None, "unavailable", reason, model)

    @classmethod
    def missing(cls, key: str, reason: str, model: str | None = None, **details: Any) -> MetricResult:
        return cls(key, None, "missing", reason, model, details)

    @classmethod
    def error(cls, key: str, reason: str, model: str | None = None) -> MetricResult:
        return cls(key, None, "error", reason, model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricResult:
        return cls(d["key"], d["value"], d["status"], d.get("reason"), d.get("model"), d.get("details") or {})


@dataclass(frozen=True)
class Segment:
    """Frames [start, end) of a video wearing one garment (pixel-frame indices)."""

    start: int
    end: int
    garment: Image.Image
    garment_ref: str  # the manifest reference, for reports


@dataclass
class SampleVideo:
    """Everything a metric may look at for one generated sample."""

    sample_id: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    reference: Image.Image
    prompt: str
    segments: list[Segment]  # one per garment; more than one for interactive runs

    @property
    def garment(self) -> Image.Image:
        return self.segments[0].garment

    @property
    def switch_frames(self) -> list[int]:
        """First pixel frame of every segment after the first."""
        return [s.start for s in self.segments[1:]]


def sample_indices(num_frames: int, k: int) -> np.ndarray:
    """`k` frame indices spread uniformly over [0, num_frames) (all frames if fewer)."""
    if num_frames <= k:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, k).round().astype(int)
