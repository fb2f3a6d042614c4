"""Thread names for samples: the Python name of each OS thread of a process.

Names come, best first, from the process itself (`threading._active`, read from outside by
probes/pythreads.py, for interpreters the kernel walker supports), from the spans the app sent
(`thread.name`, set by the hookup on every span), then from the kernel's name for the thread
(`comm`, which `threading` does not set: often the process name, at most 15 bytes). A thread id
the OS reuses gets the new thread's name at the next refresh. Read while the threads are alive:
call `refresh()` at the start and end of a recording, and at every window.
"""

from __future__ import annotations

import os

MAX_NAME = 256


class ThreadNameCache:
    def __init__(self, pid: int, proc=None) -> None:
        self.pid = pid
        self.proc = proc            # probes.pyprocess.PyProcess, to read Python names
        self.errors = 0
        self._kernel: dict[int, str] = {}
        self._python: dict[int, tuple[int, str]] = {}
        self._own: dict[int, str] = {}
        self.refresh()

    def refresh(self) -> None:
        """Read the names of the threads alive now."""
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return
        if self.proc is not None:
            self._read_python_names()
        for t in tids:
            try:
                with open(f"/proc/{self.pid}/task/{t}/comm", "rb") as f:
                    self._kernel[int(t)] = f.read().strip().decode("utf-8", "replace")
            except (OSError, ValueError):
                continue

    def from_spans(self, spans) -> None:
        """Python names from the spans of this process (the latest span of a thread wins)."""
        for s in spans:
            if s.pid != self.pid or not s.tid:
                continue
            name = dict(s.attributes).get("thread.name")
            if not name:
                continue
            prev = self._python.get(s.tid)
            if prev is None or s.start_ns >= prev[0]:
                self._python[s.tid] = (s.start_ns, str(name)[:MAX_NAME])

    def _read_python_names(self) -> None:
        from probes import pythreads, pywalk
        from probes.pyprocess import ProcessMemory

        try:
            with ProcessMemory(self.pid) as mem:
                names = pythreads.thread_names(self.proc, mem)
            _nspid, host = pywalk.task_ids(self.pid)
        except Exception:  # the process is gone, or its memory unreadable: keep what we have
            self.errors += 1
            return
        self.errors += getattr(names, "errors", 0)
        for ns_tid, name in names.items():
            tid = host.get(ns_tid)
            if tid is not None:
                self._own[tid] = name[:MAX_NAME]

    def get(self) -> dict[int, str]:
        out = dict(self._kernel)
        out.update({tid: name for tid, (_t, name) in self._python.items()})
        out.update(self._own)
        return out
