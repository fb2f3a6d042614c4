"""Running an ASGI app (uvicorn) on a background thread, with bind errors reported up front."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

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
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """uvicorn serving `app` on an already-bound socket, on a daemon thread.

    `start()` returns once it accepts connections; `close()` stops it (idempotent).
    """

    def __init__(self, app, host: str, port: int, name: str = "http") -> None:
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False,
                                timeout_keep_alive=30, limit_concurrency=256)
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
