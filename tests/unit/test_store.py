import os
import time

import pytest

from agent.model import Frame, Profile, make_labels
from agent.store import Store

S = 1_000_000_000


def prof(t0, value, span=None, thread="w"):
    p = Profile([("samples", "count"), ("cpu", "nanoseconds")], period=10_000_000,
                period_type=("cpu", "nanoseconds"), time_ns=t0, duration_ns=10 * S,
                default_sample_type="cpu")
    labels = {"thread_name": thread}
    if span:
        labels.update(span_id=span, trace_id="a" * 32)
    p.add((Frame("f", "/a.py", 1),), make_labels(labels), {"samples": 1, "cpu": value})
    return p


def test_write_find_merge_and_span_index(tmp_path):
    st = Store(tmp_path)
    t0 = 1_000 * S
    st.add_profile(prof(t0, 5), type_name="cpu", service="web", pid=1,
                   labels={"service_name": "web", "pod": "web-1"}, spans=[("b" * 16, "a" * 32)])
    st.add_profile(prof(t0 + 10 * S, 7), type_name="cpu", service="web", pid=1,
                   labels={"service_name": "web", "pod": "web-1"})
    st.add_profile(prof(t0, 11, thread="x"), type_name="cpu", service="db", pid=2,
                   labels={"service_name": "db"})
    found = st.find(start_ns=t0, end_ns=t0 + 20 * S, type_name="cpu", service="web")
    assert len(found) == 2
    assert st.merged(found).total("cpu") == 12
    assert len(st.find(start_ns=t0, end_ns=t0 + 20 * S, type_name="cpu", labels={"pod": "web-1"})) == 2
    assert st.find(start_ns=t0, end_ns=t0 + 20 * S, type_name="cpu", span_id="b" * 16)[0].pid == 1
    assert st.find(start_ns=t0 + 30 * S, end_ns=t0 + 40 * S, type_name="cpu") == []
    merged = st.merged(st.find(start_ns=0, end_ns=t0 * 2, type_name="cpu"),
                       sample_labels={"thread_name": "x"})
    assert merged.total("cpu") == 11
    assert {s["service"] for s in st.services(0, t0 * 2)} == {"web", "db"}
    tl = st.timeline(start_ns=t0, end_ns=t0 + 20 * S, type_name="cpu", buckets=2)
    assert [v for _t, v in tl] == [16, 7]


def test_a_second_store_on_the_same_directory_sees_everything(tmp_path):
    st = Store(tmp_path)
    st.add_profile(prof(5 * S, 3), type_name="cpu", service="web", pid=1, labels={})
    st.add_spans([{"span_id": "c" * 16, "trace_id": "d" * 32, "name": "GET /", "service": "web",
                   "start_ns": 5 * S, "end_ns": 6 * S, "breakdown": {"cpu_ns": 1}}])
    other = Store(tmp_path)  # as after a crash: only what was committed
    assert other.merged(other.find(start_ns=0, end_ns=10 * S, type_name="cpu")).total("cpu") == 3
    assert other.trace("d" * 32)[0]["breakdown"] == {"cpu_ns": 1}
    assert other.slow_spans(start_ns=0, end_ns=10 * S)[0]["name"] == "GET /"


def test_retention_by_age_and_size(tmp_path):
    st = Store(tmp_path, retention_s=100, max_bytes=10**9)
    now = 10_000 * S
    st.add_profile(prof(now - 500 * S, 1), type_name="cpu", service="a", labels={})
    st.add_profile(prof(now - 50 * S, 2), type_name="cpu", service="a", labels={})
    assert st.enforce_retention(now) == 1
    assert st.merged(st.find(start_ns=0, end_ns=now, type_name="cpu")).total("cpu") == 2
    for i in range(10):  # incompressible profiles of 16 KiB: the size bound is the file's
        st.add_raw(os.urandom(16 << 10), start_ns=now - 40 * S + i * S,
                   end_ns=now - 39 * S + i * S, type_name="cpu", service="a", pid=0, labels={},
                   source="test")
    st.max_bytes = st.used_bytes() - 80_000
    deleted = st.enforce_retention(now)
    assert 5 <= deleted <= 7 and st.used_bytes() <= st.max_bytes
    left = st.find(start_ns=0, end_ns=now, type_name="cpu")
    assert left and all(p.start_ns >= now - 50 * S for p in left)  # the oldest went first


def test_unwritable_store_is_a_clear_error():
    from agent.errors import SpanflameError
    with pytest.raises(SpanflameError, match="cannot use store"):
        Store("/proc/spanflame-store")


def test_a_spans_breakdown_is_stored_small_and_read_back_whole(tmp_path):
    """Spans are most of a store's bytes; their breakdowns repeated the row and every zero."""
    import json
    import sqlite3

    from agent.spansummary import SpanBreakdown
    b = SpanBreakdown("e" * 32, "f" * 16, "1" * 16, "checkout", "shop", 10, 11, 5 * S, 2 * S,
                      "ok", cpu_ns=S, lock_ns=S // 2, unaccounted_ns=S // 2,
                      top={"cpu": ["burn", "/srv/shop.py", 12, S]}, cause="50% on CPU in burn")
    full = b.to_dict()
    row = {"span_id": b.span_id, "trace_id": b.trace_id, "parent_span_id": b.parent_span_id,
           "name": b.name, "service": b.service, "pid": 10, "tid": 11, "start_ns": 5 * S,
           "end_ns": 7 * S, "status": "ok", "kind": "internal", "attributes": {},
           "breakdown": full}
    st = Store(tmp_path / "s")
    st.add_spans([row])
    assert st.span(b.span_id)["breakdown"] == full
    stored = sqlite3.connect(tmp_path / "s" / "spanflame.db").execute(
        "SELECT breakdown FROM spans").fetchone()[0]
    assert len(stored) < 0.6 * len(json.dumps(full)), stored


def test_compaction_merges_a_minute_of_windows_per_series_keeping_totals_and_span_links(tmp_path):
    st = Store(tmp_path / "s")
    t0 = 6_000 * S  # a minute boundary
    for i in range(6):  # six 10 s windows of one series, each with its own span
        st.add_profile(prof(t0 + i * 10 * S, i + 1, span=f"{i:016x}"), type_name="cpu",
                       service="web", pid=1, labels={"service_name": "web"},
                       spans=[(f"{i:016x}", "a" * 32)])
    st.add_profile(prof(t0, 100, thread="x"), type_name="cpu", service="db", pid=2,
                   labels={"service_name": "db"})
    st.add_profile(prof(t0 + 55 * S, 1000), type_name="cpu", service="web", pid=1,
                   labels={"service_name": "web"})  # across the minute's end: left alone
    before = st.merged(st.find(start_ns=0, end_ns=t0 * 2, type_name="cpu"))
    assert st.compact(before_ns=t0 + 120 * S) == 5
    rows = st.find(start_ns=0, end_ns=t0 * 2, type_name="cpu")
    assert len(rows) == 3
    web = [r for r in rows if r.service == "web" and r.end_ns - r.start_ns == 60 * S]
    assert len(web) == 1 and web[0].start_ns == t0
    after = st.merged(rows)
    assert after.total("cpu") == before.total("cpu") == 21 + 100 + 1000
    for i in range(6):  # every span still finds its samples
        found = st.find(start_ns=0, end_ns=t0 * 2, type_name="cpu", span_id=f"{i:016x}")
        assert [r.id for r in found] == [web[0].id]
        assert st.merged(found, sample_labels={"span_id": f"{i:016x}"}).total("cpu") == i + 1
    assert st.compact(before_ns=t0 + 120 * S) == 0  # nothing left to merge
    assert st.compact(before_ns=t0) == 0             # nothing old enough


def test_old_spans_are_thinned_to_the_slowest_of_each_name_and_minute_with_their_traces(tmp_path):
    st = Store(tmp_path / "s")
    t0 = 6_000 * S
    rows = []
    for i in range(30):  # 30 requests in one minute, each its own trace
        rows.append({"span_id": f"{i:016x}", "trace_id": f"{i:032x}", "name": "GET /",
                     "service": "web", "start_ns": t0 + i * S, "end_ns": t0 + i * S + i * 10**6})
        rows.append({"span_id": f"{i + 100:016x}", "trace_id": f"{i:032x}", "name": "db",
                     "parent_span_id": f"{i:016x}", "service": "web",
                     "start_ns": t0 + i * S, "end_ns": t0 + i * S + 10**5 + i})
    rows.append({"span_id": "e" * 16, "trace_id": "e" * 32, "name": "GET /", "service": "web",
                 "status": "error", "start_ns": t0 + 30 * S, "end_ns": t0 + 30 * S + 1})
    st.add_spans(rows)
    assert st.thin_spans(before_ns=t0) == 0                    # nothing old enough
    deleted = 0
    while True:
        n = st.thin_spans(before_ns=t0 + 3600 * S)
        deleted += n
        if st._thinned_until >= t0 + 3600 * S:
            break
    kept = st.slow_spans(start_ns=0, end_ns=t0 * 2, name="GET /", limit=1000)
    assert sorted(int(s["span_id"], 16) for s in kept if s["status"] != "error") == \
        list(range(20, 30))                                  # the ten slowest
    assert any(s["span_id"] == "e" * 16 for s in kept)       # and the error
    for s in kept:                                           # each with its whole trace
        if s["status"] != "error":
            assert {x["name"] for x in st.trace(s["trace_id"])} == {"GET /", "db"}
    assert deleted == st.spans_thinned == 40                   # of 61: 10 + 10 + 1 kept
    assert len(st.slow_spans(start_ns=0, end_ns=t0 * 2, limit=1000)) == 21
