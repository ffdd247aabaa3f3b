"""Pixel-level session: checkpoints, decode-encode disentangle, streamed frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from shared.models.checkpoint import CheckpointError, build_random, load_checkpoint, read_preset, save_checkpoint
from shared.models.presets import get_preset
from shared.runtime.config import EngineConfig
from shared.runtime.decode import to_uint8_frames
from shared.runtime.pipeline import Engine
from shared.runtime.session import SwitchOptions


def image(seed: int, size=(150, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


def test_chunk_frame_counts_and_streamed_frames_equal_whole_decode(engine):
    s = engine.session()
    s.open(image(0), image(1), "a person turns", seed=1)
    chunks = [s.next_chunk() for _ in range(3)]
    assert [c.frames.shape[0] for c in chunks] == [9, 12, 12]
    assert [c.first_frame for c in chunks] == [0, 9, 21]
    whole = to_uint8_frames(engine.vae.decode(torch.cat([c.latents for c in chunks], 2)))
    assert torch.equal(torch.cat([c.frames for c in chunks]), whole)


def test_switch_reference_is_decode_encode_of_last_frame(engine, monkeypatch):
    s = engine.session()
    s.open(image(0), image(1), "a person turns", seed=1)
    s.next_chunk()
    last = s.next_chunk()
    seen = []
    original = engine.encode_frame
    monkeypatch.setattr(engine, "encode_frame", lambda px: seen.append(px) or original(px))
    s.switch_garment(image(2))
    assert len(seen) == 1
    # the pixel frame that was re-encoded is the last decoded frame of the stream
    assert torch.equal(to_uint8_frames(seen[0][:, :, None])[0], last.frames[-1])
    assert torch.equal(s.latent.reference, engine.vae.encode_image(seen[0]))
    assert s.latent.cache.slots.num_valid == 0
    nxt = s.next_chunk()
    assert nxt.switched and nxt.frames.shape[0] == 12


def test_switch_without_disentangle_keeps_reference(engine):
    s = engine.session()
    s.open(image(0), image(1), "p", seed=1)
    s.next_chunk()
    ref = s.latent.reference.clone()
    s.switch_garment(image(2), SwitchOptions(disentangle=False))
    assert torch.equal(s.latent.reference, ref)


def test_switch_before_first_chunk_replaces_the_garment(engine):
    """Before chunk 0 nothing has streamed: a switch is a garment refresh only, whatever the
    options (no history to withdraw, no decoded frame to disentangle), through every caller."""
    s = engine.session()
    s.open(image(0), image(1), "p", seed=1)
    ref = s.latent.reference.clone()
    assert s.switch_options(SwitchOptions()) == SwitchOptions(refresh=True, withdraw=False, disentangle=False)
    s.switch_garment(image(2))
    assert torch.equal(s.latent.reference, ref)
    assert torch.equal(s.latent.garment, engine.encode_garment(image(2)))
    first = s.next_chunk()
    assert first.switched and first.index == 0 and first.frames.shape[0] == 9
    assert s.switch_options(SwitchOptions()) == SwitchOptions()  # mid-stream: all three steps


def test_a_switch_after_a_rewind_gives_what_the_switch_before_those_chunks_gave(engine):
    """The generator redoes a chunk the client has not received: rewinding to chunk j, then a switch
    that withdraws, gives chunk j.. exactly as the same switch applied before chunk j (withdraw drops
    the history those chunks added; the noise is the seed's, by chunk index). A prompt update that
    took effect at the dropped chunk is reported again at its redo."""
    text = engine.encode_prompt("p")
    ref, garment, other = (engine.encode_garment(image(i)) for i in range(3))
    new_ref = engine.encode_reference(image(3))  # stands for the last frame of chunk j - 1

    def session():
        s = engine.session()
        s.open_latents(ref, garment, text, seed=4)
        return s

    direct, redone = session(), session()
    for s in (direct, redone):
        s.generate()
        s.set_prompt(engine.encode_prompt("q"), "q")
    direct.switch_latents(other, SwitchOptions(), new_ref)
    want = [direct.generate() for _ in range(2)]
    dropped = [redone.generate(), redone.generate()]  # chunks 1, 2: never shown
    assert dropped[0].prompt_updated
    redone.rewind(1, prompt_updated=dropped[0].prompt_updated)
    assert redone.chunk_index == 1 and redone.latent.cache.slots.num_valid == 0
    redone.switch_latents(other, SwitchOptions(), new_ref)
    got = [redone.generate() for _ in range(2)]
    assert [(c.index, c.switched, c.prompt_updated) for c in got] == [(1, True, True), (2, False, False)]
    for a, b in zip(want, got):
        assert torch.equal(a.latents, b.latents)
    assert not torch.equal(dropped[0].latents, got[0].latents)  # the redone chunk wears the new garment
    with pytest.raises(ValueError, match="cannot rewind"):
        redone.rewind(5)  # past the next chunk


def test_disentangle_without_a_decoded_frame_is_refused(engine):
    s = engine.session()
    s.open(image(0), image(1), "p", seed=1)
    s.next_chunk()
    resumed = engine.session()
    resumed.restore(s.state())  # at chunk 1, nothing decoded by this session yet
    with pytest.raises(ValueError, match="needs a frame decoded since open or restore"):
        resumed.switch_garment(image(2))
    resumed.switch_garment(image(2), SwitchOptions(disentangle=False))  # refresh + withdraw need no frame


def test_checkpoint_round_trip_generates_the_same_video(tmp_path):
    comps = build_random(get_preset("tiny"), seed=4)
    save_checkpoint(comps, tmp_path / "ckpt")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "model_index.json", "fashionchameleon.json"):
        assert (tmp_path / "ckpt" / sub).exists(), sub
    preset, ckpt_id = read_preset(tmp_path / "ckpt")
    assert preset.dit == comps.preset.dit and preset.streaming == comps.preset.streaming
    assert ckpt_id == comps.checkpoint_id

    videos = []
    for e in (Engine(comps), Engine.from_checkpoint(tmp_path / "ckpt")):
        s = e.session()
        s.open(image(0), image(1), "a person walks", seed=9)
        videos.append(torch.cat([s.next_chunk().frames for _ in range(2)]))
    assert torch.equal(videos[0], videos[1])


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing"):
        read_preset(tmp_path / "empty")


def test_resolution_override(tmp_path):
    e = Engine.from_preset("tiny", EngineConfig(height=64, width=64))
    s = e.session()
    s.open(image(0), image(1), "p", seed=0)
    assert s.next_chunk().frames.shape == (9, 64, 64, 3)
    with pytest.raises(ValueError, match="multiples of 32"):
        Engine.from_preset("tiny", EngineConfig(height=60, width=64))
