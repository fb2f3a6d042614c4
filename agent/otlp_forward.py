"""Forwarding OTLP requests unchanged to an upstream endpoint (Tempo, Jaeger, a collector).

A bounded queue (requests beyond it are dropped and counted), one sender thread, retries with
exponential backoff on connection errors, 429 and 5xx (honouring Retry-After), no retries on
other 4xx. Nothing here blocks the receiver.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger(__name__)

_RETRYABLE = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class _Item:
    body: bytes
    content_type: str
    content_encoding: str | None


def traces_url(url: str) -> str:
    """'http://tempo:4318' -> 'http://tempo:4318/v1/traces'; a URL with a path is kept."""
    u = httpx.URL(url)
    if u.path in ("", "/"):
        return str(u.copy_with(path="/v1/traces"))
    return url


class OtlpForwarder:
    def __init__(self, url: str, *, max_queue: int = 1000, max_attempts: int = 6,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, timeout_s: float = 10.0,
                 metrics=None, headers: dict[str, str] | None = None) -> None:
        self.url = traces_url(url)
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.metrics = metrics
        self.headers = dict(headers or {})
        self._q: queue.Queue[_Item | None] = queue.Queue(max_queue)
        self._client = httpx.Client(timeout=timeout_s)
        self._stop = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="spanflame-otlp-forward",
                                        daemon=True)
        self.sent = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "failed": 0, "rejected": 0}

    def start(self) -> "OtlpForwarder":
        self._thread.start()
        return self

    def submit(self, body: bytes, content_type: str, content_encoding: str | None) -> None:
        try:
            self._q.put_nowait(_Item(body, content_type, content_encoding))
        except queue.Full:
            self._drop("queue_full")

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self.metrics is not None:
            self.metrics.forward_dropped.labels(reason=reason).inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            self._busy = True
            try:
                self._send(item)
            finally:
                self._busy = False

    def _send(self, item: _Item) -> None:
        headers = {**self.headers, "content-type": item.content_type}
        if item.content_encoding:
            headers["content-encoding"] = item.content_encoding
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                r = self._client.post(self.url, content=item.body, headers=headers)
                if r.status_code < 300:
                    self.sent += 1
                    if self.metrics is not None:
                        self.metrics.forward_sent.inc()
                    return
                if r.status_code not in _RETRYABLE:
                    log.warning("OTLP upstream refused a request: HTTP %s", r.status_code)
                    self._drop("rejected")
                    return
                retry_after = r.headers.get("retry-after", "")
                if retry_after.isdigit():
                    delay = max(delay, float(retry_after))
            except httpx.HTTPError as exc:
                log.info("OTLP upstream unreachable (%s), attempt %d", exc, attempt)
            if attempt == self.max_attempts or self._stop.is_set():
                break
            if self.metrics is not None:
                self.metrics.forward_retries.inc()
            self._stop.wait(min(self.max_backoff_s, delay) * (0.5 + random.random() / 2))
            delay *= 2
        self._drop("failed")

    def close(self, drain_s: float = 5.0) -> None:
        """Send what is queued for up to `drain_s`, then stop (idempotent)."""
        if self._thread.is_alive():
            deadline = time.monotonic() + drain_s
            while (not self._q.empty() or self._busy) and time.monotonic() < deadline:
                time.sleep(0.05)
            self._stop.set()
            try:
                self._q.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=drain_s + 5)
        self._client.close()
