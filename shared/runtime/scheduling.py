"""Step times per batch size, the batch plan they imply, and admission by compute.

A generator replica steps its due sessions in batches (`shared.runtime.batch`). Whether a batch
of b pays off depends on the hardware and the preset: on a GPU at low resolution, or on a CPU
with a tiny model, b sessions cost little more than one; on a compute-bound preset they cost b
times one. `StepTimes` keeps the measured wall time of one step (one chunk for each session of
the batch) per batch size, from a warm-up and then from every step (exponential moving
average). From it:

* `plan(n)`: the batch sizes that give n due sessions their chunk soonest (the size with the
  best sessions-per-second, never a batch that measured slower than stepping its members one at
  a time);
* `round_seconds(n)`: how long that takes: one round of n sessions, i.e. the time between two
  chunks of every session when all n are due at once;
* `admits(n, ...)`: whether n sessions all get their chunks at playback speed with a headroom.

Pure Python (no torch): the gateway and tests read it too.
"""

from __future__ import annotations

import collections
import math
import statistics
import threading
from dataclasses import dataclass


class Recent:
    """The last `n` measurements: their median (one slow outlier, such as the first call of a cold
    path, does not steer decisions for long) and their max (a cautious bound). None before the first."""

    def __init__(self, n: int = 5) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=n)

    def observe(self, x: float) -> None:
        self._recent.append(x)

    @property
    def median(self) -> float | None:
        return statistics.median(self._recent) if self._recent else None

    @property
    def max(self) -> float | None:
        return max(self._recent) if self._recent else None


@dataclass(frozen=True)
class Admission:
    """The answer to "may one more session open here?" by compute."""

    admitted: bool
    sessions: int  # sessions the replica would run
    round_seconds: float  # estimated time for one chunk of each
    chunk_seconds: float  # playback time of one chunk
    headroom: float  # chunk_seconds / round_seconds - 1 with that many sessions (inf when idle)


class StepTimes:
    """Measured seconds of one batched step, per batch size (thread-safe)."""

    def __init__(self, smoothing: float = 0.2, initial: dict[int, float] | None = None, min_gain: float = 0.02):
        """`min_gain`: a larger batch is chosen only if it is at least this much cheaper per
        session than the best smaller one (measurement noise never tips a compute-bound
        replica into batches that cost more than they save)."""
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing must lie in (0, 1]")
        self.smoothing = smoothing
        self.min_gain = min_gain
        self._seconds: dict[int, float] = {}
        self._lock = threading.Lock()
        for size, seconds in (initial or {}).items():
            self.observe(size, seconds)

    def observe(self, size: int, seconds: float) -> None:
        """One measured step of `size` sessions took `seconds` (the first sets, later ones smooth)."""
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"bad step measurement: size={size}, seconds={seconds}")
        with self._lock:
            old = self._seconds.get(size)
            self._seconds[size] = seconds if old is None else old + self.smoothing * (seconds - old)

    def table(self) -> dict[int, float]:
        with self._lock:
            return dict(sorted(self._seconds.items()))

    @property
    def measured(self) -> bool:
        return bool(self._seconds)

    def seconds(self, size: int) -> float:
        """Estimated step time for `size` sessions: measured, else linear between the nearest
        measured sizes, else beyond the largest one the per-session cost of the largest (a
        conservative extrapolation: batching is assumed to gain nothing more)."""
        if size < 1:
            return 0.0
        table = self.table()
        if not table:
            raise ValueError("no step time measured yet")
        if size in table:
            return table[size]
        sizes = sorted(table)
        if size < sizes[0]:
            return table[sizes[0]]
        if size > sizes[-1]:
            top = sizes[-1]
            return table[top] * size / top
        lo = max(s for s in sizes if s < size)
        hi = min(s for s in sizes if s > size)
        return table[lo] + (table[hi] - table[lo]) * (size - lo) / (hi - lo)

    def best_size(self, limit: int) -> int:
        """Among the measured batch sizes up to `limit` (1 when none is), the one with the most
        sessions per second; a larger size wins only by `min_gain` per session. Unmeasured sizes
        are never chosen."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        table = self.table()
        best, best_cost = 1, table.get(1, math.inf)
        for size in sorted(s for s in table if 1 < s <= limit):
            cost = table[size] / size
            if best_cost == math.inf or cost < best_cost * (1.0 - self.min_gain):
                best, best_cost = size, cost
        return best

    def plan(self, n: int, max_batch: int | None = None) -> list[int]:
        """Batch sizes (largest first) that step `n` due sessions soonest."""
        if n <= 0:
            return []
        b = self.best_size(min(n, max_batch or n))
        sizes = [b] * (n // b)
        if n % b:
            sizes.append(n % b)
        return sizes

    def round_seconds(self, n: int, max_batch: int | None = None) -> float:
        """Seconds to give each of `n` sessions one chunk, stepping them as `plan(n)` says."""
        return sum(self.seconds(size) for size in self.plan(n, max_batch))

    def admits(self, sessions: int, chunk_seconds: float, headroom: float, max_batch: int | None = None) -> Admission:
        """Whether `sessions` sessions all get a chunk every `chunk_seconds` (playback speed) with
        `headroom` to spare: round_seconds * (1 + headroom) <= chunk_seconds."""
        round_s = self.round_seconds(sessions, max_batch) if sessions > 0 else 0.0
        spare = math.inf if round_s <= 0 else chunk_seconds / round_s - 1.0
        return Admission(
            admitted=round_s * (1.0 + headroom) <= chunk_seconds,
            sessions=sessions,
            round_seconds=round_s,
            chunk_seconds=chunk_seconds,
            headroom=spare,
        )

    def realtime_sessions(self, chunk_seconds: float, headroom: float, limit: int, max_batch: int | None = None) -> int:
        """The most sessions (up to `limit`) that `admits` holds for."""
        best = 0
        for n in range(1, limit + 1):
            if not self.admits(n, chunk_seconds, headroom, max_batch).admitted:
                break
            best = n
        return best
