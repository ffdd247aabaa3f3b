"""Prompt helpers of the service edge and the caches: validation, normalization, cache keys.

Plain string code, importable without torch or transformers: the CPU-only Studio gateway
validates prompts with it; `shared.models.text_encoder` encodes the cleaned prompt.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

_ALLOWED_CONTROL = frozenset("\t\n\r")
_PROMPT_KEY_VERSION = "fashionchameleon/prompt-key/v1"


def validate_prompt(prompt: str, max_chars: int = 2000) -> str:
    """Check a user prompt at the service edge and return it stripped of surrounding whitespace.

    Raises `ValueError` for a non-string, an empty or whitespace-only prompt, more than
    `max_chars` characters (Unicode code points, counted after stripping), a NUL byte, control
    characters other than tab/newline/carriage return, or lone surrogates (not valid UTF-8).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    text = prompt.strip()
    if not text:
        raise ValueError("prompt is empty or whitespace only")
    if len(text) > max_chars:
        raise ValueError(f"prompt is {len(text)} characters long; the limit is {max_chars}")
    if "\x00" in text:
        raise ValueError("prompt contains a NUL character")
    for i, ch in enumerate(text):
        category = unicodedata.category(ch)
        if category == "Cc" and ch not in _ALLOWED_CONTROL:
            raise ValueError(f"prompt contains control character U+{ord(ch):04X} at position {i}")
        if category == "Cs":
            raise ValueError(f"prompt contains a lone surrogate U+{ord(ch):04X} at position {i}")
    return text


def clean_prompt(prompt: str) -> str:
    """Normalize a prompt like diffusers' Wan `prompt_clean`, minus `ftfy` (kept dependency-free):
    HTML entities unescaped (twice), runs of whitespace collapsed to one space, ends stripped."""
    text = html.unescape(html.unescape(prompt)).strip()
    return re.sub(r"\s+", " ", text).strip()


def prompt_key(prompt: str, model_id: str) -> str:
    """Content hash (sha256 hex, 64 chars) of a prompt's embedding for `model_id`, for caches.

    Hashes the cleaned prompt, so prompts that encode identically share a key. `model_id` must
    identify everything else the embedding depends on (weights, tokenizer, max_length).
    """
    h = hashlib.sha256()
    for part in (_PROMPT_KEY_VERSION, model_id, clean_prompt(prompt)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: no ambiguous concatenation
        h.update(data)
    return h.hexdigest()
