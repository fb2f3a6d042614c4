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
    #: what the process is called in the UI when it sends no spans (see `service_from`)
    service: str = ""

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
        #: (pid, start ticks) -> the Target, or None for a process we do not profile
        self._known: dict[tuple[int, int], Target | None] = {}
        self.skipped_over_limit = 0

    def _wanted(self, name: str, cmdline: str) -> bool:
        if self.include and not (self.include.search(name) or self.include.search(cmdline)):
            return False
        if self.exclude and (self.exclude.search(name) or self.exclude.search(cmdline)):
            return False
        return True

    def scan(self) -> dict[int, Target]:
        """Every scan lists /proc and reads one line per process; only processes not seen
        before (a new pid, or a new start time: a reused pid) get the full look (psutil,
        ELF/maps check). Targets also get their executable re-read, to notice an exec."""
        me = os.getpid()
        found: dict[int, Target] = {}
        seen: set[tuple[int, int]] = set()
        try:
            names = os.listdir("/proc")
        except OSError:
            return found
        for n in names:
            if not n.isdigit():
                continue
            pid = int(n)
            if pid == me:
                continue
            start = _start_ticks(pid)
            if start is None:
                continue
            key = (pid, start)
            seen.add(key)
            if key in self._known:
                t = self._known[key]
                if t is not None:
                    try:
                        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
                    except OSError:
                        exe = t.exe
                    if exe != t.exe:  # exec'd: look again
                        t = self._known[key] = self._look(pid, me)
            else:
                t = self._known[key] = self._look(pid, me)
            if t is None:
                continue
            if len(found) >= self.max_targets:
                self.skipped_over_limit += 1
                continue
            found[pid] = t
        for key in list(self._known):  # forget processes that are gone
            if key not in seen:
                del self._known[key]
        return found

    def _look(self, pid: int, me: int) -> Target | None:
        try:
            p = psutil.Process(pid)
            with p.oneshot():
                if p.ppid() == me:
                    return None  # our own children: py-spy
                name = p.name()
                exe = p.exe()
                argv = p.cmdline()
                cmdline = " ".join(argv)[:1000]
                ct = p.create_time()
        except (psutil.Error, OSError):
            return None
        # The cheap test first: is_python may read the whole of /proc/<pid>/maps, and on a
        # busy node most new processes are not wanted anyway.
        if not self._wanted(name, cmdline):
            return None
        try:
            if not is_python(pid):
                return None
        except SpanflameError:
            return None
        service = service_from(name, argv)
        if service == "spanflame":
            return None  # another spanflame agent (or attach): a profiler, not a service
        return Target(pid, ct, name, exe, cmdline, service)


_INTERPRETER = re.compile(r"^(python|pypy)[0-9.]*[a-z]?$")
#: interpreter options that take a value (the value is not the script)
_OPTS_WITH_VALUE = {"-W", "-X", "-Q"}


def service_from(name: str, argv: list[str]) -> str:
    """A service name from how the process was started: `python3 shop/app.py` is "app",
    `python -m celery worker` is "celery", `python -m pkg` with pkg/__main__.py is "pkg", a
    console script (`gunicorn`, `/venv/bin/uvicorn`) is its own name. Only a bare interpreter
    (`python3 -c ...`, a REPL) stays the process name."""
    args = list(argv[:64])
    if args and not _INTERPRETER.match(os.path.basename(args[0])):
        base = os.path.basename(args[0].split(":")[0].split(" ")[0])  # "gunicorn: worker [x]"
        return (base.removesuffix(".py") or name)[:200]
    i = 1
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            return args[i + 1][:200]
        if a.startswith("-m") and len(a) > 2:
            return a[2:][:200]
        if a == "-c" or a.startswith("-c") or a == "-":
            return name
        if a in _OPTS_WITH_VALUE:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        path = a.rstrip("/")
        base = os.path.basename(path)
        if base == "__main__.py":
            base = os.path.basename(os.path.dirname(path)) or base
        return (base.removesuffix(".py").removesuffix(".pyz") or name)[:200]
    return name


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None
