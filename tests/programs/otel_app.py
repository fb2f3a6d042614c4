"""A real OpenTelemetry SDK app exporting spans over OTLP/HTTP, for span-linking tests.

Three threads run spans at once, each measuring its own ground truth (thread CPU per span):
  "cruncher":  spans `cpu_span` (300 ms of CPU in crunch_numbers()) and, in between, spans
               `short_span` (20 ms of CPU in short_burst()).
  "nester":    spans `parent_op`: parent_own_work() (80 ms CPU), a child span `child_op`
               running child_work() (120 ms CPU), then parent_own_work() again.
  "locker":    spans `locked_op` waiting ~150 ms for a lock in wait_on_lock(); a helper thread
               "holder" (no spans) holds the lock while sleeping.

Usage: otel_app.py ENDPOINT REPORT [--no-processor] [--seconds S]
Prints {"pid"} when ready, waits for a line on stdin, runs S seconds, shuts the SDK down (which
flushes spans), writes {"spans": {span_id: {"name", "thread", "cpu_ns", "start", "end"}}}.
"""

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent.otel import SpanflameSpanProcessor  # noqa: E402

truth: dict = {}
truth_lock = threading.Lock()
stop = threading.Event()
lock = threading.Lock()


def burn(cpu_ms: float) -> None:
    end = time.thread_time() + cpu_ms / 1000
    x = 0
    while time.thread_time() < end:
        x += 1


def crunch_numbers() -> None:
    burn(300)  # CRUNCH


def short_burst() -> None:
    burn(20)  # SHORT


def parent_own_work() -> None:
    burn(80)  # PARENT-WORK


def child_work() -> None:
    burn(120)  # CHILD-WORK


def wait_on_lock() -> None:
    with lock:  # WAIT-LOCK
        pass


def record(span, t0: float, c0: int) -> None:
    ctx = span.get_span_context()
    with truth_lock:
        truth[format(ctx.span_id, "016x")] = {
            "name": span.name, "thread": threading.current_thread().name,
            "cpu_ns": time.thread_time_ns() - c0, "start": t0, "end": time.time_ns()}


def traced(tracer, name, fn, *fns):
    with tracer.start_as_current_span(name) as span:
        t0, c0 = time.time_ns(), time.thread_time_ns()
        fn()
        for f in fns:
            f()
        record(span, t0, c0)


def cruncher(tracer) -> None:
    while not stop.is_set():
        traced(tracer, "cpu_span", crunch_numbers)
        for _ in range(3):
            traced(tracer, "short_span", short_burst)
            time.sleep(0.01)


def nester(tracer) -> None:
    def child():
        traced(tracer, "child_op", child_work)
    while not stop.is_set():
        traced(tracer, "parent_op", parent_own_work, child, parent_own_work)
        time.sleep(0.02)


def locker(tracer) -> None:
    while not stop.is_set():
        traced(tracer, "locked_op", wait_on_lock)
        time.sleep(0.05)


def holder() -> None:
    while not stop.is_set():
        with lock:
            time.sleep(0.15)
        time.sleep(0.06)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("report")
    ap.add_argument("--no-processor", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0)
    args = ap.parse_args()
    provider = TracerProvider(resource=Resource.create({"service.name": "span-test"}))
    if not args.no_processor:
        provider.add_span_processor(SpanflameSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=args.endpoint),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("span-test")
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    threads = [threading.Thread(target=cruncher, args=(tracer,), name="cruncher"),
               threading.Thread(target=nester, args=(tracer,), name="nester"),
               threading.Thread(target=locker, args=(tracer,), name="locker"),
               threading.Thread(target=holder, name="holder")]
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join()
    provider.shutdown()
    with open(args.report, "w") as f:
        json.dump({"spans": truth}, f)


if __name__ == "__main__":
    main()
