"""FSDP2 on CPU: two gloo processes (batch 1 each, per-block sharding, activation checkpointing)
reproduce a single process with batch 2, for all three stages. Randomness is keyed by global
sample position, so both runs draw the same noise; only reduction order differs."""

from __future__ import annotations

import pytest
import torch

from training.config import load_recipe
from training.data.synthetic import make_synthetic_dataset
from training.launch import launch_local
from training.parallel import DistInfo
from training.trainer import make_run

STAGES = ["teacher", "teacher_forcing", "dmd"]


def _recipe(data, batch: int, checkpointing: bool):
    overrides = {}
    for stage in STAGES:
        overrides.update(
            {
                f"{stage}.data.root": str(data),
                f"{stage}.data.batch_size": batch,
                f"{stage}.run.max_steps": 3,
                f"{stage}.run.checkpoint_every": 100,
                f"{stage}.parallel.activation_checkpointing": checkpointing,
            }
        )
    overrides["dmd.fake_updates_per_generator"] = 2  # generator steps at 0 and 2
    overrides["dmd.reward.kind"] = "aesthetic-proxy"
    return load_recipe("tiny", overrides)


def test_fsdp_two_processes_match_single_process(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = tmp_path / "data"
        make_synthetic_dataset(data, count=4, pixel_frames=21)
        single = {}
        for stage in STAGES:
            run = make_run(_recipe(data, 2, False), stage, tmp_path / "single" / stage, DistInfo())
            single[stage] = run.run()
        sharded = launch_local(_recipe(data, 1, True), STAGES, tmp_path / "fsdp", world_size=2)
    finally:
        torch.set_num_threads(previous)

    for stage, key in [
        ("teacher", "loss"),
        ("teacher_forcing", "loss"),
        ("dmd", "fake_loss"),
        ("dmd", "generator_loss"),
    ]:
        a = [h[key] for h in single[stage] if key in h]
        b = [h[key] for h in sharded[stage] if key in h]
        assert len(a) == len(b) == (2 if key == "generator_loss" else 3), (stage, key)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), f"{stage} {key}: single {a} vs fsdp {b}"
    assert [h["generator_loss"] for h in sharded["dmd"] if "generator_loss" in h][1] > 0
    saved = sorted(p.name for p in (tmp_path / "fsdp" / "teacher" / "checkpoints" / "step-0000003").iterdir())
    assert "trainer.json" in saved and "rng-rank00001.pt" in saved and any(n.endswith(".distcp") for n in saved)
