"""A prompt change re-caches (issue 13): the cond KV always (by default), the sink + window KV as
an option, each equal (fp32) to opening fresh with the new prompt over the same latents."""

from __future__ import annotations

import pytest
import torch

from shared.models.attention import use_attention_backend
from shared.models.dit import InContextWanDiT
from shared.models.presets import get_preset
from shared.runtime.session import PromptOptions, StreamingSession

TOL = 1e-5


@pytest.fixture(autouse=True)
def _math_attention():
    with use_attention_backend("math"), torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    preset = get_preset("tiny").with_streaming(max_cache_frames=9, sink_frames=3)  # window 6: evicts at chunk 3
    return preset, InContextWanDiT.build(preset.dit, seed=0).eval()


def inputs(preset, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lh, lw = preset.latent_hw()
    c = preset.dit.in_channels
    ref = torch.randn(1, c, 1, lh, lw, generator=g)
    garment = torch.randn(1, c, 1, lh, lw, generator=g)
    texts = [torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g) for _ in range(2)]
    return ref, garment, texts


def stream(preset, dit, chunks: int, seed: int = 5):
    ref, garment, (old, new) = inputs(preset)
    session = StreamingSession(dit, preset)
    session.open(ref, garment, old, seed=seed, prompt="old")
    out = [session.next_chunk() for _ in range(chunks)]
    return session, out, (ref, garment, new)


def cond_kv(session):
    n = session.spec.cond_tokens
    return session.cache.k[:, :, :n].clone(), session.cache.v[:, :, :n].clone()


def fresh_with(preset, dit, ref, garment, text, seed, history: list[torch.Tensor], chunk_index: int):
    """Open with `text` and append the given clean chunks in order (the definition of re-caching)."""
    fresh = StreamingSession(dit, preset)
    fresh.open(ref, garment, text, seed=seed, prompt="new")
    for x0 in history:
        fresh.append_clean(x0)
    fresh.chunk_index = chunk_index
    fresh.cache.slots.next_frame_id = chunk_index * preset.streaming.chunk_frames
    return fresh


def test_prompt_change_recomputes_the_cond_kv(model) -> None:
    preset, dit = model
    session, _, (ref, garment, new) = stream(preset, dit, 2)
    before = cond_kv(session)
    session.set_prompt(new, "new")
    fresh = StreamingSession(dit, preset)
    fresh.open(ref, garment, new, seed=5)
    for got, want, old in zip(cond_kv(session), cond_kv(fresh), before):
        assert (got - want).abs().max().item() < TOL
        assert (got - old).abs().max().item() > 1e-3  # the cross-attention text reaches the cond KV


def test_text_only_keeps_the_old_cond_kv(model) -> None:
    preset, dit = model
    session, _, (_, _, new) = stream(preset, dit, 2)
    before = cond_kv(session)
    session.set_prompt(new, "new", PromptOptions(recache_cond=False))
    assert all(torch.equal(a, b) for a, b in zip(cond_kv(session), before))


@pytest.mark.parametrize("chunks", [2, 5])  # window not yet full / after eviction (ring wrapped)
def test_recache_window_equals_a_fresh_open_over_the_same_latents(model, chunks: int) -> None:
    preset, dit = model
    st = preset.streaming
    session, out, (ref, garment, new) = stream(preset, dit, chunks)
    session.set_prompt(new, "new", PromptOptions(recache_window=True))
    assert session.cache.slots.next_frame_id == chunks * st.chunk_frames and session.chunk_index == chunks
    kept = st.window_frames // st.chunk_frames
    history = [out[0]] + out[max(1, chunks - kept) :]  # the sink chunk, then the window's chunks
    fresh = fresh_with(preset, dit, ref, garment, new, 5, history, chunks)
    assert fresh.cache.slots.num_valid == session.cache.slots.num_valid
    for _ in range(3):  # and the stream continues identically (eviction order included)
        a, b = session.next_chunk(), fresh.next_chunk()
        assert (a - b).abs().max().item() < TOL


def test_recache_window_under_the_same_prompt_is_a_no_op_before_eviction(model) -> None:
    preset, dit = model
    ref, garment, (old, _) = inputs(preset)
    a, b = StreamingSession(dit, preset), StreamingSession(dit, preset)
    for s in (a, b):
        s.open(ref, garment, old, seed=5)
        s.next_chunk(), s.next_chunk()
    a.set_prompt(old, "old", PromptOptions(recache_window=True))
    assert (a.next_chunk() - b.next_chunk()).abs().max().item() < TOL


def test_window_recache_differs_from_cond_only_after_a_real_change(model) -> None:
    preset, dit = model
    results = []
    for options in (PromptOptions(), PromptOptions(recache_window=True)):
        session, _, (_, _, new) = stream(preset, dit, 4)
        session.set_prompt(new, "new", options)
        results.append(session.next_chunk())
    assert (results[0] - results[1]).abs().max().item() > 1e-4
