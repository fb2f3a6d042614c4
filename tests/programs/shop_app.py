"""An OpenTelemetry-instrumented "shop" with known slow spans, for the web UI tests.

Every request is a trace: a root span `handle_request` with three children, one after another:
  `checkout`     CPU-bound: ~150 ms of CPU in compute_prices()
  `save_order`   lock-bound: Repo.save() waits ~200 ms for a lock that the "janitor" thread
                 (no spans) holds while it sleeps
  `load_report`  IO-bound: write_report() writes 64 MiB to a file under DIR with O_DIRECT and
                 O_DSYNC, 16 MiB at a time (the thread waits on the device for each write, long
                 enough to pass the agent's off-CPU threshold even on a fast disk, and spends
                 little CPU, unlike buffered writes whose memcpy can outweigh an fsync)
and, every other request, a span named `<script>alert(1)</script>` whose CPU goes to a function
named `<img src=x onerror=alert(1)>`: hostile strings the UI must show as text.

Ground truth: every span's own CPU (thread time) and wall time, as the app measured them, is
appended to DIR/truth.jsonl as {"span_id", "name", "cpu_ns", "wall_ns"}.

Usage: shop_app.py ENDPOINT DIR [--seconds S]
Prints {"pid"} when ready, runs S seconds, flushes its spans and exits.
"""

import argparse
import contextlib
import json
import mmap
import os
import threading
import time
import sys
import types
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent.otel import SpanflameSpanProcessor  # noqa: E402

HOSTILE = "<img src=x onerror=alert(1)>"
stop = threading.Event()
orders_lock = threading.Lock()
locked = threading.Event()


def burn(cpu_ms: float) -> int:
    end = time.thread_time() + cpu_ms / 1000
    x = 0
    while time.thread_time() < end:
        for i in range(2000):
            x += i * i
    return x


def compute_prices() -> None:
    burn(150)  # CHECKOUT-CPU


class Repo:
    def save(self) -> None:
        with orders_lock:  # SAVE-LOCK
            pass


CHUNK = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT wants
CHUNK.write(os.urandom(16 << 20))


def write_report(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT | os.O_DSYNC)
    except OSError:  # a file system without O_DIRECT (tmpfs): synchronous buffered writes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DSYNC)
    try:
        for _ in range(4):
            os.write(fd, CHUNK)  # REPORT-WRITE
    finally:
        os.close(fd)


def _hostile() -> None:
    burn(100)


hostile = types.FunctionType(_hostile.__code__.replace(co_name=HOSTILE, co_qualname=HOSTILE),
                             globals(), HOSTILE)


def janitor() -> None:
    while not stop.is_set():
        with orders_lock:
            locked.set()
            time.sleep(0.2)
        time.sleep(0.02)


@contextlib.contextmanager
def measured(tracer, name: str, truth):
    """A span whose own CPU and wall time the app records as ground truth."""
    with tracer.start_as_current_span(name) as span:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        yield
        cpu, wall = time.thread_time_ns() - c0, time.perf_counter_ns() - t0
    truth.write(json.dumps({"span_id": format(span.get_span_context().span_id, "016x"),
                            "name": name, "cpu_ns": cpu, "wall_ns": wall}) + "\n")
    truth.flush()


def serve(tracer, report: str, truth) -> None:
    repo = Repo()
    n = 0
    while not stop.is_set():
        with tracer.start_as_current_span("handle_request"):
            with measured(tracer, "checkout", truth):
                compute_prices()
            locked.clear()
            locked.wait(1.0)  # the janitor has just taken the lock
            with measured(tracer, "save_order", truth):
                repo.save()
            with measured(tracer, "load_report", truth):
                write_report(report)
            if n % 2 == 0:
                with measured(tracer, "<script>alert(1)</script>", truth):
                    hostile()
        n += 1
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("dir")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    provider = TracerProvider(resource=Resource.create({"service.name": "shop"}))
    provider.add_span_processor(SpanflameSpanProcessor())  # thread ids on every span
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=args.endpoint),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("shop")
    truth = open(os.path.join(args.dir, "truth.jsonl"), "a")
    threads = [threading.Thread(target=janitor, name="janitor", daemon=True),
               threading.Thread(target=serve, args=(tracer, os.path.join(args.dir, "report.bin"),
                                                     truth), name="server")]
    for t in threads:
        t.start()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(args.seconds)
    stop.set()
    threads[1].join()
    provider.shutdown()


if __name__ == "__main__":
    main()
