"""VLM calls of stages 2-4 through an OpenAI-compatible chat-completions endpoint.

Transport and tolerant JSON extraction are the eval judge's (`services.eval.judge`:
`post_json`, `openai_answer`, `encode_jpeg`, the fenced / balanced-brace JSON search), so both
services read answers the same way. On top of them, `VLMClient.ask` adds:
- strict validation per question (a parser raising `InvalidAnswer` -> retried);
- retries: malformed answers and transient HTTP errors (408/409/429/5xx, timeouts, refused
  connections) up to `max_attempts`, exponential backoff (Retry-After wins); other 4xx and
  refusals (`message.refusal`, finish_reason content_filter) are final;
- a per-process rate limit (`requests_per_s`);
- a cache in the output store keyed by the SHA-256 of (model, system prompt, question name,
  every text and image part): a re-run, or a resumed run, pays for no answer twice. Answers
  and refusals are cached; transport failures and malformed answers are not.
A failed question is an `Outcome` with `value=None` and a reason; it never raises.

Prompts: the captioning prompt is the paper's (App. N) verbatim. The paper gives no text for
the validity checks, garment typing and retrieval (App. A describes them); ours below ask for
one small JSON object each.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from shared.storage.base import ObjectNotFound, ObjectStore
from shared.vlm import (  # the shared transport / parsing (see module docstring)
    InvalidAnswer,
    Permanent,
    Transient,
    encode_jpeg,
    json_objects,
    openai_answer,
    post_json,
)

from .config import VLMConfig

CAPTION_PROMPT = """Please generate a structured multilingual description based on the input video content, strictly following the specifications below:

1. Dynamic element description: Focus on content that changes over time in the video, such as: (a) The subject (e.g., person, animal, object, etc.) and changes in its behavior, state, or position; (b) Specific actions (e.g., running, waving, opening a door, vehicles moving, etc.); (c) Scene transitions (e.g., switching from a street to an indoor setting, weather changing from sunny to rainy, etc.); (d) Camera movement (e.g., push-in, pull-out, pan, tracking shot, fixed shot, zoom, etc.).

2. Static element description: Accurately identify visual features that remain unchanged throughout the video, such as: (a) The inherent appearance of the subject or environment (e.g., clothing style, architectural style, object color and material, indoor layout, etc.); (b) The overall aesthetic style (e.g., realistic, animated, film-like, cyberpunk, minimalist, etc.); (c) Consistent visual style elements such as color tone, lighting atmosphere, and composition principles; (d) The character’s clothing, styling, and accessories.

3. Additional notes: In the dynamic element description, completely ignore any description of the character’s clothing, styling, or accessories, but handheld items (if any) may be briefly described.

Please output in standard JSON format, containing the following four fields. The value of each field must be an array of two strings: (a) The first string: description of dynamic elements; (b) The second string: description of static elements.

The field definitions are as follows:

“cn long”: two detailed Chinese descriptions (the first for dynamics, the second for statics);

“cn short”: two concise Chinese descriptions (the first for dynamics, the second for statics);

“en long”: two detailed English descriptions, semantically corresponding to cn long;

“en short”: two concise English descriptions, semantically corresponding to cn short.

Output requirements:

1. Use natural, objective, and accurate language, based only on visible video content, without adding speculation or fabricated details;

2. The Chinese and English descriptions should be semantically aligned, but do not need to be word-for-word translations;

3. Long descriptions should be comprehensive and detailed, while short descriptions should be concise and focused on the core information."""

VERDICT_FORMAT = 'Answer with only a JSON object: {"pass": true or false, "reason": "<one short sentence>"}.'
GARMENT_CHECKS: dict[str, str] = {
    "semantic": (
        "You verify a garment image extracted from a photo of a person. [Image 1] is the photo, "
        "[Image 2] the extracted garment. Semantic consistency: does the garment in [Image 2] match "
        "the clothing worn in [Image 1] at a high level: garment category, overall shape and colour? " + VERDICT_FORMAT
    ),
    "textural": (
        "You verify a garment image extracted from a photo of a person. [Image 1] is the photo, "
        "[Image 2] the extracted garment. Textural consistency: does the garment in [Image 2] match "
        "the clothing in [Image 1] at a low level: texture, patterns, prints and logos? " + VERDICT_FORMAT
    ),
    "context": (
        "You verify a garment image extracted from a photo of a person. [Image 1] is the photo, "
        "[Image 2] the extracted garment. Non-garment context: does [Image 2] show only the garment, "
        "without a person, body parts, scene content or other artifacts? " + VERDICT_FORMAT
    ),
}
TYPE_PROMPT = (
    "[Image 1] is a garment image. Classify the garment as upper-body clothing (tops, shirts, "
    "jackets), lower-body clothing (trousers, skirts, shorts) or full-body clothing (dresses, "
    'jumpsuits, suits worn as one outfit). Answer with only a JSON object: {"garment_type": '
    '"upper" | "lower" | "full"}.'
)
RETRIEVE_PROMPT = (
    "[Image 1] shows a person. The following images are candidate garments, numbered from 0. Pick "
    "the candidate that would look most natural on this person in this scene, replacing their "
    "current {kind} clothing, and that clearly differs from what they wear now. Answer with only a "
    'JSON object: {{"choice": <number>}}.'
)
REFERENCE_CHECK = (
    "[Image 1] is an original photo of a person; [Image 2] is the same photo after a virtual "
    "try-on that should replace only the person's {kind} clothing with the garment in [Image 3]. "
    "Check that everything else (face, hair, body, pose, other clothing, accessories, background) is "
    "unchanged and that the new garment is worn. " + VERDICT_FORMAT
)
GARMENT_TYPES = ("upper", "lower", "full")
TRANSPORT_KINDS = frozenset({"transport", "http"})

Part = tuple[str, str]  # ("text", text) | ("image", base64 JPEG)


# ---- answer parsers (strict: raise InvalidAnswer("malformed", ...) -> retried) ---------
def _norm(key: str) -> str:
    return re.sub(r"[\s_\-]+", "_", key.strip().lower())


def _first_object(text: str | None) -> dict:
    if not text or not text.strip():
        raise InvalidAnswer("malformed", "empty answer")
    objects = json_objects(text)
    if not objects:
        raise InvalidAnswer("malformed", f"no JSON object in the answer: {text[:80]!r}")
    return {_norm(k): v for k, v in objects[0].items() if isinstance(k, str)}


CAPTION_FIELDS = ("cn_long", "cn_short", "en_long", "en_short")


def parse_captions(text: str | None) -> dict[str, list[str]]:
    """The four fields of the paper's caption format, each [dynamic, static] non-empty strings."""
    obj = _first_object(text)
    out = {}
    for name in CAPTION_FIELDS:
        value = obj.get(name)
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v.strip() for v in value)):
            raise InvalidAnswer("malformed", f"field {name!r} must be an array of two non-empty strings, got {value!r}")
        out[name] = [v.strip() for v in value]
    return out


def parse_verdict(text: str | None) -> dict[str, Any]:
    obj = _first_object(text)
    value = obj.get("pass", obj.get("valid"))
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "false", "no"):
        value = value.strip().lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise InvalidAnswer("malformed", f'"pass" must be a boolean, got {value!r}')
    return {"pass": value, "reason": str(obj.get("reason", ""))[:300]}


def parse_garment_type(text: str | None) -> dict[str, str]:
    value = str(_first_object(text).get("garment_type", "")).strip().lower()
    value = {"upper-body": "upper", "lower-body": "lower", "full-body": "full"}.get(value, value)
    if value not in GARMENT_TYPES:
        raise InvalidAnswer("malformed", f"garment_type must be one of {GARMENT_TYPES}, got {value!r}")
    return {"garment_type": value}


def choice_parser(n: int) -> Callable[[str | None], dict[str, int]]:
    def parse(text: str | None) -> dict[str, int]:
        value = _first_object(text).get("choice")
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
            raise InvalidAnswer("malformed", f"choice must be an integer in [0, {n}), got {value!r}")
        return {"choice": value}

    return parse


# ---- client -----------------------------------------------------------------------------
@dataclass
class Outcome:
    value: dict | None
    kind: str | None = None  # None: ok; "refused" | "malformed" | "transport" | "http"
    reason: str | None = None
    attempts: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.value is not None


class _RateLimiter:
    """At most `rate` calls per second in this process (shared by every client of a URL)."""

    _all: ClassVar[dict[str, _RateLimiter]] = {}
    _guard = threading.Lock()

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_t = 0.0
        self.lock = threading.Lock()

    @classmethod
    def get(cls, url: str, rate: float) -> _RateLimiter:
        with cls._guard:
            if url not in cls._all:
                cls._all[url] = cls(rate)
            return cls._all[url]

    def wait(self, sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
        if self.interval <= 0:
            return
        with self.lock:
            now = clock()
            start = max(now, self.next_t)
            self.next_t = start + self.interval
        if start > now:
            sleep(start - now)


def image_part(img: Image.Image | np.ndarray, cfg: VLMConfig) -> Part:
    return ("image", encode_jpeg(img, cfg.max_side, cfg.jpeg_quality))


class VLMClient:
    def __init__(
        self,
        cfg: VLMConfig,
        cache: ObjectStore | None = None,
        cache_key: Callable[[str], str] = lambda digest: f"_cache/vlm/{digest}.json",
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not cfg.configured:
            raise ValueError("the VLM needs base_url and model")
        self.cfg, self.cache, self.cache_key = cfg, cache if cfg.cache else None, cache_key
        self.sleep, self.clock = sleep, clock
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.limiter = _RateLimiter.get(self.url, cfg.requests_per_s)

    def _body(self, system: str, parts: list[Part]) -> dict:
        content = [
            {"type": "text", "text": v} if k == "text"
            else {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{v}"}}
            for k, v in parts
        ]  # fmt: skip
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
        }
        if self.cfg.temperature is not None:
            body["temperature"] = self.cfg.temperature
        if self.cfg.response_format == "json_object":
            body["response_format"] = {"type": "json_object"}
        return body

    def digest(self, name: str, system: str, parts: list[Part]) -> str:
        h = hashlib.sha256(json.dumps([self.cfg.model, name, system], ensure_ascii=False).encode())
        for k, v in parts:
            h.update(f"\n{k}:".encode())
            h.update(v.encode())
        return h.hexdigest()

    def _cached(self, digest: str) -> Outcome | None:
        if self.cache is None:
            return None
        try:
            data = json.loads(self.cache.get_bytes(self.cache_key(digest)))
        except ObjectNotFound:
            return None
        if "refusal" in data:
            return Outcome(None, "refused", f"refused: {data['refusal']}", 0, cached=True)
        return Outcome(data["value"], attempts=0, cached=True)

    def _store(self, digest: str, data: dict) -> None:
        if self.cache is not None:
            self.cache.put_bytes(self.cache_key(digest), json.dumps(data).encode(), content_type="application/json")

    def ask(self, name: str, system: str, parts: list[Part], parse: Callable[[str | None], dict]) -> Outcome:
        """One question; `name` separates questions with the same images in the cache."""
        digest = self.digest(name, system, parts)
        hit = self._cached(digest)
        if hit is not None:
            return hit
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {self.cfg.api_key.get_secret_value()}"
        body = self._body(system, parts)
        kind, reason = "transport", "no attempt"
        for attempt in range(self.cfg.max_attempts):
            self.limiter.wait(self.sleep, self.clock)
            try:
                answer = openai_answer(post_json(self.url, headers, body, self.cfg.timeout_s))
            except Transient as e:
                kind, reason = "transport", str(e)
                if attempt + 1 < self.cfg.max_attempts:
                    delay = e.retry_after_s if e.retry_after_s is not None else self.cfg.backoff_s * 2**attempt
                    self.sleep(min(delay, self.cfg.max_backoff_s))
                continue
            except Permanent as e:
                return Outcome(None, "http", str(e), attempt + 1)
            except InvalidAnswer as e:
                kind, reason = "malformed", str(e)
                continue
            if answer.refusal is not None:
                kind, reason = "refused", f"refused: {answer.refusal}"
                if self.cfg.retry_refusals and attempt + 1 < self.cfg.max_attempts:
                    continue
                self._store(digest, {"refusal": answer.refusal})
                return Outcome(None, kind, reason, attempt + 1)
            try:
                value = parse(answer.text)
            except InvalidAnswer as e:
                kind, reason = "malformed", str(e)
                continue
            self._store(digest, {"value": value})
            return Outcome(value, attempts=attempt + 1)
        return Outcome(None, kind, f"gave up after {self.cfg.max_attempts} attempts ({reason})", self.cfg.max_attempts)
