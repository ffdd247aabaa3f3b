"""Batch clip jobs: a job queue on Redis Streams with consumer groups.

- `JobQueue` (queue.py): submit (all or nothing, idempotent), claim / heartbeat / complete /
  fail / cancel, dead letters, depth, per-tenant events.
- `ClipSpec`, `JobRecord`, `JobState`, `ResultKeys` (spec.py): what a job is.
- `JobsConfig` (config.py), `JobKeys` (keys.py): configuration and key names.

The workers and the Studio RPCs on top of it live in services/jobs/.
"""

from shared.jobs.config import JobsConfig
from shared.jobs.keys import JobKeys
from shared.jobs.queue import (
    Claim,
    DeadLetter,
    IdempotencyConflict,
    JobEvent,
    JobNotFound,
    JobQueue,
    QueueDepth,
    Submitted,
    decode_page_token,
    encode_page_token,
)
from shared.jobs.spec import (
    TERMINAL_JOB_STATES,
    ClipSpec,
    GarmentAt,
    JobRecord,
    JobResult,
    JobState,
    ResultKeys,
    derived_seed,
    job_id_for,
)

__all__ = [
    "TERMINAL_JOB_STATES",
    "Claim",
    "ClipSpec",
    "DeadLetter",
    "GarmentAt",
    "IdempotencyConflict",
    "JobEvent",
    "JobKeys",
    "JobNotFound",
    "JobQueue",
    "JobRecord",
    "JobResult",
    "JobState",
    "JobsConfig",
    "QueueDepth",
    "ResultKeys",
    "Submitted",
    "decode_page_token",
    "derived_seed",
    "encode_page_token",
    "job_id_for",
]
