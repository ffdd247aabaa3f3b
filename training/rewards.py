"""Frame rewards for gradient-reweighted DMD (paper Eq. 6) and the frame weights they give.

A reward model maps generated latents [B, C, F, h, w] (normalized VAE latents) to one score per
latent frame [B, F]; higher is better. `frame_weights` turns scores into
A = F * softmax(-R / tau) over frames, written as exp(-(R - min R) / tau) / mean(...), which is
exactly 1 for every frame when the reward is constant: GR-DMD then *is* plain DMD, bit for bit.

Built-ins (`make_reward`): `constant` (plain DMD) and `aesthetic-proxy`, a cheap image-statistics
stand-in for an aesthetic predictor (sharpness, contrast, colourfulness, exposure of the decoded
frames). A real aesthetic model plugs in as "package.module:factory", factory(vae) -> reward.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch
import torch.nn.functional as F

from shared.models.vae import VideoVAE


class FrameReward(Protocol):
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w] -> rewards [B, F] (higher = better frame)."""
        ...


def frame_weights(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """[B, F] rewards -> [B, F] weights F * softmax(-R / tau); mean 1 per sample."""
    if tau <= 0:
        raise ValueError("tau must be positive")
    r = rewards.double()
    e = torch.exp(-(r - r.amin(dim=1, keepdim=True)) / tau)  # in (0, 1], max exactly 1
    return (e / e.mean(dim=1, keepdim=True)).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


class ConstantReward:
    """Every frame scores the same: GR-DMD reduces to plain DMD."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.zeros(latents.shape[0], latents.shape[2], device=latents.device)


def pixel_to_latent_frames(scores: torch.Tensor, latent_frames: int, temporal_factor: int = 4) -> torch.Tensor:
    """Per-pixel-frame scores [B, T] -> per-latent-frame [B, F]: latent 0 <- pixel 0,
    latent i <- mean of pixels 4i-3..4i (the causal VAE's grouping)."""
    first = scores[:, :1]
    rest = scores[:, 1:].reshape(scores.shape[0], latent_frames - 1, temporal_factor).mean(dim=2)
    return torch.cat([first, rest], dim=1)


class AestheticProxyReward:
    """Decode with the VAE and score each pixel frame by simple image statistics in [0, 1]."""

    def __init__(self, vae: VideoVAE):
        self.vae = vae

    @staticmethod
    def score_pixels(pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1] -> [B, T] in [0, 1]."""
        x = (pixels.float().clamp(-1, 1) + 1) / 2  # [B, 3, T, H, W] in [0, 1]
        b, _, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w)
        luma = (0.299 * frames[:, 0] + 0.587 * frames[:, 1] + 0.114 * frames[:, 2])[:, None]  # [BT, 1, H, W]
        lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device)[None, None]
        sharp = F.conv2d(luma, lap, padding=1).abs().mean(dim=(1, 2, 3))  # [BT]
        contrast = luma.std(dim=(1, 2, 3))
        rg = frames[:, 0] - frames[:, 1]
        yb = 0.5 * (frames[:, 0] + frames[:, 1]) - frames[:, 2]
        colour = torch.sqrt(rg.std(dim=(1, 2)) ** 2 + yb.std(dim=(1, 2)) ** 2)
        exposure = 1.0 - 2.0 * (luma.mean(dim=(1, 2, 3)) - 0.5).abs()
        score = (torch.tanh(8 * sharp) + torch.tanh(4 * contrast) + torch.tanh(4 * colour) + exposure) / 4
        return score.view(b, t)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = self.vae.decode(latents.to(self.vae.dtype))  # [B, 3, T, H, W]
        per_pixel = self.score_pixels(pixels)
        return pixel_to_latent_frames(per_pixel, latents.shape[2], self.vae.temporal_factor).to(latents.device)


def make_reward(kind: str, vae: VideoVAE | None = None) -> FrameReward:
    if kind == "constant":
        return ConstantReward()
    if kind == "aesthetic-proxy":
        if vae is None:
            raise ValueError("the aesthetic-proxy reward decodes frames and needs a VAE")
        return AestheticProxyReward(vae)
    if ":" in kind:
        module, _, factory = kind.partition(":")
        return getattr(importlib.import_module(module), factory)(vae)
    raise ValueError(f"unknown reward {kind!r}: constant, aesthetic-proxy or 'package.module:factory'")
