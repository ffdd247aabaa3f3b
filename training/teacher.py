"""Stage 1: the in-context teacher (paper 4.1 and appendix B).

Bidirectional flow matching over [reference, garment, noisy video] latent frames: the clean
reference and garment latents are in-context frames at timestep 0 that every video token attends
to (and that attend to everything, as in the teacher's full attention), RoPE frame positions
0..F+1 (cond first, as in streaming), loss on the video frames only. Captions: dynamic-only with
probability `dynamic_caption_prob` (0.7), else the full static + dynamic caption.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.models.dit import DenseAttention
from shared.models.presets import Preset
from shared.models.rope import RopeTable

from .config import DataConfig, FlowConfig
from .flow import add_noise, flow_sigmas, keyed_generator, stack_noise
from .models import TrainDiT


def choose_text(batch: dict, gens: list[torch.Generator], dynamic_prob: float) -> torch.Tensor:
    """Per sample: the dynamic caption with probability `dynamic_prob`, else the full one. [B, L, D]."""
    dynamic = torch.tensor([float(torch.rand(1, generator=g)) < dynamic_prob for g in gens])
    mask = dynamic.to(batch["text_full"].device)[:, None, None]
    return torch.where(mask, batch["text_dynamic"], batch["text_full"])


def in_context_sequence(batch: dict, video: torch.Tensor, video_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[reference, garment, video] latents [B, C, 2 + F, h, w] and timesteps [B, 2 + F] (cond at 0)."""
    cond = torch.cat([batch["reference"], batch["garment"]], dim=2)  # [B, C, 2, h, w]
    latents = torch.cat([cond, video], dim=2)
    timesteps = torch.cat([torch.zeros_like(video_t[:, :2]), video_t], dim=1)
    return latents, timesteps


class TeacherObjective:
    """loss(model, batch, positions) for one micro-batch; randomness keyed by sample position."""

    name = "teacher"

    def __init__(self, preset: Preset, flow: FlowConfig, data: DataConfig, seed: int, rope: RopeTable):
        self.preset, self.flow, self.data, self.seed, self.rope = preset, flow, data, seed, rope
        self.cond_frames = preset.streaming.cond_frames

    def loss(self, model: TrainDiT, batch: dict, positions: list[int]) -> tuple[torch.Tensor, dict]:
        x0 = batch["video"]  # [B, C, F, h, w]
        b, _, f = x0.shape[:3]
        gens = [keyed_generator(self.seed, self.name, p) for p in positions]
        text = choose_text(batch, gens, self.data.dynamic_caption_prob)
        sigma = torch.stack([flow_sigmas(g, 1, self.flow) for g in gens]).expand(b, f).to(x0.device)  # [B, F]
        eps = stack_noise(gens, x0.shape[1:], x0.device, x0.dtype)
        latents, timesteps = in_context_sequence(batch, add_noise(x0, eps, sigma), 1000.0 * sigma)
        attn = DenseAttention(self.rope, list(range(self.cond_frames + f)))
        v = model.text_and_forward(latents, timesteps, text, attn)[:, :, self.cond_frames :]  # [B, C, F, h, w]
        loss = F.mse_loss(v.float(), (eps - x0).float())
        return loss, {"loss": loss.detach(), "sigma_mean": sigma.mean()}
