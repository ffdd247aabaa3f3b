"""The distilled fast streaming decoder (issue 13): the streaming contract of the VAE decoder
(frame counts, chunk by chunk == whole), persistence, the training stage end to end on a copy of
the shipped toy checkpoint, and the shipped fast decoder's fidelity to the full decoder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shared.models.checkpoint import SHIPPED_CHECKPOINT
from shared.models.fast_decoder import SUBFOLDER, FastCausalDecoder, FastDecoderConfig
from shared.models.vae import VideoVAE
from shared.runtime.decode import StreamingDecoder, StreamingFastDecoder


def _latents(frames: int, seed: int = 0, z: int = 16, hw=(12, 20)) -> torch.Tensor:
    return torch.randn(1, z, frames, *hw, generator=torch.Generator().manual_seed(seed))


def test_chunk_by_chunk_equals_whole_and_frame_counts_follow_the_vae():
    torch.manual_seed(0)
    model = FastCausalDecoder(FastDecoderConfig()).eval()
    z = _latents(7)
    dec = StreamingFastDecoder(model)
    whole = dec.decode_chunk(z)
    assert whole.shape == (1, 3, 1 + 4 * 6, 96, 160)  # the Wan VAE's causal layout
    dec.reset()
    parts = [dec.decode_chunk(z[:, :, i : i + n]) for i, n in ((0, 1), (1, 3), (4, 3))]
    assert [p.shape[2] for p in parts] == [1, 12, 12]
    assert torch.allclose(torch.cat(parts, 2), whole, atol=1e-5)
    assert dec.state_bytes() > 0 and dec.frames_decoded == 25 and dec.latent_frames_decoded == 7
    # the past matters: the same chunk decodes differently after a different history
    other = StreamingFastDecoder(model)
    other.decode_chunk(_latents(4, seed=9))
    assert not torch.allclose(other.decode_chunk(z[:, :, 4:]), parts[2])


def test_a_later_frame_never_changes_an_earlier_one():
    torch.manual_seed(1)
    model = FastCausalDecoder().eval()
    z = _latents(4)
    z2 = z.clone()
    z2[:, :, 3] += 1.0
    a, _ = model(z)
    b, _ = model(z2)
    assert torch.equal(a[:, :, :12], b[:, :, :12]) and not torch.equal(a[:, :, 12:], b[:, :, 12:])


def test_save_and_load_round_trip(tmp_path):
    model = FastCausalDecoder(FastDecoderConfig(channels=(8, 8, 8, 8), memory_blocks=(1, 0, 1)))
    model.save(tmp_path / SUBFOLDER)
    back = FastCausalDecoder.load(tmp_path / SUBFOLDER)
    assert back.config == model.config
    z = _latents(2)
    assert torch.equal(back(z)[0], model.eval()(z)[0])
    with pytest.raises(FileNotFoundError, match="train fast-decoder"):
        FastCausalDecoder.load(tmp_path / "nothing")


def test_rejects_latents_of_another_vae():
    dec = StreamingFastDecoder(FastCausalDecoder())
    with pytest.raises(ValueError, match="expected latents"):
        dec.decode_chunk(torch.zeros(1, 48, 2, 12, 20))


def test_training_stage_writes_a_loadable_decoder_that_beats_its_init(tmp_path):
    from training.fast_decoder import FastDecoderTrainConfig, evaluate, train_fast_decoder

    ck = tmp_path / "toy"
    shutil.copytree(SHIPPED_CHECKPOINT, ck, ignore=shutil.ignore_patterns(SUBFOLDER))
    small = FastDecoderConfig(channels=(16, 16, 16, 8), memory_blocks=(1, 1, 0))
    vae = VideoVAE.from_pretrained(ck / "vae")
    torch.manual_seed(0)
    before = evaluate(vae, FastCausalDecoder(small).eval(), 96, 160, 24, clips=1, frames=5)
    report = train_fast_decoder(
        ck,
        FastDecoderTrainConfig(steps=40, clips=2, frames=5, batch=2, eval_clips=1, dit_sessions=1, dit_chunks=2),
        model_config=small,
    )
    assert (ck / SUBFOLDER / "model.safetensors").is_file() and not (ck / "fast_decoder-state.pt").exists()
    saved = json.loads((ck / SUBFOLDER / "training.json").read_text())
    assert saved["eval"]["psnr_db"] == pytest.approx(report["psnr_db"])
    assert report["psnr_db"] > before["psnr_db"] + 3.0  # it learned something from its teacher
    assert report["decode_speedup"] > 0 and FastCausalDecoder.load(ck / SUBFOLDER).config == small


def test_the_shipped_fast_decoder_matches_the_full_decoder_within_30_db():
    from shared.toyworld.render import render_clip, sample_scene
    from training.fast_decoder import _pixels, psnr

    vae = VideoVAE.from_pretrained(SHIPPED_CHECKPOINT / "vae")
    fast = StreamingFastDecoder(FastCausalDecoder.load(SHIPPED_CHECKPOINT / SUBFOLDER), vae.z_dim)
    rng = np.random.default_rng(7)
    x = _pixels(render_clip(sample_scene(rng, "test"), 13, 96, 160, 24))[None]
    lat = vae.encode_video(x)
    full = StreamingDecoder(vae).decode_chunk(lat)
    assert psnr(fast.decode_chunk(lat), full) >= 30.0
