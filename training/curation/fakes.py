"""Synthetic raw videos and local stand-in endpoints for tests and smoke runs (no weights).

- `write_raw_video` / `ShotSpec`: videos with hard cuts at known frames; each shot has its own
  background, 0-2 cartoon "people" (skin-coloured head, coloured top, dark legs) moving at a
  given speed, and mild texture so the quality scorers see a real image.
- `SkinBlobDetector`: a PersonDetector plugin that counts skin-coloured heads (test stand-in
  for YOLO-seg): `person.backend = "training.curation.fakes:SkinBlobDetector"`.
- `CrashingDetector`: SkinBlobDetector that raises on a two-person frame while the file
  `person.weights` exists (simulates a crash half-way through a run; test only).
- `FakeEndpoints`: one http.server on 127.0.0.1 speaking OpenAI chat-completions (canned
  answers per question, scriptable: malformed JSON, refusals, HTTP errors, delays) and the
  JSON images/edits variant of edit.py (try-off: the garment crop on white; try-on: the
  person with the top recoloured). Counts requests per question and remembers request digests.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image, ImageDraw

from .config import PersonConfig
from .vlm import CAPTION_PROMPT

SKIN = (205, 160, 130)


@dataclass(frozen=True)
class ShotSpec:
    seconds: float
    people: int = 1
    speed: float = 1.0  # pixels per frame (horizontal)
    background: tuple[int, int, int] = (200, 200, 210)
    garment: tuple[int, int, int] = (200, 40, 40)


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-12, 13, size=(h, w, 1)).astype(np.int16)


def render_shot(spec: ShotSpec, fps: float, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [round(seconds * fps), H, W, 3]."""
    n = round(spec.seconds * fps)
    tex = _texture(height, width, seed)
    frames = []
    for t in range(n):
        img = Image.new("RGB", (width, height), spec.background)
        d = ImageDraw.Draw(img)
        for p in range(spec.people):
            cx = int(width * (0.25 + 0.5 * p) + spec.speed * t)
            s = width // 10
            d.ellipse([cx - s, height // 10, cx + s, height // 10 + 2 * s], fill=SKIN)  # head
            top = [cx - int(1.6 * s), height // 10 + 2 * s, cx + int(1.6 * s), int(height * 0.7)]
            d.rectangle(top, fill=spec.garment)
            d.rectangle([cx - s, int(height * 0.7), cx + s, height - 2], fill=(40, 40, 60))  # legs
        frame = np.asarray(img, dtype=np.int16) + tex
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_raw_video(path: str | Path, shots: list[ShotSpec], fps: float = 8, height: int = 64, width: int = 96,
                    seed: int = 0) -> list[int]:  # fmt: skip
    """Write an MP4 of the shots back to back; returns the cut frames (first frame of shots 2..)."""
    from shared.media.video import write_mp4

    parts = [render_shot(s, fps, height, width, seed + i) for i, s in enumerate(shots)]
    write_mp4(np.concatenate(parts), path, fps=fps, crf=16)
    return list(np.cumsum([len(p) for p in parts])[:-1])


def write_catalog(store, prefix: str = "garments/", per_type: int = 2) -> list[str]:
    """Solid-colour garment images under {prefix}{upper|lower|full}/."""
    keys = []
    colours = [(40, 160, 60), (60, 80, 200), (230, 200, 40), (150, 60, 170)]
    for kind in ("upper", "lower", "full"):
        for i in range(per_type):
            img = Image.new("RGB", (48, 64), "white")
            ImageDraw.Draw(img).rectangle([8, 8, 40, 56], fill=colours[i % len(colours)])
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            key = f"{prefix}{kind}/g{i}.png"
            store.put_bytes(key, buf.getvalue(), content_type="image/png")
            keys.append(key)
    return keys


# ---- fake person detectors -------------------------------------------------------------
class SkinBlobDetector:
    """People = skin-coloured blobs; a person's area is 6x their head's (head + top + legs)."""

    available = True
    why_unavailable = ""

    def __init__(self, cfg: PersonConfig):
        self.cfg = cfg

    def detect(self, frame: np.ndarray) -> list[float]:
        import cv2

        lo = np.array([max(0, c - 30) for c in SKIN], np.uint8)
        hi = np.array([min(255, c + 30) for c in SKIN], np.uint8)
        mask = cv2.inRange(frame, lo, hi)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask)
        areas = [stats[i, cv2.CC_STAT_AREA] for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= 12]
        return [min(1.0, 6 * a / mask.size) for a in areas]


class CrashingDetector(SkinBlobDetector):
    """Raises on frames with two or more people while the file `cfg.weights` exists."""

    def detect(self, frame: np.ndarray) -> list[float]:
        areas = super().detect(frame)
        if sum(a > 0.05 for a in areas) > 1 and self.cfg.weights is not None and Path(self.cfg.weights).exists():
            raise RuntimeError("simulated crash (marker file present)")
        return areas


# ---- fake endpoints ----------------------------------------------------------------------
GOOD = {
    "caption": json.dumps(
        {
            "cn long": ["人物向左走。", "明亮的房间里，一个人穿着红色上衣。"],
            "cn short": ["人物走动。", "红色上衣。"],
            "en long": ["The person walks to the left across the frame.", "A person in a red top in a bright room."],
            "en short": ["A person walks.", "Red top, bright room."],
        },
        ensure_ascii=False,
    ),
    "garment_semantic": '{"pass": true, "reason": "same category and colour"}',
    "garment_textural": '{"pass": true, "reason": "texture matches"}',
    "garment_context": '{"pass": true, "reason": "garment only"}',
    "garment_type": '{"garment_type": "upper"}',
    "retrieve": '{"choice": 1}',
    "reference_check": '{"pass": true, "reason": "only the top changed"}',
}


def question_of(system: str) -> str:
    if system == CAPTION_PROMPT:
        return "caption"
    for marker, name in (("Semantic consistency", "garment_semantic"), ("Textural consistency", "garment_textural"),
                         ("Non-garment context", "garment_context"), ("Classify the garment", "garment_type"),
                         ("candidate garments", "retrieve"), ("virtual try-on", "reference_check")):  # fmt: skip
        if marker in system:
            return name
    return "unknown"


@dataclass
class Reply:
    """One scripted reply: `text` as the message content, or a `refusal`, or HTTP `status`;
    `delay_s` first (longer than the client's timeout = a timeout)."""

    text: str | None = None
    refusal: str | None = None
    status: int = 200
    delay_s: float = 0.0
    finish_reason: str = "stop"


class FakeEndpoints:
    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = defaultdict(list)  # question -> replies, then GOOD
        self.counts: Counter = Counter()  # question -> requests received
        self.answered: Counter = Counter()  # request digest -> successful answers sent
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.endswith("/chat/completions"):
                    outer._chat(self, body)
                elif self.path.endswith("/images/edits"):
                    outer._edit(self, body)
                else:
                    self.send_error(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _next(self, question: str) -> Reply | None:
        with self.lock:
            self.counts[question] += 1
            return self.script[question].pop(0) if self.script[question] else None

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def _chat(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        req = json.loads(body)
        question = question_of(req["messages"][0]["content"])
        reply = self._next(question) or Reply(text=GOOD.get(question, "{}"))
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            return self._send(h, reply.status, {"error": {"message": "scripted error"}})
        message = {"role": "assistant", "content": reply.text, "refusal": reply.refusal}
        if reply.refusal is None and reply.text is not None:
            with self.lock:
                self.answered[hashlib.sha256(body).hexdigest()] += 1
        self._send(h, 200, {"choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}]})

    def _edit(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        req = json.loads(body)
        images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in req["images"]]
        reply = self._next("try_off" if len(images) == 1 else "try_on")
        if reply is not None and reply.delay_s:
            time.sleep(reply.delay_s)
        if reply is not None and reply.status != 200:
            return self._send(h, reply.status, {"error": {"message": "scripted error"}})
        seed = int(req.get("seed", 0))  # a real edit model gives another image per seed; so does this one
        out = _try_off(images[0], seed) if len(images) == 1 else _try_on(images[0], images[1], seed)
        out.putpixel((0, 0), (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        self._send(h, 200, {"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]})


def _try_off(person: Image.Image, seed: int) -> Image.Image:
    w, h = person.size
    dx = seed % 5
    crop = person.crop((w // 4 + dx, h // 4, 3 * w // 4 + dx, 3 * h // 4))
    out = Image.new("RGB", (w // 2 + 16, h // 2 + 16), "white")
    out.paste(crop, (8, 8))
    return out


def _try_on(person: Image.Image, garment: Image.Image, seed: int) -> Image.Image:
    arr = np.asarray(person).copy()
    colour = np.asarray(garment).reshape(-1, 3)
    colour = colour[(colour < 240).any(axis=1)].mean(axis=0) if (colour < 240).any() else colour.mean(axis=0)
    h = arr.shape[0]
    top = int(h * 0.4) + seed % 3
    arr[top : int(h * 0.7)] = (0.5 * arr[top : int(h * 0.7)] + 0.5 * colour).astype(np.uint8)
    return Image.fromarray(arr)
