"""Per-thread timelines: which Python stack a thread had when, and how much CPU it used when.

All times are CLOCK_REALTIME nanoseconds.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol

from agent.model import Stack


@dataclass(frozen=True, slots=True)
class Slice:
    """The thread had `stack` (leaf first) from `start_ns` until `end_ns` (exclusive)."""

    start_ns: int
    end_ns: int
    stack: Stack


@dataclass(slots=True)
class ThreadTimeline:
    """Stack slices of one OS thread, sorted and non-overlapping."""

    pid: int
    tid: int
    name: str
    slices: list[Slice] = field(default_factory=list)
    _starts: list[int] | None = None

    def stack_at(self, t_ns: int) -> Slice | None:
        """The slice covering `t_ns`, if any."""
        if self._starts is None or len(self._starts) != len(self.slices):
            self._starts = [s.start_ns for s in self.slices]
        i = bisect.bisect_right(self._starts, t_ns) - 1
        if i >= 0 and self.slices[i].end_ns > t_ns:
            return self.slices[i]
        return None

    @property
    def start_ns(self) -> int:
        return self.slices[0].start_ns if self.slices else 0

    @property
    def end_ns(self) -> int:
        return self.slices[-1].end_ns if self.slices else 0


class CpuTimeline(Protocol):
    """Cumulative on-CPU time of threads. Implementations: schedstat polling, eBPF sched_switch."""

    def oncpu_ns(self, tid: int, start_ns: int, end_ns: int) -> int:
        """Nanoseconds thread `tid` spent on CPU within [start_ns, end_ns)."""
        ...

    def exit_ns(self, tid: int) -> int | None:
        """When the thread was last seen alive, if it exited during the recording."""
        ...

    def activity(self, tid: int, t_ns: int) -> float | None:
        """How busy the thread was at `t_ns`, 0.0 (off CPU) to 1.0 (on CPU); None if unknown."""
        ...


class PiecewiseCpu:
    """A CpuTimeline from cumulative on-CPU readings (t_ns, cum_ns) per thread, interpolated
    linearly between readings. Before the first and after the last reading the thread is
    assumed not to run."""

    def __init__(self) -> None:
        self._t: dict[int, list[int]] = {}
        self._c: dict[int, list[int]] = {}
        self._exit: dict[int, int] = {}

    def add(self, tid: int, t_ns: int, cum_ns: int) -> None:
        ts = self._t.setdefault(tid, [])
        cs = self._c.setdefault(tid, [])
        if ts and t_ns <= ts[-1]:
            return
        if cs and cum_ns < cs[-1]:  # a reused tid restarted its counter
            cum_ns = cs[-1]
        ts.append(t_ns)
        cs.append(cum_ns)

    def mark_exit(self, tid: int, t_ns: int) -> None:
        self._exit.setdefault(tid, t_ns)

    def exit_ns(self, tid: int) -> int | None:
        return self._exit.get(tid)

    def tids(self) -> list[int]:
        return list(self._t)

    def _cum(self, tid: int, t: int) -> float:
        ts = self._t.get(tid)
        if not ts:
            return 0.0
        cs = self._c[tid]
        if t <= ts[0]:
            return float(cs[0])
        if t >= ts[-1]:
            return float(cs[-1])
        i = bisect.bisect_right(ts, t)
        t0, t1 = ts[i - 1], ts[i]
        c0, c1 = cs[i - 1], cs[i]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0)

    def oncpu_ns(self, tid: int, start_ns: int, end_ns: int) -> int:
        if end_ns <= start_ns:
            return 0
        return max(0, round(self._cum(tid, end_ns) - self._cum(tid, start_ns)))

    def seen(self, tid: int) -> bool:
        """Whether the thread was read at least twice (so that its CPU over a stretch is known)."""
        return len(self._t.get(tid, ())) >= 2

    def activity(self, tid: int, t_ns: int) -> float | None:
        """The CPU rate over the reading interval that contains `t_ns`."""
        ts = self._t.get(tid)
        if not ts or t_ns < ts[0] or t_ns >= ts[-1]:
            return None
        i = bisect.bisect_right(ts, t_ns)
        dt = ts[i] - ts[i - 1]
        if dt <= 0:
            return None
        cs = self._c[tid]
        return min(1.0, max(0.0, (cs[i] - cs[i - 1]) / dt))
