"""Batched stepping (`shared.runtime.batch`): N sessions in one forward give each the video it
would have had alone, with sessions that open, switch, change prompt and close at different
times; and on the shipped toy model the frames are the same to the eye and to its metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.models.checkpoint import SHIPPED_CHECKPOINT
from shared.runtime.batch import BatchedAttention, group_batchable, next_chunks
from shared.runtime.config import EngineConfig
from shared.runtime.pipeline import Engine, generate_batch
from shared.runtime.pipeline import next_chunks as next_pixel_chunks
from shared.toyworld import metrics as tm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def image(seed: int, size=(150, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


# What each session does, by step: ("open", ref, garment, prompt, seed) | ("switch", garment)
# | ("prompt", text) | ("close",); every open session generates a chunk at every step.
SCRIPT = {
    "a": {0: ("open", 0, 1, "a person turns", 3), 3: ("switch", 7), 5: ("prompt", "the person waves")},
    "b": {1: ("open", 2, 3, "a person walks to the left", 4), 2: ("prompt", "the person jumps"), 6: ("close",)},
    "c": {2: ("open", 4, 5, "a person turns", 3), 2.5: ("switch", 8), 4: ("switch", 9)},  # 2.5: before chunk 0
    "d": {4: ("open", 6, 1, "the person stands still", 11)},
}
STEPS = 8


def run_script(engine, batched: bool) -> dict[str, list]:
    """Drive SCRIPT; return each session's chunk results in order."""
    sessions, out = {}, {name: [] for name in SCRIPT}
    for step in range(STEPS):
        for name, events in SCRIPT.items():
            for at in sorted(t for t in events if step <= t < step + 1):
                kind, *args = events[at]
                if kind == "open":
                    s = sessions[name] = engine.session()
                    s.open(image(args[0]), image(args[1]), args[2], seed=args[3])
                elif kind == "switch":
                    sessions[name].switch_garment(image(args[0]))
                elif kind == "prompt":
                    sessions[name].update_prompt(args[0])
                elif kind == "close":
                    sessions.pop(name).close()
        live = list(sessions.items())
        if batched:
            results = next_pixel_chunks([s for _, s in live])
        else:
            results = [s.next_chunk() for _, s in live]
        for (name, _), r in zip(live, results):
            out[name].append(r)
    return out


def test_batched_equals_one_at_a_time_through_opens_switches_prompts_and_closes(engine):
    serial, batched = run_script(engine, batched=False), run_script(engine, batched=True)
    assert {k: len(v) for k, v in batched.items()} == {"a": 8, "b": 5, "c": 6, "d": 4}
    for name in SCRIPT:
        for a, b in zip(serial[name], batched[name]):
            assert (a.index, a.switched, a.first_frame) == (b.index, b.switched, b.first_frame)
            assert (a.latents - b.latents).abs().max().item() <= 1e-5, (name, a.index)
            # uint8 frames: equal up to a rounding flip of the last bit
            assert (a.frames.int() - b.frames.int()).abs().max().item() <= 1, (name, a.index)
    # the switches and prompt changes took effect where the script put them
    assert [r.switched for r in batched["a"]] == [False, False, False, True, False, False, False, False]
    assert [r.switched for r in batched["c"]] == [True, False, True, False, False, False]


def test_a_batch_really_is_one_forward_per_step(engine, monkeypatch):
    sessions = [engine.session() for _ in range(3)]
    for i, s in enumerate(sessions):
        s.open(image(i), image(i + 1), "a person turns", seed=i)
    calls = []
    original = type(engine.dit).forward
    monkeypatch.setattr(
        type(engine.dit), "forward", lambda self, x, *a, **k: calls.append(x.shape[0]) or original(self, x, *a, **k)
    )
    chunks = generate_batch(sessions)
    steps = sessions[0].latent.sampler.num_steps
    assert calls == [3] * (steps + 1)  # denoising steps + the context pass, all three rows each
    assert [c.index for c in chunks] == [0, 0, 0] and all(s.chunk_index == 1 for s in sessions)


def test_seed_decides_the_noise_not_the_batch(engine):
    """The same session (seed, inputs) in batches with different neighbours: same chunk."""

    def first_chunk(neighbours: int):
        sessions = [engine.session() for _ in range(neighbours + 1)]
        sessions[0].open(image(0), image(1), "a person turns", seed=42)
        for i, s in enumerate(sessions[1:]):
            s.open(image(10 + i), image(20 + i), "a person walks to the left", seed=100 + i)
        return generate_batch(sessions)[0].latents

    alone, with_two, with_four = first_chunk(0), first_chunk(2), first_chunk(4)
    assert (alone - with_two).abs().max() <= 1e-5 and (alone - with_four).abs().max() <= 1e-5


def test_incompatible_sessions_are_grouped_apart_and_a_session_appears_once(engine):
    other = Engine.from_preset("tiny", seed=1)  # another model: another group
    sessions = [engine.session(), other.session(), engine.session()]
    for i, s in enumerate(sessions):
        s.open(image(i), image(i + 1), "p", seed=i)
    assert group_batchable([s.latent for s in sessions]) == [[0, 2], [1]]
    assert [c.index for c in generate_batch(sessions)] == [0, 0, 0]
    with pytest.raises(ValueError, match="cannot share a batch"):
        next_chunks([s.latent for s in sessions])
    with pytest.raises(ValueError, match="twice"):
        generate_batch([sessions[0], sessions[0]])
    with pytest.raises(ValueError, match="rows"):
        BatchedAttention([lambda *a: None])(0, *(torch.zeros(2, 1, 1, 1),) * 3)


def test_toy_model_batched_frames_and_metrics_equal_unbatched():
    """The shipped toy model: person.png in red (switching to green) next to a second shopper;
    batched frames equal the unbatched ones and score the same garment at every frame."""
    engine = Engine.from_checkpoint(SHIPPED_CHECKPOINT, EngineConfig())
    person = Image.open(EXAMPLES / "person.png").convert("RGB")
    red = Image.open(EXAMPLES / "garment-red.png").convert("RGB")
    green = Image.open(EXAMPLES / "garment-green.png").convert("RGB")
    prompt = "The person stands still, facing the camera."

    def run(batched: bool) -> list[np.ndarray]:
        a, b = engine.session(), engine.session()
        a.open(person, red, prompt, seed=5)
        b.open(person, green, prompt, seed=9)
        frames: list[list[torch.Tensor]] = [[], []]
        for step in range(4):
            if step == 2:
                a.switch_garment(green)
            results = next_pixel_chunks([a, b]) if batched else [a.next_chunk(), b.next_chunk()]
            for i, r in enumerate(results):
                frames[i].append(r.frames)
        return [torch.cat(f).numpy() for f in frames]

    serial, batched = run(False), run(True)
    red_px, green_px = np.asarray(red), np.asarray(green)
    for s_frames, b_frames in zip(serial, batched):
        assert np.abs(s_frames.astype(int) - b_frames.astype(int)).max() <= 1
        for fs, fb in zip(s_frames, b_frames):
            ds = [tm.garment_fidelity(fs, g)["pattern_delta_e"] for g in (red_px, green_px)]
            db = [tm.garment_fidelity(fb, g)["pattern_delta_e"] for g in (red_px, green_px)]
            assert np.allclose(ds, db, atol=0.5)
    # and the video is the try-on one: session a wears red before its switch, green after it
    a = batched[0]
    closer_green = [
        tm.garment_fidelity(f, green_px)["pattern_delta_e"] < tm.garment_fidelity(f, red_px)["pattern_delta_e"]
        for f in a
    ]
    assert not any(closer_green[:21]) and all(closer_green[21 + 12 :])


def test_sessions_at_the_same_positions_are_rotated_in_one_call():
    calls = []

    class Hook:
        def __init__(self, key):
            self.rotation_key = key

        def rotate(self, q, k):
            calls.append(("rotate", q.shape[0]))
            return q + 1, k + 1

        def attend(self, layer, q, kr, k, v):
            calls.append(("attend", float(q[0, 0, 0, 0])))
            return q

        def __call__(self, layer, q, k, v):
            return self.attend(layer, *self.rotate(q, k), k, v)

    class Plain:  # a hook without the split (the reference attention): called as is
        def __call__(self, layer, q, k, v):
            calls.append(("plain", float(q[0, 0, 0, 0])))
            return q

    hooks = [Hook("p"), Plain(), Hook("p"), Hook("other")]
    attn = BatchedAttention(hooks)
    assert attn.rotation_groups == [[0, 2]] and attn.alone == [1, 3]
    q = torch.arange(4.0).view(4, 1, 1, 1)
    out = attn(0, q, q.clone(), q.clone())
    assert out.flatten().tolist() == [1.0, 1.0, 3.0, 4.0]  # rows 0, 2 rotated together (+1), 1 plain, 3 alone (+1)
    assert calls.count(("rotate", 2)) == 1 and calls.count(("rotate", 1)) == 1 and ("plain", 1.0) in calls
