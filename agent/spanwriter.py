"""Acknowledged spans are durable: each OTLP batch is committed to the store before its 200.

`SpanWriter.submit(spans)` queues a batch and returns a Future; one thread takes every batch
queued, commits them in one transaction (group commit: one fsync for many requests, the rows
into the store's `spans` table, INSERT OR IGNORE so a resent span or a breakdown written since
is kept), then adds them to the in-memory SpanStore used for linking, then resolves the
futures. The receiver answers 200 only after its future resolved, so a kill -9 at any moment
loses no acknowledged span; a full disk fails the futures with StoreFull (the receiver answers
503 with Retry-After, and the OTLP exporter retries).

Bounded: at most `max_pending_spans` queued; beyond, `submit` raises Overloaded (429).
Thread: `submit` from any thread (never blocks); `close()` commits what is queued and stops.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Sequence

from agent.errors import SpanflameError
from agent.spans import SpanRecord, SpanStore

log = logging.getLogger(__name__)


class Overloaded(SpanflameError):
    """More spans waiting for the disk than the bound: the caller answers 429."""


def span_row(s: SpanRecord) -> tuple:
    """The `spans` table row of a span (no breakdown yet)."""
    return (s.span_id, s.trace_id, s.parent_span_id, s.name, s.service, s.pid, s.tid,
            s.start_ns, s.end_ns, s.end_ns - s.start_ns, s.status, s.kind,
            json.dumps(dict(s.attributes), separators=(",", ":")) if s.attributes else "{}", None)


class SpanWriter:
    def __init__(self, store, spans: SpanStore, *, max_pending_spans: int = 100_000) -> None:
        self.store = store
        self.spans = spans
        self.max_pending_spans = max_pending_spans
        self._queue: deque[tuple[Sequence[SpanRecord], Future]] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="spanflame-spanwriter",
                                        daemon=True)
        self.committed = 0
        self.commits = 0
        self.overloaded = 0

    def start(self) -> "SpanWriter":
        self._thread.start()
        return self

    def submit(self, spans: Sequence[SpanRecord]) -> Future:
        """Queue a batch; the Future resolves (to the count) once it is durable and held."""
        fut: Future = Future()
        if not spans:
            fut.set_result(0)
            return fut
        with self._cond:
            if self._closed:
                raise Overloaded("the span writer is closed")
            if self._pending and self._pending + len(spans) > self.max_pending_spans:
                self.overloaded += 1
                raise Overloaded(f"{self._pending} spans are waiting to be written")
            self._queue.append((spans, fut))
            self._pending += len(spans)
            self._cond.notify()
        return fut

    @property
    def pending(self) -> int:
        return self._pending

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                work = list(self._queue)
                self._queue.clear()
            self._write(work)
            with self._cond:
                self._pending -= sum(len(s) for s, _f in work)

    def _write(self, work: list[tuple[Sequence[SpanRecord], Future]]) -> None:
        try:
            self.store.insert_spans([span_row(s) for spans, _f in work for s in spans])
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            if not isinstance(exc, SpanflameError):
                log.exception("writing %d span batches failed", len(work))
            for _s, fut in work:
                fut.set_exception(exc)
            return
        self.commits += 1
        for spans, fut in work:
            try:
                self.spans.add(spans)
            except Exception:  # loop edge: durable already; linking is best effort
                log.exception("holding spans in memory failed")
            self.committed += len(spans)
            fut.set_result(len(spans))

    def close(self) -> None:
        """Commit what is queued, then stop (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> "SpanWriter":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
