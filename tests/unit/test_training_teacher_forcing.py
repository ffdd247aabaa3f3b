"""Teacher forcing (paper 4.2) on the tiny preset: the in-context mask, and the training forward
over [cond | clean | noisy] == streaming inference with the clean history in the KV cache."""

from __future__ import annotations

import warnings

import pytest
import torch

from shared.models.attention import use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.masks import expand_to_tokens
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from shared.runtime.session import StreamingSession
from training.attention import FlexAttention
from training.models import TrainDiT
from training.teacher_forcing import teacher_forcing_layout, teacher_forcing_sequence

TOL = 1e-4


@pytest.fixture(autouse=True)
def _math_one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with use_attention_backend("math"), torch.no_grad():
        yield
    torch.set_num_threads(previous)


def test_mask_equals_hand_written_small_case():
    # frames: c0 c1 | clean A0 A1 B0 B1 | noisy A0 A1 B0 B1   (cond 2, chunks of 2, 2 chunks)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # cond sees only cond
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # clean chunk 0: cond + itself
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],  # clean chunk 1: cond + clean 0..1
            [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # noisy chunk 0: cond + itself
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # noisy chunk 1: cond + clean 0 + itself
            [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    mask, positions = teacher_forcing_layout(cond_frames=2, chunk_frames=2, num_chunks=2)
    assert torch.equal(mask, expected)
    assert positions == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]  # noisy chunk i at clean chunk i's positions
    tokens = expand_to_tokens(mask, 3)
    assert tokens.shape == (30, 30) and torch.equal(tokens[::3, ::3], expected)


def _inputs(preset, chunks: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lh, lw = preset.latent_hw()
    c, f = preset.dit.in_channels, chunks * preset.streaming.chunk_frames
    ref, garment = (torch.randn(1, c, 1, lh, lw, generator=g) for _ in range(2))
    clean, noisy = (torch.randn(1, c, f, lh, lw, generator=g) for _ in range(2))
    text = torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g)
    chunk_t = [937.5, 500.0, 250.0, 40.0][:chunks]
    return ref, garment, clean, noisy, text, chunk_t


def _teacher_forcing_forward(dit, preset, ref, garment, clean, noisy, text, chunk_t, attention="dense"):
    st = preset.streaming
    chunks = len(chunk_t)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    frame_mask, positions = teacher_forcing_layout(st.cond_frames, st.chunk_frames, chunks)
    noisy_t = torch.tensor([chunk_t]).repeat_interleave(st.chunk_frames, dim=1)  # [1, F]
    latents, timesteps = teacher_forcing_sequence(torch.cat([ref, garment], 2), clean, noisy, noisy_t)
    if attention == "dense":
        attn = DenseAttention(rope, positions, expand_to_tokens(frame_mask, preset.tokens_per_frame()))
    else:
        attn = FlexAttention(rope, positions, frame_mask, compile=False)
    return dit(latents, timesteps, dit.embed_text(text), attn)[:, :, -noisy.shape[2] :]


@pytest.mark.parametrize("dit_class", [InContextWanDiT, TrainDiT])
def test_teacher_forcing_forward_equals_streaming_with_clean_history(dit_class):
    preset = get_preset("tiny")
    st = preset.streaming
    chunks = 4  # 12 latent frames: inside the cache, nothing evicted
    dit = dit_class(InContextWanDiT.build(preset.dit, seed=0).transformer).eval()
    ref, garment, clean, noisy, text, chunk_t = _inputs(preset, chunks)
    trained = _teacher_forcing_forward(dit, preset, ref, garment, clean, noisy, text, chunk_t)

    session = StreamingSession(dit, preset)
    session.open(ref, garment, text, seed=0)
    n = st.chunk_frames
    for i in range(chunks):
        rows = slice(i * n, (i + 1) * n)
        streamed = session.predict_flow(noisy[:, :, rows], chunk_t[i])  # cache: cond + clean 0..i-1
        diff = (streamed - trained[:, :, rows]).abs().max().item()
        assert diff < TOL, f"chunk {i}: teacher forcing vs streaming max abs diff {diff:.3e}"
        session.append_clean(clean[:, :, rows])
    assert session.cache.slots.num_valid == chunks * n
    assert trained.abs().max() > 0.1


def test_flex_block_mask_equals_dense_mask():
    preset = get_preset("tiny")
    dit = InContextWanDiT.build(preset.dit, seed=0).eval()
    args = _inputs(preset, 2, seed=4)
    dense = _teacher_forcing_forward(dit, preset, *args, attention="dense")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is unfused
        flex = _teacher_forcing_forward(dit, preset, *args, attention="flex")
    assert (dense - flex).abs().max().item() < 1e-5
