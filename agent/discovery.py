"""Finding the Python processes on this machine, and noticing when they go, exec or are replaced.

A process is identified by (pid, start time): a reused PID is a new process. An exec keeps both,
so the executable and command line are compared too.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import psutil

from agent.errors import SpanflameError
from agent.pyspy import is_python

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    pid: int
    create_time: float
    name: str
    exe: str
    cmdline: str

    @property
    def key(self) -> tuple[int, float, str, str]:
        return (self.pid, self.create_time, self.exe, self.cmdline)


class Discovery:
    """`scan()` returns the Python processes to profile now, keyed by pid.

    include/exclude are regular expressions matched against the process name and its command
    line; a process matches when include (if given) matches either, and exclude (if given)
    matches neither. The agent itself and its children (py-spy) are never targets.
    """

    def __init__(self, include: str | None = None, exclude: str | None = None,
                 max_targets: int = 512) -> None:
        try:
            self.include = re.compile(include) if include else None
            self.exclude = re.compile(exclude) if exclude else None
        except re.error as exc:
            raise SpanflameError(f"invalid --include/--exclude regular expression: {exc}") from None
        self.max_targets = max_targets
        self._python: dict[tuple[int, float], bool] = {}
        self.skipped_over_limit = 0

    def _wanted(self, name: str, cmdline: str) -> bool:
        if self.include and not (self.include.search(name) or self.include.search(cmdline)):
            return False
        if self.exclude and (self.exclude.search(name) or self.exclude.search(cmdline)):
            return False
        return True

    def scan(self) -> dict[int, Target]:
        me = os.getpid()
        found: dict[int, Target] = {}
        seen = set()
        for p in psutil.process_iter(["pid", "name", "exe", "cmdline", "create_time", "ppid"]):
            info = p.info
            pid = info["pid"]
            if pid == me or info.get("ppid") == me:
                continue
            ct = info.get("create_time") or 0.0
            key = (pid, ct)
            seen.add(key)
            py = self._python.get(key)
            if py is None:
                try:
                    py = is_python(pid)
                except SpanflameError:
                    py = False
                self._python[key] = py
            if not py:
                continue
            name = info.get("name") or ""
            cmdline = " ".join(info.get("cmdline") or [])[:1000]
            if not self._wanted(name, cmdline):
                continue
            if len(found) >= self.max_targets:
                self.skipped_over_limit += 1
                continue
            found[pid] = Target(pid, ct, name, info.get("exe") or "", cmdline)
        for key in list(self._python):  # forget processes that are gone
            if key not in seen:
                del self._python[key]
        return found
