"""A streaming session in latent space: open, next chunk, switch garment, set prompt, close.

The session owns one `SessionKVCache` and works on latents only. Image encoding and streaming
decode live one level up (`shared.runtime.pipeline`). That keeps this class the same for the
CLI, the services and the trainer's Self-Forcing rollouts.

Garment switch (paper 4.3), applied at the next chunk boundary, each step switchable:
  1. refresh:     run the cond forward on [reference, new garment], replace the garment's KV.
  2. withdraw:    drop sink and window; the next chunk becomes the new sink.
  3. disentangle: the new reference is the decode-encode of the last decoded pixel frame
                  (given by the caller as a one-frame latent); cond KV is recomputed over
                  [new reference, new garment].
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models.dit import InContextWanDiT
from shared.models.presets import Preset
from shared.models.rope import RopeTable

from .kv_cache import ChunkAttention, CondAttention, KVCacheSpec, SessionKVCache
from .sampler import FewStepSampler, chunk_noises


class SessionClosed(RuntimeError):
    pass


@dataclass(frozen=True)
class SwitchOptions:
    refresh: bool = True
    withdraw: bool = True
    disentangle: bool = True


@dataclass
class SessionState:
    """What a session needs to be rebuilt elsewhere (small: a few latent frames + one prompt).

    Tensors are CPU tensors: reference/garment/last_frame [1, C, 1, h, w] latents, text
    [1, Lt, text_dim] encoder output. `chunk_index` is the next chunk to generate.
    """

    reference: torch.Tensor
    garment: torch.Tensor
    text: torch.Tensor
    seed: int
    chunk_index: int
    prompt: str = ""
    last_frame: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {"reference": self.reference, "garment": self.garment, "text": self.text}
        if self.last_frame is not None:
            tensors["last_frame"] = self.last_frame
        meta = {"seed": self.seed, "chunk_index": self.chunk_index, "prompt": self.prompt, "extra": self.extra}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return st_save(tensors, metadata={"fashionchameleon.session": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "SessionState":
        tensors = st_load(data)
        meta = json.loads(_safetensors_metadata(data)["fashionchameleon.session"])
        return cls(
            reference=tensors["reference"],
            garment=tensors["garment"],
            text=tensors["text"],
            last_frame=tensors.get("last_frame"),
            seed=int(meta["seed"]),
            chunk_index=int(meta["chunk_index"]),
            prompt=meta.get("prompt", ""),
            extra=meta.get("extra", {}),
        )


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of an in-memory safetensors blob (header: u64 length + JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n].decode()).get("__metadata__", {})


class StreamingSession:
    def __init__(
        self,
        dit: InContextWanDiT,
        preset: Preset,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        rope: RopeTable | None = None,
    ):
        st = preset.streaming
        self.dit = dit
        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = KVCacheSpec.from_preset(preset, dtype)
        self.rope = rope or RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device=self.device)
        self.sampler = FewStepSampler(st.timesteps, st.shift, st.num_train_timesteps)
        lh, lw = preset.latent_hw()
        self.chunk_shape = (1, preset.dit.in_channels, st.chunk_frames, lh, lw)
        self.cache: SessionKVCache | None = None
        self.reference: torch.Tensor | None = None  # [1, C, 1, h, w]
        self.garment: torch.Tensor | None = None
        self.text_raw: torch.Tensor | None = None  # [1, Lt, text_dim]
        self.text: torch.Tensor | None = None  # [1, Lt, inner] projected
        self.seed = 0
        self.chunk_index = 0
        self.prompt = ""

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.cache is not None

    def _require_open(self) -> SessionKVCache:
        if self.cache is None:
            raise SessionClosed("session is not open")
        return self.cache

    def _latent(self, x: torch.Tensor, name: str) -> torch.Tensor:
        expected = (1, self.chunk_shape[1], 1, *self.chunk_shape[3:])
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} latent has shape {tuple(x.shape)}, expected {expected}")
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def open(
        self,
        reference: torch.Tensor,
        garment: torch.Tensor,
        text: torch.Tensor,
        seed: int,
        chunk_index: int = 0,
        prompt: str = "",
    ) -> None:
        """Start a stream: reference/garment [1, C, 1, h, w] latents, text [1, Lt, text_dim]."""
        self.cache = SessionKVCache(self.spec, self.device)
        self.reference = self._latent(reference, "reference")
        self.garment = self._latent(garment, "garment")
        self.seed = int(seed)
        self.chunk_index = int(chunk_index)
        self.cache.slots.next_frame_id = self.chunk_index * self.preset.streaming.chunk_frames
        self._set_text(text, prompt)
        self._cond_forward(write_from=0)

    def close(self) -> None:
        """Free the cache (idempotent)."""
        self.cache = None

    # ---- forwards ----------------------------------------------------------------------
    def _set_text(self, text: torch.Tensor, prompt: str) -> None:
        self.text_raw = text.to(self.device)
        self.text = self.dit.embed_text(self.text_raw).to(self.dtype)
        self.prompt = prompt

    def _forward(self, latents: torch.Tensor, t: float, hook) -> torch.Tensor:
        timesteps = torch.full((1, latents.shape[2]), float(t), device=self.device)
        return self.dit(latents, timesteps, self.text, hook)

    def _cond_forward(self, write_from: int) -> None:
        """One forward over [reference, garment] at t=0; cond tokens see only cond tokens."""
        cache = self._require_open()
        cond = torch.cat([self.reference, self.garment], dim=2)  # [1, C, 2, h, w]
        self._forward(cond, 0.0, CondAttention(cache, self.rope, write_from=write_from))

    @torch.no_grad()
    def next_chunk(self) -> torch.Tensor:
        """Generate the next chunk: clean latents [1, C, chunk_frames, h, w]."""
        cache = self._require_open()
        st = self.preset.streaming
        n = st.chunk_frames
        noises = chunk_noises(
            self.seed, self.chunk_index, self.chunk_shape, self.sampler.num_steps, self.device, self.dtype
        )
        denoise_hook = ChunkAttention(cache, self.rope, st.rope_policy, n)
        if st.context_pass:
            x0 = self.sampler.sample(lambda x, t, step: self._forward(x, t, denoise_hook), noises)
            self.append_clean(x0)  # the clean context pass writes the chunk's KV
            return x0
        # Experiment without the context pass: the last denoising step's (noisy) KV is kept.
        plan = cache.slots.plan_append(n)
        write_hook = ChunkAttention(cache, self.rope, st.rope_policy, n, write=plan)
        last = self.sampler.num_steps - 1
        x0 = self.sampler.sample(
            lambda x, t, step: self._forward(x, t, write_hook if step == last else denoise_hook), noises
        )
        cache.slots.commit(plan)
        self.chunk_index += 1
        return x0

    # ---- training hooks (teacher forcing checks, Self-Forcing rollouts) -----------------
    def predict_flow(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Flow of a noisy next chunk x [1, C, n, h, w] at model timestep t against the cache
        (cond + sink + window + the chunk itself). Writes nothing; keeps autograd when enabled."""
        cache = self._require_open()
        hook = ChunkAttention(cache, self.rope, self.preset.streaming.rope_policy, x.shape[2])
        return self._forward(x.to(device=self.device, dtype=self.dtype), t, hook)

    @torch.no_grad()
    def append_clean(self, x0: torch.Tensor) -> None:
        """The context pass on given clean latents x0 [1, C, n, h, w]: write their K/V as the
        next n latent frames and advance the chunk index (teacher-forced history, prefill)."""
        cache = self._require_open()
        n = x0.shape[2]
        plan = cache.slots.plan_append(n)
        hook = ChunkAttention(cache, self.rope, self.preset.streaming.rope_policy, n, write=plan)
        self._forward(x0.to(device=self.device, dtype=self.dtype), 0.0, hook)
        cache.slots.commit(plan)
        self.chunk_index += 1

    def rollout_chunk(self, exit_step: int) -> torch.Tensor:
        """Self-Forcing rollout of the next chunk (training): `next_chunk`'s noise and hooks, but
        denoising stops after step `exit_step`, and only that step's forward keeps an autograd
        graph (when grad is enabled). Returns its x0 [1, C, chunk_frames, h, w]; the context pass
        writes the detached x0 into the cache."""
        cache = self._require_open()
        st = self.preset.streaming
        if not st.context_pass:
            raise ValueError("rollouts need the context pass (streaming.context_pass=True)")
        if not 0 <= exit_step < self.sampler.num_steps:
            raise ValueError(f"exit_step must lie in 0..{self.sampler.num_steps - 1}, got {exit_step}")
        n = st.chunk_frames
        noises = chunk_noises(
            self.seed, self.chunk_index, self.chunk_shape, self.sampler.num_steps, self.device, self.dtype
        )
        hook = ChunkAttention(cache, self.rope, st.rope_policy, n)
        grad = torch.is_grad_enabled()

        def flow(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
            with torch.set_grad_enabled(grad and step == exit_step):
                return self._forward(x, t, hook)

        x0 = self.sampler.sample(flow, noises, steps=exit_step + 1)
        self.append_clean(x0.detach())
        return x0

    # ---- interaction -------------------------------------------------------------------
    @torch.no_grad()
    def switch_garment(
        self, garment: torch.Tensor, new_reference: torch.Tensor | None = None, options: SwitchOptions = SwitchOptions()
    ) -> None:
        """Switch garment before the next chunk (see module docstring for the three steps)."""
        cache = self._require_open()
        if options.disentangle and new_reference is None:
            raise ValueError("reference disentangle needs the last decoded frame's latent (new_reference)")
        if options.withdraw:
            cache.withdraw()
        if options.refresh:
            self.garment = self._latent(garment, "garment")
        if options.disentangle:
            self.reference = self._latent(new_reference, "reference")
            self._cond_forward(write_from=0)
        elif options.refresh:
            self._cond_forward(write_from=1)

    @torch.no_grad()
    def set_prompt(self, text: torch.Tensor, prompt: str = "") -> None:
        """Replace the text cross-attention context from the next chunk on (cache untouched)."""
        self._require_open()
        self._set_text(text, prompt)

    def state(self, last_frame: torch.Tensor | None = None) -> SessionState:
        self._require_open()
        return SessionState(
            reference=self.reference.cpu(),
            garment=self.garment.cpu(),
            text=self.text_raw.cpu(),
            seed=self.seed,
            chunk_index=self.chunk_index,
            prompt=self.prompt,
            last_frame=None if last_frame is None else last_frame.cpu(),
        )

    def restore(self, state: SessionState) -> None:
        """Rebuild from a persisted state: like a switch with withdraw + disentangle.

        The last frame (if present) becomes the reference; noise continues at `chunk_index`.
        """
        reference = state.last_frame if state.last_frame is not None else state.reference
        self.open(reference, state.garment, state.text, state.seed, state.chunk_index, state.prompt)
