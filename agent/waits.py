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
from dataclasses import dataclass
from typing import Iterable

from agent.aggregate import Piece, thread_labels
from agent.model import Frame, Labels, Profile, Stack, make_labels
from agent.timeline import PiecewiseCpu, ThreadTimeline
from probes.records import ProbeData, Run

REASONS = ("lock", "gil", "io", "net", "sleep", "runqueue", "other")

_IO_HINTS = ("io_schedule", "blk_", "folio_wait", "wait_on_page", "bit_wait_io", "jbd2",
             "ext4_sync", "ext4_fsync", "xfs_", "btrfs_", "__wait_on_buffer", "submit_bio_wait",
             "filemap_fdatawait", "file_write_and_wait", "wait_for_completion_io",
             "blkdev_", "iomap_dio", "nfs_")
_NET_HINTS = ("sk_wait_data", "inet_csk_accept", "tcp_recvmsg", "sk_stream_wait",
              "inet_wait_for_connect", "__inet_stream_connect", "unix_stream_", "tcp_sendmsg",
              "sock_", "__sys_recv", "__sys_accept", "udp_recvmsg", "do_epoll_wait", "ep_poll",
              "do_sys_poll", "do_select", "core_sys_select")
_SLEEP_HINTS = ("do_nanosleep", "hrtimer_nanosleep", "clock_nanosleep")
_LOCK_HINTS = ("futex_", "rwsem_down", "mutex_lock", "__mutex_lock", "rt_mutex")

MARKERS = {
    "lock": "[lock wait]", "gil": "[GIL wait]", "io": "[io wait]", "net": "[net wait]",
    "sleep": "[sleep]", "runqueue": "[runqueue wait]", "other": "[off-cpu]",
}
_MARKER_FRAMES = {k: (Frame(v),) for k, v in MARKERS.items()}
#: The Python part of a wait's stack when py-spy saw nothing of the thread in the wait's span.
UNSAMPLED: Stack = (Frame("[no Python stack sampled]"),)


def classify(run: Run, gil_range: tuple[int, int] | None) -> str:
    """Why a thread was off CPU: lock, gil, io, net, sleep, runqueue or other.

    Waiting in poll/select/epoll counts as net: in Python services that is almost always a
    socket (asyncio, selectors, socket timeouts).
    """
    if not run.blocked:
        return "runqueue"
    if run.futex_addr:
        if gil_range and gil_range[0] <= run.futex_addr < gil_range[1]:
            return "gil"
        return "lock"
    for f in run.kstack:
        n = f.name
        if n.startswith(_LOCK_HINTS):
            return "lock"
        if n.startswith(_IO_HINTS):
            return "io"
        if n.startswith(_NET_HINTS):
            return "net"
        if n.startswith(_SLEEP_HINTS):
            return "sleep"
    if run.state == 2:  # uninterruptible sleep: almost always IO
        return "io"
    return "other"


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
    """

    def __init__(self, data: ProbeData, pid: int, start_ns: int, end_ns: int,
                 fallback: PiecewiseCpu | None = None) -> None:
        per: dict[int, list[tuple[int, int, float]]] = {}
        self._exit: dict[int, int] = {}

        def add(tid: int, a: int | None, b: int | None, short_off: int) -> None:
            # An unknown run start (a thread the probe saw only when it left the CPU) counts
            # from its end: under-count rather than invent CPU time.
            b = end_ns if b is None else b
            a = b if a is None else max(a, start_ns)
            if b <= a:
                return
            rate = max(0.0, min(1.0, (b - a - short_off) / (b - a)))
            per.setdefault(tid, []).append((a, b, rate))

        for r in data.runs:
            if r.tgid != pid:
                continue
            add(r.tid, r.run_start_ns, r.run_end_ns, r.short_off_ns)
            if r.off_end_ns is None:
                self._exit[r.tid] = r.run_end_ns
        for tid, (tgid, a, b, short_off) in data.open_runs.items():
            if tgid == pid:
                add(tid, a, b, short_off)
        self._iv: dict[int, list[tuple[int, int, float]]] = {}
        self._cum: dict[int, list[float]] = {}
        self._starts: dict[int, list[int]] = {}
        for tid, ivs in per.items():
            ivs.sort()
            self._iv[tid] = ivs
            self._starts[tid] = [a for a, _b, _r in ivs]
            acc, cum = 0.0, []
            for a, b, r in ivs:
                cum.append(acc)
                acc += (b - a) * r
            self._cum[tid] = cum
        self.fallback = fallback

    def seen(self, tid: int) -> bool:
        return tid in self._iv

    def tids(self) -> list[int]:
        return list(self._iv)

    def runs(self, tid: int) -> list[tuple[int, int]]:
        """The thread's on-CPU runs, sorted."""
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
        if tid not in self._iv:
            return self.fallback.oncpu_ns(tid, start_ns, end_ns) if self.fallback else 0
        return max(0, round(self._c(tid, end_ns) - self._c(tid, start_ns)))

    def activity(self, tid: int, t_ns: int) -> float | None:
        if tid not in self._iv:
            return self.fallback.activity(tid, t_ns) if self.fallback else None
        starts = self._starts[tid]
        i = bisect.bisect_right(starts, t_ns) - 1
        if i < 0:
            return 0.0
        a, b, r = self._iv[tid][i]
        return r if t_ns < b else 0.0

    def exit_ns(self, tid: int) -> int | None:
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


@dataclass
class WaitSummary:
    """Totals the attach summary prints: ns per reason, bytes, connects, counters."""

    off_cpu_ns: dict[str, int]
    lock_ns: int = 0
    gil_ns: int = 0
    io_bytes: int = 0
    io_requests: int = 0
    net_send: int = 0
    net_recv: int = 0
    retransmits: int = 0
    connects: list[int] | None = None


def add_probe_samples(profile: Profile, pid: int, timelines: dict[int, ThreadTimeline],
                      data: ProbeData, window: tuple[int, int] | None = None,
                      thread_names: dict[int, str] | None = None, linker=None) -> WaitSummary:
    """Add every probe record of `pid` to `profile` (only the sample types it has).

    With `window` (start, end), waits are clipped to it and events outside it are left out, so
    that the profile covers exactly its own time range. With `linker` (a TraceLinker), every
    sample also carries the labels of the span active on its thread then.
    """
    lo, hi = window if window else (-(1 << 62), 1 << 62)
    idx = {tid: StackIndex(tl) for tid, tl in timelines.items() if tl.slices}
    names = {tid: tl.name for tid, tl in timelines.items()}
    if thread_names:
        for tid, n in thread_names.items():
            names.setdefault(tid, n)
    gil = data.gil_ranges.get(pid)
    want = {t.name for t in profile.sample_types}
    summary = WaitSummary(off_cpu_ns={r: 0 for r in REASONS}, connects=[])
    label_cache: dict[tuple, Labels] = {}

    def labels(tid: int, start: int, end: int | None = None, **extra: str) -> Labels:
        span = linker.event_labels(pid, tid, start, end) if linker is not None else ()
        key = (tid, span, tuple(sorted(extra.items())))
        lab = label_cache.get(key)
        if lab is None:
            lab = label_cache[key] = thread_labels(pid, tid, names.get(tid, ""),
                                                   make_labels(list(extra.items()) + list(span)))
        return lab

    def py(tid: int, start: int, end: int) -> Stack:
        i = idx.get(tid)
        if not i:
            return ()
        sp = linker.span_at(pid, tid, start) if linker is not None else None
        return i.during(start, end, (sp.start_ns, sp.end_ns) if sp is not None else None)

    for r in data.runs:
        if r.tgid != pid or r.off_end_ns is None:
            continue
        dur = min(r.off_end_ns, hi) - max(r.run_end_ns, lo)
        if dur <= 0:
            continue
        reason = classify(r, gil)
        summary.off_cpu_ns[reason] += dur
        values = {}
        if "off_cpu" in want:
            values["off_cpu"] = dur
        if reason == "io" and "io_wait" in want:
            values["io_wait"] = dur
        if reason == "net" and "net_wait" in want:
            values["net_wait"] = dur
        if values:
            stack = _MARKER_FRAMES[reason] + r.kstack + py(r.tid, r.run_end_ns, r.off_end_ns)
            profile.add(stack, labels(r.tid, r.run_end_ns, r.off_end_ns, reason=reason), values)

    for w in data.lock_waits:
        if w.tgid != pid:
            continue
        dur = min(w.end_ns, hi) - max(w.start_ns, lo)
        if dur <= 0:
            continue
        t = "gil_wait" if w.kind == "gil" else "lock_wait"
        if w.kind == "gil":
            summary.gil_ns += dur
        else:
            summary.lock_ns += dur
        if t in want:
            marker = {"gil": "[GIL wait]", "klock": "[kernel lock wait]"}.get(w.kind, "[lock wait]")
            stack = (Frame(marker),) + w.ustack + py(w.tid, w.start_ns, w.end_ns)
            profile.add(stack, labels(w.tid, w.start_ns, w.end_ns), {t: dur})

    for io in data.io:
        # Discards free blocks and flushes carry no data: neither is bytes moved.
        if io.tgid != pid or not lo <= io.start_ns < hi or io.op not in ("read", "write"):
            continue
        summary.io_bytes += io.bytes
        summary.io_requests += 1
        if "io" in want and io.bytes:
            stack = (Frame(f"[io {io.op}]"),) + py(io.tid, io.start_ns, io.start_ns)
            profile.add(stack, labels(io.tid, io.start_ns, device=io.dev), {"io": io.bytes})

    for n in data.net:
        if n.tgid == pid and n.kind == "connect" and lo <= n.end_ns < hi:
            summary.connects.append(n.end_ns - n.start_ns)

    for b in data.buckets:
        if b.tgid != pid:
            continue
        overlap = min(b.start_ns + b.width_ns, hi) - max(b.start_ns, lo)
        if overlap <= 0:
            continue
        if overlap < b.width_ns:  # a bucket on the window's edge counts in proportion
            b = b._replace(value=round(b.value * overlap / b.width_ns))
        mid = b.start_ns + b.width_ns // 2
        stack_py = idx[b.tid].at(mid) if b.tid in idx else ()
        if b.probe == "lock":
            t = "gil_wait" if b.kind == "gil" else "lock_wait"
            if b.kind == "gil":
                summary.gil_ns += b.value
            else:
                summary.lock_ns += b.value
            if t in want:
                marker = "[GIL wait]" if b.kind == "gil" else "[lock wait]"
                profile.add((Frame(marker),) + stack_py, labels(b.tid, mid), {t: b.value})
        elif b.probe == "net":
            t = {"send": "net_send", "recv": "net_recv", "retransmit": "tcp_retransmits"}[b.kind]
            if b.kind == "send":
                summary.net_send += b.value
            elif b.kind == "recv":
                summary.net_recv += b.value
            else:
                summary.retransmits += b.value
            if t in want:
                marker = {"send": "[tcp send]", "recv": "[tcp recv]",
                          "retransmit": "[tcp retransmit]"}[b.kind]
                profile.add((Frame(marker),) + stack_py, labels(b.tid, mid), {t: b.value})
    return summary
