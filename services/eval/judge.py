"""The VLM judge: the paper's three garment scores (App. N) from a chat model.

Transport: any OpenAI-compatible chat-completions endpoint (POST {base_url}/chat/completions,
images as base64 `data:` URLs, structured output through `response_format`), or Gemini's
generateContent REST shape (POST {base_url}/models/{model}:generateContent, images as
`inlineData`, `responseSchema`). Standard library HTTP only; the endpoint is whatever the
operator configures (loopback in tests).

What is sent: the paper's system prompt verbatim; [Image 1] the reference photo, [Image 2]
the target garment, [Video 1] `frames` frames sampled uniformly from the video (or from one
garment segment of an interactive run), each downscaled to `max_side` and JPEG-encoded.

How answers are read (each judgement = one "repeat"; `repeats` are averaged):
- the text is parsed tolerantly: the whole text as JSON, else each fenced ``` block, else
  every balanced {...} in the text (trailing or leading prose is ignored). Keys match the
  three dimension names case- and separator-insensitively ("high_level_garment_consistency"
  is fine) or the short forms hgc / lgc / ntp. Values may be numbers or numeric strings
  ("4", "4.5", "4/5").
- malformed (no JSON object, a dimension missing, a non-numeric value) -> retried;
- out of range (any value outside [score_min, score_max], 1..5: the rubric's scale; the
  paper's output template says "0-5", but 0 is not a grade of the 1-5 rubric) -> retried;
  an answer is used whole or not at all;
- refused (OpenAI `message.refusal` or finish_reason "content_filter"; Gemini blockReason
  or a safety finishReason) -> recorded as missing without retrying (`retry_refusals`);
- HTTP 408 / 409 / 429 / 5xx, timeouts and connection errors -> retried with exponential
  backoff (a Retry-After header wins, capped at `max_backoff_s`); other 4xx -> missing, no
  retry (the request itself is wrong);
- a repeat that exhausts `max_attempts` is missing with the last reason.
The sample's score per dimension is the mean over the repeats that produced one; when no
repeat did, the metric is "missing" with the reasons -- never 0.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from shared.vlm import (
    Answer,
    InvalidAnswer,
    Permanent,
    Transient,
    encode_jpeg,
    json_objects,
    openai_answer,
    post_json,
)

from .config import JudgeConfig
from .metrics.base import MetricResult, SampleVideo, sample_indices

SYSTEM_PROMPT = """Task Objective: Evaluate the quality of AI-customized video generation.

Input Description: [Image 1]: Original image of the model (reference for person identity, pose, non-target clothing, and original background). [Image 2]: Target garment image (reference for the clothing to be virtually tried on). [Video 1]: AI-generated video sequence (evaluation target).

Scoring Dimensions: 1–5, where 1 is the worst and 5 is the best:

1. High-level garment consistency

Evaluate how well the target garment in [Image 2] matches the garment worn by the model in the corresponding [Video 1] sequence at a high-level semantic level. Checkpoints: whether the category, overall silhouette (e.g. fit, cut), large color block distribution, and overall style are consistent. Execution focus: Only evaluate the match of the target garment from [Image 2]; ignore other non-target garments worn by the model in [Video 1].

2. Low-level garment consistency

Evaluate how well the target garment in [Image 2] matches the garment worn by the model in the corresponding [Video 1] sequence at the pixel-detail level. Checkpoints: whether fine-grained features are accurately reproduced, such as patterns (prints, stripes), logos, embroidery, fabric texture, surface gloss, etc. Hard constraint: If there is obvious pattern distortion, blurred logos, or completely incorrect fabric texture, this score must be ≤ 2. Execution focus: Only evaluate the match of the target garment from [Image 2]; ignore other non-target garments worn by the model in [Video 1].

3. Non-target garment preservation

Evaluate the consistency between the non-target garments in [Video 1] (i.e. all other clothing items, accessories, etc. worn by the model besides the target garment) and those in [Image 1]. Checkpoints: whether the style, color, and texture of all non-target parts in [Video 1] have been incorrectly modified or removed. Logical focus: Apart from virtually trying on the target garment, all other garments on the model in [Video 1] should preserve the original appearance from [Image 1] as much as possible.

Output Requirements:

Please output only a single JSON object, without any explanatory text:

```
{ "high-level garment consistency": 0-5, "low-level garment consistency": 0-5, "non-target garment preservation": 0-5 }
```"""

# metric key -> (JSON field in the answer, short alias)
DIMENSIONS: dict[str, tuple[str, str]] = {
    "judge_hgc": ("high-level garment consistency", "hgc"),
    "judge_lgc": ("low-level garment consistency", "lgc"),
    "judge_ntp": ("non-target garment preservation", "ntp"),
}
GEMINI_REFUSAL_FINISH = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE"}
)
_RAW_CHARS = 300  # of each raw answer kept in the per-sample record


# ---- parsing -----------------------------------------------------------------------------
_NUMBER = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(?:/\s*5(?:\.0+)?)?\s*$")


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", " ", key.strip().lower())


_KEY_LOOKUP = {
    **{_norm_key(name): metric for metric, (name, _) in DIMENSIONS.items()},
    **{alias: metric for metric, (_, alias) in DIMENSIONS.items()},
}


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        m = _NUMBER.match(value)
        return float(m.group(1)) if m else None
    return None


def parse_scores(text: str | None, lo: float = 1.0, hi: float = 5.0) -> dict[str, float]:
    """The three scores from a judge's answer text; raises InvalidAnswer."""
    if not text or not text.strip():
        raise InvalidAnswer("malformed", "empty answer")
    objects = json_objects(text)
    if not objects:
        raise InvalidAnswer("malformed", f"no JSON object in the answer: {text[:80]!r}")
    best: dict[str, Any] = {}
    for obj in objects:  # the first object that names the most dimensions
        mapped = {
            _KEY_LOOKUP[_norm_key(k)]: v for k, v in obj.items() if isinstance(k, str) and _norm_key(k) in _KEY_LOOKUP
        }
        if len(mapped) > len(best):
            best = mapped
    missing = [DIMENSIONS[m][0] for m in DIMENSIONS if m not in best]
    if missing:
        raise InvalidAnswer("malformed", f"answer lacks {', '.join(missing)}")
    scores: dict[str, float] = {}
    for metric, raw in best.items():
        v = _as_number(raw)
        if v is None:
            raise InvalidAnswer("malformed", f"{DIMENSIONS[metric][0]} is not a number: {raw!r}")
        if not lo <= v <= hi:
            raise InvalidAnswer("out_of_range", f"{DIMENSIONS[metric][0]} = {v:g} is outside [{lo:g}, {hi:g}]")
        scores[metric] = v
    return scores


# ---- request building --------------------------------------------------------------------
Part = tuple[str, str]  # ("text", text) | ("image", base64 jpeg)


def judge_parts(reference: Image.Image, garment: Image.Image, frames: np.ndarray, cfg: JudgeConfig) -> list[Part]:
    """The user turn: labelled reference, garment and video frames."""
    enc = lambda im: encode_jpeg(im, cfg.max_side, cfg.jpeg_quality)
    parts: list[Part] = [
        ("text", "[Image 1]: Original image of the model."),
        ("image", enc(reference)),
        ("text", "[Image 2]: Target garment image."),
        ("image", enc(garment)),
        ("text", f"[Video 1]: {len(frames)} frames sampled uniformly, in temporal order, from the AI-generated video."),
    ]
    parts += [("image", enc(f)) for f in frames]
    parts.append(("text", "Score [Video 1] and output only the JSON object."))
    return parts


def _names() -> list[str]:
    return [name for name, _ in DIMENSIONS.values()]


def openai_request(cfg: JudgeConfig, parts: list[Part]) -> tuple[str, dict, dict]:
    content = [
        {"type": "text", "text": v}
        if k == "text"
        else {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{v}"}}
        for k, v in parts
    ]
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
    }
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    if cfg.response_format == "json_schema":
        schema = {
            "type": "object",
            "properties": {n: {"type": "integer", "minimum": 1, "maximum": 5} for n in _names()},
            "required": _names(),
            "additionalProperties": False,
        }
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "garment_scores", "strict": True, "schema": schema},
        }
    elif cfg.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    headers = {"Content-Type": "application/json"}
    if cfg.api_key is not None:
        headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
    return cfg.base_url.rstrip("/") + "/chat/completions", headers, body


def gemini_request(cfg: JudgeConfig, parts: list[Part]) -> tuple[str, dict, dict]:
    gparts = [{"text": v} if k == "text" else {"inlineData": {"mimeType": "image/jpeg", "data": v}} for k, v in parts]
    generation: dict[str, Any] = {}
    if cfg.temperature is not None:
        generation["temperature"] = cfg.temperature
    if cfg.response_format != "none":
        generation["responseMimeType"] = "application/json"
        generation["responseSchema"] = {
            "type": "OBJECT",
            "properties": {n: {"type": "INTEGER"} for n in _names()},
            "required": _names(),
            "propertyOrdering": _names(),
        }
    body: dict[str, Any] = {
        "systemInstruction": {"parts": [{"text": SYSTEM_PROMPT}]},
        "contents": [{"role": "user", "parts": gparts}],
    }
    if generation:
        body["generationConfig"] = generation
    headers = {"Content-Type": "application/json"}
    if cfg.api_key is not None:
        headers["x-goog-api-key"] = cfg.api_key.get_secret_value()
    return f"{cfg.base_url.rstrip('/')}/models/{cfg.model}:generateContent", headers, body


def gemini_answer(data: dict) -> Answer:
    block = (data.get("promptFeedback") or {}).get("blockReason")
    if block:
        return Answer(None, f"prompt blocked: {block}")
    candidates = data.get("candidates") or []
    if not candidates:
        raise InvalidAnswer("malformed", "response has no candidates")
    cand = candidates[0]
    finish = cand.get("finishReason")
    if finish in GEMINI_REFUSAL_FINISH:
        return Answer(None, f"finishReason {finish}")
    parts = (cand.get("content") or {}).get("parts") or []
    return Answer("".join(p.get("text", "") for p in parts if isinstance(p, dict) and not p.get("thought")))


PROVIDERS: dict[str, tuple[Callable, Callable]] = {
    "openai": (openai_request, openai_answer),
    "gemini": (gemini_request, gemini_answer),
}


# ---- transport ---------------------------------------------------------------------------
# ---- judging -----------------------------------------------------------------------------
@dataclass
class RepeatOutcome:
    scores: dict[str, float] | None
    attempts: int
    reason: str | None = None  # why the repeat is missing
    raw: list[str] = field(default_factory=list)  # truncated raw answers, for reports


@dataclass
class Judgement:
    scores: dict[str, float | None]  # mean over valid repeats; None when none was valid
    repeats: list[RepeatOutcome]

    @property
    def valid(self) -> int:
        return sum(r.scores is not None for r in self.repeats)

    def reasons(self) -> list[str]:
        return [r.reason for r in self.repeats if r.reason]


class Judge:
    def __init__(self, cfg: JudgeConfig, sleep: Callable[[float], None] = time.sleep):
        if not cfg.configured:
            raise ValueError("judge needs provider, base_url and model")
        self.cfg = cfg
        self.build, self.read = PROVIDERS[cfg.provider]
        self.sleep = sleep
        self.name = f"{cfg.provider}:{cfg.model}"

    def _backoff(self, attempt: int, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else self.cfg.backoff_s * 2**attempt
        self.sleep(min(delay, self.cfg.max_backoff_s))

    def one(self, parts: list[Part]) -> RepeatOutcome:
        cfg = self.cfg
        url, headers, body = self.build(cfg, parts)
        reason, raw = None, []
        for attempt in range(cfg.max_attempts):
            last = attempt == cfg.max_attempts - 1
            try:
                answer = self.read(post_json(url, headers, body, cfg.timeout_s))
            except Transient as e:
                reason = str(e)
                if not last:
                    self._backoff(attempt, e.retry_after_s)
                continue
            except Permanent as e:
                return RepeatOutcome(None, attempt + 1, str(e), raw)
            except InvalidAnswer as e:
                reason = f"{e.kind}: {e}"
                continue
            if answer.refusal is not None:
                raw.append(f"[refusal] {answer.refusal}"[:_RAW_CHARS])
                reason = f"refused: {answer.refusal}"
                if cfg.retry_refusals:
                    continue
                return RepeatOutcome(None, attempt + 1, reason, raw)
            raw.append((answer.text or "")[:_RAW_CHARS])
            try:
                return RepeatOutcome(parse_scores(answer.text, cfg.score_min, cfg.score_max), attempt + 1, None, raw)
            except InvalidAnswer as e:
                reason = f"{e.kind}: {e}"
        return RepeatOutcome(None, cfg.max_attempts, f"gave up after {cfg.max_attempts} attempts ({reason})", raw)

    def judge(self, reference: Image.Image, garment: Image.Image, frames: np.ndarray) -> Judgement:
        """`frames` uint8 [T, H, W, 3]; `cfg.frames` of them, uniformly spaced, are sent."""
        frames = frames[sample_indices(len(frames), self.cfg.frames)]
        parts = judge_parts(reference, garment, frames, self.cfg)
        repeats = [self.one(parts) for _ in range(self.cfg.repeats)]
        scores: dict[str, float | None] = {}
        for metric in DIMENSIONS:
            vals = [r.scores[metric] for r in repeats if r.scores is not None]
            scores[metric] = float(np.mean(vals)) if vals else None
        return Judgement(scores, repeats)


def _summary(reasons: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for r in reasons:
        counts[r] = counts.get(r, 0) + 1
    return "; ".join(f"{r} (x{n})" if n > 1 else r for r, n in counts.items())


def judge_metrics(judge: Judge, video: SampleVideo) -> list[MetricResult]:
    """judge_hgc / judge_lgc / judge_ntp for a sample; per garment segment for interactive runs
    (the sample value is then the mean over the segments that got a score)."""
    segments = []
    for seg in video.segments:
        frames = video.frames[seg.start : seg.end]
        if len(frames) == 0:
            continue
        j = judge.judge(video.reference, seg.garment, frames)
        segments.append(
            {
                "start_frame": seg.start,
                "end_frame": seg.end,
                "garment": seg.garment_ref,
                "scores": j.scores,
                "valid_repeats": j.valid,
                "repeats": [asdict(r) for r in j.repeats],
            }
        )
    out = []
    for metric in DIMENSIONS:
        vals = [s["scores"][metric] for s in segments if s["scores"][metric] is not None]
        details = {"segments": segments} if metric == "judge_hgc" else {}  # stored once per sample
        if vals:
            per_seg = [s["scores"][metric] for s in segments]
            out.append(MetricResult.ok(metric, float(np.mean(vals)), judge.name, per_segment=per_seg, **details))
        else:
            reasons = [r["reason"] for s in segments for r in s["repeats"] if r["reason"]]
            out.append(MetricResult.missing(metric, _summary(reasons) or "no segment to judge", judge.name, **details))
    return out
