"""Typed configuration of the eval service: runner, metrics, VLM judge, regression gates.

Built once at the edge (CLI flags, the `eval` section of the service config JSON) and passed
down; nothing here reads the environment. Model weights are always local paths: a metric
whose weights are not given reports "unavailable" with the reason, it never downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

# Every metric key a report can hold, in report order. Groups computed together share work.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "identity": ("face_similarity",),
    "flow": (
        "motion_amplitude",
        "motion_amplitude_opens2v",
        "temporal_smoothness_warp",
    ),
    "qalign": ("temporal_smoothness_qalign",),
    "musiq": ("visual_quality_musiq",),
    "weightfree_quality": ("visual_quality_weightfree",),
    "gme": ("text_alignment_gme",),
    "judge": ("judge_hgc", "judge_lgc", "judge_ntp"),
    "continuity": ("switch_continuity",),
}
ALL_GROUPS = tuple(METRIC_GROUPS)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MetricsConfig(_Frozen):
    """Which metric groups run and where their local weights are."""

    groups: tuple[str, ...] = ALL_GROUPS
    device: str = "cpu"  # torch device of the learned metrics (MUSIQ, Q-Align, GME)
    # Frames sampled uniformly from a video for per-frame metrics (OpenS2V uses 32).
    num_frames: int = Field(default=32, ge=1)
    # Face identity. "auto": an ONNX model when `face_onnx` is set, else dlib's ResNet.
    face_model: Literal["auto", "dlib", "onnx"] = "auto"
    face_onnx: Path | None = None  # ArcFace / CurricularFace ONNX, 112x112 aligned input
    face_onnx_name: str = "arcface-onnx"  # shown in reports ("curricularface-onnx", ...)
    face_onnx_bgr: bool = False  # channel order the ONNX model expects
    dlib_models_dir: Path | None = None  # default: the installed face_recognition_models package
    clip_negative_similarity: bool = True  # OpenS2V clamps per-frame cosine at 0
    # Optical flow (OpenCV Farneback). Frames are downscaled so the longer side is at most this
    # many pixels before flow (None: full resolution, as OpenS2V). Amplitudes are then rescaled
    # to full-resolution pixels.
    flow_max_side: int | None = None
    continuity_window: int = Field(default=4, ge=1)  # frame pairs on each side of a switch
    qalign_model: Path | None = None  # folder of q-future/one-align (trust_remote_code, local only)
    qalign_window: int = Field(default=3, ge=1)
    qalign_threshold: float = 0.025
    musiq_weights: Path | None = None  # pyiqa MUSIQ checkpoint file (e.g. musiq_koniq_ckpt.pth)
    gme_model: Path | None = None  # folder of Alibaba-NLP/gme-Qwen2-VL-* (trust_remote_code, local only)
    gme_instruction: str = "Find an image that matches the given text."

    def enabled(self, group: str) -> bool:
        return group in self.groups


class JudgeConfig(_Frozen):
    """The VLM judge: any OpenAI-compatible chat-completions endpoint or Gemini generateContent.

    `provider=None` means no judge is configured; the judge metrics then report "unavailable".
    """

    provider: Literal["openai", "gemini"] | None = None
    # openai: ".../v1" (POST {base_url}/chat/completions); gemini: ".../v1beta"
    # (POST {base_url}/models/{model}:generateContent).
    base_url: str = ""
    model: str = ""
    api_key: SecretStr | None = None
    repeats: int = Field(default=3, ge=1)  # independent judgements averaged per sample
    max_attempts: int = Field(default=3, ge=1)  # per repeat: malformed / out-of-range / transient
    retry_refusals: bool = False  # a refusal is usually deterministic; retrying wastes quota
    timeout_s: float = Field(default=120.0, gt=0)
    backoff_s: float = Field(default=1.0, ge=0)  # doubles per attempt; Retry-After wins
    max_backoff_s: float = Field(default=30.0, ge=0)
    temperature: float | None = None  # None: the provider's default
    frames: int = Field(default=8, ge=1)  # video frames sent per judgement
    max_side: int = Field(default=512, ge=32)  # images are downscaled to this longer side
    jpeg_quality: int = Field(default=90, ge=10, le=100)
    # openai: "json_schema" (structured outputs), "json_object", or "none" for servers that
    # support neither. gemini always sends responseSchema unless "none".
    response_format: Literal["json_schema", "json_object", "none"] = "json_schema"
    score_min: float = 1.0  # the rubric's 1-5 scale; answers outside it are retried
    score_max: float = 5.0

    @property
    def configured(self) -> bool:
        return self.provider is not None and bool(self.base_url) and bool(self.model)


class RunnerConfig(_Frozen):
    """How samples are generated."""

    concurrency: int = Field(default=1, ge=1)  # samples in flight (timings contend above 1)
    default_frames: int = Field(default=81, ge=1)  # pixel frames of a sample without `frames`
    seed: int = 0  # session seed of samples without their own
    fps: float | None = None  # video fps written (None: the preset's / the session's)
    # Switch steps (paper 4.3); all on by default, off only for ablations.
    refresh: bool = True
    withdraw: bool = True
    disentangle: bool = True


class Tolerance(_Frozen):
    """A regression gate for one metric: B may be worse than A by at most abs and/or rel."""

    abs: float | None = None
    rel: float | None = None  # fraction of |A|, e.g. 0.05 = 5 %


# Default gates of `eval compare` (metrics not listed are shown but never fail the run).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "judge_hgc": Tolerance(abs=0.1),
    "judge_lgc": Tolerance(abs=0.1),
    "judge_ntp": Tolerance(abs=0.1),
    "face_similarity": Tolerance(abs=0.02),
    "temporal_smoothness_warp": Tolerance(abs=0.01),
    "temporal_smoothness_qalign": Tolerance(abs=0.01),
    "visual_quality_musiq": Tolerance(abs=0.01),
    "visual_quality_weightfree": Tolerance(abs=0.02),
    "text_alignment_gme": Tolerance(abs=0.01),
    "switch_continuity": Tolerance(abs=0.05),
    "backbone_fps": Tolerance(rel=0.10),
    "end_to_end_fps": Tolerance(rel=0.10),
    "time_to_first_chunk_seconds": Tolerance(rel=0.20),
    "switch_latency_seconds": Tolerance(rel=0.20),
    # the toy world's bench (services/eval/toybench.py)
    "garment_match_before": Tolerance(abs=0.1),
    "garment_match_after": Tolerance(abs=0.1),
    "identity_match_rate": Tolerance(abs=0.1),
    "bottoms_match_rate": Tolerance(abs=0.1),
    "motion_direction_accuracy": Tolerance(abs=0.15),
    "switch_latency_frames": Tolerance(abs=3.0),
    "switch_in_first_chunk": Tolerance(abs=0.15),
}


class EvalConfig(_Frozen):
    runner: RunnerConfig = RunnerConfig()
    metrics: MetricsConfig = MetricsConfig()
    judge: JudgeConfig = JudgeConfig()
    tolerances: dict[str, Tolerance] = Field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    work_dir: Path = Path("var/eval")  # local run folders (per-sample results, videos)
    report_prefix: str = "eval"  # object-store prefix: {prefix}/runs/<run_id>/report.{json,md,html}
