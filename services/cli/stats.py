"""Stream timing figures with one definition for the CLI summary and `benchmarks/stream.py`.

- backbone FPS: pixel frames / DiT seconds (denoising steps + context pass), the paper's
  definition; VAE decode excluded.
- end-to-end FPS: pixel frames / (DiT + streaming VAE decode) seconds, chunk after chunk.
Switch latency and video encoding are reported separately, never folded into either rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from shared.runtime.pipeline import ChunkResult


@dataclass(frozen=True)
class ChunkTiming:
    index: int  # chunk index since open
    frames: int  # pixel frames
    generate_seconds: float
    decode_seconds: float
    switched: bool

    @classmethod
    def of(cls, result: ChunkResult) -> ChunkTiming:
        return cls(
            index=result.index,
            frames=int(result.frames.shape[0]),
            generate_seconds=result.generate_seconds,
            decode_seconds=result.decode_seconds,
            switched=result.switched,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _rate(frames: int, seconds: float) -> float | None:
    return frames / seconds if seconds > 0 else None


def stream_rates(chunks: Sequence[ChunkTiming]) -> dict:
    """Totals and rates over `chunks`: frames, generate/decode seconds, backbone/end-to-end FPS."""
    frames = sum(c.frames for c in chunks)
    gen = sum(c.generate_seconds for c in chunks)
    dec = sum(c.decode_seconds for c in chunks)
    return {
        "frames": frames,
        "generate_seconds": gen,
        "decode_seconds": dec,
        "backbone_fps": _rate(frames, gen),
        "end_to_end_fps": _rate(frames, gen + dec),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty sequence; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
