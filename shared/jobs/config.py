"""Typed configuration of the batch job queue and its workers.

Built once at the edge (service settings, CLI, tests) and passed to constructors; nothing in
this package reads environment variables. Durations are in seconds.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JobsConfig(BaseModel):
    """Delivery, retry, retention and size bounds of batch clip jobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Consumer group of the workers on the job stream.
    group: str = Field(default="workers", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    # Attempts per job, counting attempts lost with a dead worker; then the job is dead-lettered.
    max_attempts: int = Field(default=3, ge=1, le=100)
    # Backoff before attempt n+1 after a failed attempt n: min(max, base * 2**(n-1)), plus up to
    # `backoff_jitter` of it at random.
    backoff_base_s: float = Field(default=5.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    backoff_jitter: float = Field(default=0.1, ge=0, le=1)
    # A delivery that was not heartbeated for this long belongs to a dead worker and is
    # reclaimed (XAUTOCLAIM min-idle-time).
    claim_idle_s: float = Field(default=60.0, gt=0)
    # Workers heartbeat their job (reset its idle time, report progress, learn of a cancel).
    heartbeat_s: float = Field(default=10.0, gt=0)
    # Longest blocking read of an idle worker; retries due and dead workers' jobs are looked
    # at this often.
    poll_s: float = Field(default=1.0, gt=0)
    # Finished job records (and so their idempotency keys) are kept this long; the results
    # stay in the object store.
    retention_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Events kept per tenant for WatchJobs (approximate trimming), dead letters kept.
    events_max: int = Field(default=10_000, ge=10)
    dead_letters_max: int = Field(default=100_000, ge=10)

    # Request bounds.
    max_clips_per_batch: int = Field(default=1000, ge=1)
    max_chunks_per_clip: int = Field(default=1000, ge=1)
    max_schedule_entries: int = Field(default=256, ge=1)
    max_shared_images: int = Field(default=256, ge=0)
    max_watch_jobs: int = Field(default=1000, ge=1)
    default_page_size: int = Field(default=50, ge=1)
    max_page_size: int = Field(default=500, ge=1)

    # Results: object keys `{results_prefix}/{tenant}/{job_id}/{spec_hash[:16]}/...`.
    results_prefix: str = Field(default="jobs", pattern=r"^[a-z0-9][a-z0-9._\-]*(/[a-z0-9][a-z0-9._\-]*)*$")
    presign_expiry_s: int = Field(default=3600, ge=1, le=7 * 24 * 3600)

    # Worker deployment: replicas scale with queue depth between these bounds.
    min_workers: int = Field(default=1, ge=0)
    max_workers: int = Field(default=4, ge=1)
    # Queued + running jobs per worker the autoscaler aims at.
    target_jobs_per_worker: float = Field(default=2.0, gt=0)
    # Depth is polled this often by the autoscaling policy; scale-down waits this long.
    depth_poll_s: float = Field(default=5.0, gt=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)
    worker_gpus: float = Field(default=0.0, ge=0)
    # Seconds a stopping worker waits for its job's next chunk boundary before giving it back.
    drain_timeout_s: float = Field(default=20.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> JobsConfig:
        if self.heartbeat_s * 2 > self.claim_idle_s:
            raise ValueError("heartbeat_s must be at most half of claim_idle_s (a live job would be reclaimed)")
        if self.min_workers > self.max_workers:
            raise ValueError("min_workers exceeds max_workers")
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError("backoff_base_s exceeds backoff_max_s")
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size exceeds max_page_size")
        return self

    def backoff_s(self, attempt: int) -> float:
        """Base delay (no jitter) before the attempt after failed attempt `attempt` (1-based)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** min(max(attempt - 1, 0), 32))
