"""On-CPU time of a process's threads from /proc/<pid>/task/<tid>/schedstat, without eBPF.

The first field of schedstat is the thread's cumulative time on CPU in nanoseconds. Polling it
for every thread (one pread on a kept file descriptor, about 2 µs) gives a `PiecewiseCpu` that
splits a thread's CPU time across its Python stacks. This is the activity signal that py-spy's
output formats do not carry.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from agent.timeline import PiecewiseCpu

log = logging.getLogger(__name__)


class SchedstatPoller:
    """Polls every thread of `pid` at `rate_hz` on a background thread.

    `start()` takes a first reading synchronously; `close()` takes a last one and stops the thread
    (idempotent). Never raises from the background thread: a vanished thread is marked as exited,
    a vanished process ends polling.
    """

    def __init__(self, pid: int, rate_hz: float = 100.0, cpu: PiecewiseCpu | None = None) -> None:
        self.pid = pid
        self.interval_s = 1.0 / max(1.0, rate_hz)
        self.cpu = cpu if cpu is not None else PiecewiseCpu()
        self._fds: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.polls = 0
        self.process_gone = False

    def __enter__(self) -> "SchedstatPoller":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is not None:
            return
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="spanflame-schedstat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll_once()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set() and not self.process_gone:
            next_t += self.interval_s
            delay = next_t - time.monotonic()
            if delay < 0:
                next_t = time.monotonic()
                delay = 0
            if self._stop.wait(delay):
                break
            try:
                self.poll_once()
            except Exception:  # loop edge: log once, keep the recording alive
                log.exception("schedstat poll failed")

    def poll_once(self) -> None:
        with self._lock:
            if self.process_gone:
                return
            self.polls += 1
            try:
                tids = os.listdir(f"/proc/{self.pid}/task")
            except OSError:
                self.process_gone = True
                now = time.time_ns()
                for tid in self._fds:
                    self.cpu.mark_exit(tid, now)
                return
            fds = self._fds
            for name in tids:
                tid = int(name)
                if tid not in fds:
                    try:
                        fds[tid] = os.open(f"/proc/{self.pid}/task/{tid}/schedstat", os.O_RDONLY)
                    except OSError:
                        continue
            gone = []
            for tid, fd in fds.items():
                t = time.time_ns()
                try:
                    data = os.pread(fd, 96, 0)
                except OSError:
                    data = b""
                if not data:
                    gone.append(tid)
                    self.cpu.mark_exit(tid, t)
                    continue
                self.cpu.add(tid, t, int(data.split(None, 1)[0]))
            for tid in gone:
                os.close(fds.pop(tid))
