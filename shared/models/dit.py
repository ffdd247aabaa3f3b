"""In-context Wan DiT: diffusers' `WanTransformer3DModel` parameters, our streaming forward.

The parameters stay inside a plain `WanTransformer3DModel`, so the state dict is key-for-key
diffusers' and a `transformer/` folder written by either side loads into the other. This module
only changes how the forward is driven:

* In-context conditioning (paper 4.1): reference and garment latents (one latent frame each)
  are extra latent frames with timestep 0. The temporal patch size is 1, so concatenating
  latent frames is the same as concatenating tokens. They share every projection, and the
  caller drops them from the output.
* Per-frame timesteps: every latent frame carries its own timestep. diffusers' TI2V path does
  the same per token; here it is computed once per frame and broadcast over the frame's tokens.
* Self-attention is delegated to a hook, `SelfAttention(layer, q, k, v) -> out`, called with
  un-rotated q/k/v. The hook owns RoPE positions, masks and any KV cache. This model holds no
  state between calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .presets import DiTConfig
from .rope import RopeTable, apply_rope


class SelfAttention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [B, L, H, D] un-rotated, for the L tokens of this forward -> [B, L, H, D]."""
        ...


def dit_config_of(transformer: WanTransformer3DModel) -> DiTConfig:
    cfg = transformer.config
    return DiTConfig(**{name: cfg[name] for name in DiTConfig.model_fields if name in cfg})


class InContextWanDiT(nn.Module):
    """Streaming in-context forward over a diffusers `WanTransformer3DModel`."""

    def __init__(self, transformer: WanTransformer3DModel):
        super().__init__()
        self.transformer = transformer
        self.config = dit_config_of(transformer)
        self.gradient_checkpointing = False
        self._compiled: tuple | None = None  # (pre, post) from `compile_blocks`

    # ---- construction ----------------------------------------------------------------
    @classmethod
    def build(cls, cfg: DiTConfig, seed: int | None = None) -> InContextWanDiT:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            transformer = WanTransformer3DModel(**cfg.model_dump())
        return cls(transformer)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> InContextWanDiT:
        return cls(WanTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True))

    def save_pretrained(self, folder: str | Path) -> None:
        self.transformer.save_pretrained(str(folder))

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.proj_out.weight.dtype

    # ---- pieces ------------------------------------------------------------------------
    def embed_text(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Project text-encoder output [B, Lt, text_dim] -> [B, Lt, inner]. Cache per prompt."""
        return self.transformer.condition_embedder.text_embedder(text_embeddings.to(self.dtype))

    def _time_modulation(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [B, F] (0..1000) -> temb [B, F, 1, inner] and block modulation [B, F, 6, inner]."""
        emb = self.transformer.condition_embedder
        b, f = timesteps.shape
        t_freq = emb.timesteps_proj(timesteps.flatten())  # [B*F, freq_dim]
        t_freq = t_freq.to(next(iter(emb.time_embedder.parameters())).dtype)
        temb = emb.time_embedder(t_freq).type_as(like)  # [B*F, inner]
        proj = emb.time_proj(emb.act_fn(temb))  # [B*F, 6*inner]
        return temb.view(b, f, 1, -1), proj.view(b, f, 6, -1)

    def text_kv(self, text: torch.Tensor) -> TextKV:
        """Cross-attention K/V of a projected prompt [B, Lt, inner] for every block, computed once
        per prompt (a session caches it until the prompt changes; see `TextKV`)."""
        kv = []
        for block in self.transformer.blocks:
            a2 = block.attn2
            if getattr(a2, "fused_projections", False):
                k, v = a2.to_kv(text).chunk(2, dim=-1)
            else:
                k, v = a2.to_k(text), a2.to_v(text)
            k = a2.norm_k(k)
            # [B, H, Lt, Dh]: the layout SDPA reads, so no per-forward transpose of the prompt
            kv.append(tuple(t.unflatten(2, (a2.heads, -1)).transpose(1, 2).contiguous() for t in (k, v)))
        return TextKV(text, kv)

    def compile_blocks(self, mode: str | None = None) -> None:
        """`torch.compile` the two halves of every block around the self-attention hook (the hook
        keeps its host-side cache bookkeeping eager, so a cache that fills or a moving RoPE offset
        never recompiles). `mode="reduce-overhead"` adds inductor's CUDA graphs on GPU."""
        self._compiled = (torch.compile(_block_pre, mode=mode), torch.compile(_block_post, mode=mode))

    def _block(
        self,
        layer: int,
        x: torch.Tensor,  # [B, F, N, D]
        text: torch.Tensor | TextKV,  # [B, Lt, D], or its cross-attention K/V (`text_kv`)
        modulation: torch.Tensor,  # [B, F, 6, D]
        attn: SelfAttention,
    ) -> torch.Tensor:
        block = self.transformer.blocks[layer]
        pre, post = self._compiled or (_block_pre, _block_post)
        q, k, v = pre(block, x, modulation)  # [B, L, H, Dh] un-rotated
        out = attn(layer, q, k, v)
        if isinstance(text, TextKV) and block.attn2.add_k_proj is None:
            return post(block, x, out, modulation, None, *text.kv[layer])
        ctx = text.text if isinstance(text, TextKV) else text
        return post(block, x, out, modulation, ctx, None, None)

    # ---- forward -----------------------------------------------------------------------
    def forward(
        self,
        latents: torch.Tensor,  # [B, C, F, h, w] latent frames (cond frames first when in-context)
        timesteps: torch.Tensor,  # [B, F] model timesteps in [0, 1000]; 0 for clean/cond frames
        text: torch.Tensor | TextKV,  # [B, Lt, inner] from `embed_text`, or its `text_kv`
        attn: SelfAttention,
    ) -> torch.Tensor:
        """Flow prediction for every input frame: [B, C_out, F, h, w]."""
        tr = self.transformer
        b, _, f, h, w = latents.shape
        _, ph, pw = self.config.patch_size
        gh, gw = h // ph, w // pw

        x = tr.patch_embedding(latents.to(self.dtype))  # [B, D, F, gh, gw]
        x = x.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, F, N, D]
        temb, modulation = self._time_modulation(timesteps, like=text.text if isinstance(text, TextKV) else text)

        for layer in range(self.num_layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, layer, x, text, modulation, attn, use_reentrant=False)
            else:
                x = self._block(layer, x, text, modulation, attn)

        shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb).chunk(2, dim=2)  # [B, F, 1, D] each
        x = (tr.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = tr.proj_out(x)  # [B, F, N, C_out * ph * pw]
        x = x.view(b, f, gh, gw, ph, pw, -1).permute(0, 6, 1, 2, 4, 3, 5)  # [B, C, F, gh, ph, gw, pw]
        return x.reshape(b, -1, f, gh * ph, gw * pw)


class TextKV:
    """A projected prompt and its cross-attention K/V per block ([B, H, Lt, Dh] each).

    Valid for the weights it was computed with: sessions cache one per prompt for inference
    (eval mode, no grad) and drop it when the prompt changes."""

    def __init__(self, text: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.text = text
        self.kv = kv


def _block_pre(block: Any, x: torch.Tensor, modulation: torch.Tensor):  # block: diffusers' WanTransformerBlock
    """Modulated norm + q/k/v projections + q/k norms of one block: [B, L, H, Dh] each, un-rotated."""
    b, f, n, _ = x.shape
    shift_msa, scale_msa = (block.scale_shift_table.unsqueeze(0) + modulation.float()).chunk(6, dim=2)[:2]
    h = (block.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
    a1 = block.attn1
    if getattr(a1, "fused_projections", False):
        q, k, v = a1.to_qkv(h).chunk(3, dim=-1)
    else:
        q, k, v = a1.to_q(h), a1.to_k(h), a1.to_v(h)
    q, k = a1.norm_q(q), a1.norm_k(k)
    return tuple(t.reshape(b, f * n, a1.heads, -1) for t in (q, k, v))


def _block_post(
    block: Any,  # diffusers' WanTransformerBlock
    x: torch.Tensor,  # [B, F, N, D] block input
    out: torch.Tensor,  # [B, L, H, Dh] self-attention output
    modulation: torch.Tensor,
    text: torch.Tensor | None,  # [B, Lt, D] (diffusers' cross-attention), or None with k/v given
    text_k: torch.Tensor | None,  # [B, H, Lt, Dh] cached cross-attention keys
    text_v: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention output projection + gate, cross-attention, FFN of one block."""
    b, f, n, d = x.shape
    _, _, gate_msa, c_shift, c_scale, c_gate = (block.scale_shift_table.unsqueeze(0) + modulation.float()).chunk(
        6, dim=2
    )
    a1 = block.attn1
    out = a1.to_out[1](a1.to_out[0](out.flatten(2))).view(b, f, n, d)
    x = (x.float() + out * gate_msa).type_as(x)

    h = block.norm2(x.float()).type_as(x).view(b, f * n, d)
    if text is not None:
        x = x + block.attn2(h, text, None, None).view(b, f, n, d)
    else:  # diffusers' WanAttnProcessor on the prompt's cached K/V (same ops, same kernel)
        a2 = block.attn2
        assert text_k is not None and text_v is not None
        q = a2.norm_q(a2.to_q(h)).unflatten(2, (a2.heads, -1))  # [B, L, H, Dh]
        c = F.scaled_dot_product_attention(q.transpose(1, 2), text_k, text_v).transpose(1, 2)
        x = x + a2.to_out[1](a2.to_out[0](c.flatten(2, 3).type_as(q))).view(b, f, n, d)

    h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
    return (x.float() + block.ffn(h).float() * c_gate).type_as(x)


class DenseAttention:
    """Uncached self-attention over all tokens of one forward, with RoPE at given frame positions.

    `frame_positions` has one temporal position per input latent frame; `mask` is an optional
    boolean [L, L] token mask (True = may attend), e.g. the block-causal teacher-forcing mask.
    `backend` names the attention kernel (None = the ambient default, see `shared.models.attention`).
    """

    def __init__(
        self,
        rope: RopeTable,
        frame_positions: list[int],
        mask: torch.Tensor | None = None,
        backend: str | None = None,
    ):
        self.cos, self.sin = rope.cos_sin(frame_positions)
        self.mask = mask
        self.backend = backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = apply_rope(q, self.cos, self.sin)
        k = apply_rope(k, self.cos, self.sin)
        return attention(q, k, v, self.mask, backend=self.backend)
