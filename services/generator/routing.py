"""Open sessions on the generator replica with the most room (a Ray Serve request router).

The Studio gateway's only call through the generator handle is `open_session`; a session then
lives on the replica that admitted it (control and output go through Redis). So the router
does not need affinity: it ranks replicas by what each reported in `record_routing_stats`
(polled by Serve every `request_routing_stats_period_s`):

1. replicas with room for another session (by KV memory and, with compute admission, at
   playback speed), most free sessions first, then most headroom; replicas without stats yet
   (just started) after them;
2. then the full ones (their stats may be stale: they may have room now);
3. then those that refused this very open (`meta["exclude_replicas"]`, the gateway's retry
   after a RESOURCE_EXHAUSTED);
4. draining replicas last.

Within a tier: most free sessions, then most headroom. Serve tries the ranks in order. Runs in the caller's process (the gateway): no torch here.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER = "services.generator.routing:HeadroomRouter"
EXCLUDE_KEY = "exclude_replicas"  # in open_session's `meta`: our replica ids that refused this open


def _excluded(pending_request: PendingRequest | None) -> set[str]:
    if pending_request is None:
        return set()
    meta = pending_request.kwargs.get("meta")
    if meta is None and len(pending_request.args) >= 3:
        meta = pending_request.args[2]
    if isinstance(meta, dict):
        return {str(x) for x in meta.get(EXCLUDE_KEY) or ()}
    return set()


def rank_replicas(stats: list[dict[str, Any] | None], excluded: set[str]) -> list[list[int]]:
    """Indices of replicas (by their routing stats; None = none reported yet), grouped in ranks
    as the module docstring says: each rank one replica, the best first."""

    def room(i: int) -> tuple:
        s = stats[i]
        if s is None:  # just started: no stats yet, assume it has room
            return (0, 0, -1.0, 0.0)
        if s.get("draining"):
            tier = 3  # refuses every open until it is gone
        elif str(s.get("replica_id", "")) in excluded:
            tier = 2  # refused this open a moment ago
        else:
            tier = 0 if int(s.get("free_sessions", 0)) > 0 else 1
        return (tier, -int(s.get("free_sessions", 0)), -float(s.get("headroom", 0.0)), 0.0)

    return [[i] for i in sorted(range(len(stats)), key=room)]


class HeadroomRouter(RequestRouter):
    """`RequestRouterConfig(request_router_class=ROUTER, request_routing_stats_period_s=...)`."""

    def initialize_state(self, **kwargs: Any) -> None:
        pass

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        stats = [r.routing_stats or None for r in candidate_replicas]
        ranks = rank_replicas(stats, _excluded(pending_request))
        return [[candidate_replicas[i] for i in rank] for rank in ranks]
