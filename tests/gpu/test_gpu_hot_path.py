"""The hot path on CUDA: equal to the reference path, and no host-device sync inside a chunk."""

from __future__ import annotations

import pytest
import torch

from shared.models.dit import InContextWanDiT
from shared.models.presets import get_preset
from shared.runtime.session import StreamingSession

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _session(reference: bool, dtype=torch.bfloat16):
    preset = get_preset("small").with_streaming(max_cache_frames=9, sink_frames=3)
    dit = InContextWanDiT.build(preset.dit, seed=0).to("cuda", dtype).eval()
    g = torch.Generator().manual_seed(1)
    lh, lw = preset.latent_hw()
    c = preset.dit.in_channels
    ref, garment = (torch.randn(1, c, 1, lh, lw, generator=g) for _ in range(2))
    text = torch.randn(1, preset.text_encoder.max_length, preset.dit.text_dim, generator=g)
    s = StreamingSession(dit, preset, "cuda", dtype, attention_backend="sdpa", reference_attention=reference)
    s.open(ref, garment, text, seed=4)
    return s


@torch.no_grad()
def test_hot_path_equals_reference_on_cuda_fp32():
    a, b = _session(False, torch.float32), _session(True, torch.float32)
    x = torch.cat([a.next_chunk() for _ in range(6)], 2)
    y = torch.cat([b.next_chunk() for _ in range(6)], 2)
    assert (x - y).abs().max().item() < 1e-3  # TF32/SDPA kernels differ in summation order only


@torch.no_grad()
def test_no_host_device_sync_inside_a_steady_chunk():
    s = _session(False)
    for _ in range(5):  # past the window: evictions, cond/sink re-rotation
        s.next_chunk()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        s.next_chunk()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
