"""Self-attention hooks of a streaming session over its KV cache, and the RoPE position policy.

The DiT delegates self-attention to a hook (`shared.models.dit.SelfAttention`). The hooks here
read and write a `SessionKVCache` (storage lives in `kv_cache`), decide the temporal RoPE
position of every key and query, and run the attention kernel the session selected:

* `CondAttention`: the cond forward; cond tokens attend only to cond tokens.
* `ChunkAttention`: a chunk's queries attend to cond + sink + window + the chunk itself (the
  hot path over a rotated cache); `ReferenceChunkAttention` is the same on an un-rotated cache.
* `rope_positions`: the position policy (which positions; the rotation mechanics are the
  cache's `align` and the hooks). `relative` (the default) numbers cond, sink, window and chunk
  in order so positions stay bounded however long the stream runs; `absolute` (ablation) uses
  the frame id since open.
"""

from __future__ import annotations

from typing import Literal

import torch

from shared.models.attention import attention
from shared.models.rope import RopeTable, apply_rope

from .kv_cache import AppendPlan, FrameSlots, SessionKVCache

RopePolicy = Literal["relative", "absolute"]


def rope_positions(
    slots: FrameSlots, policy: RopePolicy, cond_frames: int, n_query: int
) -> tuple[list[int], list[int]]:
    """Temporal RoPE positions: (one per valid slot in slot order, one per query frame).

    relative: cond 0..C-1, then sink, window (oldest first) and the query chunk in order, so
    positions never exceed C + M + chunk - 1. absolute: C + frame id since open.
    """
    if policy == "absolute":
        keys = [cond_frames + fid for fid in slots.slot_frame_ids()]
        queries = [cond_frames + slots.next_frame_id + j for j in range(n_query)]
        return keys, queries
    if policy != "relative":
        raise ValueError(f"unknown rope policy {policy!r}")
    keys = [0] * slots.num_valid
    for rank, slot in enumerate(range(len(slots.sink))):
        keys[slot] = cond_frames + rank
    for rank, (slot, _fid) in enumerate(slots.window):
        keys[slot] = cond_frames + len(slots.sink) + rank
    base = cond_frames + slots.num_valid
    return keys, [base + j for j in range(n_query)]


class CondAttention:
    """Self-attention hook for the cond forward: cond tokens attend only to cond tokens.

    Writes the K/V of the frames from `write_from` on (0 = reference and garment, 1 = garment
    only) into the cond segment. `backend` names the attention kernel (None = ambient default).
    """

    def __init__(self, cache: SessionKVCache, rope: RopeTable, write_from: int = 0, backend: str | None = None):
        self.cache = cache
        self.cos, self.sin = rope.cos_sin(list(range(cache.spec.cond_frames)))
        self.write_from = write_from
        self.backend = backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        skip = self.write_from * self.cache.spec.tokens_per_frame
        self.cache.write_cond(layer, k[:, skip:], v[:, skip:], first_frame=self.write_from)
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        return attention(q, k, v, backend=self.backend)


class ChunkAttention:
    """Self-attention hook for a chunk: its queries see cond + sink + window + the chunk itself.

    The hot path, on a rotated cache. Positions come from `rope_positions` once per chunk; the
    cache is then aligned to them (`SessionKVCache.align`: window keys were rotated when written,
    only cond/sink rows whose position moved are re-rotated) and the queries and the chunk's keys
    are rotated at position + the cache's offset. Per layer and forward the chunk's K/V land in
    the scratch rows right after the valid prefix and attention reads one contiguous slice: no
    copy of the cache, RoPE work proportional to the chunk. With `write=plan` (the context pass)
    the chunk's rotated K/V are committed into the plan's slots after attention (a copy only for
    the frames whose slot is not the scratch row they already occupy).

    With autograd on (training rollouts) the hook concatenates instead of writing the scratch,
    so a backward never sees buffers a later forward overwrote. `backend` names the kernel.
    """

    def __init__(
        self,
        cache: SessionKVCache,
        rope: RopeTable,
        policy: RopePolicy,
        n_frames: int,
        write: AppendPlan | None = None,
        backend: str | None = None,
    ):
        spec = cache.spec
        if not cache.rotated:
            raise ValueError("ChunkAttention needs a rotated cache; use ReferenceChunkAttention")
        self.cache = cache
        slot_pos, query_pos = rope_positions(cache.slots, policy, spec.cond_frames, n_frames)
        self.key_positions = list(range(spec.cond_frames)) + slot_pos + query_pos
        self.query_positions = query_pos
        self.delta = cache.align(rope, self.key_positions[: spec.cond_frames + len(slot_pos)])
        self.rotated_positions = [p + self.delta for p in query_pos]
        self.q_cos, self.q_sin = rope.cos_sin(self.rotated_positions)
        # Hooks with equal keys rotate their queries and keys alike (a batch rotates them at once).
        self.rotation_key = (id(rope), tuple(self.rotated_positions))
        self.prefix_tokens = cache.valid_tokens()
        self.scratch_fits = self.prefix_tokens + n_frames * spec.tokens_per_frame <= cache.k.shape[2]
        self.write = write
        self.backend = backend

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's queries and keys at their positions (+ the cache's offset): [B, L, H, D]."""
        return apply_rope(q, self.q_cos, self.q_sin), apply_rope(k, self.q_cos, self.q_sin)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qr, kr = self.rotate(q, k)
        return self.attend(layer, qr, kr, k, v)

    def attend(self, layer: int, q: torch.Tensor, kr: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of rotated queries `q` over the cache + the chunk's rotated keys `kr` (`k`: the
        same keys un-rotated, which the context pass stores beside them)."""
        cache, start = self.cache, self.prefix_tokens
        kr = kr.to(cache.k.dtype)
        vc = v.to(cache.v.dtype)
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        in_scratch = self.scratch_fits and not grad
        if in_scratch:
            end = start + k.shape[1]
            cache.k[layer, :, start:end].copy_(kr)
            cache.v[layer, :, start:end].copy_(vc)
            keys, values = cache.k[layer, :, :end], cache.v[layer, :, :end]
        else:
            keys = torch.cat([cache.k[layer, :, :start], kr], dim=1)
            values = torch.cat([cache.v[layer, :, :start], vc], dim=1)
        out = attention(q, keys.to(q.dtype), values.to(q.dtype), backend=self.backend)
        if self.write is not None:
            cache.store_rotated(
                layer, self.write.slots, kr.detach(), vc.detach(), k.detach().to(cache.k.dtype),
                self.rotated_positions, from_row=start if in_scratch else None,
            )  # fmt: skip
        return out


class ReferenceChunkAttention:
    """The reference chunk hook, on an un-rotated cache (`SessionKVCache(rotated=False)`): per
    layer and forward it concatenates the whole prefix with the chunk and rotates every key.
    Kept as the numerics reference of `ChunkAttention` (tests, `StreamingSession(reference_attention=True)`).

    Positions are fixed when the hook is built (once per chunk, reused by every denoising step).
    With `write=plan`, the chunk's un-rotated K/V go into the plan's slots after attention: the
    clean "context pass". `backend` names the attention kernel (None = ambient default).
    """

    def __init__(
        self,
        cache: SessionKVCache,
        rope: RopeTable,
        policy: RopePolicy,
        n_frames: int,
        write: AppendPlan | None = None,
        backend: str | None = None,
    ):
        spec = cache.spec
        self.cache = cache
        slot_pos, query_pos = rope_positions(cache.slots, policy, spec.cond_frames, n_frames)
        self.key_positions = list(range(spec.cond_frames)) + slot_pos + query_pos
        self.query_positions = query_pos
        self.k_cos, self.k_sin = rope.cos_sin(self.key_positions)
        self.q_cos, self.q_sin = rope.cos_sin(query_pos)
        # The prefix the positions describe. Frozen here so that a recomputed forward (activation
        # checkpointing in training rollouts) reads the same keys after later chunks were appended.
        self.prefix_tokens = cache.valid_tokens()
        self.write = write
        self.backend = backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.prefix(layer, self.prefix_tokens)  # [B, Lc, H, D]
        keys = apply_rope(torch.cat([ck, k.to(ck.dtype)], dim=1), self.k_cos, self.k_sin)
        values = torch.cat([cv, v.to(cv.dtype)], dim=1)
        q = apply_rope(q, self.q_cos, self.q_sin)
        out = attention(q, keys.to(q.dtype), values.to(q.dtype), backend=self.backend)
        if self.write is not None:
            self.cache.write_frames(layer, self.write.slots, k, v)
        return out
