"""Numerics ladder for streaming inference (CPU, fp32, tiny preset).

Every reference here is computed without the session cache's bookkeeping: uncached forwards
with the block-causal mask, or a brute-force record of every frame's K/V with an explicit
selection of what the window keeps.
"""

from __future__ import annotations

import pytest
import torch

from shared.models.attention import attention, use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.masks import expand_to_tokens, teacher_forcing_frame_mask
from shared.models.presets import get_preset
from shared.models.rope import RopeTable, apply_rope
from shared.runtime.attention_hooks import rope_positions
from shared.runtime.sampler import FewStepSampler, chunk_noises
from shared.runtime.session import SessionState, StreamingSession, SwitchOptions

TOL = 1e-4


@pytest.fixture(autouse=True)
def _math_attention():
    with use_attention_backend("math"), torch.no_grad():
        yield


def make(preset_name: str = "tiny", **streaming):
    preset = get_preset(preset_name)
    if streaming:
        preset = preset.with_streaming(**streaming)
    dit = InContextWanDiT.build(preset.dit, seed=0).eval()
    return preset, dit


def cond_inputs(preset, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lh, lw = preset.latent_hw()
    c = preset.dit.in_channels
    ref = torch.randn(1, c, 1, lh, lw, generator=g)
    garment = torch.randn(1, c, 1, lh, lw, generator=g)
    text = torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g)
    return ref, garment, text


def run_cached(preset, dit, chunks: int, seed: int = 7):
    session = StreamingSession(dit, preset)
    session.open(*cond_inputs(preset), seed=seed)
    return session, [session.next_chunk() for _ in range(chunks)]


def maxdiff(a, b) -> float:
    return (torch.cat(a, 2) - torch.cat(b, 2)).abs().max().item()


def test_cached_equals_uncached_block_causal_forward():
    """Chunk-by-chunk with the KV cache == one uncached masked forward over the whole sequence."""
    preset, dit = make()
    st = preset.streaming
    chunks = 5  # 15 latent frames: inside the window, so nothing is evicted
    _, cached = run_cached(preset, dit, chunks)

    ref, garment, text_raw = cond_inputs(preset)
    text = dit.embed_text(text_raw)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    sampler = FewStepSampler(st.timesteps, st.shift)
    n = preset.tokens_per_frame()
    cond = torch.cat([ref, garment], 2)
    history: list[torch.Tensor] = []
    for i in range(chunks):
        noises = chunk_noises(7, i, cond.shape[:2] + (st.chunk_frames,) + cond.shape[3:], 4, "cpu", torch.float32)
        mask = expand_to_tokens(teacher_forcing_frame_mask(st.cond_frames, st.chunk_frames, i + 1, 0), n)

        def flow(x, t, step):
            seq = torch.cat([cond, *history, x], 2)
            f = seq.shape[2]
            ts = torch.tensor([[0.0] * (f - st.chunk_frames) + [t] * st.chunk_frames])
            return dit(seq, ts, text, DenseAttention(rope, list(range(f)), mask))[:, :, -st.chunk_frames :]  # noqa: B023 (called in this iteration)

        history.append(sampler.sample(flow, noises))
    diff = maxdiff(cached, history)
    assert diff < TOL, f"cached vs uncached max abs diff {diff:.3e}"
    assert torch.cat(history, 2).abs().max() > 0.1  # not a trivially zero video


class BruteForceWindow:
    """Keeps every frame's K/V ever written; selects cond + sink + last W frames explicitly."""

    def __init__(self, preset, rope: RopeTable):
        st = preset.streaming
        self.c, self.s, self.w = st.cond_frames, st.sink_frames, st.max_cache_frames - st.sink_frames
        self.n = preset.tokens_per_frame()
        self.rope = rope
        self.cond: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.frames: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.history: list[int] = []  # frame ids, oldest first

    def cond_hook(self, layer, q, k, v):
        self.cond[layer] = (k, v)
        cos, sin = self.rope.cos_sin(list(range(self.c)))
        return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)

    def selected(self) -> list[int]:
        sink, rest = self.history[: self.s], self.history[self.s :]
        return sink + rest[-self.w :] if self.w else sink

    def chunk_hook(self, frame_ids, store: bool):
        chosen = self.selected()

        def hook(layer, q, k, v):
            keys = [self.cond[layer][0]] + [self.frames[layer][f][0] for f in chosen] + [k]
            vals = [self.cond[layer][1]] + [self.frames[layer][f][1] for f in chosen] + [v]
            total = self.c + len(chosen) + len(frame_ids)
            cos, sin = self.rope.cos_sin(list(range(total)))
            qcos, qsin = self.rope.cos_sin(list(range(total - len(frame_ids), total)))
            out = attention(apply_rope(q, qcos, qsin), apply_rope(torch.cat(keys, 1), cos, sin), torch.cat(vals, 1))
            if store:
                for j, fid in enumerate(frame_ids):
                    rows = slice(j * self.n, (j + 1) * self.n)
                    self.frames.setdefault(layer, {})[fid] = (k[:, rows], v[:, rows])
            return out

        return hook


def test_past_the_window_equals_brute_force_selection():
    """With eviction, cached attention == attention over cond + sink + the last W frames kept."""
    preset, dit = make(max_cache_frames=9, sink_frames=3)  # window of 6 frames: evicts from chunk 3
    st = preset.streaming
    chunks = 8
    session, cached = run_cached(preset, dit, chunks)
    assert session.cache.slots.num_valid == st.max_cache_frames

    ref, garment, text_raw = cond_inputs(preset)
    text = dit.embed_text(text_raw)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    bf = BruteForceWindow(preset, rope)
    dit(torch.cat([ref, garment], 2), torch.zeros(1, 2), text, bf.cond_hook)
    sampler = FewStepSampler(st.timesteps, st.shift)
    outs = []
    for i in range(chunks):
        ids = list(range(i * st.chunk_frames, (i + 1) * st.chunk_frames))
        noises = chunk_noises(7, i, session.chunk_shape, 4, "cpu", torch.float32)
        denoise = bf.chunk_hook(ids, store=False)
        x0 = sampler.sample(
            lambda x, t, s, denoise=denoise: dit(x, torch.full((1, st.chunk_frames), t), text, denoise), noises
        )
        dit(x0, torch.zeros(1, st.chunk_frames), text, bf.chunk_hook(ids, store=True))
        bf.history.extend(ids)
        outs.append(x0)
    diff = maxdiff(cached, outs)
    assert diff < TOL, f"windowed cache vs brute-force selection max abs diff {diff:.3e}"
    # The window really dropped frames, so a no-eviction stream would differ.
    assert len(bf.history) > st.max_cache_frames


def _spy_positions(session) -> list[list[int]]:
    """Record the key and query position lists of every chunk hook (the policy's positions; the
    hot path rotates at these plus one common offset, which RoPE scores do not see)."""
    seen: list[list[int]] = []
    original = session._chunk_hook

    def spy(*args, **kwargs):
        hook = original(*args, **kwargs)
        seen.extend([list(hook.key_positions), list(hook.query_positions)])
        return hook

    session._chunk_hook = spy
    return seen


def test_relative_and_absolute_rope_agree_within_trained_length():
    preset_rel, dit = make(rope_policy="relative")
    preset_abs = preset_rel.with_streaming(rope_policy="absolute")
    st = preset_rel.streaming
    c, f, chunks = st.cond_frames, st.chunk_frames, 5
    assert chunks * f <= st.max_cache_frames  # within the trained length: nothing is evicted
    outs, used = [], []
    for preset in (preset_rel, preset_abs):
        session = StreamingSession(dit, preset)
        session.open(*cond_inputs(preset), seed=7)
        seen = _spy_positions(session)
        outs.append([session.next_chunk() for _ in range(chunks)])
        used.append({tuple(p) for p in seen})
    assert maxdiff(*outs) < 1e-6
    # Known answer, by hand: cond frames sit at 0..C-1, generated frame i at C + i, so chunk j
    # queries C + f*j .. C + f*j + f-1 over keys 0 .. C + f*j + f-1 (cond, history, itself).
    queries = {tuple(range(c + f * j, c + f * (j + 1))) for j in range(chunks)}
    keys = {tuple(range(c + f * (j + 1))) for j in range(chunks)}
    assert used[0] == used[1] == queries | keys


def test_relative_rope_past_the_window_keeps_window_scores_of_absolute_positions():
    """Two independent computations of rotated q.k scores on a stream past the window: with the
    relative positions the cache uses, and with absolute ones. RoPE depends on position
    differences only and the relative policy shifts the window and the query chunk uniformly,
    so window keys score the same either way; sink keys are moved closer and do not."""
    preset, dit = make(rope_policy="relative")
    st = preset.streaming
    c, f = st.cond_frames, st.chunk_frames
    session = StreamingSession(dit, preset)
    session.open(*cond_inputs(preset), seed=7)
    for _ in range(-(-2 * st.max_cache_frames // f)):
        session.next_chunk()
    slots = session.cache.slots
    assert slots.next_frame_id > slots.num_valid  # frames were evicted
    rel_k, rel_q = rope_positions(slots, "relative", c, f)
    abs_k, abs_q = rope_positions(slots, "absolute", c, f)
    assert max(rel_k + rel_q) <= st.max_rope_frame_position < max(abs_k + abs_q)

    rope, n = session.rope, session.rope.tokens_per_frame
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, f * n, 2, rope.head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, slots.num_valid * n, 2, rope.head_dim, generator=g, dtype=torch.float64)

    def scores(k_pos, q_pos):
        (qc, qs), (kc, ks) = rope.cos_sin(q_pos), rope.cos_sin(k_pos)
        qr, kr = apply_rope(q, qc.double(), qs.double()), apply_rope(k, kc.double(), ks.double())
        return torch.einsum("blhd,bmhd->bhlm", qr, kr)

    s_rel, s_abs = scores(rel_k, rel_q), scores(abs_k, abs_q)

    def tokens(frame_slots):
        return [slot * n + j for slot in frame_slots for j in range(n)]

    window = tokens([slot for slot, _ in slots.window])
    sink = tokens(range(len(slots.sink)))
    assert window and sink
    assert (s_rel[..., window] - s_abs[..., window]).abs().max() < 1e-4
    assert (s_rel[..., sink] - s_abs[..., sink]).abs().max() > 1e-2


def test_long_stream_positions_bounded_and_cache_constant():
    """10x the window length: every RoPE position stays in the trained range, cache size fixed."""
    preset, dit = make()
    st = preset.streaming
    session = StreamingSession(dit, preset)
    session.open(*cond_inputs(preset), seed=3)
    seen_lists = _spy_positions(session)
    ptr, nbytes = session.cache.k.data_ptr(), session.cache.bytes_allocated
    frames = 10 * st.window_frames
    chunks = -(-frames // st.chunk_frames)
    for _ in range(chunks):
        out = session.next_chunk()
        assert session.cache.slots.num_valid <= st.max_cache_frames
    assert torch.isfinite(out).all()
    seen = [p for positions in seen_lists for p in positions]
    assert max(seen) == st.max_rope_frame_position == session.spec.max_frame_position
    assert min(seen) >= 0
    # The rotations the hot path stores stay bounded too (policy position + a re-based offset).
    stored = [p for p in session.cache.rot_pos if p is not None]
    assert max(stored) <= session.spec.max_frame_position + session.cache.max_delta
    assert session.cache.k.data_ptr() == ptr and session.cache.bytes_allocated == nbytes
    assert session.cache.slots.next_frame_id == chunks * st.chunk_frames

    # The absolute policy, by contrast, walks far outside the trained range.
    session_abs = StreamingSession(dit, preset.with_streaming(rope_policy="absolute"))
    session_abs.open(*cond_inputs(preset), seed=3)
    for _ in range(chunks):
        session_abs.next_chunk()
    keys, _ = rope_positions(session_abs.cache.slots, "absolute", st.cond_frames, st.chunk_frames)
    assert max(keys) > st.max_rope_frame_position


def _snapshot(session):
    c = session.cache
    return c.k.clone(), c.v.clone(), list(c.slots.sink), list(c.slots.window)


def test_switch_all_steps():
    preset, dit = make(max_cache_frames=9, sink_frames=3)
    session, _ = run_cached(preset, dit, 4)
    spec = session.spec
    _, new_garment, _ = cond_inputs(preset, seed=11)
    new_ref, _, _ = cond_inputs(preset, seed=12)
    session.switch_garment(new_garment, new_ref, SwitchOptions())
    assert session.cache.slots.num_valid == 0, "sink and window withdrawn"

    fresh = StreamingSession(dit, preset)
    fresh.open(new_ref, new_garment, cond_inputs(preset)[2], seed=7)
    c = spec.cond_tokens
    assert torch.allclose(session.cache.k[:, :, :c], fresh.cache.k[:, :, :c], atol=1e-6)
    assert torch.allclose(session.cache.v[:, :, :c], fresh.cache.v[:, :, :c], atol=1e-6)
    assert torch.equal(session.reference, new_ref) and torch.equal(session.garment, new_garment)

    next_ids = session.cache.slots.next_frame_id
    session.next_chunk()
    assert session.cache.slots.sink == list(range(next_ids, next_ids + spec.chunk_frames)), "next chunk is the new sink"


def test_switch_refresh_only_changes_only_garment_kv():
    preset, dit = make(max_cache_frames=9, sink_frames=3)
    session, _ = run_cached(preset, dit, 4)
    spec = session.spec
    k0, v0, sink0, window0 = _snapshot(session)
    ref0 = session.reference.clone()
    _, new_garment, _ = cond_inputs(preset, seed=11)
    session.switch_garment(new_garment, None, SwitchOptions(refresh=True, withdraw=False, disentangle=False))
    n, c = spec.tokens_per_frame, spec.cond_tokens
    k1, v1 = session.cache.k, session.cache.v
    assert torch.equal(k1[:, :, :n], k0[:, :, :n]) and torch.equal(v1[:, :, :n], v0[:, :, :n]), "reference KV kept"
    assert not torch.allclose(k1[:, :, n:c], k0[:, :, n:c]), "garment KV refreshed"
    assert torch.equal(k1[:, :, c:], k0[:, :, c:]) and torch.equal(v1[:, :, c:], v0[:, :, c:]), "history kept"
    assert session.cache.slots.sink == sink0 and list(session.cache.slots.window) == window0
    assert torch.equal(session.reference, ref0)

    # The refreshed garment rows equal a cond forward over [old reference, new garment].
    fresh = StreamingSession(dit, preset)
    fresh.open(ref0, new_garment, cond_inputs(preset)[2], seed=7)
    assert torch.allclose(k1[:, :, n:c], fresh.cache.k[:, :, n:c], atol=1e-6)


def test_switch_with_every_step_off_changes_nothing():
    preset, dit = make(max_cache_frames=9, sink_frames=3)
    session, _ = run_cached(preset, dit, 4)
    k0, v0, sink0, window0 = _snapshot(session)
    _, new_garment, _ = cond_inputs(preset, seed=11)
    session.switch_garment(new_garment, None, SwitchOptions(refresh=False, withdraw=False, disentangle=False))
    assert torch.equal(session.cache.k, k0) and torch.equal(session.cache.v, v0)
    assert session.cache.slots.sink == sink0 and list(session.cache.slots.window) == window0


def test_disentangle_requires_last_frame():
    preset, dit = make()
    session, _ = run_cached(preset, dit, 1)
    with pytest.raises(ValueError, match="last decoded frame"):
        session.switch_garment(cond_inputs(preset)[1], None, SwitchOptions())


def test_same_seed_same_video_and_state_round_trip():
    preset, dit = make()
    _, a = run_cached(preset, dit, 3, seed=5)
    session, b = run_cached(preset, dit, 3, seed=5)
    _, c = run_cached(preset, dit, 3, seed=6)
    assert maxdiff(a, b) == 0.0
    assert maxdiff(a, c) > 1e-3

    last = cond_inputs(preset, seed=21)[0]
    blob = session.state(last_frame=last).to_bytes()
    state = SessionState.from_bytes(blob)
    assert state.chunk_index == 3 and state.seed == 5 and torch.equal(state.last_frame, last)
    r1, r2 = StreamingSession(dit, preset), StreamingSession(dit, preset)
    r1.restore(state)
    r2.restore(SessionState.from_bytes(blob))
    assert r1.chunk_index == 3
    assert torch.equal(r1.next_chunk(), r2.next_chunk()), "a rebuilt session is deterministic"
    assert torch.equal(r1.reference, last.float()), "the last frame becomes the reference"


def test_set_prompt_changes_following_chunks_only():
    preset, dit = make()
    s1, a = run_cached(preset, dit, 2)
    s2, b = run_cached(preset, dit, 2)
    new_text = cond_inputs(preset, seed=33)[2]
    s2.set_prompt(new_text, "another prompt")
    assert maxdiff(a, b) == 0.0
    assert (s1.next_chunk() - s2.next_chunk()).abs().max() > 1e-4
    assert s2.prompt == "another prompt"


def test_no_context_pass_experiment_runs():
    preset, dit = make(context_pass=False)
    base_preset = preset.with_streaming(context_pass=True)
    calls: list[int] = []
    handle = dit.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        counts, runs = [], []
        for p in (preset, base_preset):
            calls.clear()
            session, chunks = run_cached(p, dit, 3)
            counts.append(len(calls))
            runs.append(chunks)
    finally:
        handle.remove()
    chunks, baseline = runs
    assert session.cache.slots.num_valid == 9 and all(torch.isfinite(c).all() for c in chunks)
    steps = len(preset.streaming.timesteps)
    # one cond forward, then `steps` forwards a chunk; the baseline adds its context pass
    assert counts == [1 + 3 * steps, 1 + 3 * (steps + 1)]
    # the first chunk sees only the cond frames: the same in both; later chunks attend to the
    # noisy last-step KV instead of the clean one, so they differ
    assert (chunks[0] - baseline[0]).abs().max() < TOL
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(chunks[1:], baseline[1:]))
