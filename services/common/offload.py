"""A bounded thread pool for the blocking work of async handlers.

A replica serves every stream and RPC from one event loop: anything that takes milliseconds
there (decoding and validating an uploaded image of up to 40 MP, hashing 20 MB of upload) stalls
all of them. Handlers hand such work to a `BlockingPool` instead. The pool is bounded, so a burst
of large uploads queues for a thread (without blocking the loop) rather than decoding dozens of
40 MP images, ~120 MB each, at once. Context variables (e.g. the field prefix of validation
errors) are carried into the worker thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

# Images one replica decodes at once: enough to use the cores, few enough that a burst of
# uploads at the pixel limit cannot exhaust memory.
IMAGE_DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))


class BlockingPool:
    """`await pool.run(fn, *args, **kwargs)`: `fn` runs on one of `max_workers` threads."""

    def __init__(self, max_workers: int, name: str) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name)

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self) -> None:
        """Stop taking work; running calls finish (idempotent)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
