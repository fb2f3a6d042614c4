"""Process and thread ids across PID namespaces: the one place they are translated.

The kernel (and so every probe record) uses host ids; an app in a container reports its own
(`os.getpid()`, `threading.get_native_id()`) on its spans, together with the inode of its PID
namespace (`spanflame.pid_ns`, set by the hookup). `PidNamespaces.to_host` maps such ids to the
host's, from /proc: each process's namespace (`/proc/PID/ns/pid`) and its ids in it (`NStgid:`,
and each task's `NSpid:`), cached and re-read on a miss at most once a second.
"""

from __future__ import annotations

import os
import threading
import time

RESCAN_S = 1.0


def namespace_of(pid: int | str = "self") -> int:
    """The inode of a process's PID namespace, 0 if unreadable."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return 0


def _status_ids(path: str, field: str) -> list[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return [int(v) for v in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


class PidNamespaces:
    """Thread-safe. Counts what it could not translate (`misses`)."""

    def __init__(self) -> None:
        self.own = namespace_of()
        self._lock = threading.Lock()
        self._pids: dict[tuple[int, int], int] = {}          # (ns inode, ns pid) -> host pid
        self._tids: dict[int, dict[int, int]] = {}           # host pid -> {ns tid: host tid}
        self._scanned = 0.0
        self._tid_scanned: dict[int, float] = {}
        self.misses = 0

    def to_host(self, ns: int, pid: int, tid: int) -> tuple[int, int] | None:
        """(host pid, host tid) of a process/thread as seen in namespace `ns`; the ids as they
        are when `ns` is 0 (unknown) or our own; None when no such process is visible here."""
        if not ns or ns == self.own or not pid:
            return pid, tid
        with self._lock:
            host = self._pids.get((ns, pid))
            if host is None or namespace_of(host) != ns:
                self._scan()
                host = self._pids.get((ns, pid))
            if host is None:
                self.misses += 1
                return None
            if not tid:
                return host, 0
            htid = self._tids.get(host, {}).get(tid)
            if htid is None:
                self._scan_tids(host)
                htid = self._tids.get(host, {}).get(tid)
            if htid is None:
                self.misses += 1
                return host, 0
            return host, htid

    def _scan(self) -> None:
        now = time.monotonic()
        if now - self._scanned < RESCAN_S:
            return
        self._scanned = now
        found: dict[tuple[int, int], int] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            ids = _status_ids(f"/proc/{name}/status", "NStgid:")
            if len(ids) < 2:
                continue  # our own namespace
            ns = namespace_of(name)
            if ns:
                found[(ns, ids[-1])] = int(name)
        self._pids = found

    def _scan_tids(self, host: int) -> None:
        now = time.monotonic()
        if now - self._tid_scanned.get(host, 0.0) < RESCAN_S:
            return
        self._tid_scanned[host] = now
        out = {}
        try:
            tids = os.listdir(f"/proc/{host}/task")
        except OSError:
            tids = []
        for t in tids:
            ids = _status_ids(f"/proc/{host}/task/{t}/status", "NSpid:")
            if ids:
                out[ids[-1]] = int(t)
        self._tids[host] = out
        if len(self._tid_scanned) > 4096:  # processes come and go: forget the old ones
            self._tid_scanned.clear()
            self._tids = {host: out}
