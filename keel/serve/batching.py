"""Dynamic batching for classify and embeddings: texts that arrive together share one forward pass.

Every request puts its texts on one queue. A single worker takes the first waiting text, waits up to
``max_wait_ms`` for more (up to ``max_batch_size``), runs the model once in a worker thread, and hands
each request its rows. A request whose deadline passed is skipped, not computed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from keel.serve.errors import ServeError


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    results: list = field(default_factory=list)
    remaining: int = 0
    cancelled: bool = False


class DynamicBatcher:
    """``await batcher.submit(texts)`` -> ``fn(texts)`` rows, computed in shared batches."""

    def __init__(self, fn: Callable[[list[str]], list], kind: str, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, metrics=None, executor: ThreadPoolExecutor | None = None):
        self.fn, self.kind = fn, kind
        self.max_batch, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.max_queue, self.metrics = max_queue, metrics
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"keel-{kind}")
        self._items: deque = deque()  # (job, index)
        self._jobs = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def depth(self) -> int:
        return self._jobs

    async def submit(self, texts: list[str], timeout_s: float) -> list:
        if self._jobs >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.labels("queue_full").inc()
            raise ServeError(429, f"the {self.kind} queue is full ({self.max_queue} requests); retry shortly",
                             code="queue_full", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        job = _Job(texts, loop.create_future(), [None] * len(texts), len(texts))
        self._jobs += 1
        self._gauge()
        self._items.extend((job, i) for i in range(len(texts)))
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(504, f"the request did not finish within {timeout_s:g} s (serve.timeout_s)",
                             code="timeout") from None
        finally:
            job.cancelled = True  # finished, timed out or the client left: its texts are not computed again
            self._jobs -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.labels(self.kind).set(self._jobs)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._live_items():
                self._wake.clear()
                await self._wake.wait()
            deadline = time.monotonic() + self.max_wait
            while self._live_items() < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = []
            while self._items and len(batch) < self.max_batch:
                job, i = self._items.popleft()
                if not job.cancelled:
                    batch.append((job, i))
            if not batch:
                continue
            if self.metrics:
                self.metrics.batch_size.labels(self.kind).observe(len(batch))
            try:
                rows = await loop.run_in_executor(self.executor, self.fn, [job.texts[i] for job, i in batch])
            except Exception as e:  # the model failed: every request in the batch hears about it
                for job, _ in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for (job, i), row in zip(batch, rows):
                job.results[i] = row
                job.remaining -= 1
                if job.remaining == 0 and not job.future.done():
                    job.future.set_result(job.results)

    def _live_items(self) -> int:
        while self._items and self._items[0][0].cancelled:
            self._items.popleft()
        return len(self._items)
