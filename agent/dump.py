"""`spanflame dump PID`: every thread's Python stack, once, with what each thread is doing.

Stacks are read from the process's memory (probes/pywalk.py, the walker the kernel probes use,
from user space), so the target is not stopped; what each thread is doing comes from the kernel
(/proc: its state, the system call it is blocked in, its kernel stack) and is classified with
the same rules as the probes' waits (agent/reasons.py): running, lock, GIL, waiting for another
thread (sync), IO, network, sleep, other. Interpreters the walker does not read (3.9 and older,
3.14, PyPy) are dumped by py-spy (`py-spy dump --json`), without the thread states.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from agent.errors import NoSuchProcess, SamplerError
from agent.model import Frame
from agent.pyspy import check_target, pyspy_path

#: what a thread is doing, in words (the summary's and `--json`'s `state`)
STATES = ("running", "runnable", "lock", "gil", "sync", "io", "net", "sleep", "other", "idle")
_MAX_THREADS = 4096


@dataclass
class ThreadDump:
    tid: int
    name: str
    state: str
    syscall: str = ""
    #: innermost first
    frames: list[Frame] = field(default_factory=list)
    truncated: bool = False
    error: str = ""


@dataclass
class Dump:
    pid: int
    python: str
    source: str  # "memory" (spanflame's walker) or "py-spy"
    threads: list[ThreadDump]
    note: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        for t in d["threads"]:
            t["frames"] = [{"name": f[0], "filename": f[1], "line": f[2]} for f in t["frames"]]
        return d


def dump(pid: int) -> Dump:
    """Raises TargetError subclasses for a process that is gone, not Python or not readable."""
    check_target(pid)
    from probes import pyprocess
    try:
        proc = pyprocess.inspect(pid)
    except pyprocess.Unsupported as exc:
        return _pyspy_dump(pid, f"spanflame's walker does not read it ({exc.reason})")
    except pyprocess.MemoryReadError as exc:
        if not _alive(pid):
            raise NoSuchProcess(f"PID {pid} exited") from None
        return _pyspy_dump(pid, f"its interpreter could not be read ({exc})")
    return _memory_dump(pid, proc)


def _memory_dump(pid: int, proc) -> Dump:
    from probes import pyruntime, pythreads, pywalk
    from probes.decode import UNKNOWN_CODE
    from probes.pyprocess import ProcessMemory
    from probes.pysymbols import Symbolizer

    with ProcessMemory(pid) as mem:
        stacks = pywalk.thread_stacks(proc, mem)
        try:
            names = pythreads.thread_names(proc, mem)
        except Exception:  # names are a nicety; a torn read must not lose the stacks
            names = {}
    r = pyruntime.find(pid)
    gil = (r.start, r.end) if r is not None else None
    threads = []
    with Symbolizer(proc) as sym:
        for tid, ts in list(stacks.items())[:_MAX_THREADS]:
            frames = [sym.frame(code, check, instr) or UNKNOWN_CODE
                      for code, instr, check in ts.frames]
            state, call = thread_state(pid, tid, tuple(frames), gil)
            threads.append(ThreadDump(tid, names.get(tid, ""), state, call, frames,
                                      ts.truncated, ts.error))
    threads.sort(key=lambda t: t.tid != pid and t.tid)  # the main thread first
    return Dump(pid, f"CPython {proc.version[0]}.{proc.version[1]}", "memory", threads)


_SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 23: "select", 35: "nanosleep",
                  43: "accept", 44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg",
                  61: "wait4", 74: "fsync", 75: "fdatasync", 202: "futex", 232: "epoll_wait",
                  230: "clock_nanosleep", 270: "pselect6", 271: "ppoll", 281: "epoll_pwait",
                  288: "accept4", 441: "epoll_pwait2"}


def thread_state(pid: int, tid: int, pystack: tuple, gil: tuple[int, int] | None
                 ) -> tuple[str, str]:
    """(state, system call) of one thread, from /proc, classified like a probe's wait."""
    from agent.reasons import classify
    from probes.session import _proc_kstack

    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "other", ""
    if st == "R":
        return "running", ""
    nr, args = -1, []
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            parts = f.read().split()
        if parts and parts[0].lstrip("-").isdigit():
            nr = int(parts[0])
            args = [int(x, 16) for x in parts[1:7]]
    except (OSError, ValueError):
        pass
    wait = SimpleNamespace(
        blocked=True, syscall=nr, arg0=args[0] if args else 1,
        futex_addr=args[0] if nr == 202 and args else 0,
        kstack=_proc_kstack(pid, tid), state=2 if st == "D" else 1, pystack=pystack)
    reason = classify(wait, gil)
    call = _SYSCALL_NAMES.get(nr, f"syscall {nr}") if nr >= 0 else ""
    return reason, call


def _alive(pid: int) -> bool:
    try:
        import psutil
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def _pyspy_dump(pid: int, why: str) -> Dump:
    try:
        res = subprocess.run([pyspy_path(), "dump", "--pid", str(pid), "--json"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise SamplerError(f"py-spy dump of PID {pid} took over 60 s") from None
    if res.returncode != 0:
        if not _alive(pid):
            raise NoSuchProcess(f"PID {pid} exited")
        first = next((l for l in res.stderr.splitlines() if l.strip()), f"exit {res.returncode}")
        raise SamplerError(f"py-spy dump failed on PID {pid}: {first.strip()[:300]}")
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        raise SamplerError(f"py-spy dump of PID {pid} printed no JSON") from None
    threads = []
    for t in doc[:_MAX_THREADS] if isinstance(doc, list) else []:
        frames = [Frame(str(f.get("name", "?"))[:500], str(f.get("filename", ""))[:1000],
                        int(f.get("line") or 0)) for f in (t.get("frames") or [])[:1024]]
        state = "running" if t.get("active") else "idle"
        threads.append(ThreadDump(int(t.get("os_thread_id") or 0),
                                  str(t.get("thread_name") or "")[:200], state, "", frames))
    return Dump(pid, "", "py-spy", threads, note=f"stacks from py-spy: {why}")


def format_text(d: Dump) -> str:
    """Like `py-spy dump`: a header per thread, then its frames innermost first."""
    lines = [f"Process {d.pid}: {d.python or 'Python'} (stacks read by "
             f"{'spanflame' if d.source == 'memory' else 'py-spy'})"]
    if d.note:
        lines.append(f"note: {d.note}")
    for t in d.threads:
        what = t.state + (f" in {t.syscall}" if t.syscall else "")
        lines.append("")
        lines.append(f"Thread {t.tid} ({what}): {json.dumps(t.name)}" if t.name
                     else f"Thread {t.tid} ({what})")
        for f in t.frames:
            where = f"{f.filename}:{f.line}" if f.line else f.filename
            lines.append(f"    {f.name} ({where})" if where else f"    {f.name}")
        if t.truncated:
            lines.append("    [truncated: deeper frames not shown]")
        if t.error:
            lines.append(f"    [stack read stopped: {t.error}]")
    return "\n".join(lines)
