"""Running an ASGI app (uvicorn) on a background thread, with bind errors reported up front,
and bounded: header, body, idle and send timeouts, a connection cap that evicts slow clients
first, and an in-flight request cap that never turns away /healthz (`HttpLimits`). Both servers
(the API and the OTLP receiver) are run by `ServerThread`, so both get the same bounds."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agent.errors import SpanflameError, UsageError

log = logging.getLogger(__name__)


def parse_listen(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'127.0.0.1:4318', '[::1]:4318', ':4318' (all interfaces) or '4318' -> (host, port)."""
    t = text.strip()
    host, port = default_host, t
    if t.startswith("["):
        host, _, rest = t[1:].partition("]")
        port = rest.lstrip(":")
    elif ":" in t:
        host, _, port = t.rpartition(":")
        host = host or "0.0.0.0"
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"invalid listen address {text!r}: use HOST:PORT") from None
    if not 0 <= p <= 65535:
        raise UsageError(f"invalid port in {text!r}")
    return host, p


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SpanflameError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class HttpLimits:
    """What one connection may cost. Seconds and counts; the defaults serve a node agent.

    - `header_timeout_s`: a request's headers must be complete this long after its first byte
      (or after the connection opened): slow-header clients are closed.
    - `body_idle_s`: a request body that sends nothing for this long is closed (a body shorter
      than its Content-Length holds the connection this long, no more); `body_total_s` bounds
      the whole body however it trickles.
    - `idle_s`: a keep-alive connection between requests (uvicorn's timeout_keep_alive); longer
      than the pyroscope clients' 10 s and the OTel exporter's 5 s between sends, so that a
      client's next request does not race the server closing the connection.
    - `send_timeout_s`: a client that reads nothing of its response for this long is closed.
    - `max_connections`: at the cap, a new connection first evicts the oldest connection that
      is idle or still sending headers; when every connection is busy with a request it is
      answered 503 with Retry-After and closed.
    - `max_inflight`: requests being handled at once; more are answered 503 with Retry-After,
      except `exempt_paths` (/healthz, /readyz, /metrics), which always get through.
    """

    header_timeout_s: float = 10.0
    body_idle_s: float = 10.0
    body_total_s: float = 60.0
    idle_s: int = 30
    send_timeout_s: float = 30.0
    max_connections: int = 512
    max_inflight: int = 128
    exempt_paths: frozenset = frozenset({"/healthz", "/readyz", "/metrics"})
    retry_after_s: int = 1


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
            b"retry-after: %d\r\nconnection: close\r\ncontent-length: 36\r\n\r\n"
            b"too many connections: retry shortly\n")
_HEADER_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                   b"connection: close\r\ncontent-length: 37\r\n\r\n"
                   b"request headers not complete in time\n")


class ConnectionGuard:
    """The connections of one server and their phase; runs on the server's event loop only.

    Counts what it closes in `metrics.http_closed{server, reason}` and keeps
    `metrics.http_connections{server}` current (when metrics are given).
    """

    def __init__(self, name: str, limits: HttpLimits, metrics=None) -> None:
        self.name = name
        self.limits = limits
        self.metrics = metrics
        self.open: dict = {}  # protocol -> None, oldest first
        self.closed: dict[str, int] = {}
        self.inflight = 0
        self.busy = 0

    def count(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.http_closed.labels(server=self.name, reason=reason).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.http_connections.labels(server=self.name).set(len(self.open))

    def admit(self, proto) -> bool:
        """Room for `proto`, evicting an idle or slow-header connection if need be."""
        if len(self.open) >= self.limits.max_connections:
            victim = next((p for p in self.open if p.phase in ("idle", "header")), None)
            if victim is None:
                self.count("refused")
                return False
            self.count("evicted")
            victim.close_now()
        self.open[proto] = None
        self._gauge()
        return True

    def gone(self, proto) -> None:
        if self.open.pop(proto, 0) is None:
            self._gauge()


def guarded_protocol(base: type, guard: ConnectionGuard) -> type:
    """`base` (uvicorn's H11Protocol) with header, body and send timeouts and the connection
    cap of `guard`. Phases: header (from the connection's or a request's first byte until its
    headers are complete), body (until the body is complete), app (the handler runs), idle
    (between requests: uvicorn's keep-alive timer)."""
    limits = guard.limits

    class Guarded(base):
        phase = "header"
        _timer = None
        _body_deadline = 0.0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if not guard.admit(self):
                self.phase = "refused"
                transport.write(_REFUSED % limits.retry_after_s)
                transport.close()
                return
            self._arm(limits.header_timeout_s, "header_timeout")

        def connection_lost(self, exc) -> None:
            self._disarm()
            guard.gone(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.phase == "refused":
                return
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer
            self._follow()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self.phase == "app":
                self._arm(limits.send_timeout_s, "send_timeout")

        def resume_writing(self) -> None:
            super().resume_writing()
            if self.phase == "app":
                self._disarm()

        def _follow(self) -> None:
            """Move to the phase the request's state says, arming its timer."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                between = (cycle is not None and self.conn.their_state is h11.IDLE
                           and not self.conn.trailing_data[0])
                if between:  # waiting for the next request
                    if self.phase != "idle":
                        self.phase = "idle"
                        self._disarm()
                        if self.timeout_keep_alive_task is None:
                            # uvicorn arms its keep-alive timer when a response ends; not when
                            # the rest of a body the handler did not read arrives after it
                            self._arm(limits.idle_s, "idle_timeout")
                elif self.phase != "header":  # part of the next request's headers arrived
                    self.phase = "header"
                    self._arm(limits.header_timeout_s, "header_timeout")
            elif cycle.more_body:
                now = self.loop.time()
                if self.phase != "body":
                    self.phase = "body"
                    self._body_deadline = now + limits.body_total_s
                self._arm(min(limits.body_idle_s, max(0.0, self._body_deadline - now)),
                          "body_timeout")
            elif self.phase != "app":
                self.phase = "app"
                self._disarm()

        def _arm(self, delay_s: float, reason: str) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay_s, self._expired, reason)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self, reason: str) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if reason == "body_timeout" and self.flow.read_paused:
                # the handler is not reading (flow control), the client is not late
                self._arm(limits.body_idle_s, reason)
                return
            guard.count(reason)
            if reason == "header_timeout" and self.conn.their_state is h11.IDLE \
                    and self.conn.trailing_data[0]:
                self.transport.write(_HEADER_TIMEOUT)
            self.close_now()

        def close_now(self) -> None:
            self._disarm()
            self.transport.close()

    Guarded.__name__ = f"Guarded{base.__name__}"
    return Guarded


class InflightCap:
    """ASGI middleware: at most `limits.max_inflight` requests handled at once; more are
    answered 503 with Retry-After (counted in `metrics.http_busy{server}`), except
    `limits.exempt_paths`, so a liveness probe is never turned away by load."""

    def __init__(self, app, guard: ConnectionGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope, receive, send) -> None:
        g = self.guard
        if scope["type"] != "http" or scope.get("path") in g.limits.exempt_paths:
            await self.app(scope, receive, send)
            return
        if g.inflight >= g.limits.max_inflight:
            g.busy += 1
            if g.metrics is not None:
                g.metrics.http_busy.labels(server=g.name).inc()
            body = b"busy: too many requests in progress, retry shortly\n"
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"retry-after", str(g.limits.retry_after_s).encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        g.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            g.inflight -= 1


class ServerThread:
    """uvicorn serving `app` on an already-bound socket, on a daemon thread.

    `start()` returns once it accepts connections; `close()` stops it (idempotent).
    """

    def __init__(self, app, host: str, port: int, name: str = "http", *,
                 limits: HttpLimits | None = None, metrics=None) -> None:
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        limits = limits or HttpLimits()
        self.guard = ConnectionGuard(name, limits, metrics)
        state = getattr(app, "state", None)
        if state is not None:  # for /readyz
            state.http_guard = self.guard
        # h11 (not httptools): the guard follows its request state; uvicorn's own
        # limit_concurrency is off, since it counts slow connections against /healthz.
        config = uvicorn.Config(InflightCap(app, self.guard), log_level="warning",
                                lifespan="off", access_log=False,
                                http=guarded_protocol(H11Protocol, self.guard),
                                timeout_keep_alive=limits.idle_s, limit_concurrency=None,
                                h11_max_incomplete_event_size=16 * 1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name=f"spanflame-{name}", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc

    def start(self, timeout_s: float = 10.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self.thread.is_alive():
                raise SpanflameError(f"HTTP server on {self.host}:{self.port} failed to start: "
                                     f"{self._error}")
            if time.monotonic() > deadline:
                raise SpanflameError(f"HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout=10)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
