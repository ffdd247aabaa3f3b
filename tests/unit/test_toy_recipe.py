"""`fashionchameleon train toy --quick`: every step of the toy recipe runs in a shortened form
(stage 0 VAE, data, teacher, teacher forcing, GR-DMD, 16-bit export), losses go down, and the
exported checkpoint loads and generates through the normal engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.models.checkpoint import load_checkpoint
from shared.models.presets import get_preset
from shared.runtime.pipeline import Engine
from training.toy import ToyPlan, run_toy, toy_reward
from training.vae import VAETrainConfig


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, dict]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("toy")
    plan = ToyPlan(
        VAETrainConfig(steps=60, long_from=50, checkpoint_every=30, stats_samples=8, lr=2e-3),
        samples=8,
        teacher_steps=40,
        tf_steps=30,
        dmd_steps=10,
    )
    try:
        summary = run_toy(out, plan, log=lambda m: None)
    finally:
        torch.set_num_threads(previous)
    return out, summary


def test_each_stage_loss_goes_down(quick_run) -> None:
    _, s = quick_run
    for stage in ("vae", "teacher", "teacher_forcing"):
        first, last = s[stage]["loss_first_last"]
        assert last < first, (stage, first, last)
    first, last = s["dmd"]["fake_loss_first_last"]
    assert last < first * 1.05, (first, last)  # the fake score tracks the moving generator
    assert s["vae"]["stream_vs_whole_max_abs"] < 1e-4  # streamed decode == whole decode


def test_export_is_16bit_loads_and_generates(quick_run) -> None:
    _, s = quick_run
    ckpt = Path(s["checkpoint"])
    weights = list(ckpt.glob("*/diffusion_pytorch_model.safetensors"))
    assert len(weights) == 2
    from safetensors import safe_open

    with safe_open(str(weights[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    info = json.loads((ckpt / "fashionchameleon.json").read_text())
    assert info["preset"] == "toy" and info["checkpoint_id"].startswith("toy-")
    comps = load_checkpoint(ckpt)
    assert comps.vae.config.latents_std != get_preset("toy").vae.latents_std  # stats of the trained VAE
    engine = Engine(comps)
    from PIL import Image

    session = engine.session()
    ref = Image.open(Path(__file__).resolve().parents[2] / "examples" / "person.png")
    garment = Image.open(Path(__file__).resolve().parents[2] / "examples" / "garment-red.png")
    session.open(ref, garment, "The person waves with the right hand steadily.")
    frames = [session.next_chunk().frames for _ in range(2)]
    assert [f.shape[0] for f in frames] == [9, 12] and tuple(frames[0].shape[1:]) == (160, 96, 3)
    session.close()


def test_resume_skips_finished_steps(quick_run) -> None:
    out, s = quick_run
    again = run_toy(
        out,
        ToyPlan(VAETrainConfig(steps=60), samples=8, teacher_steps=40, tf_steps=30, dmd_steps=10),
        log=lambda m: None,
    )
    assert again["dmd"]["export"]["checkpoint_id"] == s["dmd"]["export"]["checkpoint_id"]


def test_toy_reward_prefers_clean_frames(quick_run) -> None:
    out, _ = quick_run
    vae = load_checkpoint(Path(out) / "checkpoint", parts=frozenset({"vae"})).vae
    from shared.toyworld.samples import make_sample

    s = make_sample(0, "train", 5, 160, 96)
    x = torch.from_numpy(s.video).permute(3, 0, 1, 2).float()[None] / 127.5 - 1
    lat = vae.encode_video(x)
    noisy = lat + 1.5 * torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    r = toy_reward(vae)(torch.cat([lat, noisy]))
    assert r.shape == (2, 2) and bool((r[0] > r[1]).all())
    assert np.isfinite(r.numpy()).all()
