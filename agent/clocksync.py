"""Calibrating py-spy's clock against events whose times are exact.

py-spy stamps a sample when its main thread processes it, in microseconds since it started; we
take CLOCK_REALTIME when we spawn it as that zero. Measured here, the zero is off by up to 3 ms
from run to run (process start-up), consistently within a run. The scheduler's transitions
(a thread leaving or getting the CPU, from the sched probe) and span boundaries (from the app's
own clock) are exact, and each one that changes the thread's Python stack shows up as a py-spy
stack change a little later: one sampling gap, exponentially distributed with mean 1/rate.

Only transitions that must come *before* the stack change count: a thread cannot change its
Python stack while blocked, so the change follows its wake-up; a span's function is called after
the span starts. (A thread blocks, and a span ends, after its stack changed: those would bias.)
For every py-spy stack change shortly after such a transition we take (observed - transition).
Its lower tail is the clock error: the 10th percentile of an exponential lag is 0.105/rate, so
error = q10 - 0.105/rate; with fewer than 30 pairs, the minimum less its expectation
(1 / (n * rate)). With fewer than MIN_PAIRS pairs we do not guess.
"""

from __future__ import annotations

import bisect
import math

from agent.timeline import Slice, ThreadTimeline

#: pairs with observed - transition in [-BEFORE_NS, AFTER_NS] count
BEFORE_NS = 5_000_000
AFTER_NS = 8_000_000
MIN_PAIRS = 5
MAX_CORRECTION_NS = 10_000_000


def estimate_error_ns(timelines: list[ThreadTimeline], transitions: dict[int, list[int]],
                      rate_hz: int) -> int | None:
    """py-spy's clock error (observed - true, ns), or None without enough evidence."""
    diffs: list[int] = []
    for tl in timelines:
        ts = transitions.get(tl.tid)
        if not ts:
            continue
        for prev, cur in zip(tl.slices, tl.slices[1:]):
            if prev.stack == cur.stack:
                continue
            t = cur.start_ns
            i = bisect.bisect_right(ts, t + BEFORE_NS) - 1  # the latest transition it may follow
            if i >= 0 and t - ts[i] <= AFTER_NS:
                diffs.append(t - ts[i])
    if len(diffs) < MIN_PAIRS:
        return None
    diffs.sort()
    n = len(diffs)
    if n < 30:
        err = diffs[0] - round(1e9 / (n * rate_hz))
    else:
        err = diffs[math.ceil(0.10 * n) - 1] - round(0.105e9 / rate_hz)
    if abs(err) > MAX_CORRECTION_NS:
        return None
    return err


def shift(tl: ThreadTimeline, by_ns: int) -> ThreadTimeline:
    if not by_ns:
        return tl
    return ThreadTimeline(tl.pid, tl.tid, tl.name,
                          [Slice(s.start_ns + by_ns, s.end_ns + by_ns, s.stack) for s in tl.slices])


def run_transitions(data, pid: int) -> dict[int, list[int]]:
    """When each thread of `pid` got the CPU back after a wait (at or above the threshold)."""
    out: dict[int, list[int]] = {}
    for r in data.runs:
        if r.tgid == pid and r.off_end_ns is not None:
            out.setdefault(r.tid, []).append(r.off_end_ns)
    for lst in out.values():
        lst.sort()
    return out


def span_transitions(store, pid: int, start_ns: int, end_ns: int) -> dict[int, list[int]]:
    """When spans started on each thread of `pid`."""
    return {tid: sorted({s.start_ns for s in store.thread_spans(pid, tid, start_ns, end_ns)})
            for tid in store.threads_of(pid)}
