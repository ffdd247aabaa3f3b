"""Model presets: one registry, one code path from the CPU `tiny` model to Wan2.2-TI2V-5B.

A preset is a typed, frozen description of every component (DiT, VAE, text encoder) plus the
streaming settings. Everything derived from it (tokens per latent frame, latent frame counts,
KV-cache sizes) is computed here, never hard-coded elsewhere.

Units: "pixel frames" are decoded video frames, "latent frames" are VAE latent frames
(F pixel frames -> (F - 1) / 4 + 1 latent frames), "tokens" are DiT tokens after patchify.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DiTConfig(_Frozen):
    """Constructor arguments of diffusers' `WanTransformer3DModel` (same names)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 48
    out_channels: int = 48
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 14336
    num_layers: int = 30
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    rope_max_seq_len: int = 1024

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @model_validator(mode="after")
    def _check(self) -> DiTConfig:
        if self.patch_size[0] != 1:
            raise ValueError("streaming needs a temporal patch size of 1 (one latent frame per token row)")
        hw = 2 * (self.attention_head_dim // 6)
        if (self.attention_head_dim - 2 * hw) % 2 or hw % 2:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} does not split into even RoPE t/h/w parts")
        return self


# Wan2.2 VAE (z_dim 48) latent statistics, from the Wan2.2-TI2V-5B-Diffusers vae/config.json.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.157, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.123, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.052, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.499, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.06, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


class VAEConfig(_Frozen):
    """Constructor arguments of diffusers' `AutoencoderKLWan` (same names), Wan2.2 defaults."""

    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN22_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN22_LATENTS_STD
    is_residual: bool = True
    in_channels: int = 12
    out_channels: int = 12
    patch_size: int = 2
    scale_factor_spatial: int = 16
    scale_factor_temporal: int = 4

    @model_validator(mode="after")
    def _check(self) -> VAEConfig:
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError("latents_mean/latents_std must have z_dim entries")
        return self

    def diffusers_kwargs(self) -> dict:
        kw = self.model_dump()
        for key in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            kw[key] = list(kw[key])
        return kw


class TextEncoderConfig(_Frozen):
    """A umT5 encoder (transformers' `UMT5EncoderModel`) and its tokenizer.

    `tokenizer="byte"` builds a byte-level tokenizer in code (no download), used by small presets;
    `tokenizer="folder"` means the tokenizer is read from the checkpoint's `tokenizer/` folder.
    """

    d_model: int = 4096
    d_ff: int = 10240
    d_kv: int = 64
    num_layers: int = 24
    num_heads: int = 64
    vocab_size: int = 256384
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    max_length: int = 512
    tokenizer: Literal["byte", "folder"] = "folder"


# How to read the paper's "KV cache size M = 23" (section 5.1):
#   "trained-span" (default): M is the whole attended span, cond + sink + window + chunk = the trained
#                 sequence length (2 + 21 = 23 at the paper's setting), so no chunk ever sees a RoPE
#                 position or a sequence length that training did not show the model.
#   "m-is-cache": M counts the cached sink + window frames only, so a chunk attends cond + M + chunk
#                 (28 at the paper's setting): positions beyond training (an explicit opt-in,
#                 `attend_beyond_trained=True`, which the checkpoint loader warns about).
KVReading = Literal["trained-span", "m-is-cache"]
KV_READINGS: tuple[str, ...] = ("trained-span", "m-is-cache")


class TrainedRangeError(ValueError):
    """Streaming settings attend more latent frames than the model was trained on."""


class StreamingConfig(_Frozen):
    """Streaming inference settings (paper sections 4.3 and 5.1).

    The attended span (cond + sink + window + chunk, latent frames) is bounded by `trained_frames`,
    the sequence length (cond included) the model was trained at; the training recipe's clips are
    `trained_frames - cond_frames` latent frames and the training run records the number in the
    checkpoint. `attend_beyond_trained` lifts the bound (the "m-is-cache" reading, an ablation).
    """

    height: int = 704
    width: int = 1280
    fps: int = 24
    chunk_frames: int = 3  # latent frames per chunk (first chunk -> 9 pixel frames, later -> 12)
    sink_frames: int = 3  # latent frames kept as attention sink (the first chunk after open/switch)
    # M: sink + window latent frames kept in the cache. cond 2 + sink 3 + window 15 + chunk 3 = 23.
    max_cache_frames: int = 18
    cond_frames: int = 2  # reference + garment, one latent frame each
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    num_train_timesteps: int = 1000
    rope_policy: Literal["relative", "absolute"] = "relative"
    context_pass: bool = True
    # Sequence length the model was trained at, latent frames with cond (2 + 21 = 23 in the paper).
    trained_frames: int = 23
    # Opt-in to attend past `trained_frames` (RoPE positions and lengths never seen in training).
    attend_beyond_trained: bool = False

    @model_validator(mode="after")
    def _check(self) -> StreamingConfig:
        if self.sink_frames > self.max_cache_frames - self.chunk_frames:
            raise ValueError("sink_frames must leave room for at least one chunk in the window")
        if self.sink_frames > self.chunk_frames:
            raise ValueError("the sink is filled by the first chunk, so sink_frames <= chunk_frames")
        if any(not 0 < t <= self.num_train_timesteps for t in self.timesteps):
            raise ValueError("timesteps must lie in (0, num_train_timesteps]")
        if self.attended_frames > self.trained_frames and not self.attend_beyond_trained:
            raise TrainedRangeError(self.trained_range_message())
        return self

    @property
    def window_frames(self) -> int:
        return self.max_cache_frames - self.sink_frames

    @property
    def attended_frames(self) -> int:
        """Latent frames a steady-state chunk attends to: cond + sink + window + the chunk itself."""
        return self.cond_frames + self.max_cache_frames + self.chunk_frames

    @property
    def max_rope_frame_position(self) -> int:
        """Largest temporal RoPE position a chunk sees under the relative policy (attended - 1);
        at most `trained_frames - 1` unless `attend_beyond_trained`."""
        return self.attended_frames - 1

    @property
    def kv_reading(self) -> KVReading:
        """Which reading of the paper's M these settings follow (see `KVReading`)."""
        return "m-is-cache" if self.attended_frames > self.trained_frames else "trained-span"

    def trained_range_message(self) -> str:
        fit = self.trained_frames - self.cond_frames - self.chunk_frames
        return (
            f"streaming settings attend {self.attended_frames} latent frames (cond {self.cond_frames} + sink "
            f"{self.sink_frames} + window {self.window_frames} + chunk {self.chunk_frames}) but the model was "
            f"trained on sequences of {self.trained_frames} (trained_frames): RoPE positions up to "
            f"{self.max_rope_frame_position} would extrapolate past {self.trained_frames - 1}. Set "
            f"max_cache_frames={fit} (sink + window) to stay inside the trained range, or opt in to the "
            f"'m-is-cache' reading explicitly with attend_beyond_trained=true"
        )

    def for_reading(self, reading: KVReading) -> StreamingConfig:
        """These settings with M sized by a reading of the paper: "trained-span" fills the trained
        length exactly (M = trained - cond - chunk); "m-is-cache" caches M = trained frames and
        attends cond + M + chunk (sets `attend_beyond_trained`)."""
        if reading == "trained-span":
            m, beyond = self.trained_frames - self.cond_frames - self.chunk_frames, False
        elif reading == "m-is-cache":
            m, beyond = self.trained_frames, True
        else:
            raise ValueError(f"unknown KV reading {reading!r}; choose one of {', '.join(KV_READINGS)}")
        return StreamingConfig(**{**self.model_dump(), "max_cache_frames": m, "attend_beyond_trained": beyond})


def warn_beyond_trained(streaming: StreamingConfig, source: str) -> bool:
    """Warn (UserWarning) when `streaming` attends past its trained length by opt-in; True if so."""
    if streaming.attended_frames <= streaming.trained_frames:
        return False
    warnings.warn(
        f"{source}: attend_beyond_trained is set ('m-is-cache' reading): chunks attend "
        f"{streaming.attended_frames} latent frames, RoPE positions up to {streaming.max_rope_frame_position}, "
        f"but the model was trained on {streaming.trained_frames} (positions up to {streaming.trained_frames - 1})",
        UserWarning,
        stacklevel=3,
    )
    return True


class Preset(_Frozen):
    name: str
    dit: DiTConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    streaming: StreamingConfig = Field(default_factory=StreamingConfig)

    # ---- derived geometry -------------------------------------------------------------
    @property
    def spatial_downsample(self) -> int:
        """Pixels per DiT token side: VAE spatial factor x DiT patch."""
        return self.vae.scale_factor_spatial * self.dit.patch_size[1]

    def latent_hw(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        height = self.streaming.height if height is None else height
        width = self.streaming.width if width is None else width
        self.check_resolution(height, width)
        s = self.vae.scale_factor_spatial
        return height // s, width // s

    def token_grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """DiT tokens per latent frame along (height, width)."""
        lh, lw = self.latent_hw(height, width)
        return lh // self.dit.patch_size[1], lw // self.dit.patch_size[2]

    def tokens_per_frame(self, height: int | None = None, width: int | None = None) -> int:
        gh, gw = self.token_grid(height, width)
        return gh * gw

    def check_resolution(self, height: int, width: int) -> None:
        step = self.spatial_downsample
        if height <= 0 or width <= 0 or height % step or width % step:
            raise ValueError(f"resolution {width}x{height} must be positive multiples of {step} for preset {self.name}")

    @property
    def attended_frames(self) -> int:
        """Latent frames a chunk attends to: cond + sink + window + chunk."""
        return self.streaming.attended_frames

    @property
    def trained_frames(self) -> int:
        """The training recipe's sequence length, latent frames with cond (what the model saw)."""
        return self.streaming.trained_frames

    def with_streaming(self, **changes) -> Preset:
        """A copy with changed streaming settings, validated (the trained range included)."""
        streaming = StreamingConfig(**{**self.streaming.model_dump(), **changes})
        return self.model_copy(update={"streaming": streaming})

    def with_resolution(self, height: int, width: int) -> Preset:
        self.check_resolution(height, width)
        return self.with_streaming(height=height, width=width)


def latent_frames(pixel_frames: int, temporal_factor: int = 4) -> int:
    """F pixel frames -> (F - 1) / 4 + 1 latent frames."""
    if pixel_frames < 1 or (pixel_frames - 1) % temporal_factor:
        raise ValueError(f"{pixel_frames} pixel frames is not 1 + {temporal_factor}k")
    return (pixel_frames - 1) // temporal_factor + 1


def pixel_frames(latent_frames_: int, temporal_factor: int = 4) -> int:
    """Inverse of `latent_frames`: 1 + 4 (f - 1)."""
    return 1 + temporal_factor * (latent_frames_ - 1)


def _tiny_vae(z_dim: int) -> VAEConfig:
    return VAEConfig(
        base_dim=8,
        decoder_base_dim=8,
        z_dim=z_dim,
        dim_mult=(1, 2, 2, 2),
        num_res_blocks=1,
        latents_mean=tuple(0.0 for _ in range(z_dim)),
        latents_std=tuple(1.0 for _ in range(z_dim)),
    )


_SMALL_TEXT: dict[str, Any] = dict(vocab_size=384, relative_attention_num_buckets=8, relative_attention_max_distance=32)

PRESETS: dict[str, Preset] = {
    "wan2.2-ti2v-5b": Preset(
        name="wan2.2-ti2v-5b",
        dit=DiTConfig(),
        vae=VAEConfig(),
        text_encoder=TextEncoderConfig(),
        streaming=StreamingConfig(),
    ),
    # Runs a whole stream in seconds on one CPU core; CI and the embedded default use it.
    "tiny": Preset(
        name="tiny",
        dit=DiTConfig(
            num_attention_heads=2,
            attention_head_dim=24,
            in_channels=8,
            out_channels=8,
            text_dim=32,
            freq_dim=32,
            ffn_dim=96,
            num_layers=2,
        ),
        vae=_tiny_vae(8),
        text_encoder=TextEncoderConfig(
            d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, max_length=32, tokenizer="byte", **_SMALL_TEXT
        ),
        streaming=StreamingConfig(height=96, width=128),
    ),
    # The toy try-on world's model (shared/toyworld): trained end to end on a 2-core CPU by
    # `fashionchameleon train toy`, shipped in checkpoints/toy and used by default. Portrait 96x160
    # (examples/person.png's aspect), an 8x VAE (one downsampling stage fewer than Wan2.2's 16x,
    # causal 4x temporal compression kept) so a DiT token covers 16x16 pixels. Training clips are
    # 12 latent frames (45 pixel frames): cond 2 + sink 3 + window 6 + chunk 3 = 14 = 2 + 12.
    "toy": Preset(
        name="toy",
        dit=DiTConfig(
            num_attention_heads=4,
            attention_head_dim=32,
            in_channels=16,
            out_channels=16,
            text_dim=64,
            freq_dim=64,
            ffn_dim=512,
            num_layers=4,
        ),
        vae=VAEConfig(
            base_dim=16,
            decoder_base_dim=16,
            z_dim=16,
            dim_mult=(1, 2, 2),
            num_res_blocks=1,
            temperal_downsample=(True, True),
            latents_mean=tuple(0.0 for _ in range(16)),
            latents_std=tuple(1.0 for _ in range(16)),
            scale_factor_spatial=8,
        ),
        text_encoder=TextEncoderConfig(
            d_model=64, d_ff=128, d_kv=32, num_layers=2, num_heads=2, max_length=160, tokenizer="byte", **_SMALL_TEXT
        ),
        streaming=StreamingConfig(height=160, width=96, max_cache_frames=9, trained_frames=14),
    ),
    # In between: enough depth and width to profile kernels and cache traffic on a laptop GPU.
    "small": Preset(
        name="small",
        dit=DiTConfig(
            num_attention_heads=8,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            text_dim=256,
            ffn_dim=2048,
            num_layers=8,
        ),
        vae=_tiny_vae(16).model_copy(update={"base_dim": 32, "decoder_base_dim": 32}),
        text_encoder=TextEncoderConfig(
            d_model=256, d_ff=512, d_kv=32, num_layers=4, num_heads=8, max_length=128, tokenizer="byte", **_SMALL_TEXT
        ),
        streaming=StreamingConfig(height=256, width=448),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
