"""Runs every enabled metric group on a generated sample.

Models are built once, on first use, and shared by all samples (each behind a lock: dlib,
onnxruntime sessions and torch models are not guaranteed re-entrant). A group that cannot be
built is "unavailable" for every sample with the reason it failed; a group that raises on one
sample is an "error" for that sample only. Nothing is skipped silently: every enabled key of
every applicable group appears in every sample's results (switch_continuity applies to
interactive samples only).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .config import METRIC_GROUPS, JudgeConfig, MetricsConfig
from .judge import Judge, judge_metrics
from .metrics import flow, identity, learned, quality
from .metrics.base import MetricResult, SampleVideo

_GROUP_ORDER = ("identity", "flow", "continuity", "qalign", "musiq", "weightfree_quality", "gme", "judge")


class _Lazy:
    """A model built on first use; remembers why it could not be built."""

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._lock = threading.Lock()
        self._done = False
        self.model: Any = None
        self.reason: str | None = None
        self.use_lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if not self._done:
                try:
                    self.model = self._build()
                except Exception as e:  # noqa: BLE001 - any failure makes the metric unavailable
                    self.reason = str(e) or type(e).__name__
                self._done = True
        return self.model


class Scorer:
    def __init__(self, metrics: MetricsConfig, judge: JudgeConfig):
        self.cfg = metrics
        self.judge_cfg = judge
        unknown = set(metrics.groups) - set(METRIC_GROUPS)
        if unknown:
            raise ValueError(f"unknown metric groups {sorted(unknown)}; known: {sorted(METRIC_GROUPS)}")
        self._models = {
            "identity": _Lazy(lambda: _build_identity(metrics)),
            "qalign": _Lazy(
                lambda: _need(
                    metrics.qalign_model,
                    "no Q-Align model folder configured (qalign_model)",
                    lambda p: learned.QAlignScorer(p, metrics.device),
                )
            ),
            "musiq": _Lazy(
                lambda: _need(
                    metrics.musiq_weights,
                    "no MUSIQ checkpoint configured (musiq_weights)",
                    lambda p: quality.MusiqScorer(p, metrics.device),
                )
            ),
            "gme": _Lazy(
                lambda: _need(
                    metrics.gme_model,
                    "no GME model folder configured (gme_model)",
                    lambda p: learned.GmeEmbedder(p, metrics.device),
                )
            ),
            "judge": _Lazy(lambda: _build_judge(judge)),
        }

    def groups(self) -> list[str]:
        return [g for g in _GROUP_ORDER if self.cfg.enabled(g)]

    def describe(self) -> dict[str, dict]:
        """Per enabled group: status and model name or reason (builds the models)."""
        out = {}
        for g in self.groups():
            lazy = self._models.get(g)
            if lazy is None:
                out[g] = {"status": "ok", "model": _STATIC_MODEL[g]}
                continue
            model = lazy.get()
            if model is None:
                out[g] = {"status": "unavailable", "reason": lazy.reason}
            else:
                out[g] = {"status": "ok", "model": getattr(model, "name", type(model).__name__)}
        return out

    def score(self, video: SampleVideo) -> list[MetricResult]:
        results: list[MetricResult] = []
        groups = self.groups()
        no_cv = _opencv_missing()
        if no_cv:  # the weight-free metrics all need OpenCV
            for g in ("flow", "continuity", "weightfree_quality"):
                if g in groups and (g != "continuity" or video.switch_frames):
                    results += [MetricResult.unavailable(k, no_cv) for k in METRIC_GROUPS[g]]
            groups = [g for g in groups if g not in ("flow", "continuity", "weightfree_quality")]
        want_flow = "flow" in groups
        want_cont = "continuity" in groups and bool(video.switch_frames)
        if want_flow or want_cont:  # one optical-flow pass serves both groups
            keys = [*(METRIC_GROUPS["flow"] if want_flow else ()), *(("switch_continuity",) if want_cont else ())]
            results += _guarded(keys, flow.MODEL, lambda: _flow(video, self.cfg, want_flow, want_cont))
        for g in groups:
            if g in ("flow", "continuity"):
                continue
            if g == "weightfree_quality":
                results += _guarded(
                    METRIC_GROUPS[g],
                    quality.WEIGHTFREE_MODEL,
                    lambda: [quality.weightfree_quality(video, self.cfg.num_frames)],
                )
            else:
                results += self._learned(g, video)
        return results

    def _learned(self, group: str, video: SampleVideo) -> list[MetricResult]:
        lazy = self._models[group]
        model = lazy.get()
        keys = METRIC_GROUPS[group]
        if model is None:
            return [MetricResult.unavailable(k, lazy.reason or "unavailable") for k in keys]
        name = getattr(model, "name", None)
        cfg = self.cfg

        def run() -> list[MetricResult]:
            if group == "judge":
                return judge_metrics(model, video)  # HTTP-bound: no lock, samples judge in parallel
            with lazy.use_lock:
                if group == "identity":
                    return [identity.face_similarity(model, video, cfg.num_frames, cfg.clip_negative_similarity)]
                if group == "qalign":
                    return [learned.qalign_smoothness(model, video, cfg.qalign_window, cfg.qalign_threshold)]
                if group == "musiq":
                    return [quality.musiq_quality(model, video, cfg.num_frames)]
                if group == "gme":
                    return [learned.gme_alignment(model, video, cfg.num_frames, cfg.gme_instruction)]
            raise AssertionError(f"unhandled metric group {group!r}")

        return _guarded(keys, name, run)


_STATIC_MODEL = {
    "flow": flow.MODEL,
    "continuity": flow.MODEL,
    "weightfree_quality": quality.WEIGHTFREE_MODEL,
}


def _opencv_missing() -> str | None:
    import importlib.util

    if importlib.util.find_spec("cv2") is None:
        return "OpenCV is not installed (pip install opencv-python-headless, or the eval extra)"
    return None


def _need(path, reason: str, build: Callable):
    if path is None:
        raise RuntimeError(reason)
    return build(path)


def _build_identity(cfg: MetricsConfig):
    try:
        return identity.build_embedder(cfg)
    except identity.Unavailable as e:
        raise RuntimeError(str(e)) from None


def _build_judge(cfg: JudgeConfig) -> Judge:
    if not cfg.configured:
        raise RuntimeError("no VLM judge configured (judge provider, base_url and model)")
    return Judge(cfg)


def _flow(video: SampleVideo, cfg: MetricsConfig, want_flow: bool, want_cont: bool) -> list[MetricResult]:
    out = flow.flow_metrics(video, cfg.flow_max_side, cfg.continuity_window, want_cont)
    if not want_flow:
        out = [r for r in out if r.key == "switch_continuity"]
    return out


def _guarded(keys, model: str | None, fn: Callable[[], list[MetricResult]]) -> list[MetricResult]:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one sample's failure must not stop the run
        reason = f"{type(e).__name__}: {e}"
        return [MetricResult.error(k, reason, model) for k in keys]
