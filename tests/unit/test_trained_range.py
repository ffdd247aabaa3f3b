"""Stay inside the trained range (issue 13): the attended span cond + sink + window + chunk is one
number shared by the streaming settings and the training recipe, checked when a checkpoint loads.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import shared.runtime.attention_hooks as hooks
from shared.models.attention import use_attention_backend
from shared.models.checkpoint import SHIPPED_CHECKPOINT, STREAMING_CONFIG, CheckpointError, read_preset
from shared.models.dit import InContextWanDiT
from shared.models.presets import PRESETS, StreamingConfig, get_preset
from shared.runtime.session import StreamingSession
from training.config import get_recipe

SPEC_FILES = (
    "fashionchameleon.json",
    "model_index.json",
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
)


def recipe_frames(name: str) -> int:
    """The recipe's sequence length with cond (every stage trains the same clip length)."""
    recipe = get_recipe(name)
    lengths = {recipe.stage(s).data.latent_frames for s in ("teacher", "teacher_forcing", "dmd")}
    assert len(lengths) == 1
    return get_preset(name).streaming.cond_frames + lengths.pop()


@pytest.mark.parametrize("name", ["wan2.2-ti2v-5b", "toy"])
def test_presets_attend_what_their_recipe_trains(name: str) -> None:
    preset = get_preset(name)
    assert preset.trained_frames == recipe_frames(name)
    assert preset.attended_frames == preset.trained_frames  # the whole trained span, no further
    assert preset.streaming.kv_reading == "trained-span"


def test_full_preset_is_the_paper_setting() -> None:
    st = get_preset("wan2.2-ti2v-5b").streaming
    assert (st.cond_frames, st.sink_frames, st.window_frames, st.chunk_frames) == (2, 3, 15, 3)
    assert st.attended_frames == st.trained_frames == 23 and st.max_rope_frame_position == 22
    m = st.for_reading("m-is-cache")
    assert m.max_cache_frames == 23 and m.attended_frames == 28 and m.attend_beyond_trained
    assert m.for_reading("trained-span") == st


def test_every_preset_stays_in_range() -> None:
    for preset in PRESETS.values():
        assert preset.attended_frames <= preset.trained_frames, preset.name


def test_settings_attending_further_are_rejected_unless_opted_in() -> None:
    with pytest.raises(ValueError, match=r"attend 28 latent frames .* trained on sequences of 23"):
        StreamingConfig(max_cache_frames=23)
    with pytest.raises(ValueError, match="max_cache_frames=9"):
        get_preset("toy").with_streaming(max_cache_frames=14)
    assert StreamingConfig(max_cache_frames=23, attend_beyond_trained=True).kv_reading == "m-is-cache"


def _copy_specs(tmp_path: Path) -> Path:
    """A checkpoint folder with the shipped toy's configs (read_preset reads no weights)."""
    out = tmp_path / "ckpt"
    for rel in SPEC_FILES:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED_CHECKPOINT / rel, out / rel)
    return out


def test_shipped_toy_records_its_trained_length() -> None:
    info = json.loads((SHIPPED_CHECKPOINT / STREAMING_CONFIG).read_text())
    assert info["streaming"]["trained_frames"] == 14 == recipe_frames("toy")
    preset, _ = read_preset(SHIPPED_CHECKPOINT)
    assert preset.attended_frames == preset.trained_frames == 14


def test_loader_errors_on_settings_beyond_the_trained_length(tmp_path: Path) -> None:
    ckpt = _copy_specs(tmp_path)
    info = json.loads((ckpt / STREAMING_CONFIG).read_text())
    info["streaming"]["max_cache_frames"] = 14  # the "M is the cache" reading, not opted in
    (ckpt / STREAMING_CONFIG).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"attend 19 latent frames .* trained on sequences of 14") as exc:
        read_preset(ckpt)
    assert "attend_beyond_trained" in str(exc.value) and str(ckpt) in str(exc.value)


def test_loader_warns_on_the_opt_in(tmp_path: Path) -> None:
    ckpt = _copy_specs(tmp_path)
    info = json.loads((ckpt / STREAMING_CONFIG).read_text())
    info["streaming"].update(max_cache_frames=14, attend_beyond_trained=True)
    (ckpt / STREAMING_CONFIG).write_text(json.dumps(info))
    with pytest.warns(UserWarning, match=r"attend_beyond_trained.*RoPE positions up to 18.*trained on 14"):
        preset, _ = read_preset(ckpt)
    assert preset.attended_frames == 19
    with warnings.catch_warnings():  # within range: silent
        warnings.simplefilter("error")
        read_preset(SHIPPED_CHECKPOINT)


@pytest.mark.parametrize("name", ["toy", "tiny"])
def test_largest_position_is_the_trained_length_over_a_long_stream(name: str, monkeypatch) -> None:
    """10x the window: the largest RoPE position of any query or key == trained length - 1."""
    preset = get_preset(name)
    st = preset.streaming
    if name == "toy":
        assert st.trained_frames == recipe_frames("toy")
    seen: list[int] = []
    policy = hooks.rope_positions

    def spy(slots, pol, cond_frames, n_query):
        keys, queries = policy(slots, pol, cond_frames, n_query)
        seen.extend(keys + queries)
        return keys, queries

    monkeypatch.setattr(hooks, "rope_positions", spy)
    small = preset.with_resolution(32, 32) if name == "toy" else preset  # positions do not depend on H x W
    dit = InContextWanDiT.build(small.dit, seed=0).eval()
    session = StreamingSession(dit, small)
    lh, lw = small.latent_hw()
    c = small.dit.in_channels
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 8, small.dit.text_dim, generator=g)
    with use_attention_backend("math"), torch.no_grad():
        session.open(torch.randn(1, c, 1, lh, lw, generator=g), torch.randn(1, c, 1, lh, lw, generator=g), text, 1)
        for _ in range(-(-10 * st.window_frames // st.chunk_frames)):
            session.next_chunk()
    assert min(seen) == st.cond_frames  # cond keys sit at 0..C-1 (fixed, not from the policy)
    assert max(seen) == st.trained_frames - 1 == st.max_rope_frame_position
