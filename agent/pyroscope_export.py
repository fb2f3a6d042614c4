"""Export to Grafana Pyroscope over its push API (the one pyroscope-io 1.x uses).

One PushRequest per profile: series labels `__name__` (the profile type: `process_cpu` for cpu,
as Pyroscope's own SDKs name it, `spanflame_<type>` for the wait types), `service_name` and the
series labels; the pprof keeps every per-sample label, `span_id` and `trace_id` included.
A bounded queue (overflow dropped and counted), one sender thread, retries with exponential
backoff on connection errors, 429 and 5xx, and a tenant header, basic auth or a bearer token.
"""

from __future__ import annotations

import base64
import gzip
import logging
import queue
import random
import threading
import time
import uuid

import httpx

from agent import pprof
from agent.model import Profile
from agent.proto import push_pb2

log = logging.getLogger(__name__)

PUSH_PATH = "/push.v1.PusherService/Push"
_RETRYABLE = {408, 429, 500, 502, 503, 504}


def metric_name(type_name: str) -> str:
    return {"cpu": "process_cpu", "wall": "wall"}.get(type_name, f"spanflame_{type_name}")


def push_request(profile: Profile, type_name: str, labels: dict) -> bytes:
    """A gzip'd PushRequest for one profile (its `type_name` series)."""
    req = push_pb2.PushRequest()
    series = req.series.add()
    merged = {"__name__": metric_name(type_name), **{k: str(v) for k, v in labels.items()
                                                      if k != "__name__"}}
    for k, v in sorted(merged.items()):
        series.labels.add(name=k, value=v)
    series.samples.add(raw_profile=pprof.encode(profile, compress=False), ID=str(uuid.uuid4()))
    return gzip.compress(req.SerializeToString(), compresslevel=6)


class PyroscopeExporter:
    def __init__(self, url: str, *, tenant: str | None = None, user: str | None = None,
                 password: str | None = None, token: str | None = None, max_queue: int = 500,
                 max_attempts: int = 6, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 timeout_s: float = 15.0, metrics=None) -> None:
        self.url = url.rstrip("/") + PUSH_PATH
        self.headers = {"content-type": "application/proto", "content-encoding": "gzip",
                        "user-agent": "spanflame"}
        if tenant:
            self.headers["X-Scope-OrgID"] = tenant
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        elif user:
            cred = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self.headers["authorization"] = f"Basic {cred}"
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.metrics = metrics
        self._q: queue.Queue[bytes | None] = queue.Queue(max_queue)
        self._client = httpx.Client(timeout=timeout_s)
        self._stop = threading.Event()
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="spanflame-pyroscope-export",
                                        daemon=True)
        self.sent = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "failed": 0, "rejected": 0}

    def start(self) -> "PyroscopeExporter":
        self._thread.start()
        return self

    def submit(self, profile: Profile, type_name: str, labels: dict) -> None:
        try:
            self._q.put_nowait(push_request(profile, type_name, labels))
        except queue.Full:
            self._drop("queue_full")

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        if self.metrics is not None:
            self.metrics.export_dropped.labels(reason=reason).inc()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                body = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if body is None:
                break
            self._busy = True
            try:
                self._send(body)
            finally:
                self._busy = False

    def _send(self, body: bytes) -> None:
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            try:
                r = self._client.post(self.url, content=body, headers=self.headers)
                if r.status_code < 300:
                    self.sent += 1
                    if self.metrics is not None:
                        self.metrics.export_sent.inc()
                    return
                if r.status_code not in _RETRYABLE:
                    log.warning("Pyroscope refused a profile: HTTP %s %s", r.status_code,
                                r.text[:200])
                    self._drop("rejected")
                    return
                ra = r.headers.get("retry-after", "")
                if ra.isdigit():
                    delay = max(delay, float(ra))
            except httpx.HTTPError as exc:
                log.info("Pyroscope unreachable (%s), attempt %d", exc, attempt)
            if attempt == self.max_attempts or self._stop.is_set():
                break
            if self.metrics is not None:
                self.metrics.export_retries.inc()
            self._stop.wait(min(self.max_backoff_s, delay) * (0.5 + random.random() / 2))
            delay *= 2
        self._drop("failed")

    def pending(self) -> int:
        return self._q.qsize()

    def close(self, drain_s: float = 5.0) -> None:
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
