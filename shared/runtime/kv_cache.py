"""Per-session KV cache storage: cond | sink | window segments (paper Eq. 7).

Storage only: the attention hooks that read and write it, and the RoPE position policy, live in
`shared.runtime.attention_hooks`. Three layers, in the vLLM spirit:

* `KVCacheSpec`: frozen geometry; knows its size in bytes. No tensors.
* `FrameSlots`: host-side bookkeeping in plain integers: which slot holds which latent frame
  and FIFO eviction. No tensors and no device syncs, so it is unit-tested on exact slot ids.
* `SessionKVCache`: the tensors, one K and one V buffer for all layers:
  [layers, B, cond_tokens + (M + chunk) * tokens_per_frame, H, D]: the last chunk rows are a
  scratch where a chunk's K/V land next to the valid prefix during its forwards. On the hot path
  keys are stored rotated (window keys once, when written; cond and sink keys re-rotated from an
  un-rotated copy when their relative position moves); see `SessionKVCache.align`.

Slot layout of the video region: slots [0, S) hold the sink, the first S latent frames written
after open or after a withdraw. Slots [S, M) form a ring for the window. Slots fill in order,
so the occupied slots are always the prefix [0, num_valid). Attention therefore reads one
contiguous slice, and the slice order does not matter because every key carries its own position.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from shared.models.presets import Preset
from shared.models.rope import apply_rope


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
    ) -> KVCacheSpec:
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
    def scratch_frames(self) -> int:
        """Rows after the M slots where a chunk's K/V land during its forwards, so attention reads
        one contiguous slice [0, valid + chunk) even when all M slots are valid."""
        return self.chunk_frames

    @property
    def tokens(self) -> int:
        """Token rows per layer of the K and V buffers: cond + M frames + the chunk scratch."""
        return self.cond_tokens + (self.max_frames + self.scratch_frames) * self.tokens_per_frame

    @property
    def base_tokens(self) -> int:
        """Rows of the un-rotated key copy of cond + sink (re-rotated when their position moves)."""
        return (self.cond_frames + self.sink_frames) * self.tokens_per_frame

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
        """Bytes one session's cache allocates (batch 1): K and V buffers + the un-rotated cond/sink keys."""
        return self.tokens * self.bytes_per_token + self.base_tokens * (self.bytes_per_token // 2)

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
        self.next_frame_id = 0  # latent frames generated since open (a withdraw keeps it; only a rewind steps back)
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
    """K/V tensors of one session plus its slot bookkeeping.

    `rotated=True` (the hot path): keys are stored RoPE-rotated, each frame row at the position
    `rot_pos[row]` records (host ints; rows are cond frames 0..C-1, then C + slot). Window keys
    are rotated once when written; the un-rotated keys of cond and sink frames are kept in
    `k_base` so they can be re-rotated when their position relative to the window moves.
    `rotated=False`: keys stored un-rotated, rotated at attention time by the reference hook.
    """

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu", batch: int = 1, rotated: bool = True):
        self.spec = spec
        shape = (spec.num_layers, batch, spec.tokens, spec.num_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.k_base = torch.zeros(
            (spec.num_layers, batch, spec.base_tokens, spec.num_heads, spec.head_dim), dtype=spec.dtype, device=device
        )
        self.slots = FrameSlots(spec.sink_frames, spec.max_frames)
        self.rotated = rotated
        self.rot_pos: list[int | None] = [None] * (spec.cond_frames + spec.max_frames + spec.scratch_frames)
        self.delta = 0  # the common offset added to every policy position (see `align`)
        self.max_delta = 4 * spec.max_frames  # stored rotations stay <= max_frame_position + this

    @property
    def bytes_allocated(self) -> int:
        return (self.k.numel() * 2 + self.k_base.numel()) * self.k.element_size()

    # ---- rotated storage (the hot path) --------------------------------------------------
    def _rows(self, first_row: int, frames: int) -> slice:
        n = self.spec.tokens_per_frame
        return slice(first_row * n, (first_row + frames) * n)

    def align(self, rope, positions: Sequence[int]) -> int:
        """Make the stored keys of cond + valid slots match `positions` (one per frame row, the
        policy's) up to one common offset `delta`, and return it: queries are then rotated at
        position + delta. RoPE scores depend only on position differences, so attention equals
        rotating everything at `positions`. `delta` is chosen so window rows (rotated once when
        written) need no work; cond and sink rows whose target moved are re-rotated from `k_base`
        (a few frames per chunk, all layers in one op). Host-side integers decide; no syncs."""
        c, s = self.spec.cond_frames, self.spec.sink_frames
        counts: dict[int, int] = {}
        for row in range(c + s, len(positions)):
            stored = self.rot_pos[row]
            if stored is not None:
                d = stored - positions[row]
                counts[d] = counts.get(d, 0) + 1
        delta = max(counts, key=lambda d: (counts[d], -abs(d))) if counts else self.delta
        if abs(delta) > self.max_delta:
            # Re-base so rotation angles stay bounded however long the stream runs: the window
            # rows are shifted in place once (a key lives W / chunk chunks in the window, less
            # than a re-base period, so it takes at most one extra rounding in its lifetime).
            delta = 0
        self.delta = delta
        stale = [row for row in range(len(positions)) if self.rot_pos[row] != positions[row] + delta]
        runs = [run for region in (range(c + s), range(c + s, len(positions)))
                for run in slot_runs([r for r in stale if r in region])]  # fmt: skip
        for first, _, length in runs:
            rows = self._rows(first, length)
            targets = [positions[r] + delta for r in range(first, first + length)]
            if first + length <= c + s:  # from the un-rotated copy
                cos, sin = rope.cos_sin(targets)
                src = self.k_base[:, :, rows]
            else:  # a window row the policy moved on its own: shift it in place (one more rounding)
                was = [self.rot_pos[r] for r in range(first, first + length)]
                if any(p is None for p in was):
                    raise RuntimeError("window keys written without a rotation (use the hooks' write path)")
                cos, sin = rope.shift_cos_sin([t - int(p or 0) for p, t in zip(was, targets, strict=True)])
                src = self.k[:, :, rows]
            self.k[:, :, rows].copy_(_rotate_all_layers(src, cos, sin))
            self.rot_pos[first : first + length] = targets
        return delta

    def store_rotated(
        self,
        layer: int,
        slots: Sequence[int],
        k_rot: torch.Tensor,
        v: torch.Tensor,
        k_raw: torch.Tensor,
        positions: Sequence[int],
        from_row: int | None = None,
    ) -> None:
        """Commit len(slots) frames: rotated keys (at `positions`) and values into their slots, and
        the un-rotated keys of sink slots into `k_base`. `from_row`: the frames already sit in the
        main buffer at token row `from_row` (the scratch), so only frames elsewhere are copied."""
        n, c = self.spec.tokens_per_frame, self.spec.cond_frames
        base = self.spec.cond_tokens
        for slot, offset, length in slot_runs(slots):
            src = slice(offset * n, (offset + length) * n)
            dst = slice(base + slot * n, base + (slot + length) * n)
            if from_row is None or dst.start != from_row + src.start:
                self.k[layer, :, dst].copy_(k_rot[:, src])
                self.v[layer, :, dst].copy_(v[:, src])
            for j in range(length):
                if slot + j < self.spec.sink_frames:
                    rows = self._rows(c + slot + j, 1)
                    self.k_base[layer, :, rows].copy_(k_raw[:, (offset + j) * n : (offset + j + 1) * n])
            self.rot_pos[c + slot : c + slot + length] = list(positions[offset : offset + length])

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
        if self.rotated:  # un-rotated copy; `align` rotates these rows before the next chunk
            self.k_base[layer, :, start : start + k.shape[1]].copy_(k)
            frames = k.shape[1] // self.spec.tokens_per_frame
            self.rot_pos[first_frame : first_frame + frames] = [None] * frames

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


def _rotate_all_layers(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope over [layers, B, L, H, D] at once (layers folded into the batch)."""
    return apply_rope(x.flatten(0, 1), cos, sin).view_as(x)
