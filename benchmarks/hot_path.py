"""Hot-path figures of `benchmarks/stream.py`: what the KV cache costs, our forward against
diffusers', eager against compiled, and the fast decoder against the full one.

- cache_overhead_ratio: a cached chunk's time (steady state: cache full, 4 steps + context pass)
  over the bare DiT forwards it needs: the same number of forwards of the chunk's tokens whose
  attention reads a prepared K/V of the same span (no RoPE, no cache writes, no bookkeeping).
- forward_vs_diffusers_ratio: our forward (`InContextWanDiT`, dense attention over F frames) over
  diffusers' `WanTransformer3DModel.forward` of the same weights on the same F frames' tokens.
- compiled_chunk_seconds / compile_speedup: the same cached chunk with `torch.compile`d blocks.
- decode_speedup / decode_psnr_db: full VAE decoder time over the fast decoder's on the same
  latents (streamed chunk by chunk), and PSNR (dB, peak-to-peak 2) of fast against full frames.
Fastest of repeated timings (contention only adds time); CUDA is synchronized around each one.
"""

from __future__ import annotations

import math
import time

import torch

from shared.models.attention import attention
from shared.models.dit import DenseAttention
from shared.runtime.decode import StreamingDecoder
from shared.runtime.session import StreamingSession


def _timed(engine, fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        engine.synchronize()
        start = time.perf_counter()
        fn()
        engine.synchronize()
        out.append(time.perf_counter() - start)
    return min(out)  # the least disturbed run: this is a shared machine, contention only adds


def _timed_interleaved(engine, a, b, repeats: int) -> tuple[float, float]:
    """min seconds of `a` and of `b`, run alternately (a b a b ...) after one warm-up each: a
    comparison of two forwards must not depend on which one ran first or on a burst of load."""
    a(), b()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((a, times[0]), (b, times[1])):
            engine.synchronize()
            start = time.perf_counter()
            fn()
            engine.synchronize()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def _inputs(engine, seed: int):
    p, dev, dt = engine.preset, engine.device, engine.dtype
    g = torch.Generator().manual_seed(seed)
    lh, lw = p.latent_hw()
    c = p.dit.in_channels
    ref, garment = (torch.randn(1, c, 1, lh, lw, generator=g).to(dev, dt) for _ in range(2))
    text = torch.randn(1, p.text_encoder.max_length, p.dit.text_dim, generator=g).to(dev, dt)
    return ref, garment, text


def _full_session(engine, seed: int) -> StreamingSession:
    """A latent session whose cache is full (prefilled with clean random chunks: 1 forward each)."""
    st = engine.preset.streaming
    s = StreamingSession(engine.dit, engine.preset, engine.device, engine.dtype, engine.rope, engine.attention_backend)
    ref, garment, text = _inputs(engine, seed)
    s.open(ref, garment, text, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    while s.cache.slots.num_valid < st.max_cache_frames or s.cache.slots.next_frame_id <= st.max_cache_frames:
        s.append_clean(torch.randn(s.chunk_shape, generator=g).to(engine.device, engine.dtype))
    return s


@torch.no_grad()
def hot_path_figures(engine, chunks: int = 3, seed: int = 0, compiled: bool = True) -> dict:
    st = engine.preset.streaming
    dit = engine.dit
    saved = dit._compiled
    dit._compiled = None  # eager first, whatever the engine was configured with
    s = _full_session(engine, seed)
    s.next_chunk()  # warm
    chunk_s = _timed(engine, s.next_chunk, chunks)
    forwards = s.sampler.num_steps + (1 if st.context_pass else 0)

    # The bare forwards: the chunk's tokens against a prepared K/V of the same span.
    span = s.cache.valid_tokens() + st.chunk_frames * s.spec.tokens_per_frame
    keys = s.cache.k[:, :, :span].clone()
    values = s.cache.v[:, :, :span].clone()
    backend = engine.attention_backend

    def bare_hook(layer, q, k, v):
        return attention(q, keys[layer], values[layer], backend=backend)

    x = torch.randn(s.chunk_shape, generator=torch.Generator().manual_seed(seed)).to(engine.device, engine.dtype)
    ts = torch.full((1, st.chunk_frames), 500.0, device=engine.device)
    ctx = s._context()
    bare_s = _timed(engine, lambda: dit(x, ts, ctx, bare_hook), 2 * chunks)

    # Ours against diffusers on the same tokens: dense forwards over the attended span.
    frames = st.cond_frames + st.max_cache_frames + st.chunk_frames
    lat = torch.randn(1, x.shape[1], frames, *x.shape[3:], generator=torch.Generator().manual_seed(seed))
    lat = lat.to(engine.device, engine.dtype)
    dense = DenseAttention(engine.rope, list(range(frames)), backend=backend)
    t_frames = torch.full((1, frames), 500.0, device=engine.device)
    t_diff = torch.full((1,), 500.0, device=engine.device)

    def ours():
        dit(lat, t_frames, ctx, dense)

    def theirs():
        dit.transformer(hidden_states=lat, timestep=t_diff, encoder_hidden_states=s.text_raw, return_dict=False)

    ours_s, diff_s = _timed_interleaved(engine, ours, theirs, max(3, chunks))

    out = {
        "hot_path_chunk_seconds": chunk_s,
        "bare_forward_seconds": bare_s,
        "forwards_per_chunk": forwards,
        "cache_overhead_ratio": chunk_s / (forwards * bare_s),
        "our_forward_seconds": ours_s,
        "diffusers_forward_seconds": diff_s,
        "forward_vs_diffusers_ratio": ours_s / diff_s,
        "forward_frames": frames,
        "compiled_chunk_seconds": None,
        "compile_speedup": None,
        "compile_seconds": None,
    }
    if compiled:
        dit.compile_blocks(mode=None if engine.device.type != "cuda" or not engine.config.cuda_graphs
                           else "reduce-overhead")  # fmt: skip
        start = time.perf_counter()
        s.next_chunk()  # compiles
        out["compile_seconds"] = time.perf_counter() - start
        out["compiled_chunk_seconds"] = _timed(engine, s.next_chunk, chunks)
        out["compile_speedup"] = chunk_s / out["compiled_chunk_seconds"]
    dit._compiled = saved
    s.close()
    return out


@torch.no_grad()
def decoder_figures(engine, latents: list[torch.Tensor]) -> dict:
    """Full vs fast streaming decoder on the same latent chunks (needs `engine.fast_decoder`)."""
    if engine.fast_decoder is None or engine.vae is None or not latents:
        return {"decode_speedup": None, "decode_psnr_db": None}

    def run(decoder):
        frames, seconds = [], 0.0
        for lat in latents:
            engine.synchronize()
            start = time.perf_counter()
            frames.append(decoder.decode_chunk(lat))
            engine.synchronize()
            seconds += time.perf_counter() - start
        return torch.cat(frames, 2).float(), seconds

    full, full_s = run(StreamingDecoder(engine.vae))
    fast, fast_s = run(engine.streaming_decoder())
    mse = (full - fast).pow(2).mean().item()
    return {
        "decode_full_seconds": full_s,
        "decode_fast_seconds": fast_s,
        "decode_speedup": full_s / fast_s,
        "decode_psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else float("inf"),
    }
