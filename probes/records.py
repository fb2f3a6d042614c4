"""What the probes report, in user space: typed records with CLOCK_REALTIME nanoseconds and
symbolised stacks (kernel frames and native user frames, leaf first).

Records are NamedTuples: tens of thousands are made per second, and tuple construction runs in C.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from agent.model import Stack

# prev_state values of sched_switch (as the tracepoint reports them).
STATE_RUNNING = 0
STATE_INTERRUPTIBLE = 1
STATE_UNINTERRUPTIBLE = 2
STATE_PREEMPTED = 0x100  # TASK_REPORT_MAX: left the CPU while runnable ("R+")


class Run(NamedTuple):
    """A thread's on-CPU run, and the off-CPU wait (>= the threshold) that ended it.

    CPU time in the run is (run_end - run_start - short_off). `run_start` is None when the thread
    was already running when the probes attached; `off_end` is None when the thread exited.
    """

    tgid: int
    tid: int
    run_start_ns: int | None
    run_end_ns: int
    off_end_ns: int | None
    short_off_ns: int
    state: int
    kstack: Stack
    futex_addr: int

    @property
    def blocked(self) -> bool:
        return 0 < self.state < STATE_PREEMPTED


class LockWait(NamedTuple):
    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    addr: int
    kind: str          # "futex" | "gil" | "klock"
    ustack: Stack


class IoRequest(NamedTuple):
    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    bytes: int
    dev: str           # "major:minor"
    op: str            # "read" | "write" | "discard" | "other" (flush)
    rwbs: str


class NetEvent(NamedTuple):
    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    kind: str          # "connect" (start: connect(), end: established) | "close" (lifetime)
    dport: int
    daddr: str


class Bucket(NamedTuple):
    """Frequent short events added up in the kernel per thread and time bucket."""

    probe: str         # "lock" | "net"
    tgid: int
    tid: int
    start_ns: int
    width_ns: int
    kind: str          # lock: futex/gil/klock; net: send/recv/retransmit
    value: int         # ns or bytes or count
    count: int


@dataclass
class ProbeData:
    """Everything one probe session saw, plus its counters."""

    runs: list[Run] = field(default_factory=list)
    lock_waits: list[LockWait] = field(default_factory=list)
    io: list[IoRequest] = field(default_factory=list)
    net: list[NetEvent] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    #: runs still open at the end: tid -> (tgid, run start or None, run end (None: on CPU now),
    #: short_off_ns)
    open_runs: dict[int, tuple[int, int | None, int | None, int]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    gil_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
