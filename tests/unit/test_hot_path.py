"""The streaming hot path against its reference (CPU, fp32, tiny preset).

Each rewrite of the chunk step has its own check: keys rotated once into the cache == keys
re-rotated per forward (`ReferenceChunkAttention` on an un-rotated cache); attention over the
contiguous slice == attention over a concatenation; the prompt's cross-attention K/V cached ==
recomputed, and dropped on a prompt change; per-chunk noise unchanged by the single copy.
"""

from __future__ import annotations

import pytest
import torch

from shared.models.attention import use_attention_backend
from shared.models.dit import InContextWanDiT, TextKV
from shared.models.presets import get_preset
from shared.runtime import attention_hooks
from shared.runtime.sampler import chunk_noises, chunk_seed
from shared.runtime.session import StreamingSession, SwitchOptions

TOL = 1e-5


@pytest.fixture(autouse=True)
def _math_attention():
    with use_attention_backend("math"), torch.no_grad():
        yield


def _make(**streaming):
    preset = get_preset("tiny").with_streaming(max_cache_frames=9, sink_frames=3, **streaming)
    return preset, InContextWanDiT.build(preset.dit, seed=0).eval()


def _inputs(preset, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lh, lw = preset.latent_hw()
    c = preset.dit.in_channels
    lat = [torch.randn(1, c, 1, lh, lw, generator=g) for _ in range(4)]
    text = [torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g) for _ in range(2)]
    return lat, text


def _stream(preset, dit, reference: bool, chunks: int, events=None, max_delta: int | None = None):
    (ref, garment, garment2, new_ref), (text, text2) = _inputs(preset)
    s = StreamingSession(dit, preset, reference_attention=reference)
    s.open(ref, garment, text, seed=5)
    if max_delta is not None:
        s.cache.max_delta = max_delta
    out = []
    for i in range(chunks):
        if events and i in events:
            kind = events[i]
            if kind == "switch":
                s.switch_garment(garment2, new_ref)
            elif kind == "refresh":
                s.switch_garment(garment, options=SwitchOptions(withdraw=False, disentangle=False))
            elif kind == "prompt":
                s.set_prompt(text2)
        out.append(s.next_chunk())
    return s, torch.cat(out, 2)


@pytest.mark.parametrize("policy", ["relative", "absolute"])
def test_rotated_once_equals_rerotated_past_the_window(policy):
    """8 chunks with a 6-frame window: evictions, cond/sink re-rotation, the ring wrapping."""
    preset, dit = _make(rope_policy=policy)
    hot, a = _stream(preset, dit, False, 8)
    _, b = _stream(preset, dit, True, 8)
    assert hot.cache.slots.next_frame_id > hot.cache.slots.num_valid  # frames were evicted
    assert (a - b).abs().max().item() < TOL
    assert a.abs().max() > 0.1


def test_rebased_offset_equals_reference():
    """A tiny re-base bound forces the window to be shifted in place again and again."""
    preset, dit = _make()
    hot, a = _stream(preset, dit, False, 9, max_delta=2)
    _, b = _stream(preset, dit, True, 9)
    assert abs(hot.cache.delta) <= 2 + preset.streaming.chunk_frames
    assert (a - b).abs().max().item() < TOL


def test_switches_and_prompt_change_equal_reference():
    preset, dit = _make()
    events = {3: "switch", 5: "refresh", 6: "prompt"}
    _, a = _stream(preset, dit, False, 9, events)
    _, b = _stream(preset, dit, True, 9, events)
    assert (a - b).abs().max().item() < TOL


def test_attention_reads_one_contiguous_slice_of_the_cache(monkeypatch):
    """The chunk's K/V sit in the rows right after the valid prefix: attention's keys and values
    are views into the cache buffers (no per-layer copy), and equal the concatenation."""
    preset, dit = _make()
    s = StreamingSession(dit, preset)
    (ref, garment, *_), (text, _) = _inputs(preset)
    s.open(ref, garment, text, seed=5)
    for _ in range(4):  # fill the cache: the chunk lands in the scratch rows after all M slots
        s.next_chunk()
    assert s.cache.slots.num_valid == preset.streaming.max_cache_frames
    calls = []
    real = attention_hooks.attention

    def spy(q, k, v, mask=None, backend=None):
        calls.append((k, v))
        return real(q, k, v, mask, backend=backend)

    monkeypatch.setattr(attention_hooks, "attention", spy)
    s.next_chunk()
    chunk_calls = [c for c in calls if c[0].shape[1] > s.spec.cond_tokens]
    assert chunk_calls
    for k, v in chunk_calls:
        assert k.untyped_storage().data_ptr() == s.cache.k.untyped_storage().data_ptr()
        assert v.untyped_storage().data_ptr() == s.cache.v.untyped_storage().data_ptr()

    # The same hook on a concatenation (the autograd path) gives the same output.
    hook = s._chunk_hook(s.cache, preset.streaming.chunk_frames)
    g = torch.Generator().manual_seed(0)
    h, d = preset.dit.num_attention_heads, preset.dit.attention_head_dim
    q, k, v = (torch.randn(1, hook.q_cos.shape[0], h, d, generator=g) for _ in range(3))
    in_place = hook(0, q, k, v)
    with torch.enable_grad():
        concat = hook(0, q.requires_grad_(), k, v)
    assert (in_place - concat.detach()).abs().max().item() < 1e-6


def test_cross_attention_kv_cached_equals_recomputed():
    preset, dit = _make()
    (ref, garment, *_), (text, _) = _inputs(preset)
    projected = dit.embed_text(text)
    lat = torch.cat([ref, garment], 2)
    ts = torch.zeros(1, 2)
    rope_hook = lambda layer, q, k, v: v
    a = dit(lat, ts, projected, rope_hook)
    b = dit(lat, ts, dit.text_kv(projected), rope_hook)
    assert (a - b).abs().max().item() < 1e-6


def test_cross_attention_kv_computed_once_per_prompt_and_dropped_on_change(monkeypatch):
    preset, dit = _make()
    (ref, garment, *_), (text, text2) = _inputs(preset)
    s = StreamingSession(dit, preset)
    calls = []
    real = dit.text_kv
    monkeypatch.setattr(dit, "text_kv", lambda t: calls.append(t) or real(t))
    s.open(ref, garment, text, seed=5)
    s.next_chunk()
    s.next_chunk()
    assert len(calls) == 1  # cond forward + 2 chunks x 5 forwards: one projection
    first = s._text_kv
    s.set_prompt(text2)  # drops the old K/V; a cond re-cache (when on) computes the new ones
    s.next_chunk()
    s.next_chunk()
    assert len(calls) == 2 and s._text_kv is not first and isinstance(s._text_kv, TextKV)
    assert s._text_kv.text is s.text and not torch.equal(first.text, s.text)


def test_chunk_noises_unchanged_by_the_single_copy():
    shape = (1, 4, 3, 5, 6)
    gen = torch.Generator().manual_seed(chunk_seed(11, 3))
    expected = [torch.randn(shape, generator=gen) for _ in range(4)]
    got = chunk_noises(11, 3, shape, 4, "cpu", torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
