"""Few-step flow-matching sampler and per-session seeded noise.

Wan's flow convention: x_t = (1 - s) x0 + s * eps, and the model predicts v = eps - x0.
Timesteps t in (0, 1000] map to s = t / 1000, shifted as the scheduler does:
s' = shift * s / (1 + (shift - 1) * s). Each step predicts x0 = x_t - s' v, then re-noises
to the next level with fresh noise. The last step's x0 is the output (DMD-style sampling).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch


def shift_sigma(sigma: float, shift: float) -> float:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


class FewStepSampler:
    def __init__(self, timesteps: Sequence[int], shift: float, num_train_timesteps: int = 1000):
        self.sigmas = [shift_sigma(t / num_train_timesteps, shift) for t in timesteps]
        self.model_timesteps = [s * num_train_timesteps for s in self.sigmas]

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    def sample(
        self,
        flow_fn: Callable[[torch.Tensor, float, int], torch.Tensor],
        noises: Sequence[torch.Tensor],
        steps: int | None = None,
    ) -> torch.Tensor:
        """Run all steps. `noises[0]` is the initial noise, `noises[i]` re-noises before step i.

        flow_fn(x_t, model_timestep, step_index) -> predicted flow, same shape as x_t.
        `steps` runs only the first `steps` steps and returns that step's x0 (a Self-Forcing exit).
        """
        steps = self.num_steps if steps is None else steps
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must lie in 1..{self.num_steps}, got {steps}")
        x = noises[0]
        x0 = x
        for i, (sigma, t) in enumerate(zip(self.sigmas[:steps], self.model_timesteps[:steps])):
            if i > 0:
                x = (1.0 - sigma) * x0 + sigma * noises[i]
            flow = flow_fn(x, t, i)
            x0 = (x.float() - sigma * flow.float()).to(x.dtype)
        return x0


def chunk_seed(seed: int, chunk_index: int) -> int:
    """A 63-bit seed for one chunk, derived from the session seed (stable across machines)."""
    digest = hashlib.blake2b(f"{seed}:{chunk_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def chunk_noises(
    seed: int, chunk_index: int, shape: Sequence[int], steps: int, device: torch.device | str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Initial + re-noise draws for one chunk, drawn on the CPU so every device gets the same video.

    Deriving the generator from (seed, chunk index) makes the noise independent of history, so a
    session rebuilt at chunk k on another replica draws what the original would have drawn.
    """
    gen = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, chunk_index))
    device = torch.device(device)
    draws = torch.stack([torch.randn(tuple(shape), generator=gen) for _ in range(steps)])
    if device.type == "cuda":  # one pinned, asynchronous copy: no pageable copy or stall in a chunk
        return list(draws.to(dtype).pin_memory().to(device, non_blocking=True).unbind(0))
    return list(draws.to(device=device, dtype=dtype).unbind(0))
