"""Every Redis key of the batch job queue, built in one place.

Layout (namespace `fc`):

    fc:{jobs}:stream            stream  deliveries, one entry per queued attempt: j=<job id>
                                        (consumer group of the workers, JobsConfig.group)
    fc:{jobs}:delayed           zset    job id -> due time (ms, Redis clock) of its next attempt
    fc:{jobs}:dead              stream  dead letters: j, tenant, reason, attempts
    fc:{jobs}:job:<job id>      hash    the job record (see queue.py)
    fc:{jobs}:tenant:<tenant>   zset    "<created ms, 15 digits>:<job id>" (score 0, listed by lex)
    fc:{jobs}:events:<tenant>   stream  job changes of a tenant: j, s (state), c (chunks done)

All keys share the `{jobs}` hash tag: the queue lives on one Redis Cluster slot, so every Lua
script of queue.py is atomic over the stream, the record, the indexes and the events.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.redis_util import validate_id, validate_namespace


@dataclass(frozen=True)
class JobKeys:
    """Key names of one namespace's job queue."""

    namespace: str

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)

    @property
    def base(self) -> str:
        return f"{self.namespace}:{{jobs}}"

    @property
    def stream(self) -> str:
        return f"{self.base}:stream"

    @property
    def delayed(self) -> str:
        return f"{self.base}:delayed"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    def record(self, job_id: str) -> str:
        return f"{self.base}:job:{validate_id(job_id, 'job id')}"

    def tenant_index(self, tenant: str) -> str:
        return f"{self.base}:tenant:{validate_id(tenant, 'tenant')}"

    def events(self, tenant: str) -> str:
        return f"{self.base}:events:{validate_id(tenant, 'tenant')}"
