"""What suspended asyncio tasks are awaiting, seen from outside the process.

A task that awaits is on no thread: no CPU sample and no wait of the kernel's shows it. The
hookup keeps `agent.otel._active_tasks` (the coroutines of the tasks that have an open span);
`AwaitPoller` reads it from the process's memory every `interval_s` and, for each such task, its
await chain (probes/pyasync.py): the coroutine frames from the task's own down to the one that
awaits a future, and what that future is. Each observation stands for the time since the last
poll: added to a profile it is the `await` sample type, on the stack the task awaited in, and
it names what a span's awaiting time was spent on ("awaiting the network in fetch_upstream").

A process is polled every `interval_s` while it has tasks with open spans, or lately sent spans
in tasks (`want`, called as such spans arrive); four times a second while its registry is there but
empty (an app with the hookup, between requests); every 30 s while the hookup is not there.

Threading: `watch`, `unwatch` and `close` from one owner thread; polling on the poller's own
thread; `want`, `window` and `prune` from any thread (under a lock).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

from agent.model import Frame, Stack

log = logging.getLogger(__name__)

MAX_TASKS = 512            # per process and poll; more are counted and left for the next poll
MAX_OBSERVATIONS = 200_000  # held per process between prunes
MAX_POLLS = 3_000           # open-task sets kept per process (5 min at 10 polls/s)
WANT_S = 60.0              # a process is polled this long after its last span in a task
IDLE_S = 0.25              # ... then this often while its registry is empty (a poll of an
#                            empty one: ~36 us; requests after a lull are seen within 0.25 s)
ABSENT_S = 30.0            # ... and this often while it has no registry at all

#: what a task awaits -> words for it ("awaiting the network")
WHAT_WORDS = {"network": "the network", "lock": "a lock", "event": "an event",
              "sleep": "a sleep", "queue": "a queue", "tasks": "other tasks", "": ""}
_LOCK = {"Lock.acquire", "Semaphore.acquire", "BoundedSemaphore.acquire"}
_EVENT = {"Event.wait", "Condition.wait", "Condition.wait_for", "Barrier.wait"}
_NETWORK_FILES = ("streams.py", "selector_events.py", "proactor_events.py", "sslproto.py")
_NETWORK_FUNCS = {"BaseEventLoop.create_connection", "BaseEventLoop.getaddrinfo",
                  "BaseEventLoop.sock_connect", "BaseEventLoop.sock_recv",
                  "BaseEventLoop.sock_sendall", "BaseEventLoop.sock_accept",
                  "BaseEventLoop._ensure_resolved", "open_connection", "start_server"}
_TASK_LEAVES = ("Task", "_GatheringFuture")


class AwaitObservation(NamedTuple):
    tgid: int
    task: int          # the task's coroutine (what spans carry as spanflame.task)
    t_ns: int
    weight_ns: int     # the time it stands for: since this process's previous poll
    stack: Stack       # the awaiting coroutines' frames, innermost first
    what: str          # a key of WHAT_WORDS


def _stdlib(filename: str) -> bool:
    return "/lib/python3" in filename or "/site-packages/" in filename or \
        "/dist-packages/" in filename


def classify(stack: Stack, leaf: str) -> str:
    """What a chain awaits, from its frames (innermost first) and the awaited object's type."""
    for f in stack:
        base = f.filename.rsplit("/", 1)[-1]
        if "/asyncio/" in f.filename or "asyncio" in base:
            if f.name in _LOCK and base == "locks.py":
                return "lock"
            if f.name in _EVENT and base == "locks.py":
                return "event"
            if base == "queues.py":
                return "queue"
            if f.name == "sleep" and base == "tasks.py":
                return "sleep"
            if base in _NETWORK_FILES or f.name in _NETWORK_FUNCS:
                return "network"
            if base == "tasks.py" and f.name in ("gather", "wait", "wait_for", "_wait"):
                return "tasks"
        elif "/aiohttp/" in f.filename and ("client" in base or "connector" in base):
            return "network"
    if leaf.rsplit(".", 1)[-1] in _TASK_LEAVES:
        return "tasks"
    return ""


def user_frame(stack: Stack) -> Frame | None:
    """The innermost frame of the app's own code (not the standard library or a package), else
    the innermost Python frame."""
    python = [f for f in stack if f.filename and not f.filename.startswith("[")]
    for f in python:
        if not _stdlib(f.filename):
            return f
    return python[0] if python else None


class AwaitPoller:
    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self._procs: dict[int, tuple[object, object]] = {}   # pid -> (PyProcess, Symbolizer)
        self._wanted: dict[int, float] = {}                  # pid -> monotonic time of a task span
        self._next: dict[int, float] = {}                    # pid -> when to poll it next
        self._last: dict[int, int] = {}
        self._obs: dict[int, list[AwaitObservation]] = {}
        # pid -> [(poll time, the tasks with open spans then)], oldest first (see settled_at)
        self._open: dict[int, list[tuple[int, frozenset]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.errors = 0
        self.dropped = 0
        self.busy_s = 0.0

    def start(self) -> "AwaitPoller":
        self._thread = threading.Thread(target=self._run, name="spanflame-awaits", daemon=True)
        self._thread.start()
        return self

    def watch(self, proc) -> None:
        """Poll this process (a probes.pyprocess.PyProcess)."""
        from probes.pysymbols import Symbolizer
        with self._lock:
            if proc.pid not in self._procs:
                self._procs[proc.pid] = (proc, Symbolizer(proc))

    def want(self, spans) -> None:
        """Spans arrived (a SpanStore listener): poll the processes whose spans ran in tasks."""
        now = time.monotonic()
        pids = {s.pid for s in spans if s.task}
        if pids:
            with self._lock:
                for pid in pids:
                    self._wanted[pid] = now

    def unwatch(self, pid: int) -> None:
        with self._lock:
            entry = self._procs.pop(pid, None)
            self._next.pop(pid, None)
            self._wanted.pop(pid, None)
        if entry is not None:
            entry[1].close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for pid in list(self._procs):
            self.unwatch(pid)

    def _record_open(self, pid: int, t_ns: int, tasks) -> None:
        """One poll's tasks with open spans, for settled_at; bounded (attach and record never
        prune)."""
        with self._lock:
            polls = self._open.setdefault(pid, [])
            polls.append((t_ns, frozenset(tasks)))
            if len(polls) > MAX_POLLS:
                del polls[:len(polls) - MAX_POLLS]

    def settled_at(self, pid: int, t_ns: int) -> int | None:
        """When every task that had an open span at `t_ns` had ended it: the first poll after
        `t_ns` at which none of the tasks open at the first poll after `t_ns` is still open.
        A span overlapping a window that ends at `t_ns` has ended by then, so once the process
        has sent a span that ended later, it was sent too. `t_ns` itself for a process that is
        not polled or has no task with an open span; None while not known yet."""
        with self._lock:
            polls = self._open.get(pid)
            if pid not in self._procs or not polls or polls[-1][0] < t_ns and not polls[-1][1]:
                return t_ns
            first = None
            for t, tasks in polls:
                if t < t_ns:
                    continue
                if first is None:
                    first = tasks
                    if not first:  # (spans that ended before this poll: sent before a later one)
                        return t
                elif not (first & tasks):
                    return t
            return None

    def window(self, pid: int, lo: int, hi: int) -> list[AwaitObservation]:
        with self._lock:
            return [o for o in self._obs.get(pid, ()) if lo <= o.t_ns < hi]

    def prune(self, before_ns: int) -> None:
        with self._lock:
            for pid in list(self._open):
                kept_polls = [p for p in self._open[pid] if p[0] >= before_ns]
                if kept_polls or pid in self._procs:
                    self._open[pid] = kept_polls
                else:
                    del self._open[pid]
            for pid in list(self._obs):
                kept = [o for o in self._obs[pid] if o.t_ns >= before_ns]
                if kept or pid in self._procs:
                    self._obs[pid] = kept
                else:
                    del self._obs[pid]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            t0 = time.monotonic()
            with self._lock:
                procs = [v for pid, v in self._procs.items() if self._next.get(pid, 0) <= t0
                         or t0 - self._wanted.get(pid, -WANT_S) < WANT_S]
            for proc, sym in procs:
                try:
                    found, present = self.poll(proc, sym)
                except Exception:  # loop edge: one process must not stop the others
                    self.errors += 1
                    found, present = 0, False
                    log.debug("await poll of PID %d failed", proc.pid, exc_info=True)
                pause = self.interval_s if found else IDLE_S if present else ABSENT_S
                self._next[proc.pid] = t0 + pause
            self.busy_s += time.monotonic() - t0

    def poll(self, proc, sym) -> tuple[int, bool]:
        """One look at every task with an open span of `proc`: (observations made, whether the
        hookup's registry is there)."""
        from probes import pyasync
        from probes.pyprocess import ProcessMemory

        now = time.time_ns()
        step = round(self.interval_s * 1e9)
        # an observation stands for the time since the previous poll, at most two steps (after
        # an idle stretch polled slowly, the tasks seen now were not there all along)
        weight = min(now - self._last.get(proc.pid, now - step), 2 * step)
        self._last[proc.pid] = now
        out = []
        with ProcessMemory(proc.pid) as mem:
            tasks = pyasync.active_tasks(proc, mem)
            if tasks.present:
                self._record_open(proc.pid, now, tasks)
            if len(tasks) > MAX_TASKS:
                self.dropped += len(tasks) - MAX_TASKS
                tasks = tasks[:MAX_TASKS]
            for coro in tasks:
                chain = pyasync.await_chain(proc, mem, coro)
                if chain.running or not chain.frames:
                    continue
                frames = tuple(f for f in (sym.frame(c, chk, ins) for c, ins, chk in chain.frames)
                               if f is not None)
                out.append(AwaitObservation(proc.pid, coro, now, weight, frames,
                                            classify(frames, chain.leaf)))
        self.polls += 1
        with self._lock:
            held = self._obs.setdefault(proc.pid, [])
            room = MAX_OBSERVATIONS - len(held)
            if room < len(out):
                self.dropped += len(out) - max(0, room)
                out = out[:max(0, room)]
            held.extend(out)
        return len(out), tasks.present
