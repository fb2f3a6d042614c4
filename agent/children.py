"""Child processes and scratch directories that never outlive the process that made them.

* `spawn` starts a child with the parent-death signal set (`PR_SET_PDEATHSIG`, SIGKILL): when
  the agent or `spanflame attach` dies, even by SIGKILL, the kernel kills its py-spy children
  instead of leaving them sampling their targets. The kernel sends that signal when the *thread*
  that forked the child exits, not the process, so every child is forked by one daemon thread
  that lives as long as the process. A parent that died between the fork and the `prctl` is
  caught in the child by comparing `getppid()` with the pid recorded before the fork.
* `scratch_dir` makes a directory named after its owner: `<prefix><pidns>-<pid>-<start>-<rand>`
  (PID namespace inode, pid, start time in clock ticks). Its owner removes it on every orderly
  exit path. For the others (SIGKILL, the OOM killer), the first call per prefix also starts a
  *cleaner*: a `sh` in its own session blocked reading a pipe whose only writer is this
  process. When this process is gone, however it went, the kernel closes the pipe, `read`
  returns and the cleaner removes this process's directories (the owner tag is in their
  names). And before the first one a process makes, `remove_stale` removes those whose owner
  is gone and whose cleaner did not run (killed with it, say). A live owner's directory is
  never touched, pid reuse included (the start time differs), nor another PID namespace's.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def _die_with(parent: int):
    """The child's pre-exec step: die with `parent`. Runs between fork and exec, so it calls
    only a prepared C function and os functions (no locks, no imports)."""
    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: nobody would kill us
            os._exit(137)
    return preexec


class _Spawner:
    """Runs every fork on one daemon thread, started on first use (and again after a fork of
    this process, whose threads do not survive it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = 0
        self._queue: queue.SimpleQueue | None = None

    def submit(self, fn, timeout_s: float = 60.0):
        with self._lock:
            if self._owner != os.getpid():
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._loop, args=(self._queue,), daemon=True,
                                 name="spanflame-spawner").start()
                self._owner = os.getpid()
            q = self._queue
        fut: Future = Future()
        q.put((fn, fut))
        return fut.result(timeout_s)

    @staticmethod
    def _loop(q: queue.SimpleQueue) -> None:
        while True:
            fn, fut = q.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)


_spawner = _Spawner()


def spawn(args: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(args, **popen_kwargs)` for a child that gets SIGKILL when this process
    exits, however it exits. Raises what Popen raises (OSError when the program cannot run)."""
    if "preexec_fn" in popen_kwargs:
        raise ValueError("spawn sets preexec_fn itself")
    parent = os.getpid()
    return _spawner.submit(lambda: subprocess.Popen(args, preexec_fn=_die_with(parent),
                                                    **popen_kwargs))


# -- scratch directories ----------------------------------------------------------------------

def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def start_ticks(pid: int | str) -> int:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22); 0 if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def owner_tag() -> str:
    """`<pidns>-<pid>-<start>`: this process, unambiguously, for as long as the machine runs."""
    return f"{_pid_namespace()}-{os.getpid()}-{start_ticks('self')}"


_swept: set[tuple[str, str, int]] = set()
_swept_lock = threading.Lock()


def scratch_dir(prefix: str, parent: str | None = None) -> Path:
    """A new private (0700) directory `<parent>/<prefix><owner tag>-<random>`; the caller removes
    it. The first call per prefix and process first removes the stale ones (`remove_stale`)."""
    parent = parent or tempfile.gettempdir()
    key = (prefix, parent, os.getpid())
    with _swept_lock:
        first = key not in _swept
        _swept.add(key)
    if first:
        remove_stale(prefix, parent)
        _start_cleaner(os.path.join(parent, f"{prefix}{owner_tag()}-"))
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=parent))


#: The cleaners' pipes (write ends): held open, never written, for as long as this process lives.
_cleaners: list = []


def _start_cleaner(pattern: str) -> None:
    """Start a process that removes `<pattern>*` once this process is gone (see the module
    docstring). Best effort: without /bin/sh, `remove_stale` at the next start does it."""
    try:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", 'read _ignored; rm -rf -- "$0"*', pattern],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # no Ctrl-C from the terminal: it outlives us on purpose
    except OSError:
        return
    _cleaners.append(proc)  # keeps proc.stdin (the pipe's only writer) open


def remove_stale(prefix: str, parent: str | None = None) -> list[str]:
    """Remove `<prefix><pidns>-<pid>-<start>-*` directories in `parent` that this user owns and
    whose owner process is gone; returns their paths. Never raises."""
    parent = parent or tempfile.gettempdir()
    pattern = re.compile(re.escape(prefix) + r"(\d+)-(\d+)-(\d+)-[^/]+")
    own_ns, uid = _pid_namespace(), os.geteuid()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None:
            continue
        ns, pid, start = (int(g) for g in m.groups())
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not entry.is_dir(follow_symlinks=False) or st.st_uid != uid or ns != own_ns:
            continue
        if pid and start_ticks(pid) == start:
            continue  # its owner is alive
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(entry.path)
    return removed
