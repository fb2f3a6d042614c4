"""The node agent's kernel stack source: windows of processes whose Python stacks the kernel
walker reads (every CPU sample and every wait with the stack of its moment).

There is no per-process sampler to run: the probe session records every target all the time.
`KernelWindows` cuts each such process's time into windows of `window_s` (the first from when it
was added, the last at its exit) and hands them to the agent's pipeline, which waits for their
spans and calls `build_kernel_window`.

Threading: `add`, `remove` and `close` come from the discovery thread; windows are cut on the
class's own thread.
"""

from __future__ import annotations

import logging
import threading
import time

from agent.aggregate import fill_sample_counts, new_profile
from agent.model import SAMPLE_TYPES
from agent.threadnames import ThreadNameCache

log = logging.getLogger(__name__)


class KernelWindows:
    def __init__(self, agent, window_s: float) -> None:
        self.agent = agent
        self.window_s = window_s
        self._targets: dict[int, tuple[object, dict, int]] = {}  # pid -> (target, labels, start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spanflame-windows", daemon=True)
        self.names: dict[int, ThreadNameCache] = {}

    def start(self) -> "KernelWindows":
        self._thread.start()
        return self

    def add(self, target, labels: dict) -> None:
        with self._lock:
            self._targets[target.pid] = (target, labels, time.time_ns())
            proc = self.agent.session.procs.get(target.pid) if self.agent.session else None
            self.names[target.pid] = ThreadNameCache(target.pid, proc)

    def remove(self, pid: int) -> None:
        """The process exited or is no longer profiled: its last window ends now."""
        with self._lock:
            entry = self._targets.pop(pid, None)
        if entry is not None:
            self._submit(entry, time.time_ns())

    def pids(self) -> list[int]:
        with self._lock:
            return list(self._targets)

    def close(self) -> None:
        """Stop, handing over every open window (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=10)
        now = time.time_ns()
        with self._lock:
            entries, self._targets = list(self._targets.values()), {}
        for e in entries:
            self._submit(e, now)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            now = time.time_ns()
            due = []
            with self._lock:
                for pid, (target, labels, start) in list(self._targets.items()):
                    if now - start >= self.window_s * 1e9:
                        due.append((target, labels, start))
                        self._targets[pid] = (target, labels, now)
            for entry in due:
                names = self.names.get(entry[0].pid)
                if names is not None:
                    names.refresh()
                self._submit(entry, now)

    def _submit(self, entry, end_ns: int) -> None:
        from agent.run import WindowJob

        target, labels, start = entry
        if end_ns > start:
            self.agent.pipeline.submit(WindowJob(target, None, None, start, end_ns, dict(labels),
                                                 source="bpf"))


def build_kernel_window(agent, job) -> None:
    """Link, build and store the profiles of one window of a kernel-walked process."""
    from agent.recordprofile import add_records, kernel_python_stack
    from agent.spansummary import breakdowns
    from agent.tracelink import TraceLinker
    from agent.waits import RunsCpu

    pid = job.target.pid
    start, end = job.start_ns, job.end_ns
    data = agent.session.window(pid, start, end)
    linker = TraceLinker(agent.spans, agent.opts.rate_hz, window=(start - 1, end + 1),
                         tasks=True)
    types = []
    for p in agent.opts.probes:
        if p in ("cpu", "wall") or p in agent.session.active:
            types += [t for t in agent.probe_types[p] if t not in types]
    awaits = agent.awaits.window(pid, start, end) if agent.awaits is not None else []
    if awaits and "offcpu" in agent.session.active:
        types.append("await")
    types.sort(key=list(SAMPLE_TYPES).index)
    profile = new_profile(types, agent.opts.rate_hz, start, end)
    names = agent.kernel_windows.names.get(pid) or ThreadNameCache(pid)
    names.from_spans(s for tid in agent.spans.threads_of(pid)
                     for s in agent.spans.thread_spans(pid, tid, start, end))
    cpu = RunsCpu(data, pid, start, end)
    add_records(profile, pid, data, python_stack=kernel_python_stack, window=(start, end),
                linker=linker, thread_names=names.get(), cpu=cpu)
    if awaits:
        from agent.recordprofile import add_awaits
        add_awaits(profile, pid, awaits, window=(start, end), linker=linker,
                   thread_names=names.get())
    fill_sample_counts(profile)
    agent.store_window(job, profile, types, cpu, data)
    if not agent.kernel_windows.names.get(pid) and pid in agent.kernel_windows.names:
        agent.kernel_windows.names.pop(pid, None)
