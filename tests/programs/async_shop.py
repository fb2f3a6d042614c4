"""A real asyncio web app (aiohttp) with the OpenTelemetry SDK, serving many requests at once on
one event-loop thread, for the asyncio span tests.

Three kinds of request, each handled in its own span, started inside the request's task:
  /cpu       span `cpu_request`:      cpu_work() burns ~15 ms of CPU without awaiting
  /upstream  span `upstream_request`: fetch_upstream() awaits a reply from a slow upstream
             (an asyncio TCP server in this process that answers after ~150 ms), then parses it
             (~3 ms of CPU in parse_reply())
  /lock      span `lock_request`:     take_lock() awaits an asyncio.Lock that a holder task keeps
             most of the time, then works ~3 ms under it (locked_work())

Ground truth: every span's id, kind, start and end, the CPU its synchronous part measured
(cpu_work times itself with the thread's CPU clock; it never awaits, so nothing else runs
meanwhile) and the time it awaited the upstream or the lock (`awaited_ns`; 0 for a lock request
that found the lock free) go to REPORT as {"spans": {span_id: {...}}} at exit.

Usage: async_shop.py ENDPOINT REPORT [--seconds S]
Prints {"pid", "port"} when ready; serves S seconds; flushes its spans; writes REPORT; exits.
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent.otel import SpanflameSpanProcessor  # noqa: E402

truth: dict = {}
tracer = None
lock = None
UPSTREAM_PORT = 0


def burn(seconds: float) -> int:
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1
    return x


def cpu_work() -> int:
    return burn(0.015)


def parse_reply(data: bytes) -> int:
    return burn(0.003)


def locked_work() -> int:
    return burn(0.003)


async def fetch_upstream() -> int:
    """The time it awaited (connect and reply), in ns."""
    t0 = time.perf_counter_ns()
    reader, writer = await asyncio.open_connection("127.0.0.1", UPSTREAM_PORT)
    writer.write(b"ping\n")
    data = await reader.readline()  # AS-UPSTREAM
    waited = time.perf_counter_ns() - t0
    writer.close()
    parse_reply(data)
    return waited


async def take_lock() -> int:
    """The time it awaited the lock, in ns (0 when it found the lock free)."""
    t0 = time.perf_counter_ns()
    async with lock:  # AS-LOCK
        waited = time.perf_counter_ns() - t0
        locked_work()
    return waited


def record(span, kind: str, t0: int, cpu_ns: int = 0, awaited_ns: int = 0) -> None:
    sid = format(span.get_span_context().span_id, "016x")
    truth[sid] = {"kind": kind, "start": t0, "end": time.time_ns(), "cpu_ns": cpu_ns,
                  "awaited_ns": awaited_ns}


async def handle_cpu(request):
    with tracer.start_as_current_span("cpu_request") as span:
        t0 = time.time_ns()
        c0 = time.thread_time_ns()
        cpu_work()
        record(span, "cpu_request", t0, time.thread_time_ns() - c0)
    return web.Response(text="ok")


async def handle_upstream(request):
    with tracer.start_as_current_span("upstream_request") as span:
        t0 = time.time_ns()
        awaited = await fetch_upstream()
        record(span, "upstream_request", t0, awaited_ns=awaited)
    return web.Response(text="ok")


async def handle_lock(request):
    with tracer.start_as_current_span("lock_request") as span:
        t0 = time.time_ns()
        awaited = await take_lock()
        record(span, "lock_request", t0, awaited_ns=awaited)
    return web.Response(text="ok")


async def upstream(reader, writer):
    await reader.readline()
    await asyncio.sleep(0.15)
    writer.write(b"pong\n")
    await writer.drain()
    writer.close()


async def holder():
    while True:
        async with lock:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.001)


async def main(args) -> None:
    global lock, UPSTREAM_PORT
    lock = asyncio.Lock()
    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    UPSTREAM_PORT = up.sockets[0].getsockname()[1]
    hold = asyncio.create_task(holder())
    app = web.Application()
    app.router.add_get("/cpu", handle_cpu)
    app.router.add_get("/upstream", handle_upstream)
    app.router.add_get("/lock", handle_lock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    print(json.dumps({"pid": os.getpid(), "port": port}), flush=True)
    await asyncio.sleep(args.seconds)
    hold.cancel()
    await runner.cleanup()
    up.close()


def run() -> None:
    global tracer
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("report")
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    provider = TracerProvider(resource=Resource.create({"service.name": "async-shop"}))
    provider.add_span_processor(SpanflameSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=args.endpoint),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("async-shop")
    asyncio.run(main(args))
    provider.shutdown()
    with open(args.report, "w") as f:
        json.dump({"spans": truth}, f)


if __name__ == "__main__":
    run()
