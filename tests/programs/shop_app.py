"""An OpenTelemetry-instrumented "shop" with known slow spans, for the web UI tests.

Every request is a trace: a root span `handle_request` with three children, one after another:
  `checkout`     CPU-bound: ~150 ms of CPU in compute_prices()
  `save_order`   lock-bound: Repo.save() waits ~200 ms for a lock that the "janitor" thread
                 (no spans) holds while it sleeps
  `load_report`  IO-bound: write_report() writes and fsyncs 24 MiB in a file under DIR
and, every other request, a span named `<script>alert(1)</script>` whose CPU goes to a function
named `<img src=x onerror=alert(1)>`: hostile strings the UI must show as text.

Usage: shop_app.py ENDPOINT DIR [--seconds S]
Prints {"pid"} when ready, runs S seconds, flushes its spans and exits.
"""

import argparse
import json
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


REPORT = os.urandom(24 << 20)


def write_report(path: str) -> None:
    with open(path, "wb") as f:
        f.write(REPORT)
        f.flush()
        os.fsync(f.fileno())  # REPORT-FSYNC


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


def serve(tracer, report: str) -> None:
    repo = Repo()
    n = 0
    while not stop.is_set():
        with tracer.start_as_current_span("handle_request"):
            with tracer.start_as_current_span("checkout"):
                compute_prices()
            locked.clear()
            locked.wait(1.0)  # the janitor has just taken the lock
            with tracer.start_as_current_span("save_order"):
                repo.save()
            with tracer.start_as_current_span("load_report"):
                write_report(report)
            if n % 2 == 0:
                with tracer.start_as_current_span("<script>alert(1)</script>"):
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
    threads = [threading.Thread(target=janitor, name="janitor", daemon=True),
               threading.Thread(target=serve, args=(tracer, os.path.join(args.dir, "report.bin")),
                                name="server")]
    for t in threads:
        t.start()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(args.seconds)
    stop.set()
    threads[1].join()
    provider.shutdown()


if __name__ == "__main__":
    main()
