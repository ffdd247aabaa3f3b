"""VideoVAE and StreamingDecoder on the tiny preset (random weights, CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from shared.models.presets import get_preset, pixel_frames
from shared.models.vae import VideoVAE
from shared.runtime.decode import StreamingDecoder, to_uint8_frames

PRESET = get_preset("tiny")
TOL = 1e-5


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE.build(PRESET.vae, seed=0)


def _latents(frames: int, seed: int = 1) -> torch.Tensor:
    h, w = PRESET.latent_hw()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, PRESET.vae.z_dim, frames, h, w, generator=g)  # [1, z, f, h, w]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("chunks", [(3, 3, 3), (1, 2, 4), (4, 1, 1, 2)])
def test_streamed_decode_matches_whole_decode(vae: VideoVAE, chunks: tuple[int, ...]) -> None:
    latents = _latents(sum(chunks))
    reference = vae.decode(latents)  # [1, 3, 1 + 4(f-1), H, W]
    assert reference.shape == (1, 3, pixel_frames(sum(chunks)), PRESET.streaming.height, PRESET.streaming.width)

    decoder = StreamingDecoder(vae)
    outs, start = [], 0
    for k, f in enumerate(chunks):
        out = decoder.decode_chunk(latents[:, :, start : start + f])
        assert out.shape[2] == (pixel_frames(f) if k == 0 else 4 * f), f"chunk {k} of {f} latent frames"
        outs.append(out)
        start += f
    streamed = torch.cat(outs, dim=2)
    diff = _max_diff(streamed, reference)
    assert diff <= TOL, f"streamed vs whole decode: max abs diff {diff:.3e}"
    assert decoder.frames_decoded == reference.shape[2]
    assert decoder.latent_frames_decoded == sum(chunks)


def test_paper_chunking_gives_9_then_12_frames(vae: VideoVAE) -> None:
    decoder = StreamingDecoder(vae)
    sizes = [decoder.decode_chunk(c).shape[2] for c in _latents(9).split(PRESET.streaming.chunk_frames, dim=2)]
    assert sizes == [9, 12, 12]


def test_reset_restarts_the_stream(vae: VideoVAE) -> None:
    decoder = StreamingDecoder(vae)
    decoder.decode_chunk(_latents(3, seed=2))
    decoder.decode_chunk(_latents(3, seed=3))
    assert decoder.state_bytes() > 0

    decoder.reset()
    assert decoder.state_bytes() == 0 and decoder.frames_decoded == 0
    latents = _latents(2, seed=4)
    out = decoder.decode_chunk(latents)
    assert out.shape[2] == pixel_frames(2)
    diff = _max_diff(out, vae.decode(latents))
    assert diff <= TOL, f"after reset vs fresh decode: max abs diff {diff:.3e}"


def test_sessions_sharing_one_module_do_not_interfere(vae: VideoVAE) -> None:
    a_lat, b_lat = _latents(4, seed=5), _latents(4, seed=6)
    a, b = StreamingDecoder(vae), StreamingDecoder(vae)
    a_out, b_out = [], []
    for i in range(0, 4, 2):  # interleave two streams and a whole decode on the same module
        a_out.append(a.decode_chunk(a_lat[:, :, i : i + 2]))
        vae.decode(_latents(2, seed=7))
        b_out.append(b.decode_chunk(b_lat[:, :, i : i + 2]))
    for name, outs, lat in (("a", a_out, a_lat), ("b", b_out, b_lat)):
        diff = _max_diff(torch.cat(outs, dim=2), vae.decode(lat))
        assert diff <= TOL, f"session {name}: max abs diff {diff:.3e}"


def test_encode_image_applies_latent_normalization() -> None:
    z = PRESET.vae.z_dim
    mean = tuple(0.1 * i - 0.3 for i in range(z))
    std = tuple(0.5 + 0.25 * i for i in range(z))
    plain = VideoVAE.build(PRESET.vae, seed=3)  # mean 0, std 1: normalized == raw
    stats = VideoVAE.build(PRESET.vae.model_copy(update={"latents_mean": mean, "latents_std": std}), seed=3)

    h, w = PRESET.streaming.height, PRESET.streaming.width
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [2, 3, H, W]
    raw = plain.encode_image(images)
    assert raw.shape == (2, z, 1, h // 16, w // 16)
    expected_raw = plain.module.encode(images.unsqueeze(2)).latent_dist.mode()
    assert torch.equal(raw, expected_raw), "encode_image must use the posterior mode"

    normalized = stats.encode_image(images)
    m = torch.tensor(mean).view(1, z, 1, 1, 1)
    s = torch.tensor(std).view(1, z, 1, 1, 1)
    diff = _max_diff(normalized, (raw - m) / s)
    assert diff <= TOL, f"normalized != (z - mean) / std: max abs diff {diff:.3e}"
    diff = _max_diff(stats.decode(normalized), plain.decode(raw))
    assert diff <= TOL, f"denormalize is not the inverse: max abs diff {diff:.3e}"


def test_encode_video_shape_and_validation(vae: VideoVAE) -> None:
    h, w = PRESET.streaming.height, PRESET.streaming.width
    video = torch.zeros(1, 3, 9, h, w)  # [B, 3, F, H, W]
    assert vae.encode_video(video).shape == (1, vae.z_dim, 3, h // 16, w // 16)
    with pytest.raises(ValueError, match="pixel frames"):
        vae.encode_video(torch.zeros(1, 3, 8, h, w))
    with pytest.raises(ValueError, match="multiple of 16"):
        vae.encode_image(torch.zeros(1, 3, h + 8, w))


def test_build_is_deterministic_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = VideoVAE.build(PRESET.vae, seed=11).module.state_dict()
    b = VideoVAE.build(PRESET.vae, seed=11).module.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = VideoVAE.build(PRESET.vae, seed=12).module.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_save_load_round_trip(vae: VideoVAE, tmp_path) -> None:
    folder = tmp_path / "vae"
    vae.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()

    loaded = VideoVAE.from_pretrained(folder)
    assert loaded.config == vae.config
    assert (loaded.z_dim, loaded.spatial_factor, loaded.temporal_factor) == (8, 16, 4)
    latents = _latents(2, seed=8)
    assert torch.equal(loaded.decode(latents), vae.decode(latents))
    images = torch.rand(1, 3, PRESET.streaming.height, PRESET.streaming.width) * 2 - 1
    assert torch.equal(loaded.encode_image(images), vae.encode_image(images))

    plain = AutoencoderKLWan.from_pretrained(folder)
    ours, theirs = vae.module.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_to_uint8_frames() -> None:
    pixels = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 4, 1, 1).expand(1, 3, 4, 2, 5)  # [1, 3, T=4, H=2, W=5]
    frames = to_uint8_frames(pixels)
    assert frames.shape == (4, 2, 5, 3) and frames.dtype == torch.uint8
    assert frames[:, 0, 0, 0].tolist() == [0, 128, 255, 255]
