"""Autoscaling of the job workers on queue depth (a Ray Serve custom autoscaling policy).

Ray Serve scales deployments on the requests their handles send; the workers get none (they
pull from Redis), so the policy looks at the queue instead: desired replicas =
ceil((waiting + running jobs) / target_jobs_per_worker). Serve itself then applies the
deployment's min/max replicas and its upscale/downscale delays.

The policy runs inside the Serve controller. It polls Redis in one-shot tasks (never a
long-lived loop, which would keep the policy alive after a redeploy) at most every
`depth_poll_s`, and decides on the last depth it saw. With min_workers = 0 the deployment
scales from zero as soon as a job is queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from shared.jobs.config import JobsConfig
from shared.jobs.queue import JobQueue
from shared.redis_util import connect
from shared.sessionbus.config import RedisConfig

log = logging.getLogger(__name__)


def desired_workers(depth: int, target_jobs_per_worker: float) -> int:
    """Replicas for `depth` queued + running jobs (before Serve's min/max bounds)."""
    if depth <= 0:
        return 0
    return max(1, math.ceil(depth / target_jobs_per_worker))


class QueueDepthPolicy:
    """`AutoscalingPolicy(policy_function="services.jobs.scaling:QueueDepthPolicy",
    policy_kwargs={"redis_json": ..., "jobs_json": ...})`; kwargs are JSON of RedisConfig and
    JobsConfig (policy kwargs must be JSON-serializable)."""

    def __init__(self, redis_json: str, jobs_json: str) -> None:
        self._redis_config = RedisConfig.model_validate_json(redis_json)
        self._jobs = JobsConfig.model_validate_json(jobs_json)
        self._queue: JobQueue | None = None
        self._task: asyncio.Task | None = None
        self._last_poll = -math.inf
        self.depth = 0

    async def _poll_once(self) -> None:
        try:
            if self._queue is None:
                self._queue = JobQueue(connect(self._redis_config), self._jobs, self._redis_config.namespace)
            self.depth = (await self._queue.depth()).total
        except Exception as exc:  # noqa: BLE001 - keep the last depth; Redis may be restarting
            log.warning("job queue depth poll failed: %s", exc)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        if self._task is not None and self._task.done():
            self._task = None
        now = time.monotonic()
        if self._task is None and now - self._last_poll >= self._jobs.depth_poll_s:
            self._last_poll = now
            self._task = asyncio.get_running_loop().create_task(self._poll_once())
        return desired_workers(self.depth, self._jobs.target_jobs_per_worker), {"job_queue_depth": self.depth}
