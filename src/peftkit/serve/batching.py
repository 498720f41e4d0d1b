"""Dynamic batching: requests that arrive together run as one batch on one worker thread.

Requests wait in a bounded queue (`max_queue` requests; a full queue refuses at once with
`QueueFullError`, which the server answers with 503). A collector task takes the oldest request,
waits up to `max_wait_s` after its arrival for more, and fills a batch in arrival order with every
waiting request that fits: the same `batch_key` (kind of work, and for generation the sampling
settings), at most `max_batch_size` rows (texts or prompts) and at most `max_adapters` distinct
adapters (the model's slots). With `mixed=False` a batch holds requests for one adapter only - the
usual way to serve many adapters, kept for comparison. Requests that do not fit stay queued, in order.

The batch runs in a single worker thread (one `ThreadPoolExecutor` worker), so the event loop stays
free to accept and answer requests while the model computes, and the model is never entered by two
threads at once. Adapter loads and unloads (`run_exclusive`) go through the same thread, between
batches. `run_batch(requests)` returns one result per request; a result that is an Exception fails
only that request; if `run_batch` raises, every request of that batch fails with `BatchError` and the
worker carries on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFullError(Exception):
    """The queue holds `max_queue` requests already: try again shortly (HTTP 503)."""


class BatchError(Exception):
    """The batch this request ran in failed unexpectedly (HTTP 500); the server keeps running."""


@dataclass(eq=False)
class Request:
    """One client request: `rows` inputs for one adapter. `payload` is what the model code needs.

    `emit(event)` may be called from the worker thread to stream partial results (an asyncio queue
    on the event loop receives them, in order, before the final result). `cancelled` is set when the
    client has gone away, so that long work (decoding) can stop early for this request.
    """

    kind: str
    adapter: str
    rows: int
    payload: Any
    batch_key: Hashable = None
    stream: bool = False
    enqueued_at: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def emit(self, event: Any) -> None:
        """Thread-safe: hand a partial result to the waiting client (ignored if not streaming)."""
        if self.events is not None and self._loop is not None and not self.cancelled.is_set():
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)


END_OF_STREAM = object()  # put on a streaming request's events after its final result is set


@dataclass
class BatchRecord:
    rows: int
    requests: int
    adapters: int
    seconds: float


class DynamicBatcher:
    """Collects requests into batches and runs them one at a time on a worker thread."""

    def __init__(self, run_batch: Callable[[list[Request]], Sequence[Any]], *, max_batch_size: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256, max_adapters: int = 16, mixed: bool = True,
                 on_batch: Callable[[BatchRecord], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_adapters < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size, max_queue and max_adapters must be >= 1 and max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_adapters = max_adapters
        self.mixed = mixed
        self.on_batch = on_batch
        self.batches_run = 0  # forward passes (batches) so far: tests count these
        self.history: collections.deque[BatchRecord] = collections.deque(maxlen=10_000)
        self._pending: collections.deque[Request] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._collector: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="peftkit-model")
        self._collector = asyncio.create_task(self._collect_forever(), name="peftkit-batcher")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            try:
                await self._collector
            except asyncio.CancelledError:
                pass
        for request in self._pending:
            self._finish(request, BatchError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def submit(self, request: Request) -> Request:
        """Queue `request` (from the event loop); its `future` resolves with the result.

        Raises QueueFullError when `max_queue` requests wait already, ValueError for a request with
        more rows than a batch holds (the server checks limits before this).
        """
        if self._loop is None:
            raise RuntimeError("DynamicBatcher.start() was not called")
        if request.rows > self.max_batch_size:
            raise ValueError(f"a request of {request.rows} rows cannot fit a batch of {self.max_batch_size}")
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(f"{len(self._pending)} requests are waiting already (the queue holds {self.max_queue})")
        request._loop = self._loop
        request.future = self._loop.create_future()
        if request.stream:
            request.events = asyncio.Queue()
        request.enqueued_at = time.perf_counter()
        self._pending.append(request)
        self._arrived.set()
        return request

    async def run_exclusive(self, function: Callable, *args) -> Any:
        """Run `function(*args)` on the model's worker thread, between batches."""
        return await self._loop.run_in_executor(self._executor, function, *args)

    # --- the collector ------------------------------------------------------------------------------

    async def _collect_forever(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            first = self._pending[0]
            # Wait for more only while the batch could still grow and the oldest request is young.
            while self._compatible_rows(first) < self.max_batch_size:
                remaining = first.enqueued_at + self.max_wait_s - time.perf_counter()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    def _fits(self, first: Request, request: Request) -> bool:
        return request.batch_key == first.batch_key and (self.mixed or request.adapter == first.adapter)

    def _compatible_rows(self, first: Request) -> int:
        return sum(r.rows for r in self._pending if self._fits(first, r))

    def _take_batch(self) -> list[Request]:
        """Remove and return the oldest request plus every later one that fits with it."""
        while self._pending and self._pending[0].future.done():  # client gone (cancelled) before it ran
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending[0]
        batch, rows, adapters, kept = [], 0, set(), collections.deque()
        for request in self._pending:
            if request.future.done():
                continue
            fits = not batch or (self._fits(first, request) and rows + request.rows <= self.max_batch_size
                                 and (request.adapter in adapters or len(adapters) < self.max_adapters))
            if fits:
                batch.append(request)
                rows += request.rows
                adapters.add(request.adapter)
            else:
                kept.append(request)
        self._pending = kept
        return batch

    async def _run(self, batch: list[Request]) -> None:
        started = time.perf_counter()
        try:
            results = await self._loop.run_in_executor(self._executor, self.run_batch, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the server
            failure = BatchError(f"the batch failed: {type(error).__name__}: {error}")
            failure.__cause__ = error
            results = [failure] * len(batch)
        record = BatchRecord(rows=sum(r.rows for r in batch), requests=len(batch),
                             adapters=len({r.adapter for r in batch}), seconds=time.perf_counter() - started)
        self.batches_run += 1
        self.history.append(record)
        if self.on_batch is not None:
            self.on_batch(record)
        for request, result in zip(batch, results):
            self._finish(request, result)

    @staticmethod
    def _finish(request: Request, result: Any) -> None:
        if not request.future.done():
            if isinstance(result, BaseException):
                request.future.set_exception(result)
                request.future.exception()  # mark retrieved: a client that left must not log "never retrieved"
            else:
                request.future.set_result(result)
        if request.events is not None:
            request.events.put_nowait(END_OF_STREAM)
