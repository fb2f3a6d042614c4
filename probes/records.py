"""What the probes report, in user space: typed records with CLOCK_REALTIME nanoseconds and
symbolised stacks, leaf first: `kstack` holds kernel frames, `pystack` the Python frames the
kernel read at that moment (empty for a process whose interpreter the walker does not support;
a one-frame marker when the walk failed, see `py_marker`).

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


#: Why the kernel walker returned no (or a partial) Python stack: its error codes.
PY_ERRORS = {1: "no_process_config", 2: "fsbase", 3: "no_thread_state", 4: "thread_state",
             5: "frame", 6: "code_object", 7: "instruction"}


class Run(NamedTuple):
    """A thread's on-CPU run, and the off-CPU wait (>= the threshold) that ended it.

    CPU time in the run is (run_end - run_start - short_off). `run_start` is None when the thread
    was already running when the probes attached; `off_end` is None when the thread exited.
    `pystack` is the Python stack the thread left the CPU in (the wait's stack).
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
    pystack: Stack = ()
    syscall: int = -1       # the syscall the thread blocked in (-1: unknown)
    arg0: int = 0           # its first argument
    task: int = 0           # the asyncio task's coroutine it ran in (0: none)

    @property
    def blocked(self) -> bool:
        return 0 < self.state < STATE_PREEMPTED


class Sample(NamedTuple):
    """The CPU sampler found the thread on CPU at `t_ns`: one period of CPU time."""

    tgid: int
    tid: int
    t_ns: int
    period_ns: int
    kstack: Stack
    pystack: Stack
    task: int = 0


class ShortWaits(NamedTuple):
    """`count` blocked waits, each shorter than the off-CPU threshold, in one place (the same
    Python stack, kernel stack and futex) between start and end: `total_ns` off CPU in all."""

    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    total_ns: int
    count: int
    state: int
    kstack: Stack
    futex_addr: int
    pystack: Stack
    syscall: int = -1
    arg0: int = 0
    task: int = 0

    @property
    def blocked(self) -> bool:
        return True


class NetBytes(NamedTuple):
    """TCP bytes a thread moved between start and end, with the stack of the last call."""

    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    direction: str     # "send" | "recv"
    bytes: int
    pystack: Stack
    task: int = 0


class IoRequest(NamedTuple):
    tgid: int
    tid: int
    start_ns: int
    end_ns: int
    bytes: int
    dev: str           # "major:minor"
    op: str            # "read" | "write" | "discard" | "other" (flush)
    rwbs: str
    pystack: Stack = ()
    task: int = 0


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

    probe: str         # "net"
    tgid: int
    tid: int
    start_ns: int
    width_ns: int
    kind: str          # net: retransmit
    value: int         # ns or bytes or count
    count: int


@dataclass
class ProbeData:
    """Everything one probe session saw, plus its counters."""

    runs: list[Run] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    short_waits: list[ShortWaits] = field(default_factory=list)
    io: list[IoRequest] = field(default_factory=list)
    net: list[NetEvent] = field(default_factory=list)
    net_bytes: list[NetBytes] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    #: tid -> CLOCK_REALTIME ns at which a thread of this process was created (a reused tid
    #: is a new thread from then on)
    new_threads: dict[int, int] = field(default_factory=dict)
    #: runs still open at the end: tid -> (tgid, run start or None, run end (None: on CPU now),
    #: short_off_ns)
    open_runs: dict[int, tuple[int, int | None, int | None, int]] = field(default_factory=dict)
    #: waits still going on when read: Runs whose off_end_ns is the time of the read
    open_waits: list[Run] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    gil_ranges: dict[int, tuple[int, int]] = field(default_factory=dict)
    start_ns: int = 0
    end_ns: int = 0
