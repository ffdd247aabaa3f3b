"""Typed configuration of the curation pipeline (paper App. A), one model per component.

Built once at the edge (CLI flags / a JSON file) and passed down; nothing here reads the
environment. Model weights are always local paths; a backend whose package or weights are
missing reports "unavailable" (see `PersonConfig.on_unavailable`), it never downloads.
Durations are seconds, motion is pixels per frame at `MotionConfig.max_side`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from shared.storage.config import StorageConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShotConfig(_Frozen):
    """Shot segmentation and sub-clip cutting."""

    # "auto": PySceneDetect's ContentDetector when `scenedetect` imports, else the OpenCV
    # HSV-histogram detector below.
    detector: Literal["auto", "pyscenedetect", "histogram"] = "auto"
    content_threshold: float = Field(default=27.0, gt=0)  # PySceneDetect ContentDetector
    # histogram detector: a cut where the Bhattacharyya distance of adjacent HSV histograms exceeds this
    hist_threshold: float = Field(default=0.4, gt=0, le=1)
    min_clip_s: float = Field(default=3.0, gt=0)
    max_clip_s: float = Field(default=5.0, gt=0)
    # frames dropped on each side of a cut (fades / motion blur across the boundary)
    boundary_margin_frames: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _order(self) -> ShotConfig:
        if self.min_clip_s > self.max_clip_s:
            raise ValueError("min_clip_s must be <= max_clip_s")
        return self


class PersonConfig(_Frozen):
    """Single-person check. backend: "none" (unavailable stub), "ultralytics" (YOLO-seg from the
    local `weights` file) or "package.module:factory" (called with this config)."""

    backend: str = "none"
    weights: Path | None = None
    device: str = "cpu"
    confidence: float = Field(default=0.4, ge=0, le=1)
    frames: int = Field(default=3, ge=1)  # frames checked per clip, spread uniformly
    min_main_area: float = Field(default=0.03, ge=0, le=1)  # main person's mask area / frame area
    # another person counts as a second subject if their area is above this fraction of the
    # main person's (smaller ones are background figures, paper App. A)
    max_secondary_ratio: float = Field(default=0.25, ge=0, le=1)
    on_unavailable: Literal["keep", "drop"] = "keep"  # the report says the check did not run


class MotionConfig(_Frozen):
    """Optical-flow motion magnitude (OpenCV DIS, no weights)."""

    max_side: int = Field(default=256, ge=16)  # frames downscaled to this longer side
    pairs: int = Field(default=16, ge=1)  # frame pairs sampled per clip
    min_magnitude: float = Field(default=0.5, ge=0)  # px/frame at max_side; below: static
    max_magnitude: float | None = None  # above: shaky / broken (None: no upper bound)


class QualityConfig(_Frozen):
    """Quality and aesthetic scores in [0, 1]. Backends: "weightfree" or "package.module:factory"
    (called with (this config, which) where which is "quality" | "aesthetic"; returns a scorer)."""

    quality_backend: str = "weightfree"
    aesthetic_backend: str = "weightfree"
    weights: dict[str, Path] = Field(default_factory=dict)  # for plugged scorers, by name
    frames: int = Field(default=4, ge=1)
    min_quality: float = Field(default=0.3, ge=0, le=1)
    min_aesthetic: float = Field(default=0.3, ge=0, le=1)


class VLMConfig(_Frozen):
    """An OpenAI-compatible chat-completions endpoint (POST {base_url}/chat/completions)."""

    base_url: str = ""
    model: str = ""
    api_key: SecretStr | None = None
    max_attempts: int = Field(default=3, ge=1)  # malformed / transient answers are retried
    retry_refusals: bool = False
    timeout_s: float = Field(default=120.0, gt=0)
    backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    # requests per second per worker process (the cluster-wide rate is this x workers); 0: no limit
    requests_per_s: float = Field(default=2.0, ge=0)
    temperature: float | None = 0.0
    response_format: Literal["json_object", "none"] = "json_object"
    frames: int = Field(default=8, ge=1)  # video frames sent for captioning
    max_side: int = Field(default=512, ge=32)
    jpeg_quality: int = Field(default=90, ge=10, le=100)
    cache: bool = True  # answers cached in the output store under _cache/vlm/{sha256 of request}

    @property
    def configured(self) -> bool:
        return bool(self.base_url) and bool(self.model)


class EditConfig(_Frozen):
    """An image-edit endpoint (try-off / try-on). backend: "http" (JSON variant of
    POST {base_url}/images/edits, see edit.py) or "package.module:factory"."""

    backend: str = "http"
    base_url: str = ""
    model: str = ""
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)  # transport retries of one edit
    backoff_s: float = Field(default=2.0, ge=0)
    prompt: str = ""  # empty: the stage's default prompt

    @property
    def configured(self) -> bool:
        return self.backend != "http" or bool(self.base_url)


class GarmentStageConfig(_Frozen):
    max_tries: int = Field(default=3, ge=1)  # try-off runs until all three checks pass


class ReferenceStageConfig(_Frozen):
    # garment database: {upper|lower|full}/<name>.(png|jpg|webp) in the plain folder `folder`,
    # else {prefix}{upper|lower|full}/... in the object store `store`, else in the output store
    folder: Path | None = None
    store: StorageConfig | None = None
    prefix: str = "garments/"
    candidates: int = Field(default=4, ge=1)  # shown to the VLM to pick the compatible one
    max_tries: int = Field(default=3, ge=1)


class CurationConfig(_Frozen):
    """The whole run. Inputs are the video objects under `input_prefix` of the object store
    `input`, or the video files anywhere below the plain folder `input_folder` (exactly one of
    the two); every output (samples, manifest, report, resumable state, VLM cache) goes under
    `output_prefix` of `output`."""

    input: StorageConfig | None = None
    input_folder: Path | None = None
    input_prefix: str = ""
    video_extensions: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi")
    output: StorageConfig
    output_prefix: str = ""
    shots: ShotConfig = ShotConfig()
    person: PersonConfig = PersonConfig()
    motion: MotionConfig = MotionConfig()
    quality: QualityConfig = QualityConfig()
    vlm: VLMConfig = VLMConfig()
    try_off: EditConfig = EditConfig()
    try_on: EditConfig = EditConfig()
    garment: GarmentStageConfig = GarmentStageConfig()
    reference: ReferenceStageConfig = ReferenceStageConfig()
    # Ray Data: concurrent tasks per stage (None: Ray decides); the VLM/edit stages are I/O bound
    filter_concurrency: int | None = None
    remote_concurrency: int | None = None
    sample_sheet_rows: int = Field(default=8, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_input(self) -> CurationConfig:
        if (self.input is None) == (self.input_folder is None):
            raise ValueError("give exactly one of input (object store) and input_folder (plain folder)")
        return self
