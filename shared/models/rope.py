"""3-D rotary position embedding of Wan, evaluated at arbitrary latent-frame positions.

diffusers' `WanRotaryPosEmbed` splits each head into (t, h, w) parts and rotates interleaved
pairs. It always numbers frames 0..F-1. Streaming needs explicit temporal positions (cond frames
at fixed positions, cached frames at cache-relative ones), so this module computes the same
frequencies for any list of frame positions. The values equal diffusers' table for positions
below `rope_max_seq_len`, and positions above it are computed too instead of failing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    # [dim // 2] float64, as diffusers' get_1d_rotary_pos_embed
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))


class RopeTable:
    """RoPE cos/sin for tokens of latent frames at given temporal positions.

    Tokens are ordered frame-major then row-major over the (grid_h, grid_w) token grid, as
    the DiT's patch embedding flattens them. Results are memoised per position tuple because a
    streaming session sees the same few position lists over and over.
    """

    def __init__(
        self,
        head_dim: int,
        grid_hw: tuple[int, int],
        theta: float = 10000.0,
        device: torch.device | str = "cpu",
        max_cached: int = 64,
    ):
        self.head_dim = head_dim
        self.grid_hw = grid_hw
        self.device = torch.device(device)
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - self.h_dim - self.w_dim
        self._inv_t = _inv_freq(self.t_dim, theta)  # [t_dim/2]
        gh, gw = grid_hw
        ang_h = torch.outer(torch.arange(gh, dtype=torch.float64), _inv_freq(self.h_dim, theta))  # [gh, h/2]
        ang_w = torch.outer(torch.arange(gw, dtype=torch.float64), _inv_freq(self.w_dim, theta))  # [gw, w/2]
        self._ang_hw = torch.cat(
            [ang_h[:, None, :].expand(gh, gw, -1), ang_w[None, :, :].expand(gh, gw, -1)], dim=-1
        ).reshape(gh * gw, -1)  # [N, (h+w)/2]
        self._memo: OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._max_cached = max_cached

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def cos_sin(self, frame_positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [len(frame_positions) * N, head_dim / 2], float32 on `device`."""
        key = tuple(int(p) for p in frame_positions)
        hit = self._memo.get(key)
        if hit is not None:
            self._memo.move_to_end(key)
            return hit
        pos = torch.tensor(key, dtype=torch.float64)
        ang_t = torch.outer(pos, self._inv_t)  # [F, t/2]
        n = self.tokens_per_frame
        ang = torch.cat(
            [ang_t[:, None, :].expand(-1, n, -1), self._ang_hw[None].expand(len(key), -1, -1)], dim=-1
        ).reshape(len(key) * n, -1)  # [F*N, head_dim/2]
        out = (self._to_device(ang.cos().float()), self._to_device(ang.sin().float()))
        self._memo[key] = out
        if len(self._memo) > self._max_cached:
            self._memo.popitem(last=False)
        return out

    def shift_cos_sin(self, shifts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [len(shifts) * N, head_dim / 2] that move already-rotated keys of frames by
        `shifts` temporal positions (the h/w parts are left as they are: angle 0)."""
        pos = torch.tensor([int(p) for p in shifts], dtype=torch.float64)
        n = self.tokens_per_frame
        ang_t = torch.outer(pos, self._inv_t)[:, None, :].expand(-1, n, -1)
        ang = torch.cat([ang_t, torch.zeros(len(shifts), n, self._ang_hw.shape[-1], dtype=torch.float64)], dim=-1)
        ang = ang.reshape(len(shifts) * n, -1)
        return self._to_device(ang.cos().float()), self._to_device(ang.sin().float())

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # A pinned, asynchronous host-to-device copy: no pageable copy (and no stall) in a chunk.
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, L, H, D] by cos/sin [L, D/2] (diffusers' Wan convention)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)
