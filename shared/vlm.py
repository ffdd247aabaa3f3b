"""OpenAI-compatible chat-completions plumbing shared by the eval judge and data curation:
a JSON POST with transient/permanent error classes (Retry-After honoured), tolerant extraction
of JSON objects from model answers (fenced, chatty, trailing text), refusal detection, and
JPEG encoding of images for `image_url` parts. Standard library + Pillow only.
"""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
from PIL import Image

TRANSIENT_HTTP = frozenset({408, 409, 429, 500, 502, 503, 504})
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


class InvalidAnswer(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "malformed" | "out_of_range"


class Transient(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Permanent(Exception):
    pass


@dataclass
class Answer:
    text: str | None
    refusal: str | None = None


def _balanced_objects(text: str) -> list[str]:
    """Every top-level balanced {...} substring (string literals respected)."""
    out, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    return out


def json_objects(text: str) -> list[dict]:
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    candidates += _balanced_objects(text)
    found = []
    for c in candidates:
        try:
            obj = json.loads(c)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def encode_jpeg(img: Image.Image | np.ndarray, max_side: int, quality: int) -> str:
    """Base64 JPEG of `img`, downscaled so the longer side is at most `max_side` pixels."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    img = img.convert("RGB")
    scale = max_side / max(img.size)
    if scale < 1:
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC
        )
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def openai_answer(data: dict) -> Answer:
    choices = data.get("choices") or []
    if not choices:
        raise InvalidAnswer("malformed", "response has no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    if message.get("refusal"):
        return Answer(None, str(message["refusal"]))
    if choice.get("finish_reason") == "content_filter":
        return Answer(None, "finish_reason content_filter")
    content = message.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return Answer(content if isinstance(content, str) else None)


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def post_json(url: str, headers: dict, body: dict, timeout_s: float) -> dict:
    """POST JSON, return the decoded JSON reply; raises Transient / Permanent."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = e.read()[:200].decode("utf-8", "replace") if e.fp is not None else ""
        msg = f"HTTP {e.code}: {detail.strip()}"
        if e.code in TRANSIENT_HTTP:
            raise Transient(msg, _retry_after(e.headers)) from None
        raise Permanent(msg) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise Transient(f"connection error: {getattr(e, 'reason', e)}") from None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidAnswer("malformed", f"reply is not JSON: {raw[:80]!r}") from None
