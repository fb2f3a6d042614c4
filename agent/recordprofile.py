"""Probe records into a Profile: CPU samples, waits, short waits, block IO and network bytes.

Every record becomes samples on one stack, leaf first: a marker for what it is (`[lock wait]`,
`[io write]`, `[tcp send]`), the kernel frames where they say why (a wait's kernel stack, a CPU
sample taken in kernel code), then the Python frames. Where those Python frames come from is the
caller's choice (`python_stack`): the stack the kernel read at that moment (the kernel walker),
or what py-spy saw near it (agent/waits.py). The reason of a wait is agent/reasons.py's.

With `window` (start, end) every value is clipped to it, so that a profile covers exactly its
own time range; with `linker` (a TraceLinker) every sample carries the span active on its thread
then (a wait: at its midpoint; its thread cannot start or end a span while it is blocked).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Callable

from agent.aggregate import thread_labels
from agent.awaits import WHAT_WORDS
from agent.model import Frame, Labels, Profile, Stack, make_labels
from agent.reasons import MARKER_FRAMES, REASONS, WAIT_TYPE, classify
from probes.columns import NR_FUTEX, hot
from probes.records import ProbeData, Run, ShortWaits

_first = itemgetter(0)

#: python_stack(record, tid, start_ns, end_ns) -> the Python frames of that record
PythonStack = Callable[[object, int, int, int], Stack]


#: CPU of a span in which no sample fell (a span shorter than the sampling gap)
BETWEEN_SAMPLES: Stack = (Frame("[CPU between samples]"),)
#: a sample of a thread running no Python code (interpreter start-up or shutdown, C threads)
NO_PYTHON_FRAME: Stack = (Frame("[no Python frame]"),)


def kernel_python_stack(record, _tid: int, _start: int, _end: int) -> Stack:
    """The Python stack the kernel read at the moment of the record."""
    return record.pystack


@dataclass
class WaitSummary:
    """Totals the attach summary prints: ns per reason, bytes, connects, counters."""

    off_cpu_ns: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    cpu_ns: int = 0
    lock_ns: int = 0
    gil_ns: int = 0
    io_bytes: int = 0
    io_requests: int = 0
    net_send: int = 0
    net_recv: int = 0
    retransmits: int = 0
    await_ns: int = 0
    connects: list[int] = field(default_factory=list)

    def add(self, other: "WaitSummary") -> None:
        """Add another process's totals (attach --subprocesses)."""
        for r, ns in other.off_cpu_ns.items():
            self.off_cpu_ns[r] = self.off_cpu_ns.get(r, 0) + ns
        for k in ("cpu_ns", "lock_ns", "gil_ns", "io_bytes", "io_requests", "net_send",
                  "net_recv", "retransmits", "await_ns"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.connects += other.connects


def prorated(value: int, start: int, end: int, lo: int, hi: int) -> int:
    """The part of `value`, spread evenly over [start, end], that falls in [lo, hi)."""
    if end <= start:
        return value if lo <= start < hi else 0
    overlap = min(end, hi) - max(start, lo)
    if overlap <= 0:
        return 0
    return value if overlap >= end - start else round(value * overlap / (end - start))


def add_records(profile: Profile, pid: int, data: ProbeData, *, python_stack: PythonStack,
                window: tuple[int, int] | None = None, linker=None,
                thread_names: dict[int, str] | None = None, cpu=None,
                retransmit_stack: Callable[[int, int], Stack] | None = None) -> WaitSummary:
    """Add every record of `pid` in `data` to `profile` (only the sample types it has).

    With `cpu` (a CpuTimeline with the exact on-CPU time of each thread, from the sched probe),
    CPU samples carry exact CPU time instead of one period each: see `_weighted_samples`."""
    lo, hi = window if window else (-(1 << 62), 1 << 62)
    names = thread_names or {}
    gil = data.gil_ranges.get(pid)
    want = {t.name for t in profile.sample_types}
    summary = WaitSummary()
    label_cache: dict[tuple, Labels] = {}

    def labels(tid: int, start: int, end: int | None = None, task: int = 0,
               **extra: str) -> Labels:
        span = linker.event_labels(pid, tid, start, end, task) if linker is not None else ()
        key = (tid, span, tuple(sorted(extra.items())))
        lab = label_cache.get(key)
        if lab is None:
            lab = label_cache[key] = thread_labels(pid, tid, names.get(tid, ""),
                                                   make_labels(list(extra.items()) + list(span)))
        return lab

    fast = _FastLabels(pid, linker, names)

    if "cpu" in want or "wall" in want:
        cols = hot(data, "samples", pid) if python_stack is kernel_python_stack else None
        if cols is not None:
            _add_sample_columns(profile, pid, cols, data.columns.stacks, cpu, lo, hi, linker,
                                fast, want, summary)
        elif data.samples:
            by_tid: dict[int, list] = {}
            for s in data.samples:
                if s.tgid == pid and lo <= s.t_ns < hi:
                    by_tid.setdefault(s.tid, []).append((s.t_ns, s.task, s.period_ns, s))
            for v in by_tid.values():
                v.sort(key=_first)

            def lab(tid: int, t: int, task: int = 0) -> Labels:
                return labels(tid, t, None, task)

            for s, lb, ns in _weighted_samples(pid, by_tid, cpu, lo, hi, linker, lab):
                summary.cpu_ns += ns
                values = {}
                if "cpu" in want:
                    values["cpu"] = ns
                if "wall" in want:
                    values["wall"] = ns
                stack = (s.kstack + python_stack(s, s.tid, s.t_ns, s.t_ns)) if s is not None \
                    else BETWEEN_SAMPLES
                if not stack:  # a thread with an interpreter state but no Python frame running
                    stack = NO_PYTHON_FRAME
                profile.add(stack, lb, values)

    def add_wait(w, a: int, b: int, total: int) -> None:
        stack_py = python_stack(w, w.tid, a, b)
        reason = classify(w if w.pystack or not stack_py else w._replace(pystack=stack_py), gil)
        summary.off_cpu_ns[reason] += total
        if reason == "lock":
            summary.lock_ns += total
        elif reason == "gil":
            summary.gil_ns += total
        values = {}
        if "off_cpu" in want:
            values["off_cpu"] = total
        if "wall" in want:
            values["wall"] = total
        t = WAIT_TYPE.get(reason)
        if t in want:
            values[t] = total
        if values:
            stack = MARKER_FRAMES[reason] + w.kstack + stack_py
            profile.add(stack, labels(w.tid, a, b, w.task, reason=reason), values)

    kernel = python_stack is kernel_python_stack
    run_cols = hot(data, "runs", pid) if kernel else None
    short_cols = hot(data, "short_waits", pid) if kernel else None
    if run_cols is not None or short_cols is not None:
        _add_wait_columns(profile, run_cols, short_cols, data.columns.stacks, gil, lo, hi,
                          fast, want, summary)
    for r in (*(data.runs if run_cols is None else ()), *data.open_waits):
        if r.tgid != pid or r.off_end_ns is None:
            continue
        dur = min(r.off_end_ns, hi) - max(r.run_end_ns, lo)
        if dur > 0:
            add_wait(r, r.run_end_ns, r.off_end_ns, dur)

    for w in (data.short_waits if short_cols is None else ()):
        if w.tgid != pid:
            continue
        total = prorated(w.total_ns, w.start_ns, w.end_ns, lo, hi)
        if total > 0:
            add_wait(w, w.start_ns, w.end_ns, total)

    for io in data.io:
        # Discards free blocks and flushes carry no data: neither is bytes moved.
        if io.tgid != pid or not lo <= io.start_ns < hi or io.op not in ("read", "write"):
            continue
        summary.io_bytes += io.bytes
        summary.io_requests += 1
        if "io" in want and io.bytes:
            stack = (Frame(f"[io {io.op}]"),) + python_stack(io, io.tid, io.start_ns, io.start_ns)
            profile.add(stack, labels(io.tid, io.start_ns, None, io.task, device=io.dev),
                        {"io": io.bytes})

    for n in data.net:
        if n.tgid == pid and n.kind == "connect" and lo <= n.end_ns < hi:
            summary.connects.append(n.end_ns - n.start_ns)

    for nb in data.net_bytes:
        if nb.tgid != pid:
            continue
        v = prorated(nb.bytes, nb.start_ns, nb.end_ns, lo, hi)
        if v <= 0:
            continue
        if nb.direction == "send":
            summary.net_send += v
        else:
            summary.net_recv += v
        t = "net_send" if nb.direction == "send" else "net_recv"
        if t in want:
            stack = (Frame(f"[tcp {nb.direction}]"),) + python_stack(nb, nb.tid, nb.end_ns,
                                                                     nb.end_ns)
            profile.add(stack, labels(nb.tid, nb.end_ns, None, nb.task), {t: v})

    for b in data.buckets:
        if b.tgid != pid or b.kind != "retransmit":
            continue
        v = prorated(b.value, b.start_ns, b.start_ns + b.width_ns, lo, hi)
        if v <= 0:
            continue
        summary.retransmits += v
        if "tcp_retransmits" in want:
            mid = b.start_ns + b.width_ns // 2
            # Retransmits run in softirq: no stack of the moment, only the socket's thread.
            stack_py = retransmit_stack(b.tid, mid) if retransmit_stack else ()
            profile.add((Frame("[tcp retransmit]"),) + stack_py, labels(b.tid, mid),
                        {"tcp_retransmits": v})
    return summary


def _weighted_samples(pid: int, by_tid: dict[int, list], cpu, lo: int, hi: int, linker, labels):
    """(ref or None, labels, ns) for the CPU samples of `pid` in [lo, hi): `by_tid` holds each
    thread's samples as (t_ns, task, period_ns, ref) sorted by time; `labels(tid, t, task=0)`.

    Without an exact CPU timeline, each sample is worth its sampling period. With one, each
    thread's exact CPU time is cut at its samples and at its span boundaries, and every piece goes
    to a sample in the same span: the next one (the code the thread was running when it was
    sampled had been running since the previous sample, as far as anyone knows), else the
    previous one; a span in which no sample fell keeps its CPU on a marker stack. So per-thread
    and per-span CPU are exact, and within a span each function carries the time of the samples
    that saw it. A thread that runs asyncio tasks has its spans in tasks interleaved at every
    await: there each sample takes the thread's CPU since the sample before it.
    """
    for tid, ss in by_tid.items():
        if cpu is None or not cpu.seen(tid):
            for t, task, period, ref in ss:
                yield ref, labels(tid, t, task), period
            continue
        if any(x[1] for x in ss):
            bounds = [lo] + [x[0] for x in ss[:-1]] + [hi]
            for (t, task, period, ref), a, b in zip(ss, bounds, bounds[1:]):
                ns = cpu.oncpu_ns(tid, a, b) or period
                yield ref, labels(tid, t, task), ns
            continue
        times = [x[0] for x in ss]
        cuts = {lo, hi, *times}
        if linker is not None:
            cuts.update(t for t in linker.boundaries(pid, tid, lo, hi) if lo < t < hi)
        points = sorted(cuts)
        acc: dict[int, int] = {}          # sample index -> ns
        orphans: dict[tuple, int] = {}    # span labels -> ns with no sample in that span
        j = 0
        oncpu = cpu.oncpu_ns
        for a, b in zip(points, points[1:]):
            ns = oncpu(tid, a, b)
            if ns <= 0:
                continue
            while j < len(times) and times[j] < b:
                j += 1
            lab = labels(tid, (a + b) // 2)
            if j < len(times) and labels(tid, times[j]) == lab:
                acc[j] = acc.get(j, 0) + ns
            elif j > 0 and labels(tid, times[j - 1]) == lab:
                acc[j - 1] = acc.get(j - 1, 0) + ns
            else:
                orphans[lab] = orphans.get(lab, 0) + ns
        for i, ns in acc.items():
            yield ss[i][3], labels(tid, times[i]), ns
        for lab, ns in orphans.items():
            yield None, lab, ns


class _FastLabels:
    """Labels of records read from columns: the span of a thread (or task) at an instant, and
    the sample labels, cached per (thread, span, reason)."""

    __slots__ = ("pid", "linker", "names", "cache", "quiet_tids", "lo", "hi")

    def __init__(self, pid: int, linker, names: dict[int, str]) -> None:
        self.pid, self.linker, self.names = pid, linker, names
        self.cache: dict[tuple, Labels] = {}
        #: tid -> True when the thread has no span in the linker's window
        self.quiet_tids: dict[int, bool] = {}
        w = linker.window if linker is not None else None
        self.lo, self.hi = w if w is not None else (0, -1)

    def quiet(self, tid: int) -> bool:
        """Whether the thread has no span in the linker's window (needs a linker)."""
        q = self.quiet_tids.get(tid)
        if q is None:
            q = self.quiet_tids[tid] = not self.linker.thread_has_spans(self.pid, tid)
        return q

    def span(self, tid: int, t: int, task: int = 0) -> Labels:
        lk = self.linker
        if lk is None:
            return ()
        if not (task and lk.tasks) and self.lo <= t < self.hi:
            if self.quiet(tid):
                return ()
        return lk.event_labels(self.pid, tid, t, None, task)

    def of(self, tid: int, span: Labels, reason: str | None = None) -> Labels:
        key = (tid, span, reason)
        lab = self.cache.get(key)
        if lab is None:
            extra = [("reason", reason)] if reason is not None else []
            lab = self.cache[key] = thread_labels(self.pid, tid, self.names.get(tid, ""),
                                                  make_labels(extra + list(span)))
        return lab

    def at(self, tid: int, t: int, task: int = 0) -> Labels:
        return self.of(tid, self.span(tid, t, task))


def _add_sample_columns(profile: Profile, pid: int, cols, stacks, cpu, lo: int, hi: int, linker,
                        fast: _FastLabels, want: set[str], summary: WaitSummary) -> None:
    """CPU samples from columns: weighted as `_weighted_samples` says, added up per (stack,
    labels) before they go into the profile."""
    c = cols.cols
    i0, i1 = bisect_left(c[0], lo), bisect_left(c[0], hi)
    by_tid: dict[int, list] = {}
    for t, tid, period, sid, task in zip(c[0][i0:i1], c[1][i0:i1], c[2][i0:i1], c[3][i0:i1],
                                         c[4][i0:i1]):
        v = by_tid.get(tid)
        if v is None:
            v = by_tid[tid] = []
        v.append((t, task, period, sid))
    acc: dict[tuple, int] = {}
    for sid, lab, ns in _weighted_samples(pid, by_tid, cpu, lo, hi, linker, fast.at):
        k = (sid, lab)
        acc[k] = acc.get(k, 0) + ns
    for (sid, lab), ns in acc.items():
        summary.cpu_ns += ns
        values = {}
        if "cpu" in want:
            values["cpu"] = ns
        if "wall" in want:
            values["wall"] = ns
        if sid is None:
            stack = BETWEEN_SAMPLES
        else:
            k, py = stacks[sid]
            stack = k + py or NO_PYTHON_FRAME
        profile.add(stack, lab, values)


def _add_wait_columns(profile: Profile, runs, shorts, stacks, gil, lo: int, hi: int,
                      fast: _FastLabels, want: set[str], summary: WaitSummary) -> None:
    """Waits and short waits from columns, added up per (stack, reason, labels)."""
    reasons: dict[tuple, str] = {}
    acc: dict[tuple, int] = {}
    span, of = fast.span, fast.of

    def reason_of(sid: int, state: int, nr: int, aux: int) -> str:
        # (a Run is blocked by its state; every ShortWaits is, with state -1 as key here)
        k, py = stacks[sid]
        w = (ShortWaits(0, 0, 0, 0, 0, 0, -state - 1, k, aux if nr == NR_FUTEX else 0, py, nr,
                        aux) if state < 0 else
             Run(0, 0, None, 0, 0, 0, state, k, aux if nr == NR_FUTEX else 0, py, nr, aux))
        r = reasons[(sid, state, nr, aux)] = classify(w, gil)
        return r

    if runs is not None:
        # Waits of a thread without spans (the common case) need no lookup each: added up per
        # (thread, place) first, they get their reason and labels once.
        plain: dict[tuple, int] = {}
        quiet = fast.quiet
        lk, wlo, whi = fast.linker, fast.lo, fast.hi
        tasks = lk is not None and lk.tasks
        for (_e, _s, tid, _rs, a, b, _so, state, sid, nr, aux, task) in runs.rows():
            if not b:  # the thread exited
                continue
            dur = (b if b < hi else hi) - (a if a > lo else lo)
            if dur <= 0:
                continue
            mid = (a + b) // 2
            if lk is None or (not (task and tasks) and wlo <= mid < whi and quiet(tid)):
                k = (tid, sid, state, nr, aux)
                plain[k] = plain.get(k, 0) + dur
                continue
            reason = reasons.get((sid, state, nr, aux)) or reason_of(sid, state, nr, aux)
            key = (sid, reason, of(tid, span(tid, mid, task), reason))
            acc[key] = acc.get(key, 0) + dur
        for (tid, sid, state, nr, aux), dur in plain.items():
            reason = reasons.get((sid, state, nr, aux)) or reason_of(sid, state, nr, aux)
            key = (sid, reason, of(tid, (), reason))
            acc[key] = acc.get(key, 0) + dur
    if shorts is not None:
        for (b, a, tid, total, _n, state, sid, nr, aux, task) in shorts.rows():
            total = prorated(total, a, b, lo, hi)
            if total <= 0:
                continue
            state = -state - 1
            reason = reasons.get((sid, state, nr, aux)) or reason_of(sid, state, nr, aux)
            key = (sid, reason, of(tid, span(tid, (a + b) // 2, task), reason))
            acc[key] = acc.get(key, 0) + total
    off_cpu, wall = "off_cpu" in want, "wall" in want
    for (sid, reason, lab), total in acc.items():
        summary.off_cpu_ns[reason] += total
        if reason == "lock":
            summary.lock_ns += total
        elif reason == "gil":
            summary.gil_ns += total
        values = {}
        if off_cpu:
            values["off_cpu"] = total
        if wall:
            values["wall"] = total
        t = WAIT_TYPE.get(reason)
        if t in want:
            values[t] = total
        if values:
            k, py = stacks[sid]
            profile.add(MARKER_FRAMES[reason] + k + py, lab, values)


def add_awaits(profile: Profile, pid: int, observations, *, window: tuple[int, int],
               linker=None, thread_names: dict[int, str] | None = None) -> int:
    """Add what suspended asyncio tasks awaited (agent/awaits.py) as `await` samples, on the
    stack each awaited in, labelled with the task's span (the span's thread is the thread
    label). Returns the nanoseconds added."""
    if not profile.has_type("await"):
        return 0
    lo, hi = window
    names = thread_names or {}
    total = 0
    for o in observations:
        if o.tgid != pid or not lo <= o.t_ns < hi:
            continue
        span = linker.task_span_at(pid, o.task, o.t_ns) if linker is not None else None
        tid = span.tid if span is not None else 0
        extra = list(linker.labels(span)) if span is not None else []
        extra.append(("awaiting", o.what or "other"))
        marker = Frame(f"[awaiting {WHAT_WORDS.get(o.what) or 'something'}]")
        profile.add((marker,) + o.stack,
                    thread_labels(pid, tid, names.get(tid, ""), make_labels(extra)),
                    {"await": o.weight_ns})
        total += o.weight_ns
    return total
