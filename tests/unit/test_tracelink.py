"""TraceLinker, SpanStore and span breakdowns on hand-made spans and timelines."""

from agent.aggregate import Piece
from agent.model import Frame
from agent.spans import SpanRecord, SpanStore
from agent.spansummary import SpanBreakdown, breakdowns, cause
from agent.timeline import PiecewiseCpu, Slice, ThreadTimeline
from agent.tracelink import TraceLinker

MS = 1_000_000
F = lambda n: (Frame(n, "/app.py", 1),)


def span(sid, start, end, parent="", name=None, tid=7, pid=1, trace="a" * 32):
    return SpanRecord(trace, sid, parent, name or sid, "svc", pid, tid, start * MS, end * MS)


def store(*spans):
    s = SpanStore()
    s.add(spans)
    return s


def test_innermost_span_wins_and_labels_name_the_local_root():
    st = store(span("0" * 15 + "1", 0, 100, name="request"),
               span("0" * 15 + "2", 20, 60, parent="0" * 15 + "1", name="db"))
    lk = TraceLinker(st)
    ivs = [(i.start_ns // MS, i.end_ns // MS, i.span.name if i.span else None)
           for i in lk.intervals(1, 7, 0, 120 * MS)]
    assert ivs == [(0, 20, "request"), (20, 60, "db"), (60, 100, "request"), (100, 120, None)]
    lab = dict(lk.labels(st.get("0" * 15 + "2")))
    assert lab == {"trace_id": "a" * 32, "span_id": "0" * 15 + "2", "span_name": "db",
                   "root_span_id": "0" * 15 + "1", "root_span_name": "request"}
    assert lk.span_at(1, 7, 10 * MS).name == "request"
    assert lk.span_at(1, 8, 10 * MS) is None  # another thread


def test_overlapping_spans_without_nesting_are_marked():
    st = store(span("0" * 15 + "a", 0, 50), span("0" * 15 + "b", 30, 80))  # asyncio-style
    lk = TraceLinker(st)
    ivs = lk.intervals(1, 7, 0, 80 * MS)
    assert [(i.start_ns // MS, i.span.span_id[-1], i.overlap) for i in ivs] == [
        (0, "a", False), (30, "b", True), (50, "b", False)]
    assert dict(lk.labels(ivs[1].span, True))["span_overlap"] == "1"


def test_link_pieces_cuts_at_boundaries():
    st = store(span("0" * 15 + "1", 10, 30))
    lk = TraceLinker(st)
    out = list(lk.link_pieces([Piece(1, 7, "w", 0, 40 * MS, F("f"))]))
    assert [(p.start_ns // MS, p.end_ns // MS, dict(p.extra_labels).get("span_id"))
            for p in out] == [(0, 10, None), (10, 30, "0" * 15 + "1"), (30, 40, None)]


def test_snap_moves_a_late_stack_change_onto_the_span_boundary():
    st = store(span("0" * 15 + "1", 0, 50), span("0" * 15 + "2", 50, 100))
    lk = TraceLinker(st, rate_hz=100)
    # py-spy saw g 8 ms after span 2 began (one sampling gap late): the change moves to 50 ms.
    tl = ThreadTimeline(1, 7, "w", [Slice(0, 58 * MS, F("f")), Slice(58 * MS, 100 * MS, F("g"))])
    snapped = lk.snap(tl)
    assert [(s.start_ns // MS, s.end_ns // MS) for s in snapped.slices] == [(0, 50), (50, 100)]
    assert lk.exact_changes[(1, 7)] == {50 * MS}
    # a change far from any boundary stays where it was seen
    tl2 = ThreadTimeline(1, 7, "w", [Slice(0, 90 * MS, F("f")), Slice(90 * MS, 99 * MS, F("g"))])
    assert lk.snap(tl2).slices[0].end_ns == 90 * MS


def test_store_is_bounded_and_counts_evictions():
    st = SpanStore(max_spans=3)
    st.add(span(f"{i:016x}", i, i + 1) for i in range(1, 6))
    assert len(st) == 3 and st.evicted == 2
    assert st.get(f"{1:016x}") is None and st.get(f"{5:016x}") is not None
    assert [s.span_id[-1] for s in st.thread_spans(1, 7, 0, 100 * MS)] == ["3", "4", "5"]
    assert st.unlinkable == 0
    st.add([span("f" * 16, 0, 1, tid=0)])
    assert st.unlinkable == 1


def test_breakdown_adds_up_and_names_the_cause():
    parent = span("0" * 15 + "1", 0, 100, name="handler")
    child = span("0" * 15 + "2", 60, 90, parent=parent.span_id, name="db")
    st = store(parent, child)
    cpu = PiecewiseCpu()
    cpu.add(7, 0, 0)
    cpu.add(7, 100 * MS, 30 * MS)  # 30% busy all along
    b, = breakdowns([parent], st, cpu)
    assert b.children_ns == 30 * MS
    assert b.cpu_ns == 21 * MS                # 30% of the 70 ms of its own
    assert b.unaccounted_ns == 49 * MS        # no probe data: the rest is unaccounted
    parts = (b.cpu_ns + b.lock_ns + b.gil_ns + b.io_ns + b.net_ns + b.other_ns + b.children_ns
             + b.unaccounted_ns)
    assert parts == 100 * MS
    x = SpanBreakdown("t", "s", "", "op", "svc", 1, 7, 0, 100, "ok", cpu_ns=20, lock_ns=62,
                      other_ns=18, top={"lock": ["Repo.save", "/srv/app/repo.py", 88, 62]})
    assert cause(x) == "62% waiting on a lock in Repo.save (repo.py:88)"


def test_a_parent_mostly_in_child_spans_says_what_its_children_did():
    from agent.spansummary import roll_up
    root = SpanBreakdown("t", "r", "", "checkout", "svc", 1, 7, 0, 100, "ok", cpu_ns=4,
                         children_ns=96)
    root.cause = cause(root)
    assert root.cause == "96% in child spans"
    mid = SpanBreakdown("t", "m", "r", "save_order", "svc", 1, 7, 0, 90, "ok", cpu_ns=2,
                        children_ns=80, lock_ns=8)
    leaf = SpanBreakdown("t", "l", "m", "Repo.save", "svc", 1, 7, 0, 80, "ok", lock_ns=70,
                         cpu_ns=10, top={"lock": ["Repo.save", "/srv/app/repo.py", 54, 70]})
    other = SpanBreakdown("t", "o", "r", "price", "svc", 1, 7, 0, 6, "ok", cpu_ns=6)
    unrelated = SpanBreakdown("u", "x", "", "other", "svc", 1, 7, 0, 50, "ok", io_ns=50)
    for b in (mid, leaf, other, unrelated):
        b.cause = cause(b)
    roll_up([root, mid, leaf, other, unrelated])
    assert root.cause == ("96% in child spans: mostly waiting on a lock in Repo.save "
                          "(repo.py:54), in Repo.save")
    assert mid.cause.startswith("89% in child spans: mostly waiting on a lock")
    assert leaf.cause == "88% waiting on a lock in Repo.save (repo.py:54)"  # not a parent


def test_a_span_partly_outside_every_window_says_that_part_was_not_observed():
    """A span that began before the agent watched its process: what the window saw of it is its
    last fifth; the cause must not pass that fifth off as the whole span."""
    from agent.spansummary import unobserved_ns
    s = span("0" * 15 + "3", 0, 100, name="early")
    cpu = PiecewiseCpu()
    cpu.add(7, 0, 0)
    cpu.add(7, 100 * MS, 100 * MS)  # on CPU all along
    b, = breakdowns([s], store(s), cpu, window=(80 * MS, 200 * MS))
    assert b.cpu_ns == 20 * MS
    assert b.cause == "80% not observed"
    d = b.to_dict()
    assert d["unobserved_ns"] == 80 * MS
    # the window with its first part adds the rest (as the agent merges windows): all observed
    d["cpu_ns"] += 80 * MS
    assert unobserved_ns(d) == 0
    whole, = breakdowns([s], store(s), cpu, window=(0, 200 * MS))
    assert whole.cause.startswith("100% on CPU") and whole.to_dict()["unobserved_ns"] == 0
