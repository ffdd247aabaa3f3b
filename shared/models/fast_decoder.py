"""A small causal streaming decoder distilled from a checkpoint's VAE decoder.

Published streaming systems spend most of their end-to-end time in the VAE decoder; small
decoders that map Wan latents straight to pixels (LightX2V's LightTAE, the TAEHV family) decode
tens of times faster. This one follows their published recipe, in our own code:

* per latent frame 2D convolutions (no 3D convs, no per-conv feature caches);
* temporal context from "memory" blocks: a block sees its own input at this latent frame and at
  the previous one (concatenated on channels), so the network is causal and its streaming state
  is one feature map per memory block (the previous latent frame's input);
* spatial upsampling by nearest-neighbour x2 + conv (three times for an 8x VAE, four for 16x);
* temporal upsampling at the end: the last conv emits `temporal_factor` frames' RGB as channels.
  The first latent frame of a stream decodes to one frame (the Wan VAE's causal layout): the
  last frame of its group is kept.

Because every frame's output depends only on latent frames <= it through a fixed window of one
frame, decoding chunk by chunk equals decoding the whole sequence (tested), and training runs all
frames in parallel (the previous frame is a shift along time, not a recurrence).

Units: input normalized latents [B, z, f, h, w] (what the DiT produces); output pixels in [-1, 1]
[B, 3, T, h*s, w*s] (s the VAE's spatial factor), T = 1 + 4 (f - 1) after a reset, 4 f after.

Checkpoint layout: `<checkpoint>/fast_decoder/{config.json, model.safetensors}`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

SUBFOLDER = "fast_decoder"


class FastDecoderConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    z_dim: int = Field(default=16, ge=1)
    # channels at each resolution, latent grid first, full resolution last (one x2 step between)
    channels: tuple[int, ...] = (64, 48, 32, 24)
    memory_blocks: tuple[int, ...] = (2, 1, 1)  # per resolution below the full one
    temporal_factor: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _check(self) -> FastDecoderConfig:
        if len(self.channels) != len(self.memory_blocks) + 1 or not self.memory_blocks:
            raise ValueError("channels needs one entry more than memory_blocks (the full resolution)")
        return self

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.memory_blocks)

    @classmethod
    def for_vae(cls, z_dim: int, spatial_factor: int, temporal_factor: int) -> FastDecoderConfig:
        """The default widths for a VAE's latent layout (8x: 3 upsamplings, 16x: 4)."""
        levels = int(spatial_factor).bit_length() - 1
        if 2**levels != spatial_factor or levels < 1:
            raise ValueError(f"spatial factor {spatial_factor} is not a power of two")
        channels = (64, 48, 32, 24, 16, 16)[: levels + 1]
        blocks = (2, 1, 1, 0, 0)[:levels]
        return cls(z_dim=z_dim, channels=channels, memory_blocks=blocks, temporal_factor=temporal_factor)


class _Memory(nn.Module):
    """x_t + f([x_t, x_{t-1}]): a residual block that also sees the previous latent frame."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(torch.cat([x, past], dim=1))))


class FastCausalDecoder(nn.Module):
    """Normalized Wan latents -> pixels, causal in time; see the module docstring."""

    def __init__(self, config: FastDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or FastDecoderConfig()
        c = cfg.channels
        self.stem = nn.Conv2d(cfg.z_dim, c[0], 3, padding=1)
        self.stages: list[nn.ModuleList] = nn.ModuleList()  # type: ignore[assignment]  # one ModuleList per level
        self.ups = nn.ModuleList()
        for level in range(len(cfg.memory_blocks)):
            self.stages.append(nn.ModuleList(_Memory(c[level]) for _ in range(cfg.memory_blocks[level])))
            self.ups.append(nn.Conv2d(c[level], c[level + 1], 3, padding=1))
        self.head1 = nn.Conv2d(c[-1], c[-1], 3, padding=1)
        self.head2 = nn.Conv2d(c[-1], 3 * cfg.temporal_factor, 3, padding=1)

    @property
    def num_memories(self) -> int:
        return sum(len(s) for s in self.stages)

    def forward(
        self, latents: torch.Tensor, state: list[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """latents [B, z, f, h, w] -> (pixels [B, 3, 4f, s h, s w] in [-1, 1], new state).

        `state`: the previous latent frame's input to every memory block (None: a new stream,
        the past is zeros). Every frame group is returned whole; trimming the first group of a
        stream to one frame is the caller's (`StreamingFastDecoder`)."""
        b, _, f, h, w = latents.shape
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * f, -1, h, w)  # frames on the batch axis
        x = F.relu(self.stem(x))
        new_state: list[torch.Tensor] = []
        m = 0
        for level, stage in enumerate(self.stages):
            for block in stage:
                seq = x.reshape(b, f, *x.shape[1:])
                first = torch.zeros_like(seq[:, :1]) if state is None else state[m].unsqueeze(1)
                past = torch.cat([first, seq[:, :-1]], dim=1).reshape_as(x)  # input at t-1
                new_state.append(seq[:, -1].detach())
                x = block(x, past)
                m += 1
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = F.relu(self.ups[level](x))
        x = self.head2(F.relu(self.head1(x)))  # [B*f, 3*tf, H, W]
        tf = self.config.temporal_factor
        hh, ww = x.shape[-2:]
        pixels = x.reshape(b, f, tf, 3, hh, ww).permute(0, 3, 1, 2, 4, 5).reshape(b, 3, f * tf, hh, ww)
        return pixels.clamp(-1.0, 1.0), new_state

    # ---- persistence ------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        data = {**self.config.model_dump(), "spatial_factor": self.config.spatial_factor}  # for readers
        (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors")
        )
        return out

    @classmethod
    def load(
        cls, folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> FastCausalDecoder:
        folder = Path(folder)
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder}: no fast decoder here (config.json + model.safetensors); "
                "train one with `fashionchameleon train fast-decoder`"
            )
        data = json.loads((folder / "config.json").read_text())
        config = FastDecoderConfig(**{k: v for k, v in data.items() if k != "spatial_factor"})
        if data.get("spatial_factor", config.spatial_factor) != config.spatial_factor:
            raise ValueError(f"{folder}/config.json: spatial_factor {data['spatial_factor']} does not match its layers")
        model = cls(config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.to(device=device, dtype=dtype).eval()


def first_group_frame(temporal_factor: int) -> int:
    """Which frame of the first latent frame's group a stream keeps (the Wan VAE decodes the first
    latent frame to a single frame)."""
    return temporal_factor - 1
