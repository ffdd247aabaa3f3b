"""Frame-level attention masks for in-context streaming (True = may attend).

Masks are built over latent frames and expanded to tokens, because every token of a frame
shares its frame's visibility. The sequence layout for teacher forcing (paper 4.2) is

    [cond (C frames) | clean chunks 0..n-1 | noisy chunks 0..n-1]

* cond frames see only cond frames (they never see video);
* clean chunk i sees cond + clean chunks 0..i (block-causal);
* noisy chunk i sees cond + clean chunks 0..i-1 + itself.

That is exactly what streaming inference computes with the KV cache (cond KV, clean history
from context passes, bidirectional attention inside the chunk). This equivalence is what the
training/inference consistency tests check.
"""

from __future__ import annotations

import torch


def teacher_forcing_frame_mask(
    cond_frames: int, chunk_frames: int, num_chunks: int, noisy_chunks: int | None = None
) -> torch.Tensor:
    """Bool [L, L] over frames [cond | clean x num_chunks | noisy x noisy_chunks].

    `noisy_chunks` defaults to `num_chunks`; pass a smaller count to keep only noisy chunks
    0..noisy_chunks-1 (e.g. 0 for a clean-only causal sequence).
    """
    noisy_chunks = num_chunks if noisy_chunks is None else noisy_chunks
    c, f = cond_frames, chunk_frames
    clean0 = c
    noisy0 = c + num_chunks * f
    total = noisy0 + noisy_chunks * f
    mask = torch.zeros(total, total, dtype=torch.bool)
    mask[:, :c] = True  # everybody sees cond; cond sees only cond (rows below)
    for i in range(num_chunks):
        rows = slice(clean0 + i * f, clean0 + (i + 1) * f)
        mask[rows, clean0 : clean0 + (i + 1) * f] = True
    for i in range(noisy_chunks):
        rows = slice(noisy0 + i * f, noisy0 + (i + 1) * f)
        mask[rows, clean0 : clean0 + i * f] = True
        mask[rows, rows] = True
    return mask


def expand_to_tokens(frame_mask: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """[Lf, Lf] frame mask -> [Lf * N, Lf * N] token mask."""
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)
