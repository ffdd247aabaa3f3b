"""Per-GPU memory plan of a training stage under FSDP2, computed from the preset (no weights).

Accounting, per GPU, for N ranks sharding every model:
  trainable model: fp32 master params (4 B) + fp32 grads (4 B) + AdamW moments (8 B) = 16 B/param / N
  frozen model (real score): fp32 params = 4 B/param / N
  unsharded compute copies: bf16 params of the root plus two blocks (current + prefetched)
  activations: with per-block activation checkpointing, each layer keeps its bf16 input
  (tokens x width); one block is live at a time in recompute (~ tokens x (8 width + 2 ffn) bf16);
  attention is flash/flex (no L^2 scores). A DMD generator rollout keeps one checkpointed chunk
  forward per chunk until its backward, and one session's KV cache.
The totals are estimates (allocator slack and NCCL buffers come on top: keep ~10-15 GiB free).
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel
from pydantic import BaseModel

from shared.models.presets import Preset
from shared.runtime.kv_cache import KVCacheSpec

GiB = 1024**3


def parameter_counts(preset: Preset) -> tuple[int, int]:
    """(total DiT parameters, parameters of one block), from a meta-device model."""
    with torch.device("meta"):
        tr = WanTransformer3DModel(**preset.dit.model_dump())
    return sum(p.numel() for p in tr.parameters()), sum(p.numel() for p in tr.blocks[0].parameters())


class MemoryPlan(BaseModel):
    stage: str
    world_size: int
    parameters: int
    tokens: int  # tokens of the largest training forward
    model_states_gib: float
    compute_params_gib: float
    activations_gib: float
    kv_cache_gib: float
    total_gib: float


def stage_tokens(preset: Preset, stage: str, latent_frames: int) -> int:
    n = preset.tokens_per_frame()
    cond = preset.streaming.cond_frames
    if stage == "teacher_forcing":
        return (cond + 2 * latent_frames) * n  # [cond | clean | noisy]
    return (cond + latent_frames) * n  # teacher, and the DMD score forwards


def memory_plan(preset: Preset, stage: str, world_size: int, latent_frames: int = 21, batch: int = 1) -> MemoryPlan:
    total, per_block = parameter_counts(preset)
    d, ffn = preset.dit.inner_dim, preset.dit.ffn_dim
    trainable, frozen = {"teacher": (1, 0), "teacher_forcing": (1, 0), "dmd": (2, 1)}[stage]
    states = (16 * trainable + 4 * frozen) * total / world_size
    root = total - per_block * preset.dit.num_layers
    compute = 2 * (root + 2 * per_block)
    tokens = stage_tokens(preset, stage, latent_frames)
    layers = preset.dit.num_layers
    act = batch * (layers * tokens * d * 2 + tokens * (8 * d + 2 * ffn) * 2)
    if stage == "dmd":  # the generator's rollout keeps one checkpointed forward per chunk until backward
        chunk_tokens = preset.streaming.chunk_frames * preset.tokens_per_frame()
        chunks = latent_frames // preset.streaming.chunk_frames
        rollout = batch * (chunks * layers * chunk_tokens * d * 2 + chunk_tokens * (8 * d + 2 * ffn) * 2)
        act = max(act, rollout)
    kv = KVCacheSpec.from_preset(preset, torch.bfloat16).bytes if stage == "dmd" else 0
    gib = lambda x: round(x / GiB, 1)
    return MemoryPlan(
        stage=stage,
        world_size=world_size,
        parameters=total,
        tokens=tokens,
        model_states_gib=gib(states),
        compute_params_gib=gib(compute),
        activations_gib=gib(act),
        kv_cache_gib=gib(kv),
        total_gib=gib(states + compute + act + kv),
    )
