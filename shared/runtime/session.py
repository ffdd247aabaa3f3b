"""A streaming session in latent space: open, next chunk, switch garment, set prompt, close.

The session owns one `SessionKVCache` and works on latents only. Image encoding, streaming
decode and the rules around a switch (what it does before the first chunk) live one level up in
the orchestrator, `shared.runtime.pipeline.VideoSession`, which the CLI, the services and the
trainer's Self-Forcing rollouts all drive. The attention hooks are in `attention_hooks`; the
attention kernel is the session's own (`attention_backend`), never process-global state.

Garment switch (paper 4.3), applied at the next chunk boundary, each step switchable:
  1. refresh:     run the cond forward on [reference, new garment], replace the garment's KV.
  2. withdraw:    drop sink and window; the next chunk becomes the new sink.
  3. disentangle: the new reference is the decode-encode of the last decoded pixel frame
                  (given by the caller as a one-frame latent); cond KV is recomputed over
                  [new reference, new garment].

Prompt change (`set_prompt`, `PromptOptions`): the new text replaces the cross-attention context;
the cond KV is recomputed under it (default), and optionally the sink + window KV too, from the
clean latents the session keeps per cache slot (LongLive's re-cache).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shared.models.dit import InContextWanDiT, TextKV
from shared.models.presets import Preset
from shared.models.rope import RopeTable

from .attention_hooks import ChunkAttention, CondAttention, ReferenceChunkAttention
from .kv_cache import AppendPlan, KVCacheSpec, SessionKVCache
from .sampler import FewStepSampler, chunk_noises


class SessionClosed(RuntimeError):
    pass


@dataclass(frozen=True)
class SwitchOptions:
    refresh: bool = True
    withdraw: bool = True
    disentangle: bool = True


@dataclass(frozen=True)
class PromptOptions:
    """What a prompt change recomputes besides the cross-attention text, each step switchable.

    recache_cond:   run the cond forward under the new text (the reference/garment KV were
                    computed under the old prompt's cross-attention).
    recache_window: recompute the clean KV of the cached sink + window frames under the new
                    text, from the clean latents the session keeps (LongLive's re-cache): the same
                    cache as opening with the new prompt and appending those latents in order.
    """

    recache_cond: bool = True
    recache_window: bool = False


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
    def from_bytes(cls, data: bytes) -> SessionState:
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
        attention_backend: str | None = None,
        reference_attention: bool = False,
    ):
        """`attention_backend` names the attention kernel of every forward of this session
        (None: the ambient default of the calling thread, see `shared.models.attention`).
        `reference_attention=True` runs the reference attention path (un-rotated cache, whole-prefix
        concatenation and re-rotation per layer and forward) instead of the hot path."""
        st = preset.streaming
        self.dit = dit
        self.reference_attention = reference_attention
        self._text_kv: TextKV | None = None  # the prompt's cross-attention K/V (`InContextWanDiT.text_kv`)
        self.attention_backend = attention_backend
        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = KVCacheSpec.from_preset(preset, dtype)
        self.rope = rope or RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device=self.device)
        self.sampler = FewStepSampler(st.timesteps, st.shift, st.num_train_timesteps)
        lh, lw = preset.latent_hw()
        self.chunk_shape = (1, preset.dit.in_channels, st.chunk_frames, lh, lw)
        self.cache: SessionKVCache | None = None
        # Clean latents of the cached frames, by cache slot [1, C, M, h, w] (what a prompt change
        # re-caches the window from; a few latent frames, small next to the KV).
        self.slot_latents: torch.Tensor | None = None
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
        self.cache = SessionKVCache(self.spec, self.device, rotated=not self.reference_attention)
        self.slot_latents = torch.zeros(
            (*self.chunk_shape[:2], self.spec.max_frames, *self.chunk_shape[3:]), device=self.device, dtype=self.dtype
        )
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
        self.slot_latents = None

    # ---- forwards ----------------------------------------------------------------------
    def _set_text(self, text: torch.Tensor, prompt: str) -> None:
        self.text_raw = text.to(self.device)
        self.text = self.dit.embed_text(self.text_raw).to(self.dtype)
        self._text_kv = None  # a new prompt: its cross-attention K/V are computed on first use
        self.prompt = prompt

    def _context(self):
        """What the DiT's cross-attention reads: the prompt's K/V, computed once per prompt, for
        inference (eval mode, no grad); the projected text otherwise (training: weights move)."""
        if torch.is_grad_enabled() or self.dit.training or self.reference_attention:
            return self.text
        assert self.text is not None, "no prompt set (open the session first)"
        if self._text_kv is None or self._text_kv.text is not self.text:
            self._text_kv = self.dit.text_kv(self.text)
        return self._text_kv

    def _forward(self, latents: torch.Tensor, t: float, hook) -> torch.Tensor:
        timesteps = torch.full((1, latents.shape[2]), float(t), device=self.device)
        return self.dit(latents, timesteps, self._context(), hook)

    def _cond_forward(self, write_from: int) -> None:
        """One forward over [reference, garment] at t=0; cond tokens see only cond tokens."""
        cache = self._require_open()
        assert self.reference is not None and self.garment is not None
        cond = torch.cat([self.reference, self.garment], dim=2)  # [1, C, 2, h, w]
        self._forward(cond, 0.0, CondAttention(cache, self.rope, write_from, self.attention_backend))

    def _chunk_hook(
        self, cache: SessionKVCache, n: int, write: AppendPlan | None = None
    ) -> ChunkAttention | ReferenceChunkAttention:
        policy = self.preset.streaming.rope_policy
        hook = ReferenceChunkAttention if self.reference_attention else ChunkAttention
        return hook(cache, self.rope, policy, n, write=write, backend=self.attention_backend)

    @torch.no_grad()
    def next_chunk(self) -> torch.Tensor:
        """Generate the next chunk: clean latents [1, C, chunk_frames, h, w]."""
        cache = self._require_open()
        st = self.preset.streaming
        n = st.chunk_frames
        noises = chunk_noises(
            self.seed, self.chunk_index, self.chunk_shape, self.sampler.num_steps, self.device, self.dtype
        )
        denoise_hook = self._chunk_hook(cache, n)
        if st.context_pass:
            x0 = self.sampler.sample(lambda x, t, step: self._forward(x, t, denoise_hook), noises)
            self.append_clean(x0)  # the clean context pass writes the chunk's KV
            return x0
        # Experiment without the context pass: the last denoising step's (noisy) KV is kept.
        plan = cache.slots.plan_append(n)
        write_hook = self._chunk_hook(cache, n, write=plan)
        last = self.sampler.num_steps - 1
        x0 = self.sampler.sample(
            lambda x, t, step: self._forward(x, t, write_hook if step == last else denoise_hook), noises
        )
        self._keep_latents(plan, x0)
        cache.slots.commit(plan)
        self.chunk_index += 1
        return x0

    def _keep_latents(self, plan: AppendPlan, x0: torch.Tensor) -> None:
        """Keep the clean latents of frames entering the cache, in their slots."""
        if self.slot_latents is not None:
            self.slot_latents[:, :, list(plan.slots)] = x0.to(self.slot_latents.dtype)

    # ---- training hooks (teacher forcing checks, Self-Forcing rollouts) -----------------
    def predict_flow(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Flow of a noisy next chunk x [1, C, n, h, w] at model timestep t against the cache
        (cond + sink + window + the chunk itself). Writes nothing; keeps autograd when enabled."""
        cache = self._require_open()
        hook = self._chunk_hook(cache, x.shape[2])
        return self._forward(x.to(device=self.device, dtype=self.dtype), t, hook)

    @torch.no_grad()
    def append_clean(self, x0: torch.Tensor) -> None:
        """The context pass on given clean latents x0 [1, C, n, h, w]: write their K/V as the
        next n latent frames and advance the chunk index (teacher-forced history, prefill)."""
        self._context_pass(x0)
        self.chunk_index += 1

    def _context_pass(self, x0: torch.Tensor) -> None:
        """One forward on clean x0 at t=0 writing its K/V as the next frames (chunk index kept)."""
        cache = self._require_open()
        n = x0.shape[2]
        plan = cache.slots.plan_append(n)
        hook = self._chunk_hook(cache, n, write=plan)
        x0 = x0.to(device=self.device, dtype=self.dtype)
        self._forward(x0, 0.0, hook)
        self._keep_latents(plan, x0)
        cache.slots.commit(plan)

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
        hook = self._chunk_hook(cache, n)
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
            assert new_reference is not None  # checked above
            self.reference = self._latent(new_reference, "reference")
            self._cond_forward(write_from=0)
        elif options.refresh:
            self._cond_forward(write_from=1)

    def rewind(self, chunk_index: int) -> None:
        """Go back to chunk `chunk_index` (<= the next chunk index) as if the chunks from there on
        had never been generated, their history withdrawn: sink and window are dropped, the chunk
        index and frame ids step back (the noise of a redone chunk is the seed's, as before). That is
        the state before chunk `chunk_index` only when a switch that withdraws follows (it drops that
        history anyway) or at chunk 0 (nothing cached yet); the caller guarantees one of the two."""
        cache = self._require_open()
        if not 0 <= chunk_index <= self.chunk_index:
            raise ValueError(f"cannot rewind to chunk {chunk_index}: the session is at chunk {self.chunk_index}")
        cache.withdraw()
        self.chunk_index = int(chunk_index)
        cache.slots.next_frame_id = self.chunk_index * self.preset.streaming.chunk_frames

    @torch.no_grad()
    def set_prompt(self, text: torch.Tensor, prompt: str = "", options: PromptOptions = PromptOptions()) -> None:
        """Replace the text cross-attention context from the next chunk on, and re-cache what
        `options` asks: the cond KV (default) and the sink + window KV (see `PromptOptions`)."""
        cache = self._require_open()
        self._set_text(text, prompt)
        if options.recache_cond:
            self._cond_forward(write_from=0)
        if options.recache_window:
            self._recache_window(cache)

    def _recache_window(self, cache: SessionKVCache) -> None:
        """Recompute the cached frames' clean KV under the current text: replay the context pass
        over the kept latents, the sink first, then the window oldest first in the chunks they
        were generated in, each attending to cond + what was replayed before it (= a fresh open
        with this text appending the same latents). Frame ids and the chunk index are kept."""
        slots = cache.slots
        if slots.num_valid == 0:
            return
        ordered = [(slot, fid) for slot, fid in enumerate(slots.sink)] + list(slots.window)
        groups: list[list[tuple[int, int]]] = []
        chunk = self.preset.streaming.chunk_frames
        for slot, fid in ordered:  # consecutive frames of one generated chunk form one pass
            last = groups[-1][-1][1] if groups else None
            if last is not None and fid == last + 1 and fid // chunk == last // chunk:
                groups[-1].append((slot, fid))
            else:
                groups.append([(slot, fid)])
        assert self.slot_latents is not None  # kept from open on
        latents = self.slot_latents.clone()
        next_frame_id = slots.next_frame_id
        slots.reset()
        for group in groups:
            slots.next_frame_id = group[0][1]
            self._context_pass(latents[:, :, [slot for slot, _ in group]])
        slots.next_frame_id = next_frame_id

    def state(self, last_frame: torch.Tensor | None = None) -> SessionState:
        self._require_open()
        assert self.reference is not None and self.garment is not None and self.text_raw is not None
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
