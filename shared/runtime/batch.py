"""Batched stepping: the next chunk of several sessions in one DiT forward per denoising step.

Every linear layer of the DiT (patch embedding, time modulation, q/k/v/out projections, the
cross-attention query, the FFN) runs once over all sessions' tokens, stacked along the batch.
What belongs to one session stays per session:

* self-attention: each session's own hook against its own KV cache (`BatchedAttention`), so
  sessions at different chunk indices and cache fill levels, with different garments, batch
  together;
* cross-attention: each session's own prompt K/V, stacked along the batch (one prompt length);
* noise: drawn per session from (seed, chunk index), so batching never changes what a seed
  produces, and the cache bookkeeping (slots, sink, window, RoPE alignment) is the session's.

A batch therefore gives each session the chunk it would have generated alone, up to the float
rounding of a larger GEMM (fp32: ~1e-6). A garment switch or a prompt change is applied to a
session between batches, so it never stalls the others.

`batch_key` says which sessions can share a batch; `next_chunks` steps one such group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from shared.models.dit import TextKV

from .sampler import chunk_noises
from .session import StreamingSession


class BatchedAttention:
    """The self-attention hook of a batched forward: row b of q/k/v is session b's, and goes
    through session b's own hook (its cache, its RoPE positions, its kernel).

    Sessions whose chunk sits at the same RoPE positions (the steady state: equal cache fill)
    have their queries and keys rotated in one call (`ChunkAttention.rotate`, elementwise: the
    same numbers as one at a time); attention itself runs per session over its own cache."""

    def __init__(self, hooks: Sequence[Any]):
        self.hooks = list(hooks)
        groups: dict[Any, list[int]] = {}
        for b, hook in enumerate(self.hooks):
            key = getattr(hook, "rotation_key", None)
            groups.setdefault(("alone", b) if key is None else key, []).append(b)
        self.rotation_groups = [rows for rows in groups.values() if len(rows) > 1]
        self.alone = [rows[0] for rows in groups.values() if len(rows) == 1]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != len(self.hooks):
            raise ValueError(f"batch of {q.shape[0]} rows for {len(self.hooks)} sessions")
        outs: list[torch.Tensor | None] = [None] * len(self.hooks)
        for rows in self.rotation_groups:
            whole = rows == list(range(len(self.hooks)))
            index = None if whole else torch.tensor(rows, device=q.device)
            qg = q if index is None else q.index_select(0, index)
            kg = k if index is None else k.index_select(0, index)
            qr, kr = self.hooks[rows[0]].rotate(qg, kg)
            for j, b in enumerate(rows):
                outs[b] = self.hooks[b].attend(layer, qr[j : j + 1], kr[j : j + 1], k[b : b + 1], v[b : b + 1])
        for b in self.alone:
            outs[b] = self.hooks[b](layer, q[b : b + 1], k[b : b + 1], v[b : b + 1])
        return torch.cat(outs, dim=0)  # type: ignore[arg-type]


def batch_key(session: StreamingSession) -> tuple | None:
    """Sessions with equal keys can be stepped in one batch; None: this one steps alone (the
    reference attention path or the no-context-pass experiment, closed sessions)."""
    if not session.is_open or session.reference_attention or not session.preset.streaming.context_pass:
        return None
    assert session.text is not None
    return (
        id(session.dit),
        session.chunk_shape,
        session.dtype,
        session.device,
        tuple(session.text.shape[1:]),
        session.attention_backend,
    )


def group_batchable(sessions: Sequence[StreamingSession]) -> list[list[int]]:
    """Indices of `sessions` grouped into batches that `next_chunks` can step (order kept)."""
    groups: dict[Any, list[int]] = {}
    alone: list[list[int]] = []
    for i, s in enumerate(sessions):
        key = batch_key(s)
        if key is None:
            alone.append([i])
        else:
            groups.setdefault(key, []).append(i)
    return sorted([*groups.values(), *alone], key=lambda g: g[0])


def _stacked_context(sessions: Sequence[StreamingSession]) -> TextKV:
    """The prompts' cross-attention K/V of every session, stacked along the batch."""
    contexts = [s._context() for s in sessions]
    if not all(isinstance(c, TextKV) for c in contexts):
        raise ValueError("batched stepping is for inference (eval mode, no grad)")
    layers = len(contexts[0].kv)
    kv = [(torch.cat([c.kv[i][0] for c in contexts]), torch.cat([c.kv[i][1] for c in contexts])) for i in range(layers)]
    return TextKV(torch.cat([c.text for c in contexts]), kv)


@torch.no_grad()
def next_chunks(sessions: Sequence[StreamingSession]) -> list[torch.Tensor]:
    """Generate the next chunk of every session in one batch: clean latents [1, C, chunk_frames,
    h, w] per session, the same as `session.next_chunk()` for each (see the module docstring).

    All sessions must share a `batch_key` (see `group_batchable`); one session steps alone."""
    if not sessions:
        return []
    if len(sessions) == 1:
        return [sessions[0].next_chunk()]
    keys = {batch_key(s) for s in sessions}
    if len(keys) != 1 or None in keys:
        raise ValueError("these sessions cannot share a batch (see batch_key / group_batchable)")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session appears twice in one batch")
    first = sessions[0]
    n = first.preset.streaming.chunk_frames
    steps = first.sampler.num_steps
    caches = [s._require_open() for s in sessions]
    per_session = [chunk_noises(s.seed, s.chunk_index, s.chunk_shape, steps, s.device, s.dtype) for s in sessions]
    noises = [torch.cat([draws[i] for draws in per_session]) for i in range(steps)]
    context = _stacked_context(sessions)
    b = len(sessions)

    def forward(x: torch.Tensor, t: float, hook: BatchedAttention) -> torch.Tensor:
        timesteps = torch.full((b, x.shape[2]), float(t), device=first.device)
        return first.dit(x, timesteps, context, hook)

    denoise = BatchedAttention([s._chunk_hook(c, n) for s, c in zip(sessions, caches)])
    x0 = first.sampler.sample(lambda x, t, step: forward(x, t, denoise), noises)
    # The context pass: one clean forward at t=0 writes every session's chunk into its cache.
    plans = [c.slots.plan_append(n) for c in caches]
    write = BatchedAttention([s._chunk_hook(c, n, write=p) for s, c, p in zip(sessions, caches, plans)])
    forward(x0, 0.0, write)
    out = list(x0.split(1, dim=0))
    for s, c, p, x in zip(sessions, caches, plans, out):
        s._keep_latents(p, x)
        c.slots.commit(p)
        s.chunk_index += 1
    return out
