"""The UI's server-side logic over a real (temporary) store: views, descendants, diffs, sampling,
the read-only store."""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

import pytest

from agent.errors import SpanflameError
from agent.model import Frame, Profile
from agent.store import Store
from agent.ui import MAX_MERGED_PROFILES, View, descendants, flamegraph_document
from flamegraph.html import flamegraph_data

S = 1_000_000_000
MAIN = Frame("main", "app.py", 1)


def prof(t0: int, fn: str, ns: int, span: tuple[str, str] | None = None, type_name="cpu"):
    p = Profile([(type_name, "nanoseconds")], time_ns=t0, duration_ns=10 * S,
                default_sample_type=type_name)
    labels = (("span_id", span[0]), ("trace_id", span[1])) if span else ()
    p.add((Frame(fn, "app.py", 2), MAIN), labels, {type_name: ns})
    return p


def span_row(sid, tid, parent, name, a, b):
    return {"span_id": sid, "trace_id": tid, "parent_span_id": parent, "name": name,
            "service": "svc", "pid": 1, "tid": 2, "start_ns": a, "end_ns": b, "breakdown": None}


@pytest.fixture()
def agent(tmp_path):
    store = Store(tmp_path / "s")
    yield SimpleNamespace(store=store, spans=None)
    store.close()


def test_descendants_follow_the_tree_and_ignore_other_branches():
    rows = [span_row("a", "t", "", "root", 0, 10), span_row("b", "t", "a", "x", 1, 5),
            span_row("c", "t", "b", "y", 2, 3), span_row("d", "t", "", "other", 0, 10)]
    assert descendants(rows, "a") == {"a", "b", "c"}
    assert descendants(rows, "b") == {"b", "c"}
    assert descendants(rows, "d") == {"d"}


def test_span_view_keeps_only_its_samples_and_descendants_add_children(agent):
    t0 = 100 * S
    tid = "ab" * 16
    root, child, other = "1" * 16, "2" * 16, "3" * 16
    p = prof(t0, "root_work", 5 * S, (root, tid))
    p.merge(prof(t0, "child_work", 3 * S, (child, tid)))
    p.merge(prof(t0, "other_work", 7 * S, (other, "cd" * 16)))
    agent.store.add_profile(p, type_name="cpu", service="svc", pid=1,
                            spans=[(root, tid), (child, tid), (other, "cd" * 16)])
    agent.store.add_spans([span_row(root, tid, "", "root", t0, t0 + 9 * S),
                           span_row(child, tid, root, "child", t0 + S, t0 + 5 * S)])
    only = View(agent, {"span_id": root, "type": "all"}).profile()
    assert only.total("cpu") == 5 * S
    both = View(agent, {"span_id": root, "descendants": "1", "type": "all"}).profile()
    assert both.total("cpu") == 8 * S
    names = {f.name for (st, _l) in both.samples for f in st}
    assert "other_work" not in names and {"root_work", "child_work"} <= names


def test_compare_averages_the_other_spans_of_the_same_name(agent):
    tid = "ef" * 16
    for i, ns in enumerate([2 * S, 4 * S, 6 * S]):  # three spans named "op"
        sid = f"{i + 1:016x}"
        t0 = (100 + 20 * i) * S
        agent.store.add_profile(prof(t0, "work", ns, (sid, tid)), type_name="cpu", service="svc",
                                pid=1, spans=[(sid, tid)])
        agent.store.add_spans([{**span_row(sid, tid, "", "op", t0, t0 + 9 * S),
                                "breakdown": {"cpu_ns": ns, "cause": "on CPU"}}])
    # A span whose window was not linked yet (no breakdown, no samples): not in the average.
    agent.store.add_spans([span_row(f"{9:016x}", tid, "", "op", 110 * S, 119 * S)])
    fmt, data, _ = flamegraph_document(agent, {"span_id": f"{1:016x}", "compare": "1"})
    assert data["diff"] and data["baseline_spans"] == 2
    cpu = next(t for t in data["types"] if t["name"] == "cpu")
    assert cpu["total"] == 2 * S
    assert cpu["baseline_total"] == 5 * S  # (4 + 6) / 2
    assert cpu["tree"][7] == 5 * S  # the root node carries the baseline too


def test_a_long_range_is_estimated_from_a_bounded_number_of_profiles(agent):
    n = MAX_MERGED_PROFILES * 3
    for i in range(n):
        agent.store.add_profile(prof(i * 10 * S, "tick", S), type_name="cpu", service="svc", pid=1)
    view = View(agent, {"from": "0", "until": str(n * 10), "service": "svc"})
    p = view.profile()
    assert view.sampled == (MAX_MERGED_PROFILES, n)
    assert p.total("cpu") == n * S  # every profile alike: the estimate is exact
    fmt, data, _ = flamegraph_document(agent, {"from": "0", "until": str(n * 10), "service": "svc"})
    assert "estimated from 60 of 180" in data["subtitle"]
    # A range holding few profiles is exact.
    assert View(agent, {"from": "0", "until": "10", "service": "svc"}).sampled is None


def test_flamegraph_diff_scales_the_baseline():
    cur = prof(0, "f", 10)
    base = prof(0, "f", 30)
    base.merge(prof(0, "g", 10))
    data = flamegraph_data(cur, baseline=base, baseline_scale=0.5)
    t = data["types"][0]
    assert t["baseline_total"] == 20
    main = t["tree"][6][0]
    assert main[3] == 10 and main[7] == 20
    f = next(c for c in main[6] if data["strings"][c[0]] == "f")
    assert f[7] == 15


def test_read_only_store_needs_an_existing_store_and_never_writes(tmp_path):
    with pytest.raises(SpanflameError, match="no spanflame store"):
        Store(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()
    w = Store(tmp_path / "s")
    w.add_profile(prof(0, "f", 1), type_name="cpu", service="svc", pid=1)
    w.add_profile(prof(0, "g", 1, type_name="lock_wait"), type_name="lock_wait", service="svc", pid=1)
    r = Store(tmp_path / "s", read_only=True)
    assert r.types(0, 20 * S) == ["cpu", "lock_wait"]
    assert len(r.find(start_ns=0, end_ns=20 * S, type_name="cpu")) == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        r.add_profile(prof(0, "h", 1), type_name="cpu", service="svc")
    r.close()
    w.close()


def test_services_come_from_the_series_table_with_pods_and_old_stores_are_backfilled(tmp_path):
    w = Store(tmp_path / "s")
    k8s = {"service_name": "shop", "namespace": "prod", "pod": "shop-7d9"}
    w.add_profile(prof(0, "f", 1), type_name="cpu", service="shop", pid=7, labels=k8s)
    w.add_profile(prof(10 * S, "f", 1), type_name="cpu", service="shop", pid=7, labels=k8s)
    w.add_profile(prof(0, "g", 1, type_name="lock_wait"), type_name="lock_wait", service="shop",
                  pid=8, labels={"service_name": "shop"})
    w.add_profile(prof(50 * S, "h", 1), type_name="cpu", service="batch", pid=9)
    got = {d["service"]: d for d in w.services(0, 20 * S)}
    assert set(got) == {"shop"}  # batch's only profile starts later
    assert got["shop"]["types"] == ["cpu", "lock_wait"] and got["shop"]["pids"] == [7, 8]
    assert got["shop"]["pods"] == ["prod/shop-7d9"]
    assert got["shop"]["until_ns"] == 20 * S
    # A store from before the series table: rebuilt from the profiles when opened for writing.
    con = w._con()
    con.execute("DELETE FROM series")
    w.close()
    again = Store(tmp_path / "s")
    assert {d["service"] for d in again.services()} == {"shop", "batch"}
    again.close()


def test_views_without_sample_labels_take_the_fast_path_with_the_same_result(agent):
    for i in range(5):
        p = Profile([("samples", "count"), ("cpu", "nanoseconds")], time_ns=i * 10 * S,
                    duration_ns=10 * S, default_sample_type="cpu")
        for thread, fn, ns in (("a", "work_a", 3 * S), ("b", "work_b", S)):
            p.add((Frame(fn, "app.py", 2 + i), MAIN), (("thread_name", thread),),
                  {"samples": 1, "cpu": ns})
        agent.store.add_profile(p, type_name="cpu", service="svc", pid=1)
    q = {"from": "0", "until": "50", "service": "svc", "type": "cpu"}
    view = View(agent, q)
    assert view.fast()
    _f, fast, _h = flamegraph_document(agent, q)
    slow = flamegraph_data(view.profile(), types=["cpu"], default_type="cpu")
    assert fast["types"][0]["total"] == slow["types"][0]["total"] == 20 * S

    def named(doc):
        S_ = doc["strings"]
        def walk(a):
            return (S_[a[0]], S_[a[1]], a[2], a[3], a[4], sorted(walk(c) for c in a[6]))
        return walk(doc["types"][0]["tree"]), [(S_[r[0]], r[3], r[4]) for r in doc["types"][0]["top"]]
    assert named(fast) == named(slow)
    # A filter on sample labels needs the labels: the full path, and only thread a's samples.
    q2 = dict(q, thread_name="a")
    assert not View(agent, q2).fast()
    _f, filtered, _h = flamegraph_document(agent, q2)
    assert filtered["types"][0]["total"] == 15 * S


def test_decode_paths_rejects_bad_input_like_decode():
    from agent import pprof
    from agent.errors import ProfileDecodeError
    from flamegraph.calltree import Paths

    with pytest.raises(ProfileDecodeError):
        pprof.decode_paths(b"\x1f\x8bnot gzip at all", "cpu", Paths())
    data = pprof.encode(prof(0, "f", 5))
    assert pprof.decode_paths(data, "lock_wait", Paths()) is False
    paths = Paths()
    assert pprof.decode_paths(data, "cpu", paths) is True
    assert sum(paths.paths.values()) == 5
    assert [paths.info[i].name for i in next(iter(paths.paths))] == ["main", "f"]
