"""The generator replica's batched stepping: sessions due for a chunk step together.

Each session's loop (`SessionRunner.run`) asks `ChunkBatcher.generate(session)` for its next
chunk when it is due. The batcher collects the sessions that are due at about the same time
(waiting `batch_wait_s` for others to join), splits them into batches of the sizes the
measured step times say are fastest (`StepTimes.plan`: on a compute-bound preset that may be one
at a time), and runs each batch as one DiT forward per denoising step on a worker thread, under
the replica's compute lock (opens, switches and prompt changes take the same lock between
batches, so a switch on one session never stalls the others for longer than a step).

Sessions are served in arrival order: a round gives every due session one chunk before any
session gets a second, so no session starves. Every step's wall time updates the step-time
table that the scheduler and admission by compute read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fashionchameleon.v1 import common_pb2
from services.common.tensors import tensor_to_proto
from shared.runtime.pipeline import LatentChunk, VideoSession, generate_batch
from shared.runtime.scheduling import StepTimes
from shared.runtime.session import SessionClosed

log = logging.getLogger(__name__)

Result = tuple[LatentChunk, common_pb2.Tensor]


def generate_wire_batch(sessions: list[VideoSession]) -> list[Result | BaseException]:
    """Every session's next chunk (batched) and its latents as a wire tensor; per session either
    the result or the exception that session hit. Runs on a worker thread: the device->host
    copies (`.cpu()`) never block the event loop. A batch that fails is retried one session at a
    time, so one session's trouble does not fail its neighbours."""
    out: list[Result | BaseException | None] = [None] * len(sessions)
    live = []
    for i, s in enumerate(sessions):
        if s.is_open:
            live.append(i)
        else:
            out[i] = SessionClosed("session is not open")
    try:
        chunks = [sessions[live[0]].generate()] if len(live) == 1 else generate_batch([sessions[i] for i in live])
        for i, chunk in zip(live, chunks):
            out[i] = (chunk, tensor_to_proto(chunk.latents))
    except Exception:
        if len(live) == 1:
            raise
        log.warning("a batch of %d sessions failed; stepping them one at a time", len(live), exc_info=True)
        for i in live:
            try:
                chunk = sessions[i].generate()
                out[i] = (chunk, tensor_to_proto(chunk.latents))
            except Exception as exc:  # noqa: BLE001 - delivered to that session's loop
                out[i] = exc
    return [r if r is not None else RuntimeError("no result") for r in out]


class ChunkBatcher:
    def __init__(
        self,
        step_times: StepTimes,
        compute: Callable[[], contextlib.AbstractAsyncContextManager],
        *,
        max_batch: int,
        wait_s: float,
        observe: Callable[[int, float], None] | None = None,
        sessions: Callable[[], int] | None = None,
    ):
        """`compute()`: the replica's compute lock; `observe(batch_size, seconds)`: told after
        every step (metrics); `sessions()`: how many sessions the replica runs (when all of them
        are due, or there is only one, a step starts without waiting for others to join)."""
        self.step_times = step_times
        self.compute = compute
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe = observe
        self.sessions = sessions
        self._due: list[tuple[VideoSession, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.steps = 0  # batched steps run (introspection, tests)

    async def generate(self, session: VideoSession) -> Result:
        """The session's next chunk, stepped in a batch with the other due sessions."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._due.append((session, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        try:
            await self._serve()
        except BaseException as exc:  # never leave a session waiting on a future nobody resolves
            for _, future in self._due:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("batcher stopped"))
            self._due.clear()
            raise

    async def _serve(self) -> None:
        while self._due:
            everyone = self.sessions is not None and len(self._due) >= self.sessions()
            if self.wait_s > 0 and not everyone:
                await asyncio.sleep(self.wait_s)  # let sessions due at about the same time join
            due = [(s, f) for s, f in self._due if not f.done()]  # a cancelled loop no longer waits
            self._due.clear()
            try:
                for size in self.step_times.plan(len(due), self.max_batch):
                    group = [(s, f) for s, f in due[:size] if not f.done()]
                    due = due[size:]
                    if group:
                        await self._step(group)
            finally:  # taken off the queue but not stepped (an error, a cancel): they hear of it
                for _, future in due:
                    if not future.done():
                        future.set_exception(RuntimeError("the batch step was interrupted"))

    async def _step(self, group: list[tuple[VideoSession, asyncio.Future]]) -> None:
        sessions = [s for s, _ in group]
        try:
            async with self.compute():
                started = time.perf_counter()
                results: list[Any] = await asyncio.to_thread(generate_wire_batch, sessions)
                seconds = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - every session of the batch hears of it
            results = [exc] * len(group)
        else:
            self.steps += 1
            if all(not isinstance(r, BaseException) for r in results):
                self.step_times.observe(len(group), seconds)
            if self.observe is not None:
                self.observe(len(group), seconds)
        for (_, future), result in zip(group, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
