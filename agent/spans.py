"""Spans as the agent keeps them: `SpanRecord`, decoding from OTLP, and a bounded `SpanStore`.

A span links to samples through the process and OS thread it ran on. `SpanflameSpanProcessor`
(agent/otel.py) puts both on every span as `spanflame.pid` and `spanflame.tid`; spans without
them are kept (the trace view shows them) but cannot be linked to samples.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

#: Span attributes set by SpanflameSpanProcessor.
ATTR_PID = "spanflame.pid"
ATTR_TID = "spanflame.tid"
ATTR_PID_NS = "spanflame.pid_ns"
ATTR_TASK = "spanflame.task"
ATTR_THREAD_NAME = "thread.name"
#: Bounds on untrusted span data.
MAX_NAME = 256
MAX_ATTRS = 16
MAX_ATTR_VALUE = 256


@dataclass(frozen=True, slots=True)
class SpanRecord:
    trace_id: str           # 32 hex
    span_id: str            # 16 hex
    parent_span_id: str     # 16 hex, or "" for a root span
    name: str
    service: str
    pid: int                # 0 when unknown
    tid: int                # OS thread id, 0 when unknown
    start_ns: int
    end_ns: int
    status: str = "unset"   # unset | ok | error
    kind: str = "internal"
    attributes: tuple[tuple[str, str], ...] = ()
    parent_is_remote: bool = False
    task: int = 0           # the asyncio task's coroutine (id()) it ran in, 0 for none

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUS = {0: "unset", 1: "ok", 2: "error"}
# SpanFlags: 0x100 says whether the parent's is_remote is known, 0x200 that it is remote.
_FLAG_HAS_REMOTE, _FLAG_REMOTE = 0x100, 0x200


def _any_value(v) -> object:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which in ("array_value", "kvlist_value"):
        return "<complex>"
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


class InvalidSpan(ValueError):
    pass


def from_otlp(request, to_host=None) -> tuple[list[SpanRecord], list[str]]:
    """SpanRecords from an ExportTraceServiceRequest, plus one reason per rejected span.

    `to_host(ns, pid, tid)` (agent/pidns.py) turns ids the app saw in its own PID namespace into
    the host's; a span whose process is not visible here keeps no ids (unlinkable)."""
    out: list[SpanRecord] = []
    rejected: list[str] = []
    for rs in request.resource_spans:
        res_attrs = {kv.key: _any_value(kv.value) for kv in rs.resource.attributes}
        service = sys.intern(_clip(str(res_attrs.get("service.name") or "unknown_service"),
                                   MAX_NAME))
        res_pid = res_attrs.get("process.pid")
        for ss in rs.scope_spans:
            for sp in ss.spans:
                try:
                    out.append(_span(sp, service, res_pid, to_host))
                except InvalidSpan as exc:
                    rejected.append(str(exc))
    return out, rejected


_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)
_INT64_LIMIT = 1 << 63
_OURS = frozenset((ATTR_PID, ATTR_TID, ATTR_PID_NS, ATTR_TASK))
_PLAIN = frozenset(("string_value", "int_value", "double_value", "bool_value"))


def _span(sp, service: str, res_pid, to_host=None) -> SpanRecord:
    # The hot path of OTLP ingest (bench/otlp_ingest.py): each protobuf field is read once.
    trace_id, span_id, parent = sp.trace_id, sp.span_id, sp.parent_span_id
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE:
        raise InvalidSpan("span with an invalid trace_id (must be 16 non-zero bytes)")
    if len(span_id) != 8 or span_id == _ZERO_SPAN:
        raise InvalidSpan("span with an invalid span_id (must be 8 non-zero bytes)")
    if parent and len(parent) != 8:
        raise InvalidSpan("span with an invalid parent_span_id")
    start_ns, end_ns = sp.start_time_unix_nano, sp.end_time_unix_nano
    if end_ns < start_ns:
        raise InvalidSpan("span that ends before it starts")
    if end_ns >= _INT64_LIMIT:  # the store holds int64 (fixed64 on the wire)
        raise InvalidSpan("span end time beyond int64 nanoseconds")
    attrs = {}
    pid = res_pid if isinstance(res_pid, int) else 0
    tid = ns = task = 0
    for kv in sp.attributes:
        key = kv.key
        v = kv.value
        which = v.WhichOneof("value")
        if which is None:
            continue
        if key in _OURS:
            if which != "int_value":
                continue
            val = v.int_value
            if key == ATTR_PID:
                pid = val
            elif key == ATTR_TID:
                tid = val
            elif key == ATTR_PID_NS:
                ns = val
            else:
                task = val if 0 < val < 1 << 64 else 0
            continue
        if len(attrs) >= MAX_ATTRS:
            continue
        if which in _PLAIN:
            val = getattr(v, which)
            if which != "string_value":
                val = str(val)
        elif which == "bytes_value":
            val = v.bytes_value.hex()
        else:
            val = "<complex>"
        if len(key) > 64:
            key = _clip(key, 64)
        attrs[key] = val if len(val) <= MAX_ATTR_VALUE else _clip(val, MAX_ATTR_VALUE)
    if not 0 <= pid < 1 << 32 or not 0 <= tid < 1 << 32:
        pid = tid = 0
    if to_host is not None and ns and pid:
        host = to_host(ns, pid, tid)
        pid, tid = host if host is not None else (0, 0)
    flags = sp.flags
    name = sp.name
    # Names and services repeat across spans: one copy each (memory per span held matters).
    return SpanRecord(
        trace_id=trace_id.hex(), span_id=span_id.hex(),
        parent_span_id=parent.hex() if parent else "",
        name=sys.intern(name if len(name) <= MAX_NAME else _clip(name, MAX_NAME)),
        service=service, pid=pid, tid=tid, start_ns=start_ns, end_ns=end_ns,
        status=_STATUS.get(sp.status.code, "unset"), kind=_KINDS.get(sp.kind, "internal"),
        attributes=tuple(sorted(attrs.items())) if len(attrs) > 1 else tuple(attrs.items()),
        parent_is_remote=bool(flags & _FLAG_HAS_REMOTE and flags & _FLAG_REMOTE),
        task=task if pid else 0)


#: What one held span costs in memory, measured with tracemalloc (bench/otlp_ingest.py's spans:
#: the record, its id strings, the indexes' entries): a fixed part plus each attribute.
SPAN_FIXED_BYTES = 700
ATTR_FIXED_BYTES = 176


def span_bytes(s: SpanRecord) -> int:
    """Estimated bytes one span holds in a SpanStore (record, strings, attributes, indexes)."""
    n = SPAN_FIXED_BYTES + len(s.name) + len(s.service)
    for k, v in s.attributes:
        n += ATTR_FIXED_BYTES + len(k) + len(v)
    return n


class _ThreadSpans:
    """The spans of one thread (or task), sorted by start when read. Adding appends (a span
    that starts before the last one marks the lists unsorted; the next read sorts them once).
    Evicted spans are dropped lazily: they stay in the lists (filtered out by `alive`) until
    they are half of them, then the lists are rebuilt, so an eviction costs O(1) amortised
    whatever the order of starts."""

    __slots__ = ("spans", "starts", "max_duration_ns", "dead", "ordered")

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.starts: list[int] = []
        self.max_duration_ns = 0
        self.dead = 0
        self.ordered = True

    def add_many(self, new: list[SpanRecord]) -> None:
        for s in new:
            if self.starts and s.start_ns < self.starts[-1]:
                self.ordered = False
            self.starts.append(s.start_ns)
            self.spans.append(s)
            if s.duration_ns > self.max_duration_ns:
                self.max_duration_ns = s.duration_ns

    def __len__(self) -> int:
        return len(self.spans) - self.dead

    def evicted_one(self, alive) -> None:
        self.dead += 1
        if self.dead > 64 and self.dead * 2 > len(self.spans):
            self.spans = [s for s in self.spans if alive(s)]
            self.starts = [s.start_ns for s in self.spans]
            self.max_duration_ns = max((s.duration_ns for s in self.spans), default=0)
            self.dead = 0

    def _sort(self) -> None:
        order = sorted(range(len(self.starts)), key=self.starts.__getitem__)
        self.spans = [self.spans[i] for i in order]
        self.starts = [self.starts[i] for i in order]
        self.ordered = True

    def overlapping(self, start_ns: int, end_ns: int, alive) -> list[SpanRecord]:
        if not self.ordered:
            self._sort()
        lo = bisect.bisect_left(self.starts, start_ns - self.max_duration_ns)
        hi = bisect.bisect_right(self.starts, end_ns)
        return [s for s in self.spans[lo:hi]
                if s.end_ns > start_ns and s.start_ns < end_ns and (not self.dead or alive(s))]


class SpanStore:
    """Spans held in memory, bounded by their estimated bytes (`span_bytes`; default 64 MiB,
    about 90k spans of six attributes) and optionally by count. The oldest arrivals go first;
    each eviction is counted (`evicted`) and costs O(1) amortised. Everything kept per process
    (its service, its latest span) goes with its last span.

    Thread-safe: the OTLP receiver adds from its server thread, linkers read from others.
    """

    def __init__(self, max_spans: int | None = None, max_bytes: int = 64 << 20) -> None:
        self.max_spans = max_spans
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._order: deque[tuple[SpanRecord, int]] = deque()   # (span, its bytes), arrival order
        self._by_thread: dict[tuple[int, int], _ThreadSpans] = {}
        #: (pid, task) -> the spans that ran in that asyncio task
        self._by_task: dict[tuple[int, int], _ThreadSpans] = {}
        self._by_id: dict[str, SpanRecord] = {}
        self._by_trace: dict[str, dict[str, None]] = {}  # trace -> its span ids (ordered set)
        self.bytes = 0
        self.received = 0
        self.evicted = 0
        self.unlinkable = 0
        self.services: dict[int, str] = {}   # pid -> service.name of its spans
        self._latest: dict[int, int] = {}     # pid -> latest span start seen
        self._latest_end: dict[int, int] = {}  # pid -> latest span end seen
        self._per_pid: dict[int, int] = {}    # pid -> spans held
        self._listeners: list = []

    def _alive(self, s: SpanRecord) -> bool:
        return self._by_id.get(s.span_id) is s

    def add(self, spans: Iterable[SpanRecord]) -> int:
        n = 0
        added = []
        threads: dict[tuple[int, int], list[SpanRecord]] = {}
        tasks: dict[tuple[int, int], list[SpanRecord]] = {}
        with self._lock:
            for s in spans:
                if s.span_id in self._by_id:
                    continue
                self._by_id[s.span_id] = s
                self._by_trace.setdefault(s.trace_id, {})[s.span_id] = None
                size = span_bytes(s)
                self._order.append((s, size))
                self.bytes += size
                if s.pid and s.tid:
                    threads.setdefault((s.pid, s.tid), []).append(s)
                    if s.task:
                        tasks.setdefault((s.pid, s.task), []).append(s)
                    self.services[s.pid] = s.service
                    self._per_pid[s.pid] = self._per_pid.get(s.pid, 0) + 1
                    if s.start_ns > self._latest.get(s.pid, 0):
                        self._latest[s.pid] = s.start_ns
                    if s.end_ns > self._latest_end.get(s.pid, 0):
                        self._latest_end[s.pid] = s.end_ns
                else:
                    self.unlinkable += 1
                n += 1
                added.append(s)
            for index, groups in ((self._by_thread, threads), (self._by_task, tasks)):
                for key, group in groups.items():
                    ts = index.get(key)
                    if ts is None:
                        ts = index[key] = _ThreadSpans()
                    ts.add_many(group)
            self.received += n
            while self._order and (self.bytes > self.max_bytes or
                                   (self.max_spans is not None and
                                    len(self._order) > self.max_spans)):
                self._evict(*self._order.popleft())
        for fn in self._listeners:
            fn(added)
        return n

    def on_add(self, fn) -> None:
        """Call fn(list_of_spans) after each add (from the adding thread)."""
        self._listeners.append(fn)

    def _evict(self, s: SpanRecord, size: int) -> None:
        self.evicted += 1
        self.bytes -= size
        del self._by_id[s.span_id]
        ids = self._by_trace.get(s.trace_id)
        if ids is not None:
            ids.pop(s.span_id, None)
            if not ids:
                del self._by_trace[s.trace_id]
        if not (s.pid and s.tid):
            return
        keys = [(self._by_thread, (s.pid, s.tid))]
        if s.task:
            keys.append((self._by_task, (s.pid, s.task)))
        for index, key in keys:
            ts = index.get(key)
            if ts is None:
                continue
            ts.evicted_one(self._alive)
            if not len(ts):
                del index[key]
        left = self._per_pid.get(s.pid, 0) - 1
        if left > 0:
            self._per_pid[s.pid] = left
        else:  # the process's last span: nothing of it stays
            self._per_pid.pop(s.pid, None)
            self.services.pop(s.pid, None)
            self._latest.pop(s.pid, None)
            self._latest_end.pop(s.pid, None)

    def task_spans(self, pid: int, task: int, start_ns: int, end_ns: int) -> list[SpanRecord]:
        """Spans that ran in asyncio task `task` of `pid`, overlapping [start_ns, end_ns)."""
        with self._lock:
            ts = self._by_task.get((pid, task))
            return ts.overlapping(start_ns, end_ns, self._alive) if ts else []

    def thread_spans(self, pid: int, tid: int, start_ns: int, end_ns: int) -> list[SpanRecord]:
        """Spans of (pid, tid) overlapping [start_ns, end_ns), sorted by start."""
        with self._lock:
            ts = self._by_thread.get((pid, tid))
            return ts.overlapping(start_ns, end_ns, self._alive) if ts else []

    def latest_start(self, pid: int) -> int | None:
        """The latest start of a span received from `pid`, None if it never sent one."""
        with self._lock:
            return self._latest.get(pid)

    def latest_end(self, pid: int) -> int | None:
        """The latest end of a span received from `pid` (exporters send spans in the order they
        ended: every span that ended before it was sent too), None if it never sent one."""
        with self._lock:
            return self._latest_end.get(pid)

    def threads_of(self, pid: int) -> list[int]:
        with self._lock:
            return [tid for (p, tid) in self._by_thread if p == pid]

    def pids(self) -> list[int]:
        """Processes with spans held."""
        with self._lock:
            return list(self._per_pid)

    def get(self, span_id: str) -> SpanRecord | None:
        with self._lock:
            return self._by_id.get(span_id)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            return [self._by_id[i] for i in self._by_trace.get(trace_id, ()) if i in self._by_id]

    def local_root(self, s: SpanRecord) -> SpanRecord:
        """The outermost ancestor of `s` in the same process (a span whose parent is remote or
        not here)."""
        with self._lock:
            seen = 0
            while s.parent_span_id and not s.parent_is_remote and seen < 256:
                p = self._by_id.get(s.parent_span_id)
                if p is None or p.pid != s.pid:
                    break
                s = p
                seen += 1
            return s

    def all(self) -> Iterator[SpanRecord]:
        with self._lock:
            return iter([s for s, _n in self._order])

    def __len__(self) -> int:
        return len(self._order)
