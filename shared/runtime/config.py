"""How to run a checkpoint (`EngineConfig`): plain settings, importable without torch.

`shared.config` (the suite's settings, read by the CPU-only Studio gateway) embeds it, so this
module must not import torch, diffusers or the engine (not even inside a function: the
import-linter contracts in pyproject.toml follow those too). `shared.runtime.pipeline` maps
`dtype` to a torch dtype (`DTYPES`) and builds the engine.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the keys of shared.runtime.pipeline.DTYPES


class EngineConfig(BaseModel):
    """How to run a checkpoint: device, dtype, kernels, resolution and streaming overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention_backend: str = "auto"
    height: int | None = None
    width: int | None = None
    streaming_overrides: dict = {}
    # Which streaming decoder turns latents into frames: the checkpoint's VAE decoder, or the small
    # causal decoder distilled from it (`<checkpoint>/fast_decoder`, `fashionchameleon train fast-decoder`).
    decoder: Literal["vae", "fast"] = "vae"
    # Hot-path options (shared.runtime.pipeline.Engine applies them to the DiT):
    # `torch.compile` of the block halves around the attention hook (CPU and GPU);
    compile: bool = False
    # CUDA graphs of those compiled halves (inductor's reduce-overhead mode; CUDA only: an error elsewhere);
    cuda_graphs: bool = False
    # FP8 (e4m3, dynamic activation scales) linear layers through torchao (Hopper+ CUDA only; `gpu` extra).
    fp8: bool = False
