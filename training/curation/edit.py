"""Image-edit endpoints for try-off (stage 3) and try-on (stage 4).

`ImageEditor.edit(images, prompt, seed)` returns one RGB image or raises `EditFailed`. The
"http" backend speaks a JSON variant of the OpenAI images/edits API (one JSON body instead
of multipart, which serving stacks for Qwen-Image-Edit and similar models accept behind a thin
adapter):

    POST {base_url}/images/edits
    {"model": ..., "prompt": ..., "images": ["<base64 PNG>", ...], "seed": 0, "n": 1,
     "response_format": "b64_json"}
    -> {"data": [{"b64_json": "<base64 PNG or JPEG>"}]}

Transient HTTP errors / timeouts are retried `max_attempts` times with backoff; other errors
and undecodable replies raise `EditFailed` (the stage then drops or re-tries the clip).
Any other backend string is a plugin "package.module:factory" called with the EditConfig.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from collections.abc import Callable
from typing import Protocol

from PIL import Image

from shared.vlm import InvalidAnswer, Permanent, Transient, post_json

from .config import EditConfig
from .filters import plugin

TRY_OFF_PROMPT = (
    "Extract the garment worn by the person in the image and show it alone, flat and complete, "
    "centred on a plain white background, with no person, body parts or scene."
)
TRY_ON_PROMPT = (
    "Dress the person in image 1 in the {kind} garment shown in image 2, replacing only their {kind} "
    "clothing. Keep the face, hair, body, pose, other clothing, accessories and background unchanged."
)


class EditFailed(RuntimeError):
    pass


class ImageEditor(Protocol):
    def edit(self, images: list[Image.Image], prompt: str, seed: int) -> Image.Image: ...


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class HttpImageEditor:
    def __init__(self, cfg: EditConfig, sleep: Callable[[float], None] = time.sleep):
        if not cfg.base_url:
            raise ValueError("the image-edit endpoint needs base_url")
        self.cfg, self.sleep = cfg, sleep
        self.url = cfg.base_url.rstrip("/") + "/images/edits"

    def edit(self, images: list[Image.Image], prompt: str, seed: int) -> Image.Image:
        cfg = self.cfg
        body = {"model": cfg.model, "prompt": prompt, "images": [png_b64(i) for i in images], "seed": seed,
                "n": 1, "response_format": "b64_json"}  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"
        reason = ""
        for attempt in range(cfg.max_attempts):
            try:
                data = post_json(self.url, headers, body, cfg.timeout_s)
            except Transient as e:
                reason = str(e)
                if attempt + 1 < cfg.max_attempts:
                    self.sleep(e.retry_after_s if e.retry_after_s is not None else cfg.backoff_s * 2**attempt)
                continue
            except (Permanent, InvalidAnswer) as e:
                raise EditFailed(str(e)) from None
            try:
                raw = base64.b64decode(data["data"][0]["b64_json"], validate=True)
                return Image.open(io.BytesIO(raw)).convert("RGB")
            except (KeyError, IndexError, TypeError, binascii.Error, OSError) as e:
                raise EditFailed(f"undecodable edit reply ({type(e).__name__})") from None
        raise EditFailed(f"gave up after {cfg.max_attempts} attempts ({reason})")


def build_editor(cfg: EditConfig) -> ImageEditor:
    if cfg.backend == "http":
        return HttpImageEditor(cfg)
    return plugin(cfg.backend)(cfg)
