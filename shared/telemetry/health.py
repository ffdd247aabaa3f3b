"""Liveness, readiness and draining of one replica.

Three independent flags, each with the reason it was last changed:

- healthy (liveness): false means the process is broken and should be restarted. Ray Serve
  calls a deployment's `check_health`; `HealthState.check_health` raises `Unhealthy` then.
- ready: false while starting (weights loading) or after a dependency was lost; new work
  should go elsewhere, but nothing is restarted.
- draining: one-way; set on shutdown or scale-down. A draining replica refuses new
  sessions (`check_admission` raises `Draining`) but keeps serving the sessions it holds,
  stays live, and reports not ready so routers and load balancers stop sending new ones.

`liveness()` / `readiness()` give `/healthz` / `/readyz` style answers: an HTTP status code
and a JSON-serialisable body.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


class HealthError(RuntimeError):
    """Base of the refusals below; `reason` is for humans and logs."""

    def __init__(self, component: str, reason: str) -> None:
        super().__init__(f"{component}: {reason}")
        self.component = component
        self.reason = reason


class Unhealthy(HealthError):
    """The replica is broken; Ray Serve restarts a replica whose check_health raises."""


class NotReady(HealthError):
    """The replica cannot take new work yet (or any more)."""


class Draining(NotReady):
    """The replica is shutting down: live sessions continue, new sessions are refused."""


@dataclass(frozen=True)
class HealthSnapshot:
    """One consistent reading of a `HealthState`; `since` is the unix time of the last change."""

    component: str
    healthy: bool
    ready: bool
    draining: bool
    reason: str
    since: float

    @property
    def accepting(self) -> bool:
        """Whether a new session may be admitted."""
        return self.healthy and self.ready and not self.draining


@dataclass(frozen=True)
class Probe:
    """Answer to a health probe: `ok` maps to HTTP 200, else 503."""

    ok: bool
    body: dict[str, Any]

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503


class HealthState:
    """Thread-safe health flags of one replica. Starts healthy, not ready, not draining."""

    def __init__(self, component: str, clock: Callable[[], float] = time.time) -> None:
        self._component = component
        self._clock = clock
        self._lock = threading.Lock()
        self._healthy, self._unhealthy_reason = True, ""
        self._ready, self._unready_reason = False, "starting"
        self._draining, self._draining_reason = False, ""
        self._since = clock()

    # -- transitions ------------------------------------------------------------------------

    def mark_ready(self) -> None:
        self._update(ready=True, unready_reason="")

    def mark_not_ready(self, reason: str) -> None:
        self._update(ready=False, unready_reason=reason)

    def mark_unhealthy(self, reason: str) -> None:
        self._update(healthy=False, unhealthy_reason=reason)

    def mark_healthy(self) -> None:
        self._update(healthy=True, unhealthy_reason="")

    def start_draining(self, reason: str = "shutting down") -> None:
        """Refuse new sessions from now on; there is no way back (a drained replica exits)."""
        with self._lock:
            if not self._draining:
                self._draining, self._draining_reason = True, reason
                self._since = self._clock()

    def _update(self, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self, f"_{name}", value)
            self._since = self._clock()

    # -- readings ---------------------------------------------------------------------------

    def snapshot(self) -> HealthSnapshot:
        with self._lock:
            if not self._healthy:
                reason = self._unhealthy_reason
            elif self._draining:
                reason = self._draining_reason
            elif not self._ready:
                reason = self._unready_reason
            else:
                reason = ""
            return HealthSnapshot(self._component, self._healthy, self._ready, self._draining, reason, self._since)

    @property
    def healthy(self) -> bool:
        return self.snapshot().healthy

    @property
    def ready(self) -> bool:
        return self.snapshot().ready

    @property
    def draining(self) -> bool:
        return self.snapshot().draining

    @property
    def accepting(self) -> bool:
        return self.snapshot().accepting

    def check_health(self) -> None:
        """For a Ray Serve deployment's `check_health`: raise `Unhealthy` when broken."""
        snap = self.snapshot()
        if not snap.healthy:
            raise Unhealthy(snap.component, snap.reason)

    def check_admission(self) -> None:
        """Before opening a session: raise `Unhealthy`, `Draining` or `NotReady` to refuse it."""
        snap = self.snapshot()
        if not snap.healthy:
            raise Unhealthy(snap.component, snap.reason)
        if snap.draining:
            raise Draining(snap.component, snap.reason)
        if not snap.ready:
            raise NotReady(snap.component, snap.reason)

    def liveness(self) -> Probe:
        """`/healthz`: ok unless unhealthy; draining and not-ready replicas are alive."""
        snap = self.snapshot()
        return Probe(snap.healthy, {"status": "ok" if snap.healthy else "unhealthy", **asdict(snap)})

    def readiness(self) -> Probe:
        """`/readyz`: ok only while new sessions are accepted."""
        snap = self.snapshot()
        if snap.accepting:
            status = "ready"
        elif not snap.healthy:
            status = "unhealthy"
        elif snap.draining:
            status = "draining"
        else:
            status = "not_ready"
        return Probe(snap.accepting, {"status": status, **asdict(snap)})
