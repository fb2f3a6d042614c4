"""TraceLinker: label every sample with the innermost span active on its thread at its time.

Labels: `trace_id` (32 hex), `span_id` (16 hex), `span_name`, and the local root's
`root_span_id` and `root_span_name` (the endpoint). They are per sample, never per series, so
the number of series stays bounded however many spans there are.

Rules:
- On one synchronous thread spans nest: the innermost active span is the one that started last.
- asyncio: a span that started in a task (`spanflame.task`) belongs to that task, not to its
  thread. With `tasks=True` (the kernel walker, whose records name the task they ran in), a
  record in a task takes the innermost span of that task, and a record outside tasks (the event
  loop's own code, its epoll waits) only spans that started outside tasks: requests that share
  the loop thread never get each other's samples.
- Without task identity (py-spy), spans that overlap without nesting on one thread (asyncio tasks
  sharing the loop thread) get the thread rule, the most recently started active span wins, and
  such samples carry `span_overlap=1` so that nobody mistakes them for exact.
- A stack change py-spy saw near a span boundary on the same thread is moved onto the boundary:
  span boundaries are function calls and returns, py-spy sees the change one sampling gap late,
  and its clock is a few milliseconds off (docs/architecture.md). Without this, up to half a
  sampling gap of every short span would carry the previous span's function.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Iterator

from agent.aggregate import Piece
from agent.model import Labels
from agent.spans import SpanRecord, SpanStore
from agent.timeline import Slice, ThreadTimeline

#: How far before a stack change a span boundary may be to take it (three sampling gaps: the
#: next sample comes later than that one time in twenty), and how far after it (py-spy's clock
#: error), in sampling gaps and nanoseconds.
SNAP_BEFORE_GAPS = 3.0
SNAP_AFTER_NS = 3_000_000


@dataclass(frozen=True, slots=True)
class Interval:
    start_ns: int
    end_ns: int
    span: SpanRecord | None
    overlap: bool = False


class _Steps:
    """The innermost span of one thread as a step function of time: at times[i] it becomes
    spans[i] (None outside spans), overlaps[i] telling whether that is ambiguous."""

    __slots__ = ("times", "spans", "overlaps")

    def __init__(self, spans: list[SpanRecord]) -> None:
        events = []
        for s in spans:
            events.append((s.start_ns, 1, s))
            events.append((s.end_ns, 0, s))
        events.sort(key=lambda e: (e[0], e[1]))
        active: dict[str, SpanRecord] = {}
        self.times: list[int] = []
        self.spans: list[SpanRecord | None] = []
        self.overlaps: list[bool] = []
        i = 0
        while i < len(events):
            t = events[i][0]
            while i < len(events) and events[i][0] == t:
                _t, kind, sp = events[i]
                if kind:
                    active[sp.span_id] = sp
                else:
                    active.pop(sp.span_id, None)
                i += 1
            if active:
                inner = max(active.values(), key=lambda s: (s.start_ns, -s.end_ns))
                overlap = any(not (a.start_ns <= inner.start_ns and inner.end_ns <= a.end_ns)
                              for a in active.values())
            else:
                inner, overlap = None, False
            if self.spans and self.spans[-1] is inner and self.overlaps[-1] == overlap:
                continue
            self.times.append(t)
            self.spans.append(inner)
            self.overlaps.append(overlap)

    def split(self, a: int, b: int) -> list[Interval]:
        times = self.times
        i = bisect.bisect_right(times, a) - 1
        out = []
        cur = a
        while cur < b:
            span = self.spans[i] if i >= 0 else None
            overlap = self.overlaps[i] if i >= 0 else False
            nxt = times[i + 1] if i + 1 < len(times) else b
            end = min(b, nxt)
            out.append(Interval(cur, end, span, overlap))
            cur = end
            i += 1
        return out


class TraceLinker:
    """Reads spans from a SpanStore; thread-safe as far as the store is.

    With `window` (start, end), each thread's spans in it are read once and turned into a step
    function (fast: microseconds per sample); without, every lookup asks the store.
    """

    def __init__(self, store: SpanStore, rate_hz: int = 100,
                 window: tuple[int, int] | None = None, tasks: bool = False) -> None:
        self.store = store
        #: records carry the asyncio task they ran in: task spans are matched by task only
        self.tasks = tasks
        self.gap_ns = round(1e9 / rate_hz)
        self.window = window
        self._steps: dict[tuple[int, int], _Steps] = {}
        self._labels: dict[tuple[str, bool], Labels] = {}
        #: (pid, tid) -> stack changes snap() put on span boundaries (exact times)
        self.exact_changes: dict[tuple[int, int], set[int]] = {}
        self.linked = 0
        self.unlinked = 0

    # -- span lookup ----------------------------------------------------------------------------
    def _steps_for(self, pid: int, tid: int) -> _Steps:
        st = self._steps.get((pid, tid))
        if st is None:
            lo, hi = self.window
            spans = self.store.thread_spans(pid, tid, lo, hi)
            if self.tasks:
                spans = [s for s in spans if not s.task]
            st = self._steps[(pid, tid)] = _Steps(spans)
        return st

    def thread_has_spans(self, pid: int, tid: int) -> bool:
        """Whether the thread has a span (outside tasks, with `tasks`) in the linker's window;
        needs `window`."""
        return bool(self._steps_for(pid, tid).times)

    def _task_steps(self, pid: int, task: int) -> _Steps:
        key = (pid, -task)  # tasks are object addresses, tids small positive numbers
        st = self._steps.get(key)
        if st is None:
            lo, hi = self.window if self.window is not None else (0, 1 << 62)
            st = self._steps[key] = _Steps(self.store.task_spans(pid, task, lo, hi))
        return st

    def intervals(self, pid: int, tid: int, start_ns: int, end_ns: int) -> list[Interval]:
        """[start_ns, end_ns) cut at every span boundary of the thread, each part with its
        innermost span (None outside spans)."""
        if self.window is not None and self.window[0] <= start_ns and end_ns <= self.window[1]:
            return self._steps_for(pid, tid).split(start_ns, end_ns)
        spans = self.store.thread_spans(pid, tid, start_ns, end_ns)
        if not spans:
            return [Interval(start_ns, end_ns, None)]
        cuts = {start_ns, end_ns}
        for s in spans:
            if start_ns < s.start_ns < end_ns:
                cuts.add(s.start_ns)
            if start_ns < s.end_ns < end_ns:
                cuts.add(s.end_ns)
        points = sorted(cuts)
        out = []
        for a, b in zip(points, points[1:]):
            active = [s for s in spans if s.start_ns <= a and s.end_ns >= b]
            if not active:
                out.append(Interval(a, b, None))
                continue
            inner = max(active, key=lambda s: (s.start_ns, -s.end_ns))
            overlap = any(not (s.start_ns <= inner.start_ns and inner.end_ns <= s.end_ns)
                          for s in active)
            out.append(Interval(a, b, inner, overlap))
        return out

    def span_at(self, pid: int, tid: int, t_ns: int) -> SpanRecord | None:
        """The innermost span of the thread at t_ns."""
        if self.window is not None and self.window[0] <= t_ns < self.window[1]:
            st = self._steps_for(pid, tid)
            return st.split(t_ns, t_ns + 1)[0].span if st.times else None
        for iv in self.intervals(pid, tid, t_ns, t_ns + 1):
            return iv.span
        return None

    def labels(self, span: SpanRecord | None, overlap: bool = False) -> Labels:
        """The span labels of a sample (empty outside spans)."""
        if span is None:
            return ()
        key = (span.span_id, overlap)
        lab = self._labels.get(key)
        if lab is None:
            root = self.store.local_root(span)
            items = [("trace_id", span.trace_id), ("span_id", span.span_id),
                     ("span_name", span.name), ("root_span_id", root.span_id),
                     ("root_span_name", root.name)]
            if overlap:
                items.append(("span_overlap", "1"))
            lab = self._labels[key] = tuple(items)
        return lab

    # -- timelines and pieces -----------------------------------------------------------------
    def boundaries(self, pid: int, tid: int, start_ns: int, end_ns: int) -> list[int]:
        cuts = set()
        for s in self.store.thread_spans(pid, tid, start_ns, end_ns):
            cuts.add(s.start_ns)
            cuts.add(s.end_ns)
        return sorted(cuts)

    def snap(self, tl: ThreadTimeline) -> ThreadTimeline:
        """A copy of `tl` with stack changes moved onto nearby span boundaries of its thread."""
        sl = tl.slices
        if len(sl) < 2:
            return tl
        cuts = self.boundaries(tl.pid, tl.tid, sl[0].start_ns, sl[-1].end_ns)
        if not cuts:
            return tl
        before = round(self.gap_ns * SNAP_BEFORE_GAPS)
        starts = [s.start_ns for s in sl]
        ends = [s.end_ns for s in sl]
        for k in range(1, len(sl)):
            c = starts[k]
            if ends[k - 1] != c or sl[k - 1].stack == sl[k].stack:
                continue
            lo = max(starts[k - 1] + 1, c - before)
            hi = min(ends[k] - 1, c + SNAP_AFTER_NS)
            i = bisect.bisect_left(cuts, lo)
            best = None
            while i < len(cuts) and cuts[i] <= hi:
                if best is None or abs(cuts[i] - c) < abs(best - c):
                    best = cuts[i]
                i += 1
            if best is not None:
                ends[k - 1] = starts[k] = best
                self.exact_changes.setdefault((tl.pid, tl.tid), set()).add(best)
        return ThreadTimeline(tl.pid, tl.tid, tl.name,
                              [Slice(a, b, s.stack) for a, b, s in zip(starts, ends, sl) if b > a])

    def link_pieces(self, pieces: Iterable[Piece]) -> Iterator[Piece]:
        """Cut pieces at span boundaries and label each part with its innermost span."""
        for p in pieces:
            for iv in self.intervals(p.pid, p.tid, p.start_ns, p.end_ns):
                if iv.span is None:
                    self.unlinked += 1
                else:
                    self.linked += 1
                yield Piece(p.pid, p.tid, p.thread_name, iv.start_ns, iv.end_ns, p.stack,
                            p.extra_labels + self.labels(iv.span, iv.overlap))

    def task_span_at(self, pid: int, task: int, t_ns: int) -> SpanRecord | None:
        """The innermost span of an asyncio task at t_ns."""
        st = self._task_steps(pid, task)
        return st.split(t_ns, t_ns + 1)[0].span if st.times else None

    def event_labels(self, pid: int, tid: int, start_ns: int, end_ns: int | None = None,
                     task: int = 0) -> Labels:
        """Span labels for a wait [start_ns, end_ns] (its midpoint) or an instant event, of a
        thread, or (with `tasks`) of the asyncio task it ran in."""
        t = start_ns if end_ns is None else (start_ns + end_ns) // 2
        if task and self.tasks:
            st = self._task_steps(pid, task)
            if not st.times:
                return ()
            iv = st.split(t, t + 1)[0]
            return self.labels(iv.span, iv.overlap)
        if self.window is not None and self.window[0] <= t < self.window[1]:
            st = self._steps_for(pid, tid)
            if not st.times:
                return ()
            iv = st.split(t, t + 1)[0]
            return self.labels(iv.span, iv.overlap)
        ivs = self.intervals(pid, tid, t, t + 1)
        iv = ivs[0] if ivs else None
        return self.labels(iv.span, iv.overlap) if iv else ()
