"""Host-side cache bookkeeping: exact slot ids, eviction order, positions, sizes."""

from __future__ import annotations

import pytest
import torch

from shared.models.presets import get_preset
from shared.runtime.attention_hooks import rope_positions
from shared.runtime.kv_cache import FrameSlots, KVCacheSpec, SessionKVCache, slot_runs


def fill(slots: FrameSlots, chunks: int, n: int = 3):
    plans = []
    for _ in range(chunks):
        plan = slots.plan_append(n)
        slots.commit(plan)
        plans.append(plan)
    return plans


def test_sink_then_window_then_fifo_eviction():
    s = FrameSlots(sink_frames=3, max_frames=9)  # window of 6
    plans = fill(s, 4)
    assert [p.slots for p in plans] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (3, 4, 5)]
    assert [p.evicted for p in plans] == [(), (), (), (3, 4, 5)]
    assert s.sink == [0, 1, 2]
    assert list(s.window) == [(6, 6), (7, 7), (8, 8), (3, 9), (4, 10), (5, 11)]
    assert s.num_valid == 9 and s.next_frame_id == 12
    assert s.slot_frame_ids() == [0, 1, 2, 9, 10, 11, 6, 7, 8]


def test_relative_positions_follow_cache_order():
    s = FrameSlots(3, 9)
    fill(s, 4)
    keys, queries = rope_positions(s, "relative", cond_frames=2, n_query=3)
    # slots 0-2 sink; ring slots 6,7,8 hold the oldest window frames, then 3,4,5
    assert keys == [2, 3, 4, 8, 9, 10, 5, 6, 7]
    assert queries == [11, 12, 13]
    keys, queries = rope_positions(s, "absolute", cond_frames=2, n_query=3)
    assert keys == [2, 3, 4, 11, 12, 13, 8, 9, 10]
    assert queries == [14, 15, 16]


def test_window_wraps_mid_chunk_when_not_chunk_aligned():
    s = FrameSlots(3, 23)  # window of 20 latent frames, chunks of 3
    fill(s, 7)  # sink + 18 window frames
    plan = s.plan_append(3)
    assert plan.slots == (21, 22, 3) and plan.frame_ids == (21, 22, 23) and plan.evicted == (3,)
    assert slot_runs(plan.slots) == [(21, 0, 2), (3, 2, 1)]
    s.commit(plan)
    keys, queries = rope_positions(s, "relative", 2, 3)
    assert max(keys) == 2 + 23 - 1 and queries == [25, 26, 27]
    assert sorted(keys) == list(range(2, 25))


def test_reset_withdraws_and_keeps_frame_counter():
    s = FrameSlots(3, 9)
    fill(s, 4)
    s.reset()
    assert s.num_valid == 0
    plan = s.plan_append(3)
    assert plan.slots == (0, 1, 2) and plan.frame_ids == (12, 13, 14)


def test_plan_is_pure_until_commit():
    s = FrameSlots(3, 9)
    fill(s, 3)
    before = (list(s.sink), list(s.window), s.next_frame_id)
    s.plan_append(3)
    s.plan_append(3)
    assert (list(s.sink), list(s.window), s.next_frame_id) == before


def test_invalid_geometry_rejected():
    with pytest.raises(ValueError):
        FrameSlots(0, 9)
    with pytest.raises(ValueError):
        FrameSlots(9, 9)


def test_full_preset_cache_size_matches_the_numbers_page():
    spec = KVCacheSpec.from_preset(get_preset("wan2.2-ti2v-5b"), torch.bfloat16)
    assert spec.tokens_per_frame == 880
    assert spec.bytes_per_frame == 880 * 3072 * 2 * 2 * 30  # ~309 MiB per latent frame
    # cond + sink + window (20 frames ~ 6.0 GiB) + the chunk scratch (3 frames: the buffer is the
    # attended span) + the un-rotated keys of cond + sink (K only) the hot path re-rotates from
    assert spec.bytes == (2 + 3 + 15 + 3) * spec.bytes_per_frame + (2 + 3) * spec.bytes_per_frame // 2
    assert 7.6 < spec.bytes / 2**30 < 7.8
    assert spec.max_frame_position == 22  # attends 2 + 3 + 15 + 3 = 23 = the trained length


def test_write_frames_lands_in_the_right_rows():
    spec = KVCacheSpec(
        num_layers=1,
        num_heads=1,
        head_dim=2,
        tokens_per_frame=2,
        cond_frames=2,
        sink_frames=1,
        max_frames=4,
        chunk_frames=1,
        dtype=torch.float32,
    )
    cache = SessionKVCache(spec)
    assert cache.bytes_allocated == spec.bytes
    k = torch.arange(3 * 2, dtype=torch.float32).view(1, 6, 1, 1).expand(1, 6, 1, 2)  # 3 frames x 2 tokens
    cache.write_frames(0, (3, 1, 2), k, k + 100)
    rows = cache.k[0, 0, :, 0, 0]
    # cond rows 0-3 untouched; slot s occupies rows 4 + 2s .. 4 + 2s + 1; then the chunk scratch
    assert rows.tolist() == [0, 0, 0, 0, 0, 0, 2, 3, 4, 5, 0, 1, 0, 0]
    assert cache.v[0, 0, 10, 0, 0].item() == 100
