"""GPU numerics in bf16 (run where a CUDA device is lent: `python -m pytest tests/gpu -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from shared.models.attention import BACKENDS, use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.masks import expand_to_tokens, teacher_forcing_frame_mask
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from shared.runtime.sampler import FewStepSampler, chunk_noises
from shared.runtime.session import StreamingSession

pytestmark = pytest.mark.gpu


def _setup(name: str, dtype=torch.bfloat16):
    preset = get_preset(name)
    dit = InContextWanDiT.build(preset.dit, seed=0).to("cuda", dtype).eval()
    g = torch.Generator().manual_seed(1)
    lh, lw = preset.latent_hw()
    c = preset.dit.in_channels
    ref, garment = (torch.randn(1, c, 1, lh, lw, generator=g) for _ in range(2))
    text = torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g)
    return preset, dit, ref, garment, text


@pytest.mark.parametrize("name", ["tiny", "small"])
@torch.no_grad()
def test_bf16_cached_equals_uncached(name):
    preset, dit, ref, garment, text_raw = _setup(name)
    st = preset.streaming
    session = StreamingSession(dit, preset, "cuda", torch.bfloat16)
    session.open(ref, garment, text_raw, seed=7)
    cached = [session.next_chunk() for _ in range(4)]

    text = dit.embed_text(text_raw.to("cuda")).to(torch.bfloat16)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid(), device="cuda")
    sampler = FewStepSampler(st.timesteps, st.shift)
    n = preset.tokens_per_frame()
    cond = torch.cat([ref, garment], 2).to("cuda", torch.bfloat16)
    history = []
    for i in range(4):
        noises = chunk_noises(7, i, session.chunk_shape, 4, "cuda", torch.bfloat16)
        mask = expand_to_tokens(teacher_forcing_frame_mask(st.cond_frames, st.chunk_frames, i + 1, 0), n).cuda()

        def flow(x, t, step):
            seq = torch.cat([cond, *history, x], 2)
            f = seq.shape[2]
            ts = torch.tensor([[0.0] * (f - 3) + [t] * 3], device="cuda")
            return dit(seq, ts, text, DenseAttention(rope, list(range(f)), mask))[:, :, -3:]  # noqa: B023 (called in this iteration)

        history.append(sampler.sample(flow, noises))
    a, b = torch.cat(cached, 2).float(), torch.cat(history, 2).float()
    rel = ((a - b).norm() / b.norm()).item()
    print(f"{name}: bf16 cached vs uncached max abs {(a - b).abs().max().item():.3e}, rel {rel:.3e}")
    assert rel < 2e-2


@torch.no_grad()
def test_flash_matches_sdpa_when_available():
    if not BACKENDS["flash"].supports(torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16), None):
        pytest.skip("flash-attn not installed")
    preset, dit, ref, garment, text = _setup("small")
    outs = []
    for backend in ("sdpa", "flash"):
        with use_attention_backend(backend):
            s = StreamingSession(dit, preset, "cuda", torch.bfloat16)
            s.open(ref, garment, text, seed=3)
            outs.append(torch.cat([s.next_chunk() for _ in range(3)], 2).float())
    rel = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
    assert rel < 2e-2
