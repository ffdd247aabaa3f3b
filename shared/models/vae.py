"""Video VAE: a thin wrapper around diffusers' `AutoencoderKLWan` that speaks normalized latents.

The wrapped module stays a plain `AutoencoderKLWan`, so a checkpoint's `vae/` folder loads with
`from_pretrained` and our saves load anywhere diffusers runs.

Latent normalization is the one diffusers' Wan pipelines use:
    normalized = (z - latents_mean) / latents_std,    z = normalized * latents_std + latents_mean
Everything this class returns or accepts as "latents" is normalized (what the DiT sees).

Units: pixels are in [-1, 1]; F pixel frames <-> f = (F - 1) / 4 + 1 latent frames; a latent pixel
covers `spatial_factor` x `spatial_factor` pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

from shared.models.presets import VAEConfig


class VideoVAE:
    """Encode images/videos to normalized latents and decode them back (whole-sequence reference)."""

    def __init__(self, module: AutoencoderKLWan) -> None:
        self.module = module.eval()
        self.config = VAEConfig(**{k: module.config[k] for k in VAEConfig.model_fields})

    # ---- construction -----------------------------------------------------------------
    @classmethod
    def build(cls, cfg: VAEConfig, seed: int | None = None) -> VideoVAE:
        """Random init from a config; with `seed`, the weights depend only on the seed (global RNG untouched)."""
        if seed is None:
            return cls(AutoencoderKLWan(**cfg.diffusers_kwargs()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(AutoencoderKLWan(**cfg.diffusers_kwargs()))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        subfolder: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> VideoVAE:
        """Load a diffusers-layout VAE folder (config.json + diffusion_pytorch_model.safetensors)."""
        module = AutoencoderKLWan.from_pretrained(str(folder), subfolder=subfolder, torch_dtype=dtype)
        return cls(module.to(device))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the diffusers layout (config.json + diffusion_pytorch_model.safetensors) into `folder`."""
        self.module.save_pretrained(str(folder), safe_serialization=True)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VideoVAE:
        self.module.to(device=device, dtype=dtype)
        return self

    # ---- geometry ---------------------------------------------------------------------
    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along height and width."""
        return self.config.scale_factor_spatial

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame (after the first one)."""
        return self.config.scale_factor_temporal

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    # ---- normalization ----------------------------------------------------------------
    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(self.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents [B, z, f, h, w] -> normalized latents (same shape)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, f, h, w] -> raw VAE latents (same shape)."""
        mean, std = self._stats(latents)
        return latents * std + mean

    # ---- encode / decode --------------------------------------------------------------
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels [B, 3, F, H, W], got {tuple(pixels.shape)}")
        f, h, w = pixels.shape[2:]
        s = self.spatial_factor
        if h % s or w % s:
            raise ValueError(f"pixel size {w}x{h} must be a multiple of {s}")
        if (f - 1) % self.temporal_factor:
            raise ValueError(f"{f} pixel frames is not 1 + {self.temporal_factor}k")

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, z, (F-1)/4+1, H/16, W/16].

        Deterministic: uses the posterior mode (its mean), not a sample.
        """
        self._check_pixels(pixels)
        x = pixels.to(device=self.device, dtype=self.dtype)
        z = self.module.encode(x).latent_dist.mode()  # [B, z, f, h, w]
        return self.normalize(z)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> normalized latents [B, z, 1, H/16, W/16] (a one-frame video)."""
        if pixels.ndim != 4:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(pixels.shape)}")
        return self.encode_video(pixels.unsqueeze(2))  # [B, 3, 1, H, W]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, f, h, w] -> pixels [B, 3, 1 + 4(f-1), 16h, 16w] in [-1, 1].

        Decodes the whole sequence in one call: the reference that streaming decode must match.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"expected latents [B, {self.z_dim}, f, h, w], got {tuple(latents.shape)}")
        z = self.denormalize(latents.to(device=self.device, dtype=self.dtype))
        return self.module.decode(z).sample
