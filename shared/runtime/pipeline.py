"""Pixel-level streaming: images + prompt in, decoded video chunks out.

`Engine` holds the shared, read-only components (DiT, VAE, text encoder) for one checkpoint,
and the attention backend its sessions run on. `VideoSession` is one user's stream and the one
orchestrator of a session's engine operations (open, switch garment, update prompt, next chunk,
decode, state, close): a latent `StreamingSession`, a `StreamingDecoder` and the last decoded
frame, which the garment switch's reference disentangle re-encodes. The CLI, eval, batch jobs,
the benchmark, the generator service and training rollouts all drive it; callers add transport
(files, Redis, pacing), never engine logic of their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from shared.media.image_tensors import to_tensor
from shared.media.images import prepare_garment, prepare_reference
from shared.models.attention import check_backend
from shared.models.checkpoint import ALL_PARTS, Components, build_random, load_checkpoint
from shared.models.dit import InContextWanDiT
from shared.models.fast_decoder import SUBFOLDER as FAST_DECODER_FOLDER
from shared.models.fast_decoder import FastCausalDecoder, FastDecoderConfig
from shared.models.presets import Preset, get_preset, warn_beyond_trained
from shared.models.prompts import validate_prompt
from shared.models.rope import RopeTable
from shared.models.vae import VideoVAE

from .batch import group_batchable
from .batch import next_chunks as _next_latent_chunks
from .config import EngineConfig
from .decode import StreamingDecoder, StreamingFastDecoder, to_uint8_frames
from .session import PromptOptions, SessionClosed, SessionState, StreamingSession, SwitchOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ChunkResult:
    index: int  # chunk index since open
    latents: torch.Tensor  # [1, C, chunk_frames, h, w]
    frames: torch.Tensor  # uint8 [T, H, W, 3] on the CPU (T = 9 for chunk 0, else 12)
    first_frame: int  # pixel-frame index of frames[0] since open
    generate_seconds: float  # DiT: denoising steps + context pass
    decode_seconds: float  # streaming VAE decode + copy to host
    switched: bool  # a garment switch took effect at this chunk


@dataclass
class LatentChunk:
    """One generated chunk before decode (the generator service decodes on another deployment)."""

    index: int  # chunk index since open
    latents: torch.Tensor  # [1, C, chunk_frames, h, w]
    generate_seconds: float  # DiT: denoising steps + context pass
    switched: bool  # a garment switch took effect at this chunk
    prompt_updated: bool  # a prompt update took effect at this chunk


def switch_options_at(chunk_index: int, options: SwitchOptions) -> SwitchOptions:
    """The switch steps that apply before chunk `chunk_index` of a stream.

    Before the first chunk nothing has streamed: there is no history to withdraw and no decoded
    frame to disentangle, so the new garment simply replaces the old one (refresh only).
    """
    if chunk_index == 0:
        return SwitchOptions(refresh=True, withdraw=False, disentangle=False)
    return options


def apply_hot_path_options(dit: InContextWanDiT, config: EngineConfig, device: torch.device) -> None:
    """`EngineConfig.fp8`, `.compile` and `.cuda_graphs` on a DiT already on `device` (in place).

    The GPU-only options fail here, at engine build, with a message that says why."""
    if (config.cuda_graphs or config.fp8) and device.type != "cuda":
        which = " and ".join(n for n, on in (("cuda_graphs", config.cuda_graphs), ("fp8", config.fp8)) if on)
        raise ValueError(f"EngineConfig {which} needs a CUDA device (got device={device.type!r})")
    if config.fp8:
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("EngineConfig fp8 needs an FP8-capable GPU (compute capability >= 8.9, e.g. H100/H200)")
        try:  # lazily: the `gpu` extra; CPU installs never import it
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
        except ImportError as e:
            raise ValueError(f"EngineConfig fp8 needs torchao (pip install 'fashionchameleon[gpu]'): {e}") from None
        # The blocks' linear layers only: embeddings, time and output projections stay in the model dtype.
        quantize_(dit.transformer.blocks, Float8DynamicActivationFloat8WeightConfig())
    if config.compile or config.cuda_graphs:
        dit.compile_blocks(mode="reduce-overhead" if config.cuda_graphs else None)


class Engine:
    def __init__(self, components: Components, config: EngineConfig = EngineConfig()):
        preset = components.preset
        if config.height is not None or config.width is not None:
            preset = preset.with_resolution(
                config.height or preset.streaming.height, config.width or preset.streaming.width
            )
        if config.streaming_overrides:
            preset = preset.with_streaming(**config.streaming_overrides)  # checks the trained range
            warn_beyond_trained(preset.streaming, "engine streaming overrides")
        self.preset = preset
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.checkpoint_id = components.checkpoint_id
        # A replica may load only some parts (a decoder needs no DiT); missing ones stay None.
        c = components
        self.dit = c.dit.to(device=self.device, dtype=self.dtype).eval() if c.dit is not None else None
        if self.dit is not None:
            apply_hot_path_options(self.dit, config, self.device)
        self.vae = c.vae.to(self.device, self.dtype) if c.vae is not None else None
        self.text_encoder = c.text_encoder.to(self.device, self.dtype) if c.text_encoder is not None else None
        self.rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device=self.device)
        # A property of the engine, passed down to every attention hook of its sessions: engines
        # with different backends run side by side (threads) without touching each other.
        self.attention_backend = check_backend(config.attention_backend)
        # `config.decoder == "fast"`: the distilled causal decoder (set by from_checkpoint / from_preset).
        self.fast_decoder: FastCausalDecoder | None = None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: EngineConfig = EngineConfig(), parts: frozenset[str] = ALL_PARTS
    ) -> Engine:
        engine = cls(load_checkpoint(path, device="cpu", dtype=DTYPES[config.dtype], parts=parts), config)
        if config.decoder == "fast" and "vae" in parts:
            engine.fast_decoder = FastCausalDecoder.load(
                Path(path) / FAST_DECODER_FOLDER, device=engine.device, dtype=engine.dtype
            )
        return engine

    @classmethod
    def from_preset(
        cls, name: str, config: EngineConfig = EngineConfig(), seed: int = 0, parts: frozenset[str] = ALL_PARTS
    ) -> Engine:
        engine = cls(build_random(get_preset(name), seed=seed, dtype=DTYPES[config.dtype], parts=parts), config)
        if config.decoder == "fast" and "vae" in parts:  # random weights, like the rest (dev, benchmarks)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                vae = engine.preset.vae
                model = FastCausalDecoder(
                    FastDecoderConfig.for_vae(vae.z_dim, vae.scale_factor_spatial, vae.scale_factor_temporal)
                )
            engine.fast_decoder = model.to(device=engine.device, dtype=engine.dtype).eval()
        return engine

    def streaming_decoder(self) -> StreamingDecoder | StreamingFastDecoder:
        """A new per-stream decoder of the configured kind (`EngineConfig.decoder`)."""
        vae = self._vae()
        if self.fast_decoder is not None:
            return StreamingFastDecoder(self.fast_decoder, vae.z_dim)
        return StreamingDecoder(vae)

    # ---- encoders (no session state) ---------------------------------------------------
    def _vae(self) -> VideoVAE:
        if self.vae is None:
            raise RuntimeError("this engine has no VAE loaded")
        return self.vae

    def _pixels(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img)[None].to(self.device, self.dtype)  # [1, 3, H, W]

    @torch.no_grad()
    def encode_reference(self, img: Image.Image) -> torch.Tensor:
        st = self.preset.streaming
        return self._vae().encode_image(self._pixels(prepare_reference(img, st.height, st.width)))

    @torch.no_grad()
    def encode_garment(self, img: Image.Image) -> torch.Tensor:
        st = self.preset.streaming
        return self._vae().encode_image(self._pixels(prepare_garment(img, st.height, st.width)))

    @torch.no_grad()
    def encode_frame(self, pixels: torch.Tensor) -> torch.Tensor:
        """A decoded frame [1, 3, H, W] in [-1, 1] -> one-frame latent (decode-encode round trip)."""
        return self._vae().encode_image(pixels.to(self.device, self.dtype))

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        if self.text_encoder is None:
            raise RuntimeError("this engine has no text encoder loaded")
        return self.text_encoder.encode([validate_prompt(prompt)])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def session(self) -> VideoSession:
        return VideoSession(self)


class VideoSession:
    """The one orchestrator of a session's engine operations.

    Two levels over the same state and rules:

    * pixel level (`open`, `switch_garment`, `update_prompt`, `next_chunk`): images and prompt
      strings in, decoded uint8 frames out, through the engine's encoders and this session's
      streaming decoder (the CLI, eval, batch jobs, the benchmark);
    * latent level (`open_latents`, `switch_latents`, `set_prompt`, `generate`): latents and
      text embeddings in, latent chunks out, for callers whose encoders and decoder run
      elsewhere (the generator service) or that train the model (`rollout_chunk`).

    Both levels share the switch rule (`switch_options`: what a switch does at this chunk) and
    the attention backend (the engine's, passed down to every attention hook).
    """

    def __init__(self, engine: Engine | None, latent: StreamingSession | None = None):
        if latent is None:
            if engine is None or engine.dit is None:
                raise ValueError("a session needs an engine with a DiT, or a latent session")
            latent = StreamingSession(
                engine.dit,
                engine.preset,
                engine.device,
                engine.dtype,
                rope=engine.rope,
                attention_backend=engine.attention_backend,
            )
        self.engine = engine
        self.latent = latent
        # An engine without a VAE (the generator service's) decodes on another deployment.
        vae = None if engine is None else engine.vae
        self.decoder = engine.streaming_decoder() if engine is not None and vae is not None else None
        self.last_frame: torch.Tensor | None = None  # [1, 3, H, W] in [-1, 1]
        self._switch_pending = False
        self._prompt_pending = False

    @classmethod
    def of_model(
        cls,
        dit: InContextWanDiT,
        preset: Preset,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rope: RopeTable | None = None,
        attention_backend: str | None = None,
    ) -> VideoSession:
        """A latent-level session over a bare DiT, without an engine: training rollouts drive the
        model being trained (no VAE, no text encoder; `attention_backend` None = ambient)."""
        return cls(None, StreamingSession(dit, preset, device, dtype, rope=rope, attention_backend=attention_backend))

    # ---- introspection -----------------------------------------------------------------
    @property
    def chunk_index(self) -> int:
        return self.latent.chunk_index

    @property
    def preset(self) -> Preset:
        return self.latent.preset

    @property
    def is_open(self) -> bool:
        return self.latent.is_open

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise ValueError("pixel-level operations need an engine (this session drives a bare model)")
        return self.engine

    def _require_decoder(self) -> StreamingDecoder | StreamingFastDecoder:
        if self.decoder is None:
            raise ValueError("this engine has no VAE: decode the latents elsewhere (use generate())")
        return self.decoder

    def _synchronize(self) -> None:
        if self.latent.device.type == "cuda":
            torch.cuda.synchronize(self.latent.device)

    def _timed(self, fn, *args):
        self._synchronize()
        start = time.perf_counter()
        out = fn(*args)
        self._synchronize()
        return out, time.perf_counter() - start

    def _reset_stream(self) -> None:
        if self.decoder is not None:
            self.decoder.reset()
        self.last_frame = None
        self._switch_pending = self._prompt_pending = False

    # ---- latent level ------------------------------------------------------------------
    def open_latents(
        self,
        reference: torch.Tensor,
        garment: torch.Tensor,
        text: torch.Tensor,
        seed: int,
        chunk_index: int = 0,
        prompt: str = "",
    ) -> None:
        """Start (or, at `chunk_index` > 0, resume) a stream from reference/garment latents
        [1, C, 1, h, w] and a text embedding [1, Lt, text_dim]."""
        self.latent.open(reference, garment, text, seed, chunk_index, prompt)
        self._reset_stream()

    def switch_options(self, options: SwitchOptions = SwitchOptions()) -> SwitchOptions:
        """The steps a switch asked with `options` applies before the next chunk (see
        `switch_options_at`); `disentangle` there means it needs the last decoded frame."""
        return switch_options_at(self.latent.chunk_index, options)

    def switch_latents(
        self,
        garment: torch.Tensor,
        options: SwitchOptions = SwitchOptions(),
        new_reference: torch.Tensor | None = None,
    ) -> SwitchOptions:
        """Switch to a garment latent [1, C, 1, h, w] before the next chunk. `new_reference` is the
        decode-encode latent of the last decoded frame, needed when `switch_options(options)`
        disentangles. Returns the steps applied."""
        applied = self.switch_options(options)
        self.latent.switch_garment(garment, new_reference if applied.disentangle else None, applied)
        self._switch_pending = True
        return applied

    def rewind(self, chunk_index: int, prompt_updated: bool = False) -> None:
        """Latent level: drop the chunks from `chunk_index` on, generated but never shown, before a
        switch that withdraws their history anyway (`StreamingSession.rewind`): the switch then
        takes effect at `chunk_index`. Their decode is the caller's to drop (the generator service
        re-primes its decoder). `prompt_updated`: the first dropped chunk was the first under a new
        prompt, so its redo is reported as such."""
        self.latent.rewind(chunk_index)
        self._prompt_pending = self._prompt_pending or prompt_updated

    def set_prompt(self, text: torch.Tensor, prompt: str = "", options: PromptOptions = PromptOptions()) -> None:
        """Replace the text context [1, Lt, text_dim] from the next chunk on, re-caching the cond
        KV (and the window's, if `options.recache_window`) under it."""
        self.latent.set_prompt(text, prompt, options)
        self._prompt_pending = True

    def generate(self) -> LatentChunk:
        """Generate the next chunk's latents (no decode)."""
        index = self.latent.chunk_index
        latents, seconds = self._timed(self.latent.next_chunk)
        return self._took_chunk(index, latents, seconds)

    def _took_chunk(self, index: int, latents: torch.Tensor, seconds: float) -> LatentChunk:
        switched, self._switch_pending = self._switch_pending, False
        prompt_updated, self._prompt_pending = self._prompt_pending, False
        return LatentChunk(index, latents, seconds, switched, prompt_updated)

    def rollout_chunk(self, exit_step: int) -> torch.Tensor:
        """Self-Forcing rollout of the next chunk (training; see `StreamingSession.rollout_chunk`)."""
        self._switch_pending = self._prompt_pending = False
        return self.latent.rollout_chunk(exit_step)

    def project_text_with_grad(self) -> None:
        """Re-project the prompt with autograd on (training: rollouts train the text projection;
        inference projects it once at open, graph-free)."""
        s = self.latent
        if s.text_raw is None:
            raise SessionClosed("session is not open")
        s.text = s.dit.embed_text(s.text_raw).to(s.dtype)

    # ---- pixel level -------------------------------------------------------------------
    def open(self, reference: Image.Image, garment: Image.Image, prompt: str, seed: int = 0) -> None:
        e = self._require_engine()
        self.open_latents(
            e.encode_reference(reference), e.encode_garment(garment), e.encode_prompt(prompt), seed, prompt=prompt
        )

    def next_chunk(self) -> ChunkResult:
        return self.decode(self.generate())

    def decode(self, chunk: LatentChunk) -> ChunkResult:
        """Decode a chunk this session generated (`generate` / `generate_batch`), in order."""
        decoder = self._require_decoder()
        first_frame = decoder.frames_decoded
        pixels, dec_s = self._timed(decoder.decode_chunk, chunk.latents)
        self.last_frame = pixels[:, :, -1].clone()  # a copy: a view would keep the whole chunk's pixels
        frames = to_uint8_frames(pixels)
        return ChunkResult(
            chunk.index, chunk.latents, frames, first_frame, chunk.generate_seconds, dec_s, chunk.switched
        )

    def switch_garment(self, garment: Image.Image, options: SwitchOptions = SwitchOptions()) -> float:
        """Apply a garment switch before the next chunk; returns its latency in seconds."""
        e = self._require_engine()

        def run() -> None:
            applied = self.switch_options(options)
            new_ref = None
            if applied.disentangle:
                if self.last_frame is None:
                    raise ValueError("reference disentangle needs a frame decoded since open or restore")
                new_ref = e.encode_frame(self.last_frame)
            self.switch_latents(e.encode_garment(garment), applied, new_ref)

        _, seconds = self._timed(run)
        return seconds

    def update_prompt(self, prompt: str, options: PromptOptions = PromptOptions()) -> None:
        self.set_prompt(self._require_engine().encode_prompt(prompt), prompt, options)

    # ---- persistence -------------------------------------------------------------------
    def state(self) -> SessionState:
        last = None if self.last_frame is None else self._require_engine().encode_frame(self.last_frame)
        return self.latent.state(last_frame=last)

    def restore(self, state: SessionState) -> None:
        self.latent.restore(state)
        self._reset_stream()

    def close(self) -> None:
        self.latent.close()
        self._reset_stream()


def generate_batch(sessions: list[VideoSession]) -> list[LatentChunk]:
    """The next chunk of every session, stepped in batches (`shared.runtime.batch`): one DiT
    forward per denoising step for each group of sessions that can share one (one group when
    they come from one engine). Each session gets the chunk `session.generate()` would give it;
    `generate_seconds` is the wall time of the batch it was stepped in."""
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("a session appears twice in one batch")
    out: list[LatentChunk | None] = [None] * len(sessions)
    for group in group_batchable([s.latent for s in sessions]):
        members = [sessions[i] for i in group]
        indices = [s.latent.chunk_index for s in members]
        latents, seconds = members[0]._timed(_next_latent_chunks, [s.latent for s in members])
        for i, s, index, x in zip(group, members, indices, latents):
            out[i] = s._took_chunk(index, x, seconds)
    return [c for c in out if c is not None]


def next_chunks(sessions: list[VideoSession]) -> list[ChunkResult]:
    """Pixel level of `generate_batch`: every session's next chunk, generated in batches and
    decoded by each session's own streaming decoder."""
    return [s.decode(c) for s, c in zip(sessions, generate_batch(sessions))]
