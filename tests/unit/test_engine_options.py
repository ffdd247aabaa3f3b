"""Hot-path engine options: torch.compile (CPU-tested), CUDA graphs and FP8 (GPU only: clear
errors elsewhere), and the GPU benchmark script's CPU behaviour."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from shared.models.attention import use_attention_backend
from shared.models.checkpoint import build_random
from shared.models.presets import get_preset
from shared.runtime.config import EngineConfig
from shared.runtime.pipeline import Engine

ROOT = Path(__file__).resolve().parents[2]


def _latents(engine, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lh, lw = engine.preset.latent_hw()
    c = engine.preset.dit.in_channels
    ref, garment = (torch.randn(1, c, 1, lh, lw, generator=g) for _ in range(2))
    text = torch.randn(1, engine.preset.text_encoder.max_length, engine.preset.dit.text_dim, generator=g)
    return ref, garment, text


def _stream(engine, chunks: int) -> torch.Tensor:
    s = engine.session()
    s.open_latents(*_latents(engine), seed=3)
    with use_attention_backend("sdpa"):
        return torch.cat([s.generate().latents for _ in range(chunks)], 2)


@pytest.mark.slow
def test_compiled_equals_eager_on_cpu():
    preset = get_preset("tiny")
    eager = Engine(build_random(preset, seed=0), EngineConfig())
    compiled = Engine(build_random(preset, seed=0), EngineConfig(compile=True))
    assert compiled.dit._compiled is not None and eager.dit._compiled is None
    a, b = _stream(eager, 2), _stream(compiled, 2)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("option", ["cuda_graphs", "fp8"])
def test_gpu_only_options_fail_clearly_on_cpu(option):
    with pytest.raises(ValueError, match=f"{option} needs a CUDA device"):
        Engine(build_random(get_preset("tiny"), seed=0), EngineConfig(**{option: True}))


def test_engine_config_hot_path_options_default_off():
    cfg = EngineConfig()
    assert (cfg.compile, cfg.cuda_graphs, cfg.fp8) == (False, False, False)


def _gpu_sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_gpu_script_parses_its_options():
    r = _gpu_sh("--help")
    assert r.returncode == 0 and "--chunks" in r.stdout and "23.8" in r.stdout
    bad = _gpu_sh("--no-such-option")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_gpu_script_fails_clearly_without_cuda():
    r = _gpu_sh("--chunks", "2")
    assert r.returncode == 3, r.stderr
    assert "needs a CUDA device" in r.stderr
