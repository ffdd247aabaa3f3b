"""Our DiT is diffusers' WanTransformer3DModel: same keys, same numbers, same folders."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from shared.models.attention import use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.presets import get_preset
from shared.models.rope import RopeTable


@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    return preset, InContextWanDiT.build(preset.dit, seed=0).eval()


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_video_only_forward_equals_diffusers(tiny, backend):
    preset, dit = tiny
    lh, lw = preset.latent_hw()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, preset.dit.in_channels, 5, lh, lw, generator=g)
    t = torch.tensor([700.0, 120.0])
    text = torch.randn(2, 16, preset.dit.text_dim, generator=g)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    with torch.no_grad(), use_attention_backend(backend):
        ours = dit(x, t[:, None].expand(2, 5), dit.embed_text(text), DenseAttention(rope, list(range(5))))
        theirs = dit.transformer(x, t, text).sample
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-5, f"max abs diff vs diffusers {diff:.3e}"


def test_rope_matches_diffusers_table(tiny):
    preset, dit = tiny
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    lh, lw = preset.latent_hw()
    cos_ref, sin_ref = dit.transformer.rope(torch.zeros(1, 1, 4, lh, lw))  # [1, L, 1, D] interleaved
    cos, sin = rope.cos_sin([0, 1, 2, 3])
    assert torch.allclose(cos, cos_ref[0, :, 0, 0::2], atol=1e-6)
    assert torch.allclose(sin, sin_ref[0, :, 0, 1::2], atol=1e-6)


def test_transformer_folder_round_trips_both_ways(tiny, tmp_path):
    preset, dit = tiny
    dit.save_pretrained(tmp_path / "ours")
    theirs = WanTransformer3DModel.from_pretrained(tmp_path / "ours")
    assert list(theirs.state_dict()) == list(dit.transformer.state_dict())
    for key, value in dit.transformer.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key

    plain = WanTransformer3DModel(**preset.dit.model_dump())
    plain.save_pretrained(tmp_path / "theirs")
    back = InContextWanDiT.from_pretrained(tmp_path / "theirs")
    assert back.config == preset.dit
    for key, value in plain.state_dict().items():
        assert torch.equal(back.transformer.state_dict()[key], value), key


def test_in_context_conditioning_only_returns_what_the_caller_keeps(tiny):
    """Cond frames ride along at t=0; the flow for video frames depends on them."""
    preset, dit = tiny
    lh, lw = preset.latent_hw()
    g = torch.Generator().manual_seed(1)
    cond_a = torch.randn(1, preset.dit.in_channels, 2, lh, lw, generator=g)
    cond_b = torch.randn(1, preset.dit.in_channels, 2, lh, lw, generator=g)
    video = torch.randn(1, preset.dit.in_channels, 3, lh, lw, generator=g)
    text = dit.embed_text(torch.randn(1, 8, preset.dit.text_dim, generator=g))
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    ts = torch.tensor([[0.0, 0.0, 500.0, 500.0, 500.0]])
    with torch.no_grad():
        a = dit(torch.cat([cond_a, video], 2), ts, text, DenseAttention(rope, list(range(5))))[:, :, 2:]
        b = dit(torch.cat([cond_b, video], 2), ts, text, DenseAttention(rope, list(range(5))))[:, :, 2:]
    assert a.shape == video.shape
    assert (a - b).abs().max() > 1e-4
