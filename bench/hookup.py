"""What the app-side hookup (SpanflameSpanProcessor) adds to a span's start and end.

Spans are made with a real OpenTelemetry SDK TracerProvider and no exporter, with and without
the processor, in alternating rounds (paired: one round each way, adjacent in time), in a plain
thread and inside an asyncio task (where the hookup also records the task and keeps its registry
of tasks with open spans). Reported: the median difference per span, in ns.

    python -m bench.hookup [--rounds 21] [--spans 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from opentelemetry.sdk.trace import TracerProvider

from agent.otel import SpanflameSpanProcessor


def tracer(with_hookup: bool):
    provider = TracerProvider()
    if with_hookup:
        provider.add_span_processor(SpanflameSpanProcessor())
    return provider.get_tracer("bench")


def per_span_ns(t, n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with t.start_as_current_span("s"):
            pass
    return (time.perf_counter_ns() - t0) / n


async def in_task(t, n: int) -> float:
    return await asyncio.get_running_loop().create_task(_task_body(t, n))


async def _task_body(t, n: int) -> float:
    return per_span_ns(t, n)


def measure(rounds: int, n: int, where: str) -> dict:
    plain, hooked = tracer(False), tracer(True)
    run = (lambda t: per_span_ns(t, n)) if where == "thread" else \
        (lambda t: asyncio.run(in_task(t, n)))
    run(plain), run(hooked)  # warm up
    diffs, base = [], []
    for i in range(rounds):
        order = (plain, hooked) if i % 2 == 0 else (hooked, plain)
        got = {id(t): run(t) for t in order}
        diffs.append(got[id(hooked)] - got[id(plain)])
        base.append(got[id(plain)])
    return {"where": where, "rounds": rounds, "spans_per_round": n,
            "span_ns_without": round(statistics.median(base)),
            "added_ns_per_span": round(statistics.median(diffs))}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--spans", type=int, default=20000)
    args = ap.parse_args(argv)
    out = []
    for where in ("thread", "asyncio task"):
        r = measure(args.rounds, args.spans, where)
        print(f"hookup in a {where}: +{r['added_ns_per_span']} ns per span (start and end), "
              f"on spans of {r['span_ns_without']} ns without it "
              f"(median of {r['rounds']} paired rounds)", flush=True)
        out.append(r)
    return out


if __name__ == "__main__":
    main()
