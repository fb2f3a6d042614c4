"""Bounded admission for heavy requests (the Pyroscope ingest): a request either gets a slot at
once or an immediate 429 with Retry-After; the work of admitted requests (decompressing,
decoding, storing) runs on a small pool of its own threads, never on the event loop, so that
/healthz and the API keep answering while a large push is decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """No slot: answer 429 with `Retry-After: retry_after_s`."""

    def __init__(self, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.message = message


class Admission:
    """At most `max_requests` requests admitted at once (reading their body, waiting for a
    worker or being worked on), holding at most `max_bytes` of bodies between them (each
    counted at its Content-Length, or at the body limit when it has none), `workers` of them
    worked on at a time.

    `slot()` and `run()` are called on the event loop; the work runs on the pool's threads.
    `gauge` (a prometheus Gauge, optional) follows the number admitted.
    """

    def __init__(self, max_requests: int = 4, workers: int = 1, *, name: str = "ingest",
                 gauge=None, max_bytes: int | None = None) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.workers = workers
        self.name = name
        self.admitted = 0
        self.admitted_bytes = 0
        self.refused = 0
        self.gauge = gauge
        #: moving average of one request's work, for Retry-After
        self.avg_work_s = 0.5
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix=f"spanflame-{name}")

    @property
    def full(self) -> bool:
        return self.admitted >= self.max_requests

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free (the queue's work at the recent pace)."""
        return max(1, min(60, math.ceil(self.admitted * self.avg_work_s / self.workers)))

    @contextlib.asynccontextmanager
    async def slot(self, cost_bytes: int = 0) -> AsyncIterator[None]:
        """Admit one request whose body may take `cost_bytes`, or raise Overloaded."""
        if self.full:
            self.refused += 1
            raise Overloaded(self.retry_after_s(),
                             f"{self.name} busy: {self.admitted} requests in progress, the "
                             f"limit; retry later")
        if (self.max_bytes is not None and self.admitted
                and self.admitted_bytes + cost_bytes > self.max_bytes):
            self.refused += 1
            raise Overloaded(self.retry_after_s(),
                             f"{self.name} busy: {self.admitted_bytes} bytes of requests in "
                             f"progress, the limit is {self.max_bytes}; retry later")
        self.admitted += 1
        self.admitted_bytes += cost_bytes
        self._set_gauge()
        try:
            yield
        finally:
            self.admitted -= 1
            self.admitted_bytes -= cost_bytes
            self._set_gauge()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs) on the pool; its exceptions are raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self._timed, fn, *args,
                                                                        **kwargs))

    def _timed(self, fn, *args, **kwargs):
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.avg_work_s = 0.8 * self.avg_work_s + 0.2 * (time.monotonic() - t0)

    def _set_gauge(self) -> None:
        if self.gauge is not None:
            self.gauge.set(self.admitted)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
