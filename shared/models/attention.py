"""Attention backends in one registry: `math` (reference), `sdpa` (PyTorch), `flash` (flash-attn).

All backends take q [B, Lq, H, D], k/v [B, Lk, H, D] and an optional boolean mask [Lq, Lk]
(True = may attend) and return [B, Lq, H, D]. `auto` picks the fastest backend whose
constraints the call meets. CPU numerics tests compare against `math`.

Selecting a backend is not process-global state. An engine (and each session it opens) passes
its backend name down to its attention hooks (`attention(..., backend=name)`), so two engines
with different backends run side by side in threads. Code without an engine (training steps,
tests) can set an ambient default with `use_attention_backend(name)`: a context variable, so
it holds for the current thread / asyncio task only. An explicit `backend` wins over it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: AttentionFn
    supports: Callable[[torch.Tensor, torch.Tensor | None], bool]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


_FLASH_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional GPU extra

    return flash_attn_func(q, k, v)


def _flash_supports(q: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return _FLASH_AVAILABLE and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


BACKENDS: dict[str, AttentionBackend] = {
    "math": AttentionBackend("math", _math, lambda q, m: True),
    "sdpa": AttentionBackend("sdpa", _sdpa, lambda q, m: True),
    "flash": AttentionBackend("flash", _flash, _flash_supports),
}
_AUTO_ORDER = ("flash", "sdpa")
# The ambient default of this thread / task (`use_attention_backend`); engines pass theirs explicitly.
_ambient: contextvars.ContextVar[str] = contextvars.ContextVar("attention_backend", default="auto")


def check_backend(name: str) -> str:
    """`name` if it selects a usable backend (`auto` or a registry entry), else ValueError."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto or one of {sorted(BACKENDS)}")
    if name == "flash" and not _FLASH_AVAILABLE:
        raise ValueError("attention backend 'flash' needs the flash-attn package (the `gpu` extra)")
    return name


def current_backend() -> str:
    """The ambient default of the calling thread / task."""
    return _ambient.get()


@contextlib.contextmanager
def use_attention_backend(name: str) -> Iterator[None]:
    """Make `name` the ambient default inside the block, for this thread / task only."""
    token = _ambient.set(check_backend(name))
    try:
        yield
    finally:
        _ambient.reset(token)


def resolve_backend(q: torch.Tensor, mask: torch.Tensor | None = None, name: str | None = None) -> AttentionBackend:
    """The backend a call runs on: `name` (None = the ambient default), `auto` resolved per call."""
    name = _ambient.get() if name is None else name
    if name != "auto":
        backend = BACKENDS[check_backend(name)]
        if not backend.supports(q, mask):
            raise ValueError(f"attention backend {name!r} does not support this call ({q.device}, {q.dtype})")
        return backend
    for candidate in _AUTO_ORDER:
        if BACKENDS[candidate].supports(q, mask):
            return BACKENDS[candidate]
    return BACKENDS["sdpa"]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """Scaled dot-product attention, [B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D].

    `backend` names the kernel (None = the ambient default of this thread / task)."""
    return resolve_backend(q, mask, backend).fn(q, k, v, mask)
