"""Putting probe records on Python stacks.

A wait (off-CPU, lock, IO, network) has a thread, a start and an end. Its Python stack is what
py-spy saw on that thread then: a waiting thread's stack does not change, so a stack first seen
inside the wait is the waiting one; otherwise the stack seen just before the wait began, which
no sample contradicted. Below the Python frames go the native frames (user stack) or kernel
frames, and a marker leaf such as `[lock wait]`, so that the flame graph reads
`handler -> Repo.save -> socket.recv -> [net wait]`.

CPU time with probes on is exact: the sched probe reports every on-CPU run. py-spy's samples
(all threads, idle included) are split into CPU by *active observations*: a stack seen while the
thread was on CPU holds until the next stack seen on CPU, and gets the CPU time in between.
Observations of a waiting thread never collect CPU.
"""

from __future__ import annotations

import bisect
import dataclasses
from itertools import compress
from typing import Iterable

from agent.aggregate import Piece, thread_labels
from agent.model import Frame, Labels, Profile, Stack, make_labels
from agent.reasons import MARKER_FRAMES, MARKERS, REASONS, WAIT_TYPE, classify  # noqa: F401
from agent.recordprofile import WaitSummary, add_records  # noqa: F401
from agent.timeline import PiecewiseCpu, ThreadTimeline
from probes.columns import hot
from probes.records import ProbeData, Run

_MARKER_FRAMES = MARKER_FRAMES
#: The Python part of a wait's stack when py-spy saw nothing of the thread in the wait's span.
UNSAMPLED: Stack = (Frame("[no Python stack sampled]"),)


class StackIndex:
    """Python stack lookups on one thread's py-spy timeline."""

    def __init__(self, tl: ThreadTimeline) -> None:
        self.tl = tl
        self.starts = [s.start_ns for s in tl.slices]

    def at(self, t: int) -> Stack:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0:
            return self.tl.slices[i].stack
        return self.tl.slices[0].stack if self.tl.slices else ()

    def during(self, start: int, end: int, span: tuple[int, int] | None = None) -> Stack:
        """The stack py-spy showed for most of (start, end]; the one seen at or before start
        when it saw no change inside.

        A blocked thread's stack cannot change, so one stack is right for the whole wait. py-spy
        stamps a sample when it processes it, a little late and by a varying amount, so the
        first change seen inside a wait is often the stack from just before it: the stack that
        covers most of the wait is the one py-spy saw while the thread waited.

        `span` is the (start, end) of the span the thread was in when the wait began. A stack
        seen before that span started is stale (the thread has since entered the span's code),
        so when py-spy saw the thread inside the span, only what it saw there counts: during the
        wait, else the first stack after it (the thread resumes where it waited).
        """
        slices = self.tl.slices
        i = bisect.bisect_right(self.starts, start)
        floor = span[0] if span is not None else None
        if i >= len(slices) or slices[i].start_ns > end:
            # No change seen during the wait (the common case): only the slice covering its
            # start can count.
            if i > 0:
                sl = slices[i - 1]
                if sl.stack and sl.end_ns > start and (floor is None or sl.start_ns >= floor):
                    return sl.stack
        else:
            best: dict[Stack, int] = {}
            j = max(0, i - 1)
            while j < len(slices) and slices[j].start_ns <= end:
                sl = slices[j]
                ov = min(end, sl.end_ns) - max(start, sl.start_ns)
                if ov > 0 and sl.stack and (floor is None or sl.start_ns >= floor):
                    best[sl.stack] = best.get(sl.stack, 0) + ov
                j += 1
            if best:
                return max(best.items(), key=lambda kv: kv[1])[0]
        if floor is not None and span is not None:
            k = bisect.bisect_left(self.starts, end)
            while k < len(slices) and slices[k].start_ns <= span[1]:
                if slices[k].stack:
                    return slices[k].stack
                k += 1
        if i < len(slices) and slices[i].start_ns <= end:
            return slices[i].stack
        if floor is not None:
            # py-spy saw nothing of the thread inside its span: any stack we have predates the
            # span and belongs to other code (often another span's). Say so rather than guess.
            return UNSAMPLED
        return self.at(start)


class RunsCpu:
    """A CpuTimeline from the sched probe's runs: exact on-CPU time per thread.

    Within a run the thread is on CPU at rate (length - short_off) / length. Threads the probe
    never saw leave the CPU fall back to `fallback` (schedstat readings at the start and end).
    From a window's columns (probes/columns.py), a thread's timeline is built when first asked
    for: most threads of a window are never asked about.
    """

    def __init__(self, data: ProbeData, pid: int, start_ns: int, end_ns: int,
                 fallback: PiecewiseCpu | None = None) -> None:
        self.start_ns, self.end_ns = start_ns, end_ns
        self.fallback = fallback
        self._exit: dict[int, int] = {}
        self._iv: dict[int, list[tuple[int, int, float]]] = {}
        self._cum: dict[int, list[float]] = {}
        self._starts: dict[int, list[int]] = {}
        self._open: dict[int, list[tuple]] = {}
        for tid, (tgid, a, b, short_off) in data.open_runs.items():
            if tgid == pid:
                self._open.setdefault(tid, []).append((a, b, short_off))
        self._cols = hot(data, "runs", pid)
        if self._cols is not None:  # a window's columns: all of `pid`
            self._order = list(dict.fromkeys([*self._cols.cols[2], *self._open]))
            self._pending = set(self._order)
            return
        self._pending = set()
        per: dict[int, list[tuple[int, int, float]]] = {}
        for r in data.runs:
            if r.tgid != pid:
                continue
            self._add(per.setdefault(r.tid, []), r.run_start_ns, r.run_end_ns, r.short_off_ns)
            if r.off_end_ns is None:
                self._exit[r.tid] = r.run_end_ns
        for tid, runs in self._open.items():
            for a, b, short_off in runs:
                self._add(per.setdefault(tid, []), a, b, short_off)
        for tid, ivs in per.items():
            self._index(tid, ivs)
        self._order = list(self._iv)

    def _add(self, ivs: list, a: int | None, b: int | None, short_off: int) -> None:
        # An unknown run start (a thread the probe saw only when it left the CPU) counts
        # from its end: under-count rather than invent CPU time.
        b = self.end_ns if b is None else b
        a = b if a is None else max(a, self.start_ns)
        if b <= a:
            return
        ivs.append((a, b, max(0.0, min(1.0, (b - a - short_off) / (b - a)))))

    def _index(self, tid: int, ivs: list) -> None:
        if not ivs:
            return
        ivs.sort()
        self._iv[tid] = ivs
        self._starts[tid] = [a for a, _b, _r in ivs]
        acc, cum = 0.0, []
        for a, b, r in ivs:
            cum.append(acc)
            acc += (b - a) * r
        self._cum[tid] = cum

    def _build(self, tid: int) -> None:
        """The timeline of one thread, from the columns."""
        self._pending.discard(tid)
        c = self._cols.cols
        mask = list(map(tid.__eq__, c[2]))
        ivs: list = []
        lo = self.start_ns
        for a, b, oe, so in zip(compress(c[3], mask), compress(c[4], mask),
                                compress(c[5], mask), compress(c[6], mask)):
            if not oe:
                self._exit[tid] = b
            a = b if not a else (a if a > lo else lo)
            if b > a:
                ivs.append((a, b, max(0.0, min(1.0, (b - a - so) / (b - a)))))
        for a, b, short_off in self._open.get(tid, ()):
            self._add(ivs, a, b, short_off)
        self._index(tid, ivs)

    def _has(self, tid: int) -> bool:
        if tid in self._pending:
            self._build(tid)
        return tid in self._iv

    def seen(self, tid: int) -> bool:
        return self._has(tid)

    def tids(self) -> list[int]:
        return [t for t in self._order if self._has(t)]

    def runs(self, tid: int) -> list[tuple[int, int]]:
        """The thread's on-CPU runs, sorted."""
        self._has(tid)
        return [(a, b) for a, b, _r in self._iv.get(tid, ())]

    def _c(self, tid: int, t: int) -> float:
        starts = self._starts[tid]
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            return 0.0
        a, b, r = self._iv[tid][i]
        return self._cum[tid][i] + (min(t, b) - a) * r

    def oncpu_ns(self, tid: int, start_ns: int, end_ns: int) -> int:
        if end_ns <= start_ns:
            return 0
        if not self._has(tid):
            return self.fallback.oncpu_ns(tid, start_ns, end_ns) if self.fallback else 0
        return max(0, round(self._c(tid, end_ns) - self._c(tid, start_ns)))

    def activity(self, tid: int, t_ns: int) -> float | None:
        if not self._has(tid):
            return self.fallback.activity(tid, t_ns) if self.fallback else None
        starts = self._starts[tid]
        i = bisect.bisect_right(starts, t_ns) - 1
        if i < 0:
            return 0.0
        a, b, r = self._iv[tid][i]
        return r if t_ns < b else 0.0

    def exit_ns(self, tid: int) -> int | None:
        self._has(tid)
        return self._exit.get(tid)


def run_pieces(tl: ThreadTimeline, cpu: "RunsCpu", exact: set[int] = frozenset(),
               window: tuple[int, int] | None = None) -> Iterable[Piece]:
    """CPU pieces of one thread, run by run.

    A run is an exact on-CPU stretch from the sched probe, between waits at or above the
    threshold. A thread resumes where it waited (its Python stack cannot change while it is off
    CPU), so a run begins with the stack seen last before it; each stack py-spy saw inside the
    run holds until the next. Between the run's start and the first stack seen inside it the
    switch happened at an unknown time: we split that stretch at its middle, unless the switch
    time is exact (`exact`: stack changes put on span boundaries). A run py-spy saw nothing of
    keeps the stack it began with. So observations made while a thread waited never collect the
    CPU of code it ran long after waking, and a thread waiting for the GIL is seen exactly where
    its next run goes. With `window`, runs before the thread's first observation (at low
    sampling rates, or right after py-spy attached) count too, with the first stack seen.
    """
    obs = [(s.start_ns, s.stack) for s in tl.slices if s.stack]
    if not obs:
        return
    if not cpu.seen(tl.tid):  # never seen by the sched probe: plain slices
        yield from (Piece(tl.pid, tl.tid, tl.name, s.start_ns, s.end_ns, s.stack)
                    for s in tl.slices if s.stack)
        return
    times = [t for t, _ in obs]
    lo_all, hi_all = window if window is not None else (tl.start_ns, tl.end_ns)
    for a, b in cpu.runs(tl.tid):
        a, b = max(a, lo_all), min(b, hi_all)
        if b <= a:
            continue
        i = bisect.bisect_left(times, a)
        j = bisect.bisect_left(times, b)
        resumed = obs[i - 1][1] if i > 0 else obs[i][1] if i < len(obs) else None
        if i == j:  # nothing observed inside the run
            yield Piece(tl.pid, tl.tid, tl.name, a, b, resumed)
            continue
        t1 = times[i]
        if t1 > a and obs[i][1] != resumed:
            mid = t1 if t1 in exact else (a + t1) // 2
            if mid > a:
                yield Piece(tl.pid, tl.tid, tl.name, a, mid, resumed)
            a = mid
        cuts = [a] + times[i + 1:j] + [b]
        for n, (x, y) in enumerate(zip(cuts, cuts[1:])):
            if y > x:
                yield Piece(tl.pid, tl.tid, tl.name, x, y, obs[i + n][1])


def add_probe_samples(profile: Profile, pid: int, timelines: dict[int, ThreadTimeline],
                      data: ProbeData, window: tuple[int, int] | None = None,
                      thread_names: dict[int, str] | None = None, linker=None) -> WaitSummary:
    """Add every probe record of `pid` to `profile`, on the Python stacks py-spy saw then
    (`StackIndex.during`; py-spy's own samples give the CPU, so CPU samples are left out)."""
    idx = {tid: StackIndex(tl) for tid, tl in timelines.items() if tl.slices}
    names = {tid: tl.name for tid, tl in timelines.items()}
    if thread_names:
        for tid, n in thread_names.items():
            names.setdefault(tid, n)

    def py(_record, tid: int, start: int, end: int) -> Stack:
        i = idx.get(tid)
        if not i:
            return ()
        sp = linker.span_at(pid, tid, start) if linker is not None else None
        return i.during(start, end, (sp.start_ns, sp.end_ns) if sp is not None else None)

    def at(tid: int, t: int) -> Stack:
        return idx[tid].at(t) if tid in idx else ()

    return add_records(profile, pid, dataclasses.replace(data, samples=[]) if data.samples else data,
                       python_stack=py, window=window, linker=linker, thread_names=names,
                       retransmit_stack=at)
