"""Span linking costs: OTLP ingest per span, TraceLinker per sample, memory for 100k spans.

Synthetic spans: 100 threads, each running back-to-back requests of 3 nested spans (10-50 ms).
Samples: pieces of 1-20 ms at random times on random threads, as timelines produce them.

    python -m bench.linker [--spans 100000] [--samples 200000]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.aggregate import Piece
from agent.model import Frame
from agent.spans import SpanStore, from_otlp
from agent.tracelink import TraceLinker

MS = 1_000_000


def make_requests(n_spans: int, threads: int = 100, per_request: int = 1000, seed: int = 1):
    """ExportTraceServiceRequests holding n_spans spans in total."""
    rng = random.Random(seed)
    clock = {t: 1_700_000_000_000_000_000 for t in range(threads)}
    reqs, sid = [], 1
    req = None
    count = 0
    while count < n_spans:
        if req is None or count % per_request == 0:
            req = trace_service_pb2.ExportTraceServiceRequest()
            rs = req.resource_spans.add()
            kv = rs.resource.attributes.add()
            kv.key, kv.value.string_value = "service.name", "bench"
            ss = rs.scope_spans.add()
            reqs.append(req)
        tid = rng.randrange(threads)
        start = clock[tid]
        dur = rng.randint(10, 50) * MS
        trace = rng.getrandbits(128).to_bytes(16, "big")
        parent = b""
        for depth in range(3):
            sp = ss.spans.add(trace_id=trace, span_id=sid.to_bytes(8, "big"),
                              parent_span_id=parent, name=f"op{depth}",
                              start_time_unix_nano=start + depth * MS,
                              end_time_unix_nano=start + dur - depth * MS)
            for key, val in (("spanflame.pid", 1), ("spanflame.tid", 1000 + tid)):
                a = sp.attributes.add()
                a.key, a.value.int_value = key, val
            parent = sid.to_bytes(8, "big")
            sid += 1
            count += 1
        clock[tid] = start + dur + rng.randint(0, 5) * MS
    return reqs, clock


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=200_000)
    args = ap.parse_args(argv)
    reqs, clock = make_requests(args.spans)
    blobs = [r.SerializeToString() for r in reqs]
    def ingest() -> SpanStore:
        store = SpanStore(max_spans=args.spans * 2)
        for b in blobs:
            req = trace_service_pb2.ExportTraceServiceRequest.FromString(b)
            spans, _ = from_otlp(req)
            store.add(spans)
        return store

    gc.collect()
    t0 = time.perf_counter()
    store = ingest()
    ingest_s = time.perf_counter() - t0
    del store
    gc.collect()
    tracemalloc.start()
    store = ingest()
    gc.collect()
    held, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    rng = random.Random(2)
    lo = 1_700_000_000_000_000_000
    hi = max(clock.values())
    stack = (Frame("handler", "/app.py", 10),)
    pieces = []
    for _ in range(args.samples):
        tid = 1000 + rng.randrange(100)
        a = rng.randrange(lo, hi)
        pieces.append(Piece(1, tid, "w", a, a + rng.randint(1, 20) * MS, stack))
    linker = TraceLinker(store, window=(lo, hi + 60 * MS))
    t0 = time.perf_counter()
    for tid in range(1000, 1100):  # each thread's spans become a step function once per window
        linker._steps_for(1, tid)
    steps_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sum(1 for _ in linker.link_pieces(pieces))
    link_s = time.perf_counter() - t0
    summary = {
        "benchmark": "linker", "spans": len(store), "samples": args.samples,
        "ingest_us_per_span": round(ingest_s / len(store) * 1e6, 2),
        "step_function_us_per_span": round(steps_s / len(store) * 1e6, 2),
        "link_us_per_sample": round(link_s / args.samples * 1e6, 2),
        "pieces_out": out,
        "memory_mib_for_spans": round(held / 2**20, 1),
        "bytes_per_span": round(held / len(store)),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
