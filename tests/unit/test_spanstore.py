"""SpanStore bounds: by bytes, eviction cost independent of the order of starts, nothing kept
per process once its spans are gone."""

from __future__ import annotations

import time
import tracemalloc

from agent.spans import SpanRecord, SpanStore, span_bytes


def _span(i: int, *, pid: int = 4242, tid: int = 4300, start_ns: int | None = None,
          attrs: int = 6, value_len: int = 10) -> SpanRecord:
    start = 10**18 + i * 1000 if start_ns is None else start_ns
    return SpanRecord(trace_id=f"{i // 8 + 1:032x}", span_id=f"{i + 1:016x}",
                      parent_span_id="", name="GET /x", service="shop", pid=pid, tid=tid,
                      start_ns=start, end_ns=start + 500,
                      attributes=tuple((f"k{j}", f"{i:08d}" + "v" * value_len)
                                       for j in range(attrs)))


def test_bounded_by_bytes_with_large_attributes():
    """Spans with 16 attributes of 256 characters: the store stays near its byte bound (the
    count bound alone let 200k of them take 1.7 GiB) and counts what it dropped."""
    bound = 4 << 20
    st = SpanStore(max_bytes=bound)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for b in range(20):
            st.add([_span(b * 500 + i, attrs=16, value_len=248) for i in range(500)])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert st.bytes <= bound
    assert st.evicted == 10_000 - len(st) and st.evicted > 0
    assert held < bound * 1.3, f"{held} bytes held for a bound of {bound}"
    assert len(st) > 0.8 * bound / span_bytes(_span(0, attrs=16, value_len=248))


def test_estimate_is_not_below_what_a_span_costs():
    st = SpanStore(max_bytes=1 << 40)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        spans = [_span(i) for i in range(20_000)]
        st.add(spans)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held <= st.bytes * 1.1, (held, st.bytes)


def test_eviction_of_one_thread_with_decreasing_starts_is_fast():
    """200k spans of one thread arriving newest-start-first, through a store that holds 100k:
    every batch is added in well under a second of CPU (a linear search per eviction took 5.8 s)."""
    st = SpanStore(max_spans=100_000, max_bytes=1 << 40)
    slowest = 0.0
    for b in range(400):
        batch = [_span(b * 500 + i, start_ns=10**18 - (b * 500 + i) * 1000, attrs=0)
                 for i in range(500)]
        t0 = time.thread_time()  # CPU, not wall: the test machine may be busy
        st.add(batch)
        slowest = max(slowest, time.thread_time() - t0)
        assert slowest < 1.0, f"batch {b} took {slowest:.1f} s of CPU"
    assert len(st) == 100_000 and st.evicted == 100_000
    # what is held is still found by time, and nothing evicted is
    got = st.thread_spans(4242, 4300, 0, 1 << 62)
    assert len(got) == 100_000
    assert [s.start_ns for s in got] == sorted(s.start_ns for s in got)
    assert st.get(f"{1:016x}") is None and st.get(f"{200_000:016x}") is not None


def test_per_process_state_goes_with_its_spans():
    """A million short-lived processes must not leave a service name or a latest start each."""
    st = SpanStore(max_spans=1000, max_bytes=1 << 40)
    for b in range(100):
        st.add([_span(b * 1000 + i, pid=10 + b * 1000 + i, tid=7, attrs=0) for i in range(1000)])
    assert len(st) == 1000
    assert len(st.services) == 1000 and len(st._latest) == 1000 and len(st.pids()) == 1000
    assert len(st._by_thread) == 1000 and len(st._by_trace) <= 1000
    assert st.latest_start(10) is None and st.services.get(10) is None
    last = 10 + 99_999
    assert st.latest_start(last) is not None and st.services[last] == "shop"


def test_tasks_and_threads_evicted_together():
    st = SpanStore(max_spans=10, max_bytes=1 << 40)
    st.add([SpanRecord(f"{1:032x}", f"{i + 1:016x}", "", "t", "svc", 5, 6, i * 10, i * 10 + 5,
                       task=99) for i in range(30)])
    assert len(st) == 10
    assert len(st.task_spans(5, 99, 0, 1000)) == 10
    assert len(st.thread_spans(5, 6, 0, 1000)) == 10
    st.add([SpanRecord(f"{2:032x}", f"{100 + i:016x}", "", "t", "svc", 8, 9, i, i + 1)
            for i in range(10)])
    assert st.task_spans(5, 99, 0, 1000) == [] and st.threads_of(5) == []
    assert 5 not in st.services
