"""Autoscaling of the generators on real-time capacity (a Ray Serve custom autoscaling policy).

A generator's sessions are background loops, not requests, so Serve's default signal (ongoing
requests) says little about its load. Each replica reports instead
(`GeneratorService.record_autoscaling_stats`): `sessions` (open + being admitted) and
`realtime_sessions` (how many it serves at playback speed with its configured headroom, from
its measured step times; its session limit when pacing is off). The policy keeps the fleet's
utilisation, sessions / real-time capacity, at `target_utilisation`:

    desired replicas = ceil(total sessions / (mean capacity per replica * target_utilisation))

so a fleet at 70% target scales out before admission starts refusing sessions, and in again
when sessions end (Serve applies the deployment's min/max replicas and up/downscale delays).
Without reports yet (replicas starting) it keeps the current target.
"""

from __future__ import annotations

import math
from typing import Any

SESSIONS = "sessions"
CAPACITY = "realtime_sessions"


def desired_generators(sessions: float, capacities: list[float], target_utilisation: float) -> int | None:
    """Replicas for `sessions` open sessions given the replicas' real-time capacities (None: no
    capacity reported yet)."""
    if not 0 < target_utilisation <= 1:
        raise ValueError("target_utilisation must lie in (0, 1]")
    if not capacities:
        return None
    per_replica = max(1.0, sum(capacities) / len(capacities))
    return max(1, math.ceil(sessions / (per_replica * target_utilisation))) if sessions > 0 else 1


class RealtimeCapacityPolicy:
    """`AutoscalingPolicy(policy_function="services.generator.scaling:RealtimeCapacityPolicy",
    policy_kwargs={"target_utilisation": 0.7})`."""

    def __init__(self, target_utilisation: float = 0.7) -> None:
        if not 0 < target_utilisation <= 1:
            raise ValueError("target_utilisation must lie in (0, 1]")
        self.target_utilisation = target_utilisation

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        sessions = sum(float(v) for v in (metrics.get(SESSIONS) or {}).values())
        capacities = [float(v) for v in (metrics.get(CAPACITY) or {}).values()]
        desired = desired_generators(sessions, capacities, self.target_utilisation)
        if desired is None:
            return ctx.target_num_replicas, {}
        return desired, {"sessions": sessions, "capacity_per_replica": sum(capacities) / len(capacities)}
