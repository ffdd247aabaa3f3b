"""Stage 1 teacher on the tiny preset: overfitting one sample, caption mixing, fine-tuning
modes (full / attention-only / LoRA merged on export), the model subclass used for FSDP, and
the paper's learning-rate schedule."""

from __future__ import annotations

import statistics

import pytest
import torch

from shared.models.attention import use_attention_backend
from shared.models.dit import DenseAttention, InContextWanDiT
from shared.models.presets import get_preset
from shared.models.rope import RopeTable
from training.config import get_recipe, load_recipe
from training.flow import keyed_generator
from training.models import PEFT_AVAILABLE, TrainDiT, merged_state_dict
from training.parallel import DistInfo
from training.teacher import choose_text
from training.trainer import make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_sample(synthetic_data):
    return synthetic_data(count=1, pixel_frames=9)  # 3 latent frames


def _teacher(root, **overrides):
    base = {"teacher.data.root": str(root), "teacher.data.latent_frames": 3, "teacher.run.checkpoint_every": 10_000}
    return load_recipe("tiny", {**base, **{f"teacher.{k}": v for k, v in overrides.items()}})


def test_teacher_overfits_one_sample(one_sample, tmp_path):
    recipe = _teacher(
        one_sample, **{"run.max_steps": 300, "optim.lr": 1e-3, "optim.lr_steps": [], "data.dynamic_caption_prob": 0.0}
    )
    history = make_run(recipe, "teacher", tmp_path / "run", DistInfo()).run()
    losses = [h["loss"] for h in history]
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    assert last < first / 5, f"loss {first:.3f} -> {last:.3f}"


def test_caption_mixing_rate():
    n = 2000
    batch = {"text_full": torch.zeros(n, 2, 1), "text_dynamic": torch.ones(n, 2, 1)}
    gens = [keyed_generator(0, "teacher", p) for p in range(n)]
    share = choose_text(batch, gens, 0.7)[:, 0, 0].mean().item()
    assert 0.66 < share < 0.74
    assert choose_text(batch, gens, 0.0).sum() == 0 and choose_text(batch, gens, 1.0).min() == 1


def test_train_dit_matches_base_model_with_and_without_checkpointing():
    preset = get_preset("tiny")
    base = InContextWanDiT.build(preset.dit, seed=0)
    train = TrainDiT(base.transformer)
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 5, 6, 8, generator=g)
    t = torch.tensor([[0.0, 0.0, 900.0, 900.0, 900.0]])
    text = torch.randn(1, 32, 32, generator=g)
    attn = DenseAttention(rope, list(range(5)))
    with use_attention_backend("math"):
        ref = base(x, t, base.embed_text(text), attn)
        out = train.text_and_forward(x, t, text, attn)
        assert torch.equal(ref, out)
        train.gradient_checkpointing = True
        out.sum().backward()
        grads = [p.grad.clone() for p in train.parameters()]
        train.zero_grad()
        train.text_and_forward(x, t, text, attn).sum().backward()
        assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, train.parameters()))
    assert set(train.state_dict()) == set(base.state_dict()), "state-dict keys unchanged"


def test_attention_only_finetune_freezes_the_rest(one_sample, tmp_path):
    recipe = _teacher(one_sample, **{"run.max_steps": 3, "finetune.mode": "attention"})
    run = make_run(recipe, "teacher", tmp_path / "run", DistInfo())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    run.run()
    after = run.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn1." in k or ".attn2." in k for k in changed)
    assert not any("ffn" in k or "patch_embedding" in k for k in changed)


@pytest.mark.skipif(not PEFT_AVAILABLE, reason="LoRA needs peft (the train extra)")
def test_lora_trains_adapters_and_merges_into_diffusers_keys(one_sample, tmp_path):
    recipe = _teacher(
        one_sample, **{"run.max_steps": 3, "finetune.mode": "lora", "finetune.lora_rank": 4, "finetune.lora_alpha": 4}
    )
    run = make_run(recipe, "teacher", tmp_path / "run", DistInfo())
    assert all("lora_" in n for n, p in run.model.named_parameters() if p.requires_grad)
    base_q = run.model.state_dict()["transformer.blocks.0.attn1.to_q.base_layer.weight"].clone()
    run.run()
    merged = merged_state_dict(run.model)
    plain = InContextWanDiT.build(get_preset("tiny").dit)
    assert set(merged) == set(plain.transformer.state_dict())
    plain.transformer.load_state_dict(merged)
    preset = get_preset("tiny")
    rope = RopeTable(preset.dit.attention_head_dim, preset.token_grid())
    x, text = torch.randn(1, 8, 4, 6, 8), torch.randn(1, 32, 32)
    t = torch.tensor([[0.0, 0.0, 500.0, 500.0]])
    with torch.no_grad(), use_attention_backend("math"):
        lora_out = run.model.text_and_forward(x, t, text, DenseAttention(rope, list(range(4))))
        plain_out = plain(x, t, plain.embed_text(text), DenseAttention(rope, list(range(4))))
    assert (lora_out - plain_out).abs().max() < 1e-5
    assert not torch.equal(merged["blocks.0.attn1.to_q.weight"], base_q), "the trained adapter is merged in"


def test_paper_learning_rate_schedules():
    r = get_recipe("wan2.2-ti2v-5b")
    lr = r.teacher.optim.lr_at
    assert lr(0) == pytest.approx(1e-5 / 200) and lr(199) == pytest.approx(1e-5)
    assert lr(1099) == 1e-5 and lr(1100) == 5e-6 and lr(2299) == 5e-6
    assert r.teacher.optim.betas == (0.9, 0.999) and r.teacher.optim.weight_decay == 0.01
    assert r.teacher.run.max_steps == 2300 and r.teacher.data.dynamic_caption_prob == 0.7
    assert r.teacher_forcing.optim.lr == 1e-6 and r.teacher_forcing.optim.betas == (0.0, 0.999)
    assert r.teacher_forcing.run.max_steps == 4000 and r.teacher_forcing.data.dynamic_caption_prob == 0.0
    d = r.dmd
    assert d.generator_optim.lr == 2e-6 and d.fake_optim.lr == 4e-7 and d.fake_optim.betas == (0.0, 0.999)
    assert d.fake_updates_per_generator == 5 and d.generator_steps == 400 and d.reward.tau == 0.2
    assert get_preset(d.generator.preset).streaming.timesteps == (1000, 750, 500, 250)
