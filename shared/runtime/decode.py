"""Streaming VAE decode: latent chunks in, pixel frames out, causal-conv caches kept across calls.

Decoding a latent stream chunk by chunk gives the same frames as `VideoVAE.decode` of the whole
sequence, because the Wan decoder is causal in time and `AutoencoderKLWan._decode` itself walks
the sequence one latent frame at a time through per-conv feature caches. This decoder runs the
same loop but owns its cache list, so many sessions can share one VAE module (the module's own
`_feat_map` is never touched).

Units: latent frames in; pixel frames out (1 + 4(f-1) for the first chunk after `reset`, 4f after).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from shared.models.vae import VideoVAE


class StreamingDecoder:
    """Per-session causal decode state over a shared `VideoVAE`."""

    def __init__(self, vae: VideoVAE) -> None:
        self.vae = vae
        self._num_convs: int = vae.module._cached_conv_counts["decoder"]
        self.reset()

    def reset(self) -> None:
        """Forget the stream: the next chunk is decoded as the start of a new video."""
        # One slot per causal conv of the decoder: None, the "Rep" marker, or a tensor [B, C, <=2, h', w'].
        self._feat_cache: list[torch.Tensor | str | None] = [None] * self._num_convs
        self.latent_frames_decoded = 0
        self.frames_decoded = 0  # pixel frames returned since reset

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [1, z, f, h, w] (f >= 1) -> pixels [1, 3, T, 16h, 16w] in [-1, 1].

        T = 1 + 4(f-1) pixel frames for the first chunk after `reset`, 4f after.
        """
        module = self.vae.module
        if latents.ndim != 5 or latents.shape[1] != self.vae.z_dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents [B, {self.vae.z_dim}, f>=1, h, w], got {tuple(latents.shape)}")
        z = self.vae.denormalize(latents.to(device=self.vae.device, dtype=self.vae.dtype))
        x = module.post_quant_conv(z)  # [B, z, f, h, w]; a 1x1x1 conv, so per-frame
        outs = []
        for i in range(x.shape[2]):
            first = self.latent_frames_decoded == 0
            out = module.decoder(x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first)
            outs.append(out)  # [B, 3*p*p, 1 or 4, h*16/p, w*16/p]
            self.latent_frames_decoded += 1
        pixels = torch.cat(outs, dim=2)
        if module.config.patch_size is not None:
            pixels = unpatchify(pixels, patch_size=module.config.patch_size)  # [B, 3, T, H, W]
        pixels = pixels.clamp(-1.0, 1.0)
        self.frames_decoded += pixels.shape[2]
        return pixels

    def state_bytes(self) -> int:
        """Bytes held by the causal-conv caches (the per-session decode state)."""
        return sum(t.numel() * t.element_size() for t in self._feat_cache if isinstance(t, torch.Tensor))


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [1, 3, T, H, W] in [-1, 1] -> uint8 frames [T, H, W, 3] on the CPU (video-encoder layout)."""
    if pixels.ndim != 5 or pixels.shape[0] != 1 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [1, 3, T, H, W], got {tuple(pixels.shape)}")
    frames = ((pixels[0].float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)  # [3, T, H, W]
    return frames.permute(1, 2, 3, 0).contiguous().cpu()  # [T, H, W, 3]


class StreamingFastDecoder:
    """`StreamingDecoder`'s contract over a distilled `FastCausalDecoder` (same frame counts,
    chunk by chunk == whole); its state is one feature map per memory block."""

    def __init__(self, model, vae_z_dim: int | None = None) -> None:
        from shared.models.fast_decoder import first_group_frame

        self.model = model
        self.z_dim = vae_z_dim or model.config.z_dim
        self._keep_first = first_group_frame(model.config.temporal_factor)
        self.reset()

    def reset(self) -> None:
        self._state: list[torch.Tensor] | None = None
        self.latent_frames_decoded = 0
        self.frames_decoded = 0

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [1, z, f, h, w] -> pixels [1, 3, T, 8h, 8w]; T as `StreamingDecoder`."""
        if latents.ndim != 5 or latents.shape[1] != self.z_dim or latents.shape[2] < 1:
            raise ValueError(f"expected latents [B, {self.z_dim}, f>=1, h, w], got {tuple(latents.shape)}")
        param = next(self.model.parameters())
        pixels, self._state = self.model(latents.to(device=param.device, dtype=param.dtype), self._state)
        if self.latent_frames_decoded == 0:  # the stream's first latent frame is one frame
            tf = self.model.config.temporal_factor
            pixels = torch.cat([pixels[:, :, self._keep_first : self._keep_first + 1], pixels[:, :, tf:]], dim=2)
        self.latent_frames_decoded += latents.shape[2]
        self.frames_decoded += pixels.shape[2]
        return pixels

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._state or ())
