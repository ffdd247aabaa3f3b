"""Masked self-attention hooks for training sequences.

`DenseAttention` (shared) takes a boolean [L, L] token mask: exact and simple, but the mask is
L^2 bytes (38,720^2 = 1.5 GB for a 5B teacher-forcing sequence). `FlexAttention` evaluates the
same frame-level mask inside `torch.nn.attention.flex_attention` from a BlockMask, never
materialising it; on GPU it is compiled into a fused kernel. CPU tests use the dense path and
check the flex path against it.
"""

from __future__ import annotations

import functools

import torch

from shared.models.dit import DenseAttention
from shared.models.masks import expand_to_tokens
from shared.models.rope import RopeTable, apply_rope


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class FlexAttention:
    """RoPE at `frame_positions` + flex attention under a frame-level mask [Lf, Lf]."""

    def __init__(
        self, rope: RopeTable, frame_positions: list[int], frame_mask: torch.Tensor, compile: bool | None = None
    ):
        from torch.nn.attention.flex_attention import create_block_mask

        self.cos, self.sin = rope.cos_sin(frame_positions)
        n = rope.tokens_per_frame
        frames = frame_mask.to(rope.device)
        length = frames.shape[0] * n

        def mask_mod(b, h, q_idx, kv_idx):
            return frames[q_idx // n, kv_idx // n]

        self.block_mask = create_block_mask(mask_mod, None, None, length, length, device=rope.device)
        self.compile = rope.device.type == "cuda" if compile is None else compile

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if self.compile else flex_attention
        q = apply_rope(q, self.cos, self.sin).transpose(1, 2)  # [B, H, L, D]
        k = apply_rope(k, self.cos, self.sin).transpose(1, 2)
        out = fn(q, k, v.transpose(1, 2), block_mask=self.block_mask)
        return out.transpose(1, 2)  # [B, L, H, D]


def masked_attention(kind: str, rope: RopeTable, frame_positions: list[int], frame_mask: torch.Tensor | None):
    """The attention hook of a training forward: dense (bool token mask) or flex (BlockMask)."""
    if kind == "dense":
        mask = None if frame_mask is None else expand_to_tokens(frame_mask, rope.tokens_per_frame).to(rope.device)
        return DenseAttention(rope, frame_positions, mask)
    if kind == "flex":
        if frame_mask is None:
            return DenseAttention(rope, frame_positions, None)
        return FlexAttention(rope, frame_positions, frame_mask)
    raise ValueError(f"unknown attention kind {kind!r} (dense or flex)")
