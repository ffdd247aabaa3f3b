"""Every Redis key name of the session bus (shared.sessionbus), built in one place.

Layout (namespace `fc`, session `abc`):

    fc:session:{abc}                 hash    the session record
    fc:session:{abc}:lease           string  replica holding the session (PX = lease)
    fc:session:{abc}:control         stream  control commands (gateway -> replica)
    fc:session:{abc}:results         hash    command id -> effective chunk index
    fc:session:{abc}:result-events   stream  one entry per acked command (wakes waiters)
    fc:session:{abc}:output          stream  video chunks, entry id = chunk index + 1
    fc:index:live                    zset    live session ids, score = idle deadline (unix s)
    fc:index:replica:<replica>       set     live session ids held by a replica
    fc:index:tenant:<tenant>         set     live session ids of a tenant
    fc:session:{abc}:request:<h>     hash    idempotency record of a control request_id
    fc:session:{abc}:prompt_rev      string  last assigned prompt revision
    fc:quota:tenant:<tenant>         zset    quota reservations, score = deadline (+inf: held)
    fc:index:generators              zset    generator replicas admitting sessions, score = deadline

The `{session_id}` hash tag puts all of a session's keys on one Redis Cluster slot, so the
Lua scripts that keep them consistent touch a single slot. The index keys are global and
live on other slots: they are updated right after the per-session script and are repaired
by readers and the reaper (see sessions.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.redis_util import validate_id, validate_namespace


@dataclass(frozen=True)
class SessionKeys:
    """The per-session keys, all on the slot of `{session_id}`."""

    record: str
    lease: str
    control: str
    results: str
    result_events: str
    output: str

    def all(self) -> tuple[str, ...]:
        return (self.record, self.lease, self.control, self.results, self.result_events, self.output)


class KeySpace:
    """Builds namespaced key names. The namespace separates deployments sharing one Redis."""

    def __init__(self, namespace: str) -> None:
        self.namespace = validate_namespace(namespace)

    def session(self, session_id: str) -> SessionKeys:
        base = f"{self.namespace}:session:{{{validate_id(session_id, 'session id')}}}"
        return SessionKeys(
            record=base,
            lease=f"{base}:lease",
            control=f"{base}:control",
            results=f"{base}:results",
            result_events=f"{base}:result-events",
            output=f"{base}:output",
        )

    def session_request(self, session_id: str, request_id: str) -> str:
        """Idempotency record of one client request_id on the session's slot (hash: fp, id, rev).
        The request id is hashed: client ids may hold characters key names must not."""
        digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:32]
        return f"{self.session(session_id).record}:request:{digest}"

    def prompt_revision(self, session_id: str) -> str:
        """Counter of the session's prompt revisions (string, INCR), on the session's slot."""
        return f"{self.session(session_id).record}:prompt_rev"

    def tenant_quota(self, tenant: str) -> str:
        """Quota reservations of a tenant: zset member -> deadline (+inf once registered)."""
        return f"{self.namespace}:quota:tenant:{validate_id(tenant, 'tenant')}"

    def live_index(self) -> str:
        return f"{self.namespace}:index:live"

    def generator_index(self) -> str:
        """Generator replicas that can admit sessions: member = replica id, score = heartbeat deadline."""
        return f"{self.namespace}:index:generators"

    def replica_index(self, replica: str) -> str:
        return f"{self.namespace}:index:replica:{validate_id(replica, 'replica')}"

    def tenant_index(self, tenant: str) -> str:
        return f"{self.namespace}:index:tenant:{validate_id(tenant, 'tenant')}"
