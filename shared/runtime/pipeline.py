"""Pixel-level streaming: images + prompt in, decoded video chunks out.

`Engine` holds the shared, read-only components (DiT, VAE, text encoder) for one checkpoint.
`VideoSession` is one user's stream: a latent `StreamingSession` plus a `StreamingDecoder`
and the last decoded frame, which the garment switch's reference disentangle re-encodes.
The CLI, the benchmark and the services all drive this one code path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from shared.media.images import prepare_garment, prepare_reference, to_tensor
from shared.models.attention import use_attention_backend
from shared.models.checkpoint import ALL_PARTS, Components, build_random, load_checkpoint
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from shared.models.text_encoder import validate_prompt

from .decode import StreamingDecoder, to_uint8_frames
from .session import SessionState, StreamingSession, SwitchOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    """How to run a checkpoint: device, dtype, kernels, resolution and streaming overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_backend: str = "auto"
    height: int | None = None
    width: int | None = None
    streaming_overrides: dict = {}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class ChunkResult:
    index: int  # chunk index since open
    latents: torch.Tensor  # [1, C, chunk_frames, h, w]
    frames: torch.Tensor  # uint8 [T, H, W, 3] on the CPU (T = 9 for chunk 0, else 12)
    first_frame: int  # pixel-frame index of frames[0] since open
    generate_seconds: float  # DiT: denoising steps + context pass
    decode_seconds: float  # streaming VAE decode + copy to host
    switched: bool  # a garment switch took effect at this chunk


class Engine:
    def __init__(self, components: Components, config: EngineConfig = EngineConfig()):
        preset = components.preset
        if config.height is not None or config.width is not None:
            preset = preset.with_resolution(config.height or preset.streaming.height, config.width or preset.streaming.width)
        if config.streaming_overrides:
            preset = preset.with_streaming(**config.streaming_overrides)
        self.preset = preset
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.checkpoint_id = components.checkpoint_id
        # A replica may load only some parts (a decoder needs no DiT); missing ones stay None.
        c = components
        self.dit = c.dit.to(device=self.device, dtype=self.dtype).eval() if c.dit is not None else None
        self.vae = c.vae.to(self.device, self.dtype) if c.vae is not None else None
        self.text_encoder = c.text_encoder.to(self.device, self.dtype) if c.text_encoder is not None else None
        self.rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device=self.device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: EngineConfig = EngineConfig(), parts: frozenset[str] = ALL_PARTS
    ) -> "Engine":
        return cls(load_checkpoint(path, device="cpu", dtype=config.torch_dtype, parts=parts), config)

    @classmethod
    def from_preset(
        cls, name: str, config: EngineConfig = EngineConfig(), seed: int = 0, parts: frozenset[str] = ALL_PARTS
    ) -> "Engine":
        return cls(build_random(get_preset(name), seed=seed, dtype=config.torch_dtype, parts=parts), config)

    # ---- encoders (no session state) ---------------------------------------------------
    def _pixels(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img)[None].to(self.device, self.dtype)  # [1, 3, H, W]

    @torch.no_grad()
    def encode_reference(self, img: Image.Image) -> torch.Tensor:
        st = self.preset.streaming
        return self.vae.encode_image(self._pixels(prepare_reference(img, st.height, st.width)))

    @torch.no_grad()
    def encode_garment(self, img: Image.Image) -> torch.Tensor:
        st = self.preset.streaming
        return self.vae.encode_image(self._pixels(prepare_garment(img, st.height, st.width)))

    @torch.no_grad()
    def encode_frame(self, pixels: torch.Tensor) -> torch.Tensor:
        """A decoded frame [1, 3, H, W] in [-1, 1] -> one-frame latent (decode-encode round trip)."""
        return self.vae.encode_image(pixels.to(self.device, self.dtype))

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        return self.text_encoder.encode([validate_prompt(prompt)])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def session(self) -> "VideoSession":
        return VideoSession(self)


class VideoSession:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.latent = StreamingSession(engine.dit, engine.preset, engine.device, engine.dtype, rope=engine.rope)
        self.decoder = StreamingDecoder(engine.vae)
        self.last_frame: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1]
        self._switch_pending = False

    @property
    def chunk_index(self) -> int:
        return self.latent.chunk_index

    def _timed(self, fn, *args):
        self.engine.synchronize()
        start = time.perf_counter()
        out = fn(*args)
        self.engine.synchronize()
        return out, time.perf_counter() - start

    def open(self, reference: Image.Image, garment: Image.Image, prompt: str, seed: int = 0) -> None:
        e = self.engine
        with use_attention_backend(e.config.attention_backend):
            self.latent.open(
                e.encode_reference(reference), e.encode_garment(garment), e.encode_prompt(prompt), seed, prompt=prompt
            )
        self.decoder.reset()
        self.last_frame = None

    def next_chunk(self) -> ChunkResult:
        with use_attention_backend(self.engine.config.attention_backend):
            index = self.latent.chunk_index
            latents, gen_s = self._timed(self.latent.next_chunk)
            first_frame = self.decoder.frames_decoded
            pixels, dec_s = self._timed(self.decoder.decode_chunk, latents)
        self.last_frame = pixels[:, :, -1]
        frames = to_uint8_frames(pixels)
        switched, self._switch_pending = self._switch_pending, False
        return ChunkResult(index, latents, frames, first_frame, gen_s, dec_s, switched)

    def switch_garment(self, garment: Image.Image, options: SwitchOptions = SwitchOptions()) -> float:
        """Apply a garment switch before the next chunk; returns its latency in seconds."""
        e = self.engine

        def run() -> None:
            new_ref = None
            if options.disentangle:
                if self.last_frame is None:
                    raise ValueError("a garment switch needs at least one generated chunk")
                new_ref = e.encode_frame(self.last_frame)
            self.latent.switch_garment(e.encode_garment(garment), new_ref, options)

        with use_attention_backend(e.config.attention_backend):
            _, seconds = self._timed(run)
        self._switch_pending = True
        return seconds

    def update_prompt(self, prompt: str) -> None:
        self.latent.set_prompt(self.engine.encode_prompt(prompt), prompt)

    def state(self) -> SessionState:
        last = None if self.last_frame is None else self.engine.encode_frame(self.last_frame)
        return self.latent.state(last_frame=last)

    def restore(self, state: SessionState) -> None:
        with use_attention_backend(self.engine.config.attention_backend):
            self.latent.restore(state)
        self.decoder.reset()
        self.last_frame = None

    def close(self) -> None:
        self.latent.close()
        self.decoder.reset()
        self.last_frame = None
