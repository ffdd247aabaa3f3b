"""Flow-matching pieces shared by every stage, and counter-based randomness.

Wan's convention (paper Eq. 1-2): x_t = (1 - sigma) x0 + sigma * eps, target v = eps - x0,
model timestep t = 1000 sigma. Training sigmas are shifted uniform draws:
sigma = shift * u / (1 + (shift - 1) u), u ~ U(min_u, max_u) (`shared.runtime.sampler.shift_sigma`).

Randomness is keyed, not stateful: everything random about one training sample (noise, sigma,
caption choice, rollout seed) comes from a generator seeded by (run seed, purpose, global sample
position). A step therefore draws the same numbers however the global batch is split over ranks,
and a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from shared.runtime.sampler import shift_sigma

from .config import FlowConfig


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `key` (same on every machine and rank)."""
    digest = hashlib.blake2b(":".join(map(str, key)).encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def sample_sigmas(gen: torch.Generator, n: int, shift: float, min_u: float = 0.0, max_u: float = 1.0) -> torch.Tensor:
    """n shifted-uniform sigmas [n] in (0, 1], float32."""
    u = min_u + (max_u - min_u) * torch.rand(n, generator=gen)
    return shift_sigma(u, shift).clamp(1e-4, 1.0)  # tensor arithmetic; the floor keeps t > 0


def flow_sigmas(gen: torch.Generator, n: int, cfg: FlowConfig) -> torch.Tensor:
    return sample_sigmas(gen, n, cfg.shift, cfg.min_u, cfg.max_u)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0, eps [B, C, F, h, w]; sigma [B, F] per latent frame -> x_t."""
    s = sigma[:, None, :, None, None].to(x0.dtype)
    return (1.0 - s) * x0 + s * eps


def stack_noise(gens: Sequence[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """One standard-normal draw of `shape` per generator, stacked: [len(gens), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device=device, dtype=dtype)
