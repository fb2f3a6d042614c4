"""The HTTP servers' bounds (agent/httpserver.py): slow clients are closed on time, a cap on
connections evicts slow clients before turning anyone away, and /healthz answers throughout."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from agent.httpbody import BodyError, read_body
from agent.httpserver import HttpLimits, ServerThread


def make_app(gate: asyncio.Event | None = None) -> Starlette:
    async def healthz(request: Request):
        return PlainTextResponse("ok\n")

    async def upload(request: Request):
        try:
            body = await read_body(request, 1 << 20)
        except BodyError as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)
        return PlainTextResponse(f"{len(body)}\n")

    async def slow(request: Request):
        await asyncio.sleep(1.5)
        return PlainTextResponse("done\n")

    async def refuse(request: Request):  # answers without reading the body
        return PlainTextResponse("no\n", status_code=415)

    return Starlette(routes=[Route("/healthz", healthz), Route("/slow", slow),
                             Route("/refuse", refuse, methods=["POST"]),
                             Route("/upload", upload, methods=["POST"])])


@pytest.fixture()
def server(request):
    limits = getattr(request, "param", None) or HttpLimits(header_timeout_s=1.0, body_idle_s=1.0,
                                                            body_total_s=3.0, idle_s=2,
                                                            max_connections=64, max_inflight=4)
    with ServerThread(make_app(), "127.0.0.1", 0, name="test", limits=limits) as s:
        yield s


def connect(s: ServerThread) -> socket.socket:
    c = socket.create_connection((s.host, s.port), timeout=10)
    return c


def response(c: socket.socket) -> bytes:
    """One whole response (by its Content-Length) read from `c`."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += c.recv(4096)
    return head + b"\r\n\r\n" + body


def closed_within(c: socket.socket, most_s: float) -> float:
    """Seconds until the server closes `c` (reading and discarding what it sends)."""
    t0 = time.monotonic()
    c.settimeout(most_s)
    try:
        while c.recv(4096):
            pass
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"still open after {most_s} s") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_incomplete_headers_are_closed_at_the_header_timeout(server):
    c = connect(server)
    c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    assert closed_within(c, 5) < 3
    silent = connect(server)  # a connection that sends nothing at all
    assert closed_within(silent, 5) < 3
    assert server.guard.closed["header_timeout"] >= 2


def test_a_body_shorter_than_its_content_length_is_closed_at_the_body_timeout(server):
    c = connect(server)
    c.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    took = closed_within(c, 8)
    assert took < 3, took
    assert server.guard.closed["body_timeout"] == 1
    # a complete body on the same server still works
    assert httpx.post(server.url + "/upload", content=b"x" * 1000).text == "1000\n"


def test_a_trickled_body_is_bounded_by_the_total_body_time(server):
    c = connect(server)
    c.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    t0 = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(40):  # a byte every 0.5 s: never idle for body_idle_s
            c.sendall(b"x")
            time.sleep(0.5)
    assert time.monotonic() - t0 < 5


def test_a_connection_whose_body_was_refused_unread_stays_open_for_the_idle_time(server):
    c = connect(server)
    c.sendall(b"POST /refuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert response(c).startswith(b"HTTP/1.1 415")
    c.sendall(b"x" * 5000)  # the rest arrives after the answer
    time.sleep(1.5)  # past the header timeout (1 s), inside the idle time (2 s)
    c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response(c).startswith(b"HTTP/1.1 200")
    assert closed_within(c, 5) < 3  # and then the idle time closes it
    assert server.guard.closed.get("header_timeout", 0) == 0


def test_300_slow_connections_do_not_stop_healthz(server):
    slow = []
    for _ in range(300):
        c = connect(server)
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(c)
    failures = 0
    for _ in range(20):
        try:
            r = httpx.get(server.url + "/healthz", timeout=2)
            failures += r.status_code != 200
        except httpx.HTTPError:
            failures += 1
        time.sleep(0.05)
    assert failures == 0
    assert server.guard.closed.get("evicted", 0) > 0  # 300 > the cap of 64: slow ones made room
    for c in slow:
        c.close()


def test_requests_beyond_the_inflight_cap_get_503_with_retry_after_but_healthz_passes(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            slow = [asyncio.create_task(client.get("/slow")) for _ in range(8)]
            await asyncio.sleep(0.5)
            health = await client.get("/healthz")
            done = await asyncio.gather(*slow)
            return health, done

    health, done = asyncio.run(go())
    assert health.status_code == 200
    codes = sorted(r.status_code for r in done)
    assert codes.count(200) == 4 and codes.count(503) == 4, codes
    assert all(r.headers["retry-after"] == "1" for r in done if r.status_code == 503)


@pytest.mark.parametrize("server", [HttpLimits(max_connections=4, max_inflight=8)],
                         indirect=True)
def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503_and_retry_after(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=10,
                                     limits=httpx.Limits(max_connections=4)) as client:
            busy = [asyncio.create_task(client.get("/slow")) for _ in range(4)]
            await asyncio.sleep(0.5)
            c = await asyncio.open_connection(server.host, server.port)
            answer = await asyncio.wait_for(c[0].read(), 5)
            c[1].close()
            await asyncio.gather(*busy)
            return answer

    answer = asyncio.run(go())
    assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer
    assert server.guard.closed["refused"] == 1
