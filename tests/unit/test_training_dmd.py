"""GR-DMD (paper Eq. 6) on the tiny preset: frame weights, constant reward == plain DMD, the
real score gets no gradient, rollouts are the inference session with gradients through the
exit step only, and the fake score steps 5 times per generator step."""

from __future__ import annotations

import pytest
import torch

from shared.models.checkpoint import build_random
from shared.models.dit import InContextWanDiT
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from shared.runtime.session import StreamingSession
from training.config import get_recipe, load_recipe
from training.data.synthetic import make_synthetic_dataset
from training.dmd import GRDMD, dmd_loss
from training.models import TrainDiT
from training.parallel import DistInfo
from training.rewards import (
    AestheticProxyReward,
    ConstantReward,
    frame_weights,
    pixel_to_latent_frames,
)
from training.trainer import DMDRun

pytestmark = pytest.mark.usefixtures("math_attention")


PRESET = get_preset("tiny")


def _dit(seed: int) -> TrainDiT:
    return TrainDiT(InContextWanDiT.build(PRESET.dit, seed=seed).transformer)


@pytest.fixture
def models():
    generator, real, fake = _dit(0), _dit(1).requires_grad_(False), _dit(1)
    with torch.no_grad():  # a fake score that has drifted from the real one: non-zero DMD gradient
        for p in fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return generator, fake, real


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lh, lw = PRESET.latent_hw()
    return {
        "reference": torch.randn(1, 8, 1, lh, lw, generator=g),
        "garment": torch.randn(1, 8, 1, lh, lw, generator=g),
        "text_full": torch.randn(1, 32, 32, generator=g),
    }


def _objective(reward) -> GRDMD:
    cfg = get_recipe("tiny").dmd  # 6 latent frames = 2 chunks
    rope = RopeTable(PRESET.dit.attention_head_dim, PRESET.token_grid())
    return GRDMD(
        PRESET, cfg, seed=0, rope=rope, reward=reward, null_text=None, device=torch.device("cpu"), dtype=torch.float32
    )


def test_frame_weights():
    r = torch.tensor([[0.9, 0.5, 0.7, 0.9]])
    w = frame_weights(r, tau=0.2)
    assert w.argmax().item() == 1 and w[0, 1] > w[0, 2] > w[0, 0] == w[0, 3], "lower reward, larger weight"
    assert w.sum().item() == pytest.approx(4.0)
    # by hand: exp(-(r - 0.5) / 0.2) = [e^-2, 1, e^-1, e^-2], times 4 / (1 + e^-1 + 2 e^-2)
    torch.testing.assert_close(w, torch.tensor([[0.330378, 2.441183, 0.898061, 0.330378]]), rtol=0, atol=1e-6)
    # rewards tau*ln(1, 2, 4) weigh 1 : 1/2 : 1/4, mean 1: exactly 12/7, 6/7, 3/7
    w3 = frame_weights(
        torch.tensor([[0.0, 0.2 * 0.6931471805599453, 0.2 * 1.3862943611198906]], dtype=torch.float64), 0.2
    )
    torch.testing.assert_close(w3, torch.tensor([[12 / 7, 6 / 7, 3 / 7]], dtype=torch.float64))
    # per sample: a second row of other rewards does not change the first
    torch.testing.assert_close(frame_weights(torch.cat([r, torch.tensor([[0.1, 0.2, 0.3, 0.4]])]), 0.2)[:1], w)
    assert torch.equal(frame_weights(torch.full((2, 7), 0.3), 0.2), torch.ones(2, 7)), "constant reward: exactly 1"
    sharp, flat = frame_weights(r, 0.05), frame_weights(r, 5.0)
    assert sharp[0, 1] > w[0, 1] > flat[0, 1] > 1.0


def test_weighted_loss_gradient_is_weighted_dmd_direction():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 2, 2, generator=g, requires_grad=True)
    fake, real = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    weights = frame_weights(torch.tensor([[0.2, 0.8, 0.5], [0.5, 0.5, 0.1]]), 0.2)
    loss, grad = dmd_loss(x0, fake, real, weights)
    loss.backward()
    plain = (fake - real) / (x0.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = plain * weights[:, None, :, None, None] / x0.numel()
    torch.testing.assert_close(x0.grad, expected)
    torch.testing.assert_close(grad.float(), plain * weights[:, None, :, None, None])


def test_constant_reward_reproduces_plain_dmd_exactly(models):
    generator, fake, real = models
    grads, losses = [], []
    for reward in (ConstantReward(), None):  # None: plain DMD, no weighting code at all
        generator.zero_grad(set_to_none=True)
        loss, _ = _objective(reward).generator_loss(generator, fake, real, _batch(), [0], step=0)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in generator.parameters()])
    assert losses[0] == losses[1] > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert sum(g.abs().sum().item() for g in grads[0]) > 0


def test_real_score_gets_no_gradient_and_fake_none_from_generator_loss(models):
    generator, fake, real = models
    real_before = [p.clone() for p in real.parameters()]
    loss, _ = _objective(ConstantReward()).generator_loss(generator, fake, real, _batch(), [0], step=3)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in real.parameters())
    assert all(p.grad is None for p in fake.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(real_before, real.parameters()))
    # The fake-score loss trains the fake score only.
    generator.zero_grad(set_to_none=True)
    loss, _ = _objective(ConstantReward()).fake_loss(generator, fake, _batch(), [1], step=3)
    loss.backward()
    assert all(p.grad is None for p in generator.parameters()) and all(p.grad is None for p in real.parameters())
    assert all(p.grad is not None for p in fake.parameters())


def test_rollout_is_the_inference_session_with_grad_through_exit_steps_only():
    generator = _dit(0)
    ref, garment, text = _batch()["reference"], _batch()["garment"], _batch()["text_full"]
    a, b = StreamingSession(generator, PRESET), StreamingSession(generator, PRESET)
    a.open(ref, garment, text, seed=9)
    b.open(ref, garment, text, seed=9)
    with torch.no_grad():
        for _ in range(2):  # the last exit step is exactly inference's chunk
            assert torch.equal(a.next_chunk(), b.rollout_chunk(a.sampler.num_steps - 1))

    calls = []
    forward = generator.forward

    def spy(latents, timesteps, text, attn):
        calls.append((torch.is_grad_enabled(), float(timesteps.max())))
        return forward(latents, timesteps, text, attn)

    generator.forward = spy
    session = StreamingSession(generator, PRESET)
    session.open(ref, garment, text, seed=9)
    exits = [2, 0, 3]
    outs = [session.rollout_chunk(e) for e in exits]
    generator.forward = forward
    with_grad = [c for c in calls if c[0]]
    assert len(with_grad) == len(exits), "one forward with a graph per chunk: the exit step"
    sigmas = session.sampler.model_timesteps
    assert [c[1] for c in with_grad] == [pytest.approx(sigmas[e]) for e in exits]
    assert len(calls) == 1 + sum(e + 1 for e in exits) + len(exits)  # cond + denoising + context passes
    assert all(o.requires_grad for o in outs)
    outs[-1].sum().backward()
    assert any(p.grad is not None for p in generator.parameters())


def test_aesthetic_proxy_reward_shapes():
    vae = build_random(PRESET, seed=1, parts=frozenset({"vae"})).vae
    rewards = AestheticProxyReward(vae)(torch.randn(2, 8, 3, 6, 8))
    assert rewards.shape == (2, 3) and torch.isfinite(rewards).all()
    per_pixel = torch.arange(9.0)[None]  # pixel frames 0..8 -> latent frames {0}, {1..4}, {5..8}
    torch.testing.assert_close(pixel_to_latent_frames(per_pixel, 3), torch.tensor([[0.0, 2.5, 6.5]]))


def test_fake_score_and_generator_step_five_to_one(tmp_path):
    make_synthetic_dataset(tmp_path / "data", count=2, pixel_frames=21)
    recipe = load_recipe(
        "tiny",
        {
            "dmd.data.root": str(tmp_path / "data"),
            "dmd.run.max_steps": 10,
            "dmd.run.checkpoint_every": 100,
            "dmd.reward.kind": "constant",
        },
    )
    run = DMDRun(recipe, tmp_path / "run", DistInfo())
    steps = {"generator": [], "fake": []}
    for name, opt in (("generator", run.gen_optimizer), ("fake", run.fake_optimizer)):
        original = opt.step
        opt.step = lambda *a, _o=original, _n=name, **k: (steps[_n].append(run.step), _o(*a, **k))[1]
    history = run.run()
    assert steps == {"generator": [0, 5], "fake": list(range(10))}
    assert (run.generator_steps, run.fake_steps) == (2, 10)
    assert history[-1]["fake_steps"] == 10 and "generator_loss" in history[5] and "generator_loss" not in history[4]


def test_activation_checkpointing_in_rollouts_gives_the_same_gradients(models):
    """The exit step is recomputed in backward after later chunks were appended to the cache."""
    generator, fake, real = models
    grads = []
    for checkpointing in (False, True):
        generator.gradient_checkpointing = checkpointing
        generator.zero_grad(set_to_none=True)
        loss, _ = _objective(None).generator_loss(generator, fake, real, _batch(), [0], step=1)
        loss.backward()
        grads.append([p.grad.clone() for p in generator.parameters()])
    generator.gradient_checkpointing = False
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
