"""Stage 2: in-context teacher forcing (paper 4.2).

One forward over [cond | clean chunks 0..n-1 | noisy chunks 0..n-1] with
`shared.models.masks.teacher_forcing_frame_mask`: cond frames see only cond; clean chunk i sees
cond + clean 0..i; noisy chunk i sees cond + clean 0..i-1 + itself. Noisy chunk i sits at the
RoPE positions of clean chunk i, which is where streaming inference puts the chunk it generates
after i chunks of history (relative policy, within the cache size). So every noisy chunk's
output equals what `StreamingSession` computes with the clean history in its KV cache
(tests/unit/test_training_teacher_forcing.py checks it). Loss on the noisy frames only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models.masks import teacher_forcing_frame_mask
from shared.models.presets import Preset
from shared.models.rope import RopeTable

from .attention import masked_attention
from .config import DataConfig, FlowConfig
from .flow import add_noise, flow_sigmas, keyed_generator, stack_noise
from .models import TrainDiT
from .teacher import choose_text


def teacher_forcing_layout(cond_frames: int, chunk_frames: int, num_chunks: int) -> tuple[torch.Tensor, list[int]]:
    """(frame mask [L, L], RoPE frame position per frame) of [cond | clean | noisy]."""
    mask = teacher_forcing_frame_mask(cond_frames, chunk_frames, num_chunks)
    video = list(range(cond_frames, cond_frames + num_chunks * chunk_frames))
    return mask, list(range(cond_frames)) + video + video


def teacher_forcing_sequence(
    cond: torch.Tensor, clean: torch.Tensor, noisy: torch.Tensor, noisy_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cond [B, C, Fc, h, w], clean/noisy [B, C, F, h, w], noisy_t [B, F] ->
    latents [B, C, Fc + 2F, h, w] and timesteps [B, Fc + 2F] (cond and clean at 0)."""
    b, _, fc = cond.shape[:3]
    f = clean.shape[2]
    zeros = torch.zeros(b, fc + f, device=noisy_t.device, dtype=noisy_t.dtype)
    return torch.cat([cond, clean, noisy], dim=2), torch.cat([zeros, noisy_t], dim=1)


class TeacherForcingObjective:
    name = "teacher_forcing"

    def __init__(
        self,
        preset: Preset,
        flow: FlowConfig,
        data: DataConfig,
        seed: int,
        rope: RopeTable,
        per_chunk_timesteps: bool = True,
        attention: str = "dense",
    ):
        st = preset.streaming
        if data.latent_frames % st.chunk_frames:
            raise ValueError(f"latent_frames={data.latent_frames} is not a multiple of chunk_frames={st.chunk_frames}")
        if data.latent_frames > st.max_cache_frames + st.chunk_frames:
            # The last noisy chunk sees all earlier chunks; streaming does too while they fit in the
            # cache (M frames). Past that the cache evicts, which the mask does not model.
            raise ValueError("teacher forcing past the KV-cache size (eviction) is not modelled by the mask")
        self.preset, self.flow, self.data, self.seed, self.rope = preset, flow, data, seed, rope
        self.chunk = st.chunk_frames
        self.cond_frames = st.cond_frames
        self.num_chunks = data.latent_frames // st.chunk_frames
        self.per_chunk = per_chunk_timesteps
        self.frame_mask, self.positions = teacher_forcing_layout(self.cond_frames, self.chunk, self.num_chunks)
        self.attn = masked_attention(attention, rope, self.positions, self.frame_mask)  # built once, reused

    def sigmas(self, gens: list[torch.Generator]) -> torch.Tensor:
        """[B, F]: one sigma per chunk (repeated over its frames), or one per sample."""
        draws = self.num_chunks if self.per_chunk else 1
        per = torch.stack([flow_sigmas(g, draws, self.flow) for g in gens])  # [B, draws]
        return per.repeat_interleave(self.num_chunks * self.chunk // draws, dim=1)

    def loss(self, model: TrainDiT, batch: dict, positions: list[int]) -> tuple[torch.Tensor, dict]:
        x0 = batch["video"]  # [B, C, F, h, w]
        gens = [keyed_generator(self.seed, self.name, p) for p in positions]
        text = choose_text(batch, gens, self.data.dynamic_caption_prob)
        sigma = self.sigmas(gens).to(x0.device)  # [B, F]
        eps = stack_noise(gens, x0.shape[1:], x0.device, x0.dtype)
        cond = torch.cat([batch["reference"], batch["garment"]], dim=2)
        latents, timesteps = teacher_forcing_sequence(cond, x0, add_noise(x0, eps, sigma), 1000.0 * sigma)
        f = x0.shape[2]
        v = model.text_and_forward(latents, timesteps, text, self.attn)[:, :, -f:]  # noisy frames
        loss = F.mse_loss(v.float(), (eps - x0).float())
        return loss, {"loss": loss.detach(), "sigma_mean": sigma.mean()}
