"""Per-session KV cache: cond | sink | window segments (paper Eq. 7).

Three layers, in the vLLM spirit:

* `KVCacheSpec`: frozen geometry; knows its size in bytes. No tensors.
* `FrameSlots`: host-side bookkeeping in plain integers: which slot holds which latent frame,
  FIFO eviction, and the RoPE frame positions of every slot. No tensors and no device syncs,
  so it is unit-tested on exact slot ids.
* `SessionKVCache`: the tensors, one K and one V buffer for all layers:
  [layers, B, cond_tokens + M * tokens_per_frame, H, D]. Keys are stored un-rotated and rotated
  at attention time from the positions `FrameSlots` reports. That is the cache-relative policy:
  positions stay bounded however long the stream runs.

Slot layout of the video region: slots [0, S) hold the sink, the first S latent frames written
after open or after a withdraw. Slots [S, M) form a ring for the window. Slots fill in order,
so the occupied slots are always the prefix [0, num_valid). Attention therefore reads one
contiguous slice, and the slice order does not matter because every key carries its own position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from shared.models.attention import attention
from shared.models.presets import Preset
from shared.models.rope import RopeTable, apply_rope

RopePolicy = Literal["relative", "absolute"]


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_heads: int
    head_dim: int
    tokens_per_frame: int
    cond_frames: int  # reference + garment latent frames
    sink_frames: int  # S
    max_frames: int  # M: sink + window latent frames
    chunk_frames: int
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_preset(
        cls, preset: Preset, dtype: torch.dtype = torch.bfloat16, height: int | None = None, width: int | None = None
    ) -> "KVCacheSpec":
        st = preset.streaming
        return cls(
            num_layers=preset.dit.num_layers,
            num_heads=preset.dit.num_attention_heads,
            head_dim=preset.dit.attention_head_dim,
            tokens_per_frame=preset.tokens_per_frame(height, width),
            cond_frames=st.cond_frames,
            sink_frames=st.sink_frames,
            max_frames=st.max_cache_frames,
            chunk_frames=st.chunk_frames,
            dtype=dtype,
        )

    @property
    def window_frames(self) -> int:
        return self.max_frames - self.sink_frames

    @property
    def cond_tokens(self) -> int:
        return self.cond_frames * self.tokens_per_frame

    @property
    def tokens(self) -> int:
        """Token rows per layer: cond + M frames."""
        return self.cond_tokens + self.max_frames * self.tokens_per_frame

    @property
    def bytes_per_token(self) -> int:
        """K and V over all layers for one token."""
        itemsize = self.dtype.itemsize  # no tensor allocation: callers include event loops
        return 2 * self.num_layers * self.num_heads * self.head_dim * itemsize

    @property
    def bytes_per_frame(self) -> int:
        return self.tokens_per_frame * self.bytes_per_token

    @property
    def bytes(self) -> int:
        """Bytes one session's cache allocates (batch 1)."""
        return self.tokens * self.bytes_per_token

    @property
    def max_frame_position(self) -> int:
        """Largest temporal RoPE position under the relative policy (the trained range)."""
        return self.cond_frames + self.max_frames + self.chunk_frames - 1


@dataclass(frozen=True)
class AppendPlan:
    """Where the next `len(slots)` frames go; computed before a forward, committed after it."""

    slots: tuple[int, ...]
    frame_ids: tuple[int, ...]
    evicted: tuple[int, ...]  # frame ids leaving the window


class FrameSlots:
    """Slot bookkeeping for the video region of one session's cache (host-side integers only)."""

    def __init__(self, sink_frames: int, max_frames: int):
        if not 0 < sink_frames < max_frames:
            raise ValueError("need 0 < sink_frames < max_frames")
        self.sink_frames = sink_frames
        self.max_frames = max_frames
        self.next_frame_id = 0  # latent frames generated since open (never reset)
        self.sink: list[int] = []  # frame ids in slots 0..len-1
        self.window: deque[tuple[int, int]] = deque()  # (slot, frame id), oldest first
        self._window_writes = 0

    @property
    def window_capacity(self) -> int:
        return self.max_frames - self.sink_frames

    @property
    def num_valid(self) -> int:
        return len(self.sink) + len(self.window)

    def reset(self) -> None:
        """Withdraw sink and window (the next frames become the new sink)."""
        self.sink.clear()
        self.window.clear()
        self._window_writes = 0

    def plan_append(self, n: int) -> AppendPlan:
        slots, ids, evicted = [], [], []
        sink_len = len(self.sink)
        window = list(self.window)
        writes = self._window_writes
        for i in range(n):
            fid = self.next_frame_id + i
            if sink_len < self.sink_frames:
                slots.append(sink_len)
                sink_len += 1
            else:
                slot = self.sink_frames + writes % self.window_capacity
                writes += 1
                if len(window) == self.window_capacity:
                    old_slot, old_id = window.pop(0)
                    assert old_slot == slot, "ring order broken"
                    evicted.append(old_id)
                window.append((slot, fid))
                slots.append(slot)
            ids.append(fid)
        return AppendPlan(tuple(slots), tuple(ids), tuple(evicted))

    def commit(self, plan: AppendPlan) -> None:
        assert len(plan.slots) == len(plan.frame_ids), "malformed plan"
        for slot, fid in zip(plan.slots, plan.frame_ids):
            if slot < self.sink_frames:
                assert slot == len(self.sink)
                self.sink.append(fid)
            else:
                if len(self.window) == self.window_capacity:
                    self.window.popleft()
                self.window.append((slot, fid))
                self._window_writes += 1
        self.next_frame_id = plan.frame_ids[-1] + 1 if plan.frame_ids else self.next_frame_id

    def slot_frame_ids(self) -> list[int]:
        """Frame id held by each valid slot, indexed by slot (slots are the prefix 0..num_valid-1)."""
        ids = list(self.sink) + [0] * len(self.window)
        for slot, fid in self.window:
            ids[slot] = fid
        return ids

    def positions(self, policy: RopePolicy, cond_frames: int, n_query: int) -> tuple[list[int], list[int]]:
        """Temporal RoPE positions: (one per valid slot in slot order, one per query frame).

        relative: cond 0..C-1, then sink, window (oldest first) and the query chunk in order, so
        positions never exceed C + M + chunk - 1. absolute: C + frame id since open.
        """
        if policy == "absolute":
            keys = [cond_frames + fid for fid in self.slot_frame_ids()]
            queries = [cond_frames + self.next_frame_id + j for j in range(n_query)]
            return keys, queries
        if policy != "relative":
            raise ValueError(f"unknown rope policy {policy!r}")
        keys = [0] * self.num_valid
        for rank, slot in enumerate(range(len(self.sink))):
            keys[slot] = cond_frames + rank
        for rank, (slot, _fid) in enumerate(self.window):
            keys[slot] = cond_frames + len(self.sink) + rank
        base = cond_frames + self.num_valid
        return keys, [base + j for j in range(n_query)]


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Group slots into contiguous runs: (first slot, offset into the write, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][0] + runs[-1][2] == s:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, i, 1))
    return runs


class SessionKVCache:
    """K/V tensors of one session plus its slot bookkeeping."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu", batch: int = 1):
        self.spec = spec
        shape = (spec.num_layers, batch, spec.tokens, spec.num_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.slots = FrameSlots(spec.sink_frames, spec.max_frames)

    @property
    def bytes_allocated(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def valid_tokens(self) -> int:
        return self.spec.cond_tokens + self.slots.num_valid * self.spec.tokens_per_frame

    def prefix(self, layer: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated K, V of cond + valid frames: [B, valid_tokens, H, D] views (or the first `tokens`)."""
        n = self.valid_tokens() if tokens is None else tokens
        return self.k[layer, :, :n], self.v[layer, :, :n]

    def cond(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.spec.cond_tokens
        return self.k[layer, :, :c], self.v[layer, :, :c]

    def write_cond(self, layer: int, k: torch.Tensor, v: torch.Tensor, first_frame: int = 0) -> None:
        """Write cond K/V [B, n_frames * N, H, D] starting at cond frame `first_frame`."""
        start = first_frame * self.spec.tokens_per_frame
        self.k[layer, :, start : start + k.shape[1]].copy_(k)
        self.v[layer, :, start : start + v.shape[1]].copy_(v)

    def write_frames(self, layer: int, slots: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of len(slots) frames ([B, len(slots) * N, H, D]) into their slots."""
        n = self.spec.tokens_per_frame
        base = self.spec.cond_tokens
        for slot, offset, length in slot_runs(slots):
            dst = slice(base + slot * n, base + (slot + length) * n)
            src = slice(offset * n, (offset + length) * n)
            self.k[layer, :, dst].copy_(k[:, src])
            self.v[layer, :, dst].copy_(v[:, src])

    def withdraw(self) -> None:
        """Drop sink and window; the cond segment stays."""
        self.slots.reset()


class CondAttention:
    """Self-attention hook for the cond forward: cond tokens attend only to cond tokens.

    Writes the K/V of the frames from `write_from` on (0 = reference and garment, 1 = garment
    only) into the cond segment.
    """

    def __init__(self, cache: SessionKVCache, rope: RopeTable, write_from: int = 0):
        self.cache = cache
        self.cos, self.sin = rope.cos_sin(list(range(cache.spec.cond_frames)))
        self.write_from = write_from

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        skip = self.write_from * self.cache.spec.tokens_per_frame
        self.cache.write_cond(layer, k[:, skip:], v[:, skip:], first_frame=self.write_from)
        return attention(apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin), v)


class ChunkAttention:
    """Self-attention hook for a chunk: its queries see cond + sink + window + the chunk itself.

    Positions are fixed when the hook is built (once per chunk, reused by every denoising step).
    With `write=plan`, the chunk's un-rotated K/V go into the plan's slots after attention: the
    clean "context pass".
    """

    def __init__(
        self, cache: SessionKVCache, rope: RopeTable, policy: RopePolicy, n_frames: int, write: AppendPlan | None = None
    ):
        spec = cache.spec
        self.cache = cache
        slot_pos, query_pos = cache.slots.positions(policy, spec.cond_frames, n_frames)
        self.key_positions = list(range(spec.cond_frames)) + slot_pos + query_pos
        self.query_positions = query_pos
        self.k_cos, self.k_sin = rope.cos_sin(self.key_positions)
        self.q_cos, self.q_sin = rope.cos_sin(query_pos)
        # The prefix the positions describe. Frozen here so that a recomputed forward (activation
        # checkpointing in training rollouts) reads the same keys after later chunks were appended.
        self.prefix_tokens = cache.valid_tokens()
        self.write = write

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.prefix(layer, self.prefix_tokens)  # [B, Lc, H, D]
        keys = apply_rope(torch.cat([ck, k.to(ck.dtype)], dim=1), self.k_cos, self.k_sin)
        values = torch.cat([cv, v.to(cv.dtype)], dim=1)
        out = attention(apply_rope(q, self.q_cos, self.q_sin), keys.to(q.dtype), values.to(q.dtype))
        if self.write is not None:
            self.cache.write_frames(layer, self.write.slots, k, v)
        return out
